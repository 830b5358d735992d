"""Preference data in the layouts other tools read and write: Hugging Face preference sets (as
TRL trains on them), Label Studio ranking projects and Argilla datasets; in JSON Lines, JSON
arrays and Parquet. workbench.preferences reads every preference file (its `rows`) and hands
each record to `parse_any`, and the formats below to `export`.

    hf            {"prompt": str, "chosen": str, "rejected": str}, or "\\n\\nHuman: ..." transcripts
                  without a prompt: preferences' pairs, in .jsonl or .parquet
    hf-messages   TRL's conversational form: {"prompt": [{"role", "content"}, ...] (or a string),
                  "chosen": [{"role": "assistant", "content"}], "rejected": [...]}; or the implicit
                  prompt: "chosen" and "rejected" whole conversations that differ only in their
                  last, assistant message
    label-studio  the JSON export of a project (a list of tasks). Ranker: data {"prompt",
                  "items": [{"id", "title", "body"}]}, result {"type": "ranker", "value":
                  {"ranker": {RANKER_NAME: [item ids, best first]}}}; with Buckets the result
                  maps each bucket to its ids: buckets are tie groups, best first in the order
                  listed. Pairwise: data {"prompt", "answer1", "answer2"} (or text1/text2, ...),
                  result {"type": "pairwise", "value": {"selected": "left" | "right"}}
    argilla       v2 records as `to_json`/`to_disk` write them: {"id", "fields": {"prompt",
                  ANSWER...}, "responses": {QUESTION: [{"value": [ANSWER field names, best
                  first], "user_id"}]}}, or flattened as `to_datasets`/`to_hub` write them:
                  {"prompt", ANSWER..., "QUESTION.responses": [value, ...],
                  "QUESTION.responses.users": [...], "QUESTION.responses.status": [...]}. A
                  ranking given as [{"value", "rank"}] (Argilla's server form) may tie answers.

A K-way ranking becomes one Label Studio task or Argilla record per item with one annotation or
response per ranking; the Hugging Face forms hold pairs, every (better, worse) pair of it. Who
ranked travels in columns ("annotator", "simulated") or under a "workbench" key the other tool
ignores; files their tools wrote name annotators by the tool's user id ("label-studio:7",
"argilla:<uuid>"). Flags, scores and notes stay here: none of these layouts has a place for them.
"""
from __future__ import annotations

import io
import json
import uuid
from itertools import groupby
from pathlib import Path
from typing import Any, Iterable, Iterator

from engine.fsutil import atomic_write_bytes, atomic_write_text
from engine.transcripts import same_answer
from workbench.pref_records import Record, json_type, message_problem, parse_record
from workbench.preferences import _index_groups, _ranked, _write_jsonl, pair_records
from workbench.store import MAX_K, MIN_K, Item, Ranking, Store

FORMATS = ("hf", "hf-messages", "label-studio", "argilla")
SUFFIXES = {"hf": (".jsonl", ".parquet"), "hf-messages": (".jsonl", ".parquet"),
            "label-studio": (".json",), "argilla": (".json",)}
LS_PAIR_KEYS = (("answer1", "answer2"), ("text1", "text2"), ("response1", "response2"),
                ("response_a", "response_b"))
ARGILLA_PROMPT_KEYS = ("prompt", "instruction", "question")
ARGILLA_RECORD_KEYS = ("id", "status", "_server_id")     # flattened rows: not fields
_SPEAKER = {"user": "Human", "assistant": "Assistant", "system": "System"}


# --- one record -----------------------------------------------------------------------------

def parse_any(rec: Any, where: int | str) -> tuple[list[Record], list[str]]:
    """The Records of one value of a file (a Label Studio task or an Argilla record holds one
    per annotator), or the reasons, each naming its field, that it holds none."""
    if isinstance(rec, dict) and not ("answers" in rec or "ranking" in rec):
        tool = _tool_record(rec)
        if tool == "data":
            return _label_studio(rec, where)
        if tool == "fields":
            return _argilla_nested(rec, where)
        if tool:
            return [], [tool]
        if any(k.endswith(".responses") for k in rec):
            return _argilla_flat(rec, where)
        if any(isinstance(rec.get(k), list) for k in ("prompt", "chosen", "rejected")):
            return _hf_messages(rec, where)
    record, problems = parse_record(rec, where)
    return ([record] if record else []), problems


