"""Preference data in and out: K-way rankings, {prompt, chosen, rejected} pairs, transcripts.

Formats (JSON Lines, one record per line; `.gz` files are read transparently):

    K-way    {"prompt", "answers": [text, ...], "ranking": [[0], [2, 3], [1]],
              "annotator", "simulated", "flags": [[flag, ...] per answer], "scores": [1-7 or null
              per answer]}; optional "messages" (turns of a multi-turn prompt), "note", "repeat"
    pairs    {"prompt", "chosen", "rejected"}; optional "messages", "annotator", "simulated"
    transcript  {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}, the form of
             public preference sets: the shared conversation up to the last "\\n\\nAssistant:"
             is the prompt (several turns allowed), the two final assistant turns are the answers
    others   Hugging Face (TRL) message lists, Label Studio and Argilla exports, in JSONL, JSON
             or Parquet: workbench/pref_formats.py reads and writes them

The ranking groups answer indexes best first; answers in one group are tied. Pairs are what
the reward model trains on: every (better, worse) pair of a ranking, C(K, 2) of them when
there are no ties, none for a tie.

Human and simulated labels are never mixed silently: every exported record says who ranked it
and whether that was a simulated annotator, and the exporters make the caller choose whether
simulated rankings go in. Hidden repeats (a second ranking of an item by the same annotator, for
agreement) stay out unless asked for; the first ranking is the label.

Importing makes one batch per file. Records with the same prompt and answers ranked by
different annotators share one item, so agreement can be measured on imported data too; a record
of a prompt and answers an item of the project already has (in any order of the answers, when
their texts differ), by an annotator who has not ranked that item, joins that item instead, so a
colleague's rankings of an exported batch, made in another tool, are compared with the ones
made here.
Records without an "annotator" are credited to an annotator named after the file, human unless
the caller says otherwise. Every record is checked before anything is written, and all problems
come back in one InputError as `FILE:LINE: reason`. Importing the same file content twice
returns the batch the first import made. An item all of whose rankings the project already
holds (the same annotator, prompt, answers and order, as when a project's own export is imported
back) is left out and its rankings counted, so none is trained on twice; an item with one new
ranking joins the project's item if its other rankings are that item's (a new hidden repeat goes
beside its first ranking, a new annotator beside the others'), and comes whole otherwise.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

from engine.fsutil import atomic_write_text
from engine.transcripts import fold_copies
from workbench.pref_records import Record, read_preferences
from workbench.project import output_problem
from workbench.store import InputError, Item, Ranking, Store



@dataclass
class ImportResult:
    batch_id: int
    records: int
    items: int
    existing: bool = False                  # True: this file was imported before; nothing new
    already: int = 0                        # the project's rankings the left-out records repeat
    already_records: int = 0                # the file's records left out for that (a pairs file
                                            # has several per ranking)
    skipped: list[str] = field(default_factory=list)   # problems of records left out (on_error="skip")
    joined: int = 0                         # of `records`, those that joined items the project had
    joined_items: int = 0                   # and how many such items, in
    joined_batches: tuple[int, ...] = ()    # these batches; batch_id is the first when no new
                                            # item made a batch of its own

    @property
    def held(self) -> tuple[str, int, str]:
        """What the file's left-out records are, as the CLI and the app say it: ("ranking", 3, "")
        or, for a pairs file, ("record", 6, " of 1 ranking(s)")."""
        if self.already_records != self.already:
            return "record", self.already_records, f" of {self.already} ranking(s)"
        return "ranking", self.already, ""

    def joined_clause(self, batch_names: dict[int, str]) -> str:
        """What joined items the project had, as the CLI and the app say it ('' if none)."""
        if not self.joined:
            return ""
        where = ", ".join(repr(batch_names[b]) for b in self.joined_batches)
        return (f"{self.joined} ranking(s) joined {self.joined_items} item(s) the project had "
                f"(batch {where}), where agreement compares them with the rankings made there")


# --- export ---------------------------------------------------------------------------------

def _ranked(store: Store, *, batch_ids: Iterable[int] | None, include_simulated: bool,
            include_human: bool = True, include_repeats: bool = False
            ) -> Iterator[tuple[Item, Ranking]]:
    """(item, ranking) for every active ranking: by batch, then item position, then age."""
    ids = sorted(batch_ids) if batch_ids is not None else [b.id for b in store.batches()]
    for batch_id in ids:
        by_item: dict[int, list[Ranking]] = {}
        for r in store.rankings(batch_id=batch_id, include_simulated=include_simulated,
                                include_human=include_human, include_repeats=include_repeats):
            by_item.setdefault(r.item_id, []).append(r)
        if not by_item:
            continue
        for item in store.items(batch_id, list(by_item)):
            for r in by_item[item.id]:
                yield item, r


def _index_groups(item: Item, r: Ranking) -> list[list[int]]:
    idx = {a.id: a.idx for a in item.answers}
    # Tied answers have no order among themselves; sorting makes exports comparable.
    return [sorted(idx[a] for a in g) for g in r.ordering]


def _prompt_fields(item: Item) -> dict:
    return {"prompt": item.prompt, **({"messages": item.messages} if item.messages else {})}


def kway_record(item: Item, r: Ranking) -> dict:
    rec = {**_prompt_fields(item), "answers": [a.text for a in item.answers],
           "ranking": _index_groups(item, r), "annotator": r.annotator, "simulated": r.simulated,
           "flags": [r.flags.get(a.id, []) for a in item.answers],
           "scores": [r.scores.get(a.id) for a in item.answers]}
    if r.note:
        rec["note"] = r.note
    if r.is_repeat:
        rec["repeat"] = True
    return rec


def pair_records(item: Item, r: Ranking) -> list[dict]:
    """Every (better, worse) pair of the ranking; answers in one tie group give no pair, nor do
    two answers of one text ranked apart (a sampled duplicate: the pair would say nothing, and
    every reader of pairs, ours included, refuses it)."""
    groups = _index_groups(item, r)
    texts = [a.text for a in item.answers]
    return [{**_prompt_fields(item), "chosen": texts[w], "rejected": texts[l],
             "annotator": r.annotator, "simulated": r.simulated}
            for gi, better in enumerate(groups) for worse in groups[gi + 1:]
            for w in better for l in worse if texts[w] != texts[l]]


def _write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    lines = [json.dumps(rec, ensure_ascii=False) + "\n" for rec in records]
    atomic_write_text(Path(path), "".join(lines))
    return len(lines)


def export_rankings(store: Store, path: str | Path, *, include_simulated: bool,
                    include_human: bool = True, fmt: str = "kway",
                    batch_ids: Iterable[int] | None = None, include_repeats: bool = False) -> dict:
    """Write rankings as K-way records (fmt="kway"), pairs (fmt="pairs") or another tool's
    layout (workbench.pref_formats.FORMATS); returns counts:
    {"records", "rankings", "human", "simulated"}. A path that would replace the project's
    database, settings, data or a run's files is refused (ValueError) before anything is read;
    a folder of the path that does not exist yet is made."""
    why = output_problem(Path(path), store.path.parent)
    if why:
        raise ValueError(f"{path} {why}: write the export elsewhere")
    if fmt not in ("kway", "pairs"):
        from workbench.pref_formats import export     # it builds on this module
        return export(store, path, fmt=fmt, include_simulated=include_simulated,
                      include_human=include_human, batch_ids=batch_ids,
                      include_repeats=include_repeats)
    counts = {"records": 0, "rankings": 0, "human": 0, "simulated": 0}
    records: list[dict] = []
    for item, r in _ranked(store, batch_ids=batch_ids, include_simulated=include_simulated,
                           include_human=include_human, include_repeats=include_repeats):
        records += [kway_record(item, r)] if fmt == "kway" else pair_records(item, r)
        counts["rankings"] += 1
        counts["simulated" if r.simulated else "human"] += 1
    Path(path).parent.mkdir(parents=True, exist_ok=True)     # as `workbench report --out` does
    counts["records"] = _write_jsonl(path, records)
    return counts


def rankings_for_training(store: Store, *, include_simulated: bool, include_human: bool = True,
                          batch_ids: Iterable[int] | None = None,
                          min_agreement: float | None = None, keep_single: bool = True,
                          aggregate: str = "each") -> list[dict]:
    """The reward model's input: {prompt, answers, ranking} (+ messages for a multi-turn
    prompt) per ranking, repeats left out. A ranking that ties every answer teaches nothing
    (it has no pair), so it is left out too, as is one whose answers are all one text (the
    engine counts copies once: engine.transcripts.fold_copies).

    Agreement options (workbench.agreement_items.for_training), over the rankings chosen here:
    `min_agreement` keeps only items whose rankings agree on at least that share of answer-pair
    comparisons (items ranked once are kept unless `keep_single` is False); aggregate="borda"
    gives one record per item, the Borda aggregate of its rankings, instead of every ranking."""
    from itertools import groupby

    from workbench.agreement_items import check_choice, for_training
    check_choice(min_agreement, aggregate)
    out = []
    ranked = _ranked(store, batch_ids=batch_ids, include_simulated=include_simulated,
                     include_human=include_human)
    # _ranked gives an item's rankings one after another: one group per item.
    for _, group in groupby(ranked, key=lambda pair: pair[0].id):
        pairs = list(group)
        item = pairs[0][0]
        text_of = {a.id: a.text for a in item.answers}
        orderings = for_training([r.ordering for _, r in pairs], min_agreement=min_agreement,
                                 keep_single=keep_single, aggregate=aggregate, text_of=text_of)
        idx = {a.id: a.idx for a in item.answers}
        for ordering in orderings:
            if len(fold_copies(ordering, text_of)) > 1:
                out.append({**_prompt_fields(item), "answers": [a.text for a in item.answers],
                            "ranking": [sorted(idx[a] for a in g) for g in ordering]})
    return out


class TrainingCounts(NamedTuple):
    human: int          # rankings that hold a preference, made by people
    simulated: int      # ... by the simulated annotator
    tied: int           # rankings that tie every answer: no pair, so not trained on


def count_for_training(store: Store) -> TrainingCounts:
    """How many records rankings_for_training gives of each kind, and how many it leaves out for
    having no pair (every answer tied, or all one text), reading the texts of the items with
    copies only (under half the time of reading the items; the reward page counts on show)."""
    human = simulated = tied = 0
    copied = store.copied_answers()
    for r in store.rankings(include_simulated=True, include_repeats=False):
        texts = copied.get(r.item_id)
        if len(fold_copies(r.ordering, texts) if texts else r.ordering) < 2:
            tied += 1
        elif r.simulated:
            simulated += 1
        else:
            human += 1
    return TrainingCounts(human, simulated, tied)


def write_rm_dataset(store: Store, path: str | Path, *, include_simulated: bool,
                     include_human: bool = True, batch_ids: Iterable[int] | None = None,
                     min_agreement: float | None = None, keep_single: bool = True,
                     aggregate: str = "each") -> int:
    """rankings_for_training as JSONL at `path` (written atomically); returns the record count."""
    return _write_jsonl(path, rankings_for_training(
        store, include_simulated=include_simulated, include_human=include_human,
        batch_ids=batch_ids, min_agreement=min_agreement, keep_single=keep_single,
        aggregate=aggregate))


# --- import ---------------------------------------------------------------------------------

def _group(records: list[Record], path: Path, default_annotator: str, default_simulated: bool,
           kinds: dict[str, str], problems: list[str]) -> list[tuple[dict, list[Record]]]:
    """Items (in first-seen order) with the records that rank them. A record joins an earlier
    item with the same prompt and answers if its annotator has not ranked that item yet (or,
    for a repeat, has ranked it once); otherwise it starts a new item."""
    items: list[tuple[dict, list[Record]]] = []
    by_key: dict[tuple, list[int]] = {}
    for rec in records:
        rec.annotator = rec.annotator or default_annotator
        rec.simulated = default_simulated if rec.simulated is None else rec.simulated
        kind = "simulated" if rec.simulated else "human"
        if kinds.setdefault(rec.annotator, kind) != kind:
            problems.append(f"{path}:{rec.line}: annotator {rec.annotator!r} is "
                            f"{kinds[rec.annotator]} elsewhere; one name cannot be both")
            continue
        key = (rec.prompt, json.dumps(rec.messages), tuple(rec.answers))
        slots = by_key.setdefault(key, [])

        def has(i: int, repeat: bool) -> bool:
            return any(r.annotator == rec.annotator and r.repeat == repeat for r in items[i][1])

        if rec.repeat:
            match = [i for i in slots if has(i, False) and not has(i, True)]
            if not match:
                problems.append(f"{path}:{rec.line}: a repeat ranking with no earlier ranking of "
                                f"the same answers by {rec.annotator!r} before it")
                continue
            items[match[-1]][1].append(rec)
            continue
        match = [i for i in slots if not has(i, False)]
        if match:
            items[match[0]][1].append(rec)
        else:
            slots.append(len(items))
            items.append(({"prompt": rec.prompt, "messages": rec.messages,
                           "answers": [{"text": a} for a in rec.answers],
                           "meta": {"line": rec.line}}, [rec]))
    return items


def _signature(annotator: str, simulated: bool, prompt: str, messages, answers: Sequence[str],
               groups: Iterable[Iterable[int]], repeat: bool) -> tuple:
    """What makes two rankings the same, wherever they came from: the answers' texts in each
    group, so that another tool's order of the answers is the same ranking."""
    return (annotator, simulated, prompt, json.dumps(messages or None), tuple(sorted(answers)),
            tuple(tuple(sorted(answers[i] for i in g)) for g in groups), repeat)


def _known(store: Store, annotators: set[str]) -> dict[tuple, tuple[int, int]]:
    """The signature of every active ranking by these annotators, and of each (better, worse)
    pair it holds (an export as pairs comes back as two-answer records, none of them marked a
    repeat), with its (batch, ranking id)."""
    out: dict[tuple, tuple[int, int]] = {}
    for item, r in _ranked(store, batch_ids=None, include_simulated=True, include_repeats=True):
        if r.annotator not in annotators:
            continue
        texts = [a.text for a in item.answers]
        groups = _index_groups(item, r)
        out.setdefault(_signature(r.annotator, r.simulated, item.prompt, item.messages, texts, groups,
                                  r.is_repeat), (item.batch_id, r.id))
        for pair in pair_records(item, r):
            out.setdefault(_signature(r.annotator, r.simulated, item.prompt, item.messages,
                                      (pair["chosen"], pair["rejected"]), [[0], [1]], False),
                           (item.batch_id, r.id))
    return out


class _Held(NamedTuple):
    records: int                # the file's records the project already holds
    rankings: int               # the project's rankings those records repeat
    batch: int | None           # the batch of the first of them


class _Join(NamedTuple):
    item: Item                  # the project's item the records rank
    order: list[int]            # the file's answer i is the item's answer order[i]
    records: list[Record]