def _tool_record(rec: dict) -> str | None:
    """"data" for a Label Studio task, "fields" for a nested Argilla record, the problem of one
    whose field of the answers is missing or not an object, None for other records."""
    key, tool = (("data", "Label Studio task") if "annotations" in rec or "completions" in rec
                 else ("fields", "Argilla record") if "responses" in rec else (None, None))
    if key is None or isinstance(rec.get(key), dict):
        return key
    if any(k in rec for k in ("prompt", "chosen", "rejected")):     # a pair with extra columns
        return None
    got = "missing" if key not in rec else f"must be an object, got {json_type(rec[key])}"
    return f"field '{key}': {got} (a {tool} holds its prompt and answers there)"


def _prompt_text(turns: list[dict]) -> str:
    """A multi-turn prompt as text, as preferences writes a transcript's turns."""
    return "\n\n".join(f"{_SPEAKER[m['role']]}: {m['content']}" for m in turns)


def _kway(where, turns: list[dict], key: str, answers: list[str], ranking: list[list[int]],
          *, text: str | None = None, **who) -> tuple[list[Record], list[str]]:
    """One ranking as a Record, checked by pref_records.parse_record (annotator, simulated,
    repeat, K). A single user turn is a plain prompt, as everywhere else in the workbench."""
    if not turns or turns[-1]["role"] != "user":
        return [], [f"field '{key}' must end with a user turn (the answers reply to it)"]
    rec = {"prompt": turns[0]["content"], "answers": answers, "ranking": ranking}
    if len(turns) > 1:
        rec.update(prompt=text or _prompt_text(turns), messages=turns)
    rec.update({k: v for k, v in who.items() if v is not None})
    record, problems = parse_record(rec, where)
    return ([record] if record else []), problems


def _turns(v: Any, key: str, problems: list[str]) -> list[dict] | None:
    """Messages, or a string as one user message; None (and a problem) otherwise."""
    if isinstance(v, str):
        return [{"role": "user", "content": v}]
    why = message_problem(v, key)
    if why:
        problems.append(why)
        return None
    return [{"role": m["role"], "content": m["content"]} for m in v]


def _by_name(groups: list[list], names: list, what: str, among: str = "") -> list[list[int]]:
    """Groups of names (best first) as groups of answer indexes; ValueError says what's wrong."""
    index = {n: i for i, n in enumerate(names)}
    seen: set = set()
    for x in (x for g in groups for x in g):
        if not isinstance(x, (str, int)) or x not in index:
            among = among or "one of " + ", ".join(map(repr, names))
            raise ValueError(f"{what} {x!r} is not {among}")
        if x in seen:
            raise ValueError(f"{what} {x!r} is ranked twice")
        seen.add(x)
    missing = [repr(n) for n in names if n not in seen]
    if missing:
        raise ValueError(f"{what} {', '.join(missing)} not ranked: rank every one exactly once")
    return [[index[x] for x in g] for g in groups if g]


# --- Hugging Face: conversational (TRL) -----------------------------------------------------

def _hf_messages(rec: dict, where) -> tuple[list[Record], list[str]]:
    problems: list[str] = []
    who = {"annotator": rec.get("annotator"), "simulated": rec.get("simulated")}
    if rec.get("prompt") is None:       # implicit prompt: all but the last message is shared
        chosen = _conversation(rec.get("chosen"), "chosen", problems)
        rejected = _conversation(rec.get("rejected"), "rejected", problems)
        if problems:
            return [], problems
        if chosen[:-1] != rejected[:-1]:
            return [], ["'chosen' and 'rejected' differ before their last message (they must "
                        "share the conversation up to the final answer)"]
        answers = [chosen[-1]["content"], rejected[-1]["content"]]
        same = same_answer(*answers)
        return ([], [same]) if same else _kway(where, chosen[:-1], "chosen", answers, [[0], [1]], **who)
    turns = _turns(rec["prompt"], "prompt", problems)
    answers = [_completion(rec.get(k), k, problems) for k in ("chosen", "rejected")]
    if not problems and same_answer(*answers):     # a pair with nothing to prefer
        problems.append(same_answer(*answers))
    if problems:
        return [], problems
    return _kway(where, turns, "prompt", answers, [[0], [1]], **who)


def _conversation(v: Any, key: str, problems: list[str]) -> list[dict] | None:
    if isinstance(v, str) or not isinstance(v, list):
        problems.append(f"field '{key}' must be a list of {{role, content}} messages "
                        "(or give a 'prompt')")
        return None
    turns = _turns(v, key, problems)
    if turns is not None and (len(turns) < 2 or turns[-1]["role"] != "assistant"):
        problems.append(f"field '{key}' must end with the assistant's answer to an earlier turn")
        return None
    return turns