def _answer_order(item: Item, answers: Sequence[str]) -> list[int] | None:
    """Where the file's answers sit among the item's: the same texts in the same order, or, when
    no two texts are one, in any order; None when they are other answers."""
    texts = [a.text for a in item.answers]
    if texts == list(answers):
        return list(range(len(texts)))
    if len(set(texts)) == len(texts) and sorted(texts) == sorted(answers):
        where = {t: i for i, t in enumerate(texts)}
        return [where[a] for a in answers]
    return None


class _Ranked(NamedTuple):
    """Who ranked one of the project's items: (annotator, is repeat) and the rankings' ids."""
    who: set
    ids: set


def _join(store: Store, item: dict, recs: list[Record], held: list, seen: dict[int, _Ranked]
          ) -> _Join | None:
    """The oldest of the project's items with this prompt and these answers that the file's new
    records can join: each of the file's held records is a ranking of that very item, and no new
    one's annotator has ranked it (as a first ranking, or as a repeat) there already."""
    fresh = [r for r, h in zip(recs, held) if h is None]
    for existing in store.items_of_prompt(item["prompt"], item["messages"]):
        order = _answer_order(existing, [a["text"] for a in item["answers"]])
        if order is None:
            continue
        if existing.id not in seen:
            rs = store.rankings(item_id=existing.id)
            seen[existing.id] = _Ranked({(r.annotator, r.is_repeat) for r in rs}, {r.id for r in rs})
        ranked = seen[existing.id]
        if (all(h[1] in ranked.ids for h in held if h is not None)
                and not {(r.annotator, r.repeat) for r in fresh} & ranked.who):
            ranked.who.update((r.annotator, r.repeat) for r in fresh)
            return _Join(existing, order, fresh)
    return None