def _completion(v: Any, key: str, problems: list[str]) -> str:
    """An answer: a string, or a list holding one assistant message."""
    if isinstance(v, str):
        return v
    turns = _turns(v, key, problems) if isinstance(v, list) else None
    if turns is None:
        if not isinstance(v, list):
            problems.append(f"field '{key}' must be a string or a list of one assistant message")
        return ""
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        problems.append(f"field '{key}' must hold one assistant message, got "
                        f"{', '.join(m['role'] for m in turns) or 'none'}")
        return ""
    return turns[0]["content"]


# --- Label Studio ---------------------------------------------------------------------------

def _label_studio(task: dict, where) -> tuple[list[Record], list[str]]:
    anns = task.get("annotations", task.get("completions"))
    key = "annotations" if "annotations" in task else "completions"
    if not isinstance(anns, list):
        return [], [f"field '{key}' must be a list"]
    # A cancelled (skipped) annotation states no preference; a task nobody labelled is not
    # an error either: exports hold the whole project, labelled or not.
    live = [(i, a) for i, a in enumerate(anns)
            if not (isinstance(a, dict) and a.get("was_cancelled"))]
    if not live:
        return [], []
    problems: list[str] = []
    data = task["data"]
    turns = _ls_prompt(data, problems)
    out: list[Record] = []
    for i, ann in live:
        at = f"{key}[{i}]"
        if not isinstance(ann, dict):
            problems.append(f"field '{at}' must be an object")
            continue
        got = _ls_ranking(data, ann, at, problems)
        extra = ann.get("workbench") if isinstance(ann.get("workbench"), dict) else {}
        if got is None or turns is None:
            continue
        text = data.get("prompt") if isinstance(data.get("prompt"), str) else None
        recs, bad = _kway(where, turns, "data.prompt", *got, text=text,
                          annotator=extra.get("annotator", _ls_user(ann.get("completed_by"))),
                          simulated=extra.get("simulated"), repeat=extra.get("repeat"))
        out += recs
        problems += [f"{at}: {p}" for p in bad]
    return out, problems


def _ls_prompt(data: dict, problems: list[str]) -> list[dict] | None:
    if "messages" in data:      # the turns of a multi-turn prompt, as `export` writes them
        return _turns(data["messages"], "data.messages", problems)
    if not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
        problems.append("field 'data.prompt' must be a non-empty string")
        return None
    return _turns(data["prompt"], "data.prompt", problems)


def _ls_user(who: Any) -> str | None:
    """Label Studio exports the annotator as a user id, or as a user object."""
    if isinstance(who, dict):
        return who.get("email") or (f"label-studio:{who['id']}" if "id" in who else None)
    if isinstance(who, int) and not isinstance(who, bool):
        return f"label-studio:{who}"
    return who if isinstance(who, str) else None


def _ls_ranking(data: dict, ann: dict, at: str, problems: list[str]):
    """(answers, ranking) of the annotation's one ranker or pairwise result, or None."""
    results = ann.get("result")
    if not isinstance(results, list):
        problems.append(f"field '{at}.result' must be a list")
        return None
    found = [(j, r) for j, r in enumerate(results)
             if isinstance(r, dict) and r.get("type") in ("ranker", "pairwise")]
    if len(found) != 1:
        problems.append(f"field '{at}.result' must hold one 'ranker' or 'pairwise' result, "
                        f"found {len(found)}")
        return None
    j, res = found[0]
    at = f"{at}.result[{j}].value"
    if not isinstance(res.get("value"), dict):
        problems.append(f"field '{at}' must be an object")
        return None
    parse = _ls_ranker if res["type"] == "ranker" else _ls_pairwise
    return parse(data, res, at, problems)


def _ls_ranker(data: dict, res: dict, at: str, problems: list[str]):
    # The List tag the ranker sorts names its data with value="$items" in every template; its
    # own name (to_name) is tried first, as the config itself is not in the export.
    to = res.get("to_name")
    name = to if isinstance(to, str) and isinstance(data.get(to), list) else "items"
    items = data.get(name)
    if (not isinstance(items, list) or not all(isinstance(it, dict) for it in items)
            or not MIN_K <= len(items) <= MAX_K):
        problems.append(f"field 'data.{name}' must be a list of {MIN_K} to {MAX_K} "
                        "{id, body} items")
        return None
    ids = [it.get("id") for it in items]
    bad = [n for n, it in enumerate(items) if not isinstance(it.get("body"), str)]
    if bad:
        problems.append(f"field 'data.{name}[{bad[0]}].body' must be a string")
        return None
    if not all(isinstance(i, (str, int)) for i in ids) or len(set(ids)) != len(ids):
        problems.append(f"field 'data.{name}': every item needs an 'id' of its own")
        return None
    ranker = res["value"].get("ranker")
    if not isinstance(ranker, dict) or not ranker or not all(isinstance(v, list)
                                                            for v in ranker.values()):
        problems.append(f"field '{at}.ranker' must map a name to a list of item ids")
        return None
    if len(ranker) == 1 and "_" not in ranker:     # no buckets: one list, best first
        groups = [[x] for x in next(iter(ranker.values()))]
    elif ranker.get("_"):     # Label Studio's column of items not yet put in any bucket
        problems.append(f"field '{at}.ranker._': items {ranker['_']} are in no bucket")
        return None
    else:
        groups = [members for bucket, members in ranker.items() if bucket != "_"]
    try:
        return [it["body"] for it in items], _by_name(groups, ids, "item")
    except ValueError as e:
        problems.append(f"field '{at}.ranker': {e}")
        return None


def _ls_pairwise(data: dict, res: dict, at: str, problems: list[str]):
    names = str(res.get("to_name", "")).split(",")
    keys = names if len(names) == 2 and all(isinstance(data.get(n), str) for n in names) else \
        next((p for p in LS_PAIR_KEYS if all(k in data for k in p)), None)
    if keys is None:
        problems.append("field 'data' must hold the two answers as " +
                        ", ".join("/".join(p) for p in LS_PAIR_KEYS))
        return None
    bad = [k for k in keys if not isinstance(data[k], str)]
    selected = res["value"].get("selected")
    if bad:
        problems.append(f"field 'data.{bad[0]}' must be a string")
    elif selected not in ("left", "right"):
        problems.append(f"field '{at}.selected' must be 'left' or 'right', got {selected!r}")
    else:
        return [data[k] for k in keys], [[0], [1]] if selected == "left" else [[1], [0]]
    return None


# --- Argilla --------------------------------------------------------------------------------

def _argilla_nested(rec: dict, where) -> tuple[list[Record], list[str]]:
    responses = rec["responses"] or {}
    if not isinstance(responses, dict) or not all(isinstance(v, list) for v in responses.values()):
        return [], ["field 'responses' must map question names to lists of responses"]
    given, problems = [], []
    for q, rs in responses.items():
        for i, r in enumerate(rs):
            if not isinstance(r, dict) or "value" not in r:
                problems.append(f"field 'responses.{q}[{i}]' must be an object with a 'value'")
            else:
                given.append((q, f"responses.{q}[{i}].value", r["value"], r.get("user_id"),
                              r.get("status")))
    extra = rec.get("workbench") if isinstance(rec.get("workbench"), dict) else {}
    return _argilla(rec["fields"], "fields.", given, extra.get("users"), where, problems)


def _argilla_flat(rec: dict, where) -> tuple[list[Record], list[str]]:
    given, problems = [], []
    for key in (k for k in rec if k.endswith(".responses")):
        q, values = key[:-len(".responses")], rec[key] or []
        users, status = rec.get(f"{key}.users") or [], rec.get(f"{key}.status") or []
        if not all(isinstance(v, list) for v in (values, users, status)) \
                or len(users) not in (0, len(values)) or len(status) not in (0, len(values)):
            problems.append(f"field '{key}' must be a list with one entry per user in "
                            f"'{key}.users' (and '{key}.status')")
            continue
        given += [(q, f"{key}[{i}]", v, users[i] if users else None,
                   status[i] if status else None) for i, v in enumerate(values)]
    fields = {k: v for k, v in rec.items() if k not in ARGILLA_RECORD_KEYS and "." not in k}
    return _argilla(fields, "", given, None, where, problems)


def _names(value: Any) -> list[list] | None:
    """A ranking response as groups of names: a list of names (the client's form), or of
    {"value", "rank"} (the server's form, where equal ranks tie)."""
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) for v in value):
        return [[v] for v in value]
    if not all(isinstance(v, dict) and isinstance(v.get("value"), str) for v in value):
        return None
    if any(v.get("rank") is None for v in value):
        return [[v["value"]] for v in value]
    if not all(isinstance(v["rank"], int) and not isinstance(v["rank"], bool) for v in value):
        return None
    ranks = sorted({v["rank"] for v in value})
    return [[v["value"] for v in value if v["rank"] == r] for r in ranks]