def _sort_out(store: Store, items: list[tuple[dict, list[Record]]]
              ) -> tuple[list[tuple[dict, list[Record]]], list[_Join], _Held]:
    """(the file's items that are new, those whose new rankings join an item the project has,
    what the file holds that the project has). An item all of whose rankings the project holds
    is left out. One with a new ranking joins the project's item of its prompt and answers when
    the rest of its rankings are that item's (so a new annotator's ranking sits beside the others'
    it is to agree with, and a new hidden repeat beside its first ranking); if none is, it comes
    whole, as a new item."""
    known = _known(store, {r.annotator for _, recs in items for r in recs})
    new, joins, seen = [], [], {}
    records, held_ids, first = 0, set(), None
    for item, recs in items:
        held = [known.get(_signature(r.annotator, r.simulated, r.prompt, r.messages, r.answers,
                                     r.ranking, r.repeat)) for r in recs]
        join = _join(store, item, recs, held, seen) if None in held else None
        if None in held and join is None:
            new.append((item, recs))
            continue
        if join is not None:
            joins.append(join)
        old = [h for h in held if h is not None]
        records += len(old)
        held_ids.update(ranking for _, ranking in old)
        first = old[0][0] if first is None and old else first
    return new, joins, _Held(records, len(held_ids), first)


def import_preferences(store: Store, path: str | Path, *, annotator: str | None = None,
                       simulated: bool = False, name: str | None = None,
                       on_error: str = "raise") -> ImportResult:
    """Import a preference file, in one transaction: rankings of items the project has join
    them (see the module's docstring), the other items make a new batch with their rankings.

    `annotator` (default: the file's name) and `simulated` apply to records that do not say.
    on_error="raise" refuses the file if any record is bad; "skip" imports the good records
    and reports the bad ones in ImportResult.skipped (public sets have a few bad records)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    key = "preferences:" + hashlib.sha256(path.read_bytes()).hexdigest()
    records, problems = read_preferences(path)
    with store.transaction():
        existing = store.batch_by_source_key(key)
        if existing is not None:
            return ImportResult(existing.id, len(records), existing.n_items, existing=True)
        kinds = {a.name: a.kind for a in store.annotators()}
        items = _group(records, path, annotator or path.name, simulated, kinds, problems)
        items, joins, held = _sort_out(store, items)
        if held.records and not items and not joins and not (problems and on_error == "raise"):
            return ImportResult(held.batch, 0, 0, existing=True, already=held.rankings,
                                already_records=held.records, skipped=problems)
        if problems and (on_error == "raise" or not (items or joins)):
            raise InputError(problems, f"preference file {path}")
        batch_id = None
        if items:
            ks = {len(it["answers"]) for it, _ in items}
            batch_id = store.create_batch(
                name if name is not None else store.unique_batch_name(path.name),
                [it for it, _ in items], kind="imported", source=str(path.resolve()), source_key=key,
                settings={"format": "preferences", "file": path.name},
                k=ks.pop() if len(ks) == 1 else None)
        ranked = [_Join(item, list(range(len(item.answers))), recs)
                  for item, (_, recs) in zip(store.items(batch_id) if items else [], items)]
        n = _add_rankings(store, ranked + joins, path.name)
    joined = tuple(dict.fromkeys(j.item.batch_id for j in joins))
    return ImportResult(batch_id if batch_id is not None else joined[0], n, len(items),
                        skipped=problems, already=held.rankings, already_records=held.records,
                        joined=sum(len(j.records) for j in joins), joined_items=len(joins),
                        joined_batches=joined)


def _add_rankings(store: Store, ranked: list[_Join], file_name: str) -> int:
    """Store each record's ranking on its item, in a session of its annotator on the item's
    batch that says which file it came from; returns how many."""
    sessions: dict[tuple[int, str], int] = {}
    n = 0
    for item, order, recs in ranked:
        ids = [item.answer_ids[j] for j in order]       # the file's answer i is ids[i]
        for rec in recs:
            key = (item.batch_id, rec.annotator)
            if key not in sessions:
                who = store.annotator(rec.annotator, "simulated" if rec.simulated else "human")
                sessions[key] = store.session(item.batch_id, who.id, {"imported_from": file_name})[0]
            store.add_ranking(
                sessions[key], item.id, [[ids[i] for i in g] for g in rec.ranking],
                is_repeat=rec.repeat, note=rec.note,
                flags={ids[i]: f for i, f in enumerate(rec.flags or []) if f},
                scores={ids[i]: s for i, s in enumerate(rec.scores or []) if s is not None})
            n += 1
    return n