def _argilla(fields: dict, prefix: str, given: list, users: dict | None, where,
             problems: list[str]) -> tuple[list[Record], list[str]]:
    """Records of the one question whose responses rank the record's fields."""
    # Drafts and discarded responses are no one's ranking (a flattened export keeps them).
    given = [g for g in given if g[4] in (None, "submitted")]
    ranked = [(g, _names(g[2])) for g in given]
    questions = {g[0] for g, names in ranked
                 if names and any(x in fields for n in names for x in n)}
    if problems or not given:
        return [], problems
    if len(questions) != 1:
        found = f"{', '.join(sorted(questions))} all do" if questions else "none does"
        return [], [f"one question's responses must rank the record's answer fields, best "
                    f"first (a RankingQuestion over fields such as 'answer_1'); {found}"]
    q = questions.pop()
    ranked = [(g, names) for g, names in ranked if g[0] == q]
    named = {x for _, names in ranked for n in names or [] for x in n if isinstance(x, str)}
    answers = [k for k in fields if k in named]
    key, turns = _argilla_prompt(fields, prefix, answers, problems)
    texts = [fields[k] for k in answers]
    bad = [k for k in answers if not isinstance(fields[k], str)]
    if bad:
        problems.append(f"field '{prefix}{bad[0]}' must be a string (an answer)")
    if problems:
        return [], problems
    out: list[Record] = []
    for (_, at, value, user, _), names in ranked:
        try:
            if names is None:
                raise ValueError("must be a list of answer field names, best first, or of "
                                 "{value, rank}")
            ranking = _by_name(names, answers, "answer",
                               f"a field of this record ({', '.join(fields)})")
        except ValueError as e:
            problems.append(f"field '{at}': {e}")
            continue
        extra = users.get(str(user)) if isinstance(users, dict) else None
        extra = extra if isinstance(extra, dict) else {}
        recs, bad = _kway(where, turns, prefix + key, texts, ranking,
                          annotator=extra.get("annotator", f"argilla:{user}" if user else None),
                          simulated=extra.get("simulated"), repeat=extra.get("repeat"))
        out += recs
        problems += bad
    return out, problems


def _argilla_prompt(fields: dict, prefix: str, answers: list[str], problems: list[str]):
    rest = [k for k in fields if k not in answers and isinstance(fields[k], (str, list))]
    key = next((k for k in ARGILLA_PROMPT_KEYS if k in rest), rest[0] if len(rest) == 1 else None)
    if key is None:
        problems.append(f"field '{prefix}prompt' is missing: name the prompt field one of "
                        f"{', '.join(ARGILLA_PROMPT_KEYS)}" + (f" (found {', '.join(rest)})"
                                                              if rest else ""))
        return "", None
    return key, _turns(fields[key], prefix + key, problems)


# --- export ---------------------------------------------------------------------------------

def _by_item(store: Store, **kw) -> Iterator[tuple[Item, list[Ranking]]]:
    """preferences._ranked grouped by item: its rankings come one after another."""
    for _, group in groupby(_ranked(store, **kw), key=lambda p: p[0].id):
        pairs = list(group)
        yield pairs[0][0], [r for _, r in pairs]


def _who(r: Ranking) -> dict:
    return {"annotator": r.annotator, "simulated": r.simulated,
            **({"repeat": True} if r.is_repeat else {})}


def _hf_rows(items, fmt: str) -> list[dict]:
    """Every (better, worse) pair: preferences' pairs for hf; for hf-messages the prompt as
    its turns and each answer as one assistant message."""
    out = []
    for item, rs in items:
        for p in (p for r in rs for p in pair_records(item, r)):
            if fmt == "hf-messages":
                p = {"prompt": item.messages or [{"role": "user", "content": item.prompt}],
                     "chosen": [{"role": "assistant", "content": p["chosen"]}],
                     "rejected": [{"role": "assistant", "content": p["rejected"]}],
                     "annotator": p["annotator"], "simulated": p["simulated"]}
            out.append(p)
    return out


def _ls_tasks(items) -> list[dict]:
    """One task per item. A ranker without buckets orders answers strictly; a file with any
    tie uses buckets rank_1..rank_K (tie groups, best first) for all its tasks, so that one
    labelling config (see the README) shows them all."""
    tied = any(len(g) > 1 for item, rs in items for r in rs for g in _index_groups(item, r))
    k = max((len(item.answers) for item, _ in items), default=0)
    tasks = []
    for item, rs in items:
        ids = [f"answer_{a.idx + 1}" for a in item.answers]
        data = {"prompt": item.prompt, **({"messages": item.messages} if item.messages else {}),
                "items": [{"id": i, "title": f"Answer {a.idx + 1}", "body": a.text}
                          for i, a in zip(ids, item.answers)]}
        anns = []
        for r in rs:
            groups = [[ids[i] for i in g] for g in _index_groups(item, r)]
            ranker = ({f"rank_{n + 1}": groups[n] if n < len(groups) else [] for n in range(k)}
                      if tied else {"rank": [x for g in groups for x in g]})
            anns.append({"id": r.id, "result": [{
                "id": f"wb{r.id}", "type": "ranker", "from_name": "rank", "to_name": "items",
                "origin": "manual", "value": {"ranker": ranker}}],
                "was_cancelled": False, "ground_truth": False, "workbench": _who(r)})
        tasks.append({"id": len(tasks) + 1, "data": data, "annotations": anns})
    return tasks


def _user_id(name: str) -> str:
    """Argilla names users by UUID: the same annotator gets the same one in every export."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"rlhf-workbench:annotator:{name}"))


def _argilla_records(items) -> list[dict]:
    """One record per item with a response per annotator. Argilla keeps one response per user
    and question, so a second ranking by the same annotator (a hidden repeat) starts another
    record of the item: the rankings keep their order."""
    out = []
    for item, rs in items:
        fields = {"prompt": item.messages or item.prompt,
                  **{f"answer_{a.idx + 1}": a.text for a in item.answers}}
        groups: list[list[Ranking]] = [[]]
        for r in rs:
            if any(o.annotator == r.annotator for o in groups[-1]):
                groups.append([])
            groups[-1].append(r)
        for n, group in enumerate(groups):
            responses = []
            for r in group:
                named = [[f"answer_{i + 1}" for i in g] for g in _index_groups(item, r)]
                value = ([x for g in named for x in g] if all(len(g) == 1 for g in named) else
                         [{"value": x, "rank": j + 1} for j, g in enumerate(named) for x in g])
                responses.append({"value": value, "user_id": _user_id(r.annotator),
                                  "status": "submitted"})
            out.append({"id": f"item-{item.id}" + (f"-{n + 1}" if n else ""),
                        "fields": fields, "metadata": {}, "suggestions": {},
                        "responses": {"ranking": responses}, "vectors": {}, "_server_id": None,
                        "workbench": {"users": {_user_id(r.annotator): _who(r) for r in group}}})
    return out


def _write_parquet(path: Path, rows: list[dict], fmt: str) -> None:
    """A fixed schema, so an empty export and a column that is null in every row still read."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    text = msgs if fmt == "hf-messages" else pa.string()
    cols = [("prompt", text), ("chosen", text), ("rejected", text), ("annotator", pa.string()),
            ("simulated", pa.bool_())] + ([("messages", msgs)] if fmt == "hf" else [])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(cols)), buf)
    atomic_write_bytes(path, buf.getvalue())


def export(store: Store, path: str | Path, *, fmt: str, include_simulated: bool,
           include_human: bool = True, batch_ids: Iterable[int] | None = None,
           include_repeats: bool = False) -> dict:
    """preferences.export_rankings for the formats of this module; the same counts."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of kway, pairs, {', '.join(FORMATS)}; got {fmt!r}")
    if path.suffix.lower() not in SUFFIXES[fmt]:
        raise ValueError(f"{fmt} files end in {' or '.join(SUFFIXES[fmt])}, not {path.name!r}")
    items = list(_by_item(store, batch_ids=batch_ids, include_simulated=include_simulated,
                          include_human=include_human, include_repeats=include_repeats))
    rankings = [r for _, rs in items for r in rs]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("hf", "hf-messages"):
        rows = _hf_rows(items, fmt)
        if path.suffix.lower() == ".parquet":
            _write_parquet(path, rows, fmt)
        else:
            _write_jsonl(path, rows)
    else:
        rows = _ls_tasks(items) if fmt == "label-studio" else _argilla_records(items)
        atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
    sim = sum(r.simulated for r in rankings)
    return {"records": len(rows), "rankings": len(rankings), "human": len(rankings) - sim,
            "simulated": sim}
