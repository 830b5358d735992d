"""workbench.pref_formats: Hugging Face (strings, TRL messages; JSONL, Parquet), Label Studio and
Argilla preference data in and out; round trips, files their own libraries wrote, bad input."""
from __future__ import annotations

import json

import pytest

from tests.test_preferences import HH_MULTI, ranked_batch, read, write
from workbench.annotation import AnnotationSession
from workbench.pref_records import read_preferences, rows
from workbench.preferences import export_rankings, import_preferences
from workbench.store import InputError, Store

LOST = ("flags", "scores", "note")      # labels only the workbench's own K-way form carries


@pytest.fixture
def store(tmp_path):
    """ranked_batch (ties, two annotators, one simulated, a hidden repeat) and a multi-turn
    prompt ranked by a second human."""
    s = Store(tmp_path / "a.db")
    ranked_batch(s)
    import_preferences(s, write(tmp_path / "hh.jsonl", [{**HH_MULTI, "annotator": "bea"}]))
    yield s
    s.close()


def kway(store, path, **kw):
    """The K-way export, without the labels no other format carries."""
    export_rankings(store, path, include_simulated=True, include_repeats=True, **kw)
    return [{k: v for k, v in r.items() if k not in LOST} for r in read(path)]


def table(path):
    """A file's records as our reader sees them (Parquet rows, JSON array, JSON Lines)."""
    problems: list[str] = []
    out = [rec for _, rec in rows(path, problems)]
    assert problems == []
    return out


def refused_with(store, expected: dict) -> None:
    """Each file is refused with exactly its problems, and nothing is imported."""
    for path, problems in expected.items():
        with pytest.raises(InputError) as e:
            import_preferences(store, path)
        assert e.value.problems == problems, path
    assert store.batches() == []


@pytest.mark.parametrize("fmt,suffix", [("hf", ".jsonl"), ("hf", ".parquet"),
                                        ("hf-messages", ".jsonl"), ("hf-messages", ".parquet")])
def test_hugging_face_pairs_round_trip(tmp_path, store, fresh, fmt, suffix):
    first = tmp_path / f"first{suffix}"
    counts = export_rankings(store, first, include_simulated=False, fmt=fmt)
    # ranked_batch's human ranks 3 items with 5 pairs each; the multi-turn item gives 1.
    assert counts == {"records": 16, "rankings": 4, "human": 4, "simulated": 0}
    recs = table(first)
    multi = recs[-1]
    if fmt == "hf":
        assert multi["prompt"].startswith("Human: Hi!") and multi["chosen"] == "5"
        assert multi["messages"][-1] == {"role": "user", "content": "Add 2 and 3."}
    else:
        assert multi["prompt"] == [{"role": "user", "content": "Hi!"},
                                   {"role": "assistant", "content": "Hello. How can I help?"},
                                   {"role": "user", "content": "Add 2 and 3."}]
        assert (multi["chosen"], multi["rejected"]) == ([{"role": "assistant", "content": "5"}],
                                                         [{"role": "assistant", "content": "23"}])
        assert recs[0]["prompt"] == [{"role": "user", "content": "What is 1 + 1?"}]
    assert (multi["annotator"], multi["simulated"]) == ("bea", False)
    import_preferences(fresh, first)
    second = tmp_path / f"second{suffix}"
    export_rankings(fresh, second, include_simulated=False, fmt=fmt)
    assert table(second) == recs
    # Pairs carry who ranked them: the multi-turn item is bea's again, human.
    assert {(a.name, a.kind) for a in fresh.annotators()} == {("ann", "human"), ("bea", "human")}


@pytest.mark.parametrize("fmt", ["label-studio", "argilla"])
def test_kway_rankings_with_ties_and_repeats_round_trip(tmp_path, store, fresh, fmt):
    out = tmp_path / "theirs.json"
    counts = export_rankings(store, out, include_simulated=True, include_repeats=True, fmt=fmt)
    # One task per item (Argilla: plus a record for the hidden repeat, one response per user).
    assert counts == {"records": 4 if fmt == "label-studio" else 5, "rankings": 8, "human": 5,
                      "simulated": 3}
    result = import_preferences(fresh, out)
    assert (result.records, result.items) == (8, 4)
    assert kway(fresh, tmp_path / "back.jsonl") == kway(store, tmp_path / "first.jsonl")
    assert {(a.name, a.kind) for a in fresh.annotators()} == \
           {("ann", "human"), ("bea", "human"), ("sim", "simulated")}


def strict_store(path):
    s = Store(path)
    b = s.create_batch("b", [{"prompt": f"p{i}", "answers": [{"text": t} for t in "xyz"]}
                             for i in range(2)], k=3)
    for name, order in (("ann", [3, 1, 2]), ("bo", [1, 2, 3])):
        session = AnnotationSession(s, b, name, seed=0)
        while session.current() is not None:
            session.submit(order)
    return s


def test_strict_rankings_use_the_plain_ranker_and_a_list_of_names(tmp_path, fresh):
    s = strict_store(tmp_path / "s.db")
    first = kway(s, tmp_path / "first.jsonl")
    ls, ag = tmp_path / "ls.json", tmp_path / "ag.json"
    export_rankings(s, ls, include_simulated=False, fmt="label-studio")
    export_rankings(s, ag, include_simulated=False, fmt="argilla")
    s.close()
    names = [[f"answer_{g[0] + 1}" for g in r["ranking"]] for r in first[:2]]
    [result] = json.loads(ls.read_text())[0]["annotations"][0]["result"]
    assert result["value"] == {"ranker": {"rank": names[0]}}
    ranking = json.loads(ag.read_text())[0]["responses"]["ranking"]
    assert [r["value"] for r in ranking] == names
    for i, path in enumerate((ls, ag)):
        other = Store(tmp_path / f"{i}.db")
        import_preferences(other, path)
        assert kway(other, tmp_path / f"{i}.jsonl") == first
        other.close()


def test_label_studio_exports_as_label_studio_writes_them(tmp_path, fresh):
    """Shaped like Label Studio's own exports: a Pairwise project (HumanSignal's RLHF tutorial:
    data prompt/answer1/answer2, completed_by a user id) and a Ranker with buckets."""
    def ann(user, result, **kw):
        return {"id": 9, "completed_by": user, "result": [result], "was_cancelled": False,
                "ground_truth": False, "lead_time": 3.2, "task": 1, **kw}

    def pw(side):
        return {"value": {"selected": side}, "id": "Sba4F4tuVh", "from_name": "comparison",
                "to_name": "comparison", "type": "pairwise", "origin": "manual"}

    items = [{"id": "llm_1", "title": "LLM 1", "body": "Wars."},
             {"id": "llm_2", "title": "LLM 2", "body": "Fire."},
             {"id": "llm_3", "title": "LLM 3", "body": "Time."}]
    buckets = {"from_name": "rank", "to_name": "results", "type": "ranker",
               "value": {"ranker": {"best": ["llm_2", "llm_3"], "worst": ["llm_1"]}}}
    tasks = [
        {"id": 1, "data": {"prompt": "Q1?", "answer1": "a", "answer2": "b"}, "predictions": [],
         "annotations": [ann(2, pw("left")), ann(3, pw("right"), was_cancelled=True)]},
        {"id": 2, "data": {"prompt": "Q2?", "answer1": "c", "answer2": "d"}, "annotations": []},
        {"id": 3, "data": {"prompt": "Q1?", "answer1": "a", "answer2": "b"},
         "annotations": [ann({"id": 4, "email": "kim@example.org"}, pw("right"))]},
        {"id": 4, "data": {"prompt": "Why?", "items": items},
         "annotations": [ann(2, buckets), ann(4, {**buckets, "value": {"ranker": {
             "rank": ["llm_3", "llm_1", "llm_2"]}}})]},
    ]
    path = tmp_path / "project-1-at-2024.json"
    path.write_text(json.dumps(tasks, indent=2))
    result = import_preferences(fresh, path)
    # The unlabelled task and the cancelled annotation are no one's preference.
    assert (result.records, result.items) == (4, 2)
    got = [(r["prompt"], r["answers"], r["ranking"], r["annotator"])
           for r in kway(fresh, tmp_path / "k.jsonl")]
    assert got == [("Q1?", ["a", "b"], [[0], [1]], "label-studio:2"),
                   ("Q1?", ["a", "b"], [[1], [0]], "kim@example.org"),
                   ("Why?", ["Wars.", "Fire.", "Time."], [[1, 2], [0]], "label-studio:2"),
                   ("Why?", ["Wars.", "Fire.", "Time."], [[2], [0], [1]], "label-studio:4")]


def test_nothing_ranked_yet_is_said_so(tmp_path, fresh):
    path = tmp_path / "new.json"
    path.write_text(json.dumps([{"id": 1, "data": {"prompt": "p"}, "annotations": []}]))
    with pytest.raises(InputError, match=r"new.json: no preference records \(none of its 1 "
                                         r"records is ranked\)"):
        import_preferences(fresh, path)


def test_bad_fields_give_one_line_each_and_nothing_is_written(tmp_path, fresh):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    msgs = write(tmp_path / "trl.jsonl", [
        {"prompt": [{"role": "user", "content": "q"}],
         "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
        {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]},
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
         "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "human", "content": "q"}], "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "a"}]},
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])
    pq.write_table(pyarrow.Table.from_pylist([{"prompt": "q", "chosen": "a", "rejected": "b"},
                                              {"prompt": "q", "chosen": None, "rejected": "b"}]),
                   parquet := tmp_path / "pairs.parquet")
    ls = tmp_path / "ls.json"
    ls.write_text(json.dumps([
        {"data": {"prompt": "q", "answer1": "a", "answer2": "b"}, "annotations": [
            {"result": [{"type": "pairwise", "value": {"selected": "middle"}}]}]},
        {"data": {"prompt": "q", "items": [{"id": "a", "body": "A"}, {"id": "b", "body": "B"}]},
         "annotations": [{"result": [{"type": "ranker", "from_name": "rank",
                                      "value": {"ranker": {"rank": ["a", "c"]}}}]}]},
        {"data": {"answer1": "a", "answer2": "b"}, "annotations": [
            {"result": [{"type": "pairwise", "value": {"selected": "left"}}]}]},
    ], indent=2))
    ag = write(tmp_path / "argilla.jsonl", [
        {"fields": {"prompt": "q", "answer_1": "a", "answer_2": "b"},
         "responses": {"ranking": [{"value": ["answer_1", "answr_2"], "user_id": "u1"}]}},
        {"fields": {"context": "c", "source": "s", "answer_1": "a", "answer_2": "b"},
         "responses": {"ranking": [{"value": ["answer_2", "answer_1"], "user_id": "u1"}]}},
        {"prompt": "q", "answer_1": "a", "answer_2": "b",
         "ranking.responses": [["answer_1", "answer_1"]],
         "ranking.responses.users": ["u1"], "ranking.responses.status": ["submitted"]},
    ])
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"data": {"prompt": "q"},\n   "annotations": [}\n]')
    expected = {
        broken: [f"{broken}:3: malformed JSON at column 20: Expecting value"],
        msgs: [f"{msgs}:2: field 'chosen' must hold one assistant message, got user",
               f"{msgs}:3: 'chosen' and 'rejected' differ before their last message (they must "
               "share the conversation up to the final answer)",
               f"{msgs}:4: field 'prompt' must end with a user turn (the answers reply to it)",
               f"{msgs}:5: field 'prompt[0].role' must be one of system, user, assistant, got "
               "'human'",
               f"{msgs}:6: 'chosen' and 'rejected' are the same answer, so the pair holds no preference",
               f"{msgs}:7: 'chosen' and 'rejected' are the same answer, so the pair holds no preference"],
        parquet: [f"{parquet}:row 2: field 'chosen' must be a string"],
        ls: [f"{ls}:record 1: field 'annotations[0].result[0].value.selected' must be 'left' or "
             "'right', got 'middle'",
             f"{ls}:record 2: field 'annotations[0].result[0].value.ranker': item 'c' is not one "
             "of 'a', 'b'",
             f"{ls}:record 3: field 'data.prompt' must be a non-empty string"],
        ag: [f"{ag}:1: field 'responses.ranking[0].value': answer 'answr_2' is not a field of "
             "this record (prompt, answer_1, answer_2)",
             f"{ag}:2: field 'fields.prompt' is missing: name the prompt field one of prompt, "
             "instruction, question (found context, source)",
             f"{ag}:3: field 'ranking.responses[0]': answer 'answer_1' is ranked twice"],
    }
    refused_with(fresh, expected)


def test_parquet_written_by_hugging_face_datasets_imports(tmp_path, fresh):
    datasets = pytest.importorskip("datasets")
    strings = tmp_path / "strings.parquet"
    datasets.Dataset.from_list([{"prompt": "Capital of France?", "chosen": "Paris.",
                                 "rejected": "Lyon."}]).to_parquet(str(strings))
    explicit = tmp_path / "explicit.parquet"
    datasets.Dataset.from_list([{
        "prompt": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "2 + 3?"}],
        "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": [{"role": "assistant", "content": "23"}]}]).to_parquet(str(explicit))
    implicit = tmp_path / "implicit.parquet"
    datasets.Dataset.from_list([{
        "chosen": [{"role": "user", "content": "Sky colour?"},
                   {"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "user", "content": "Sky colour?"},
                     {"role": "assistant", "content": "Green."}]}]).to_parquet(str(implicit))
    got = []
    # `datasets` writes JSON Lines even to a .json file.
    lines = tmp_path / "implicit.json"
    datasets.Dataset.from_parquet(str(implicit), cache_dir=str(tmp_path / "c")).to_json(str(lines))
    for path in (strings, explicit, implicit, lines):
        records, problems = read_preferences(path)
        assert problems == []
        got += [(r.prompt, r.messages, r.answers, r.ranking, r.line) for r in records]
    assert got == [
        ("Capital of France?", None, ["Paris.", "Lyon."], [[0], [1]], "row 1"),
        ("System: Be brief.\n\nHuman: 2 + 3?", [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "2 + 3?"}],
         ["5", "23"], [[0], [1]], "row 1"),
        ("Sky colour?", None, ["Blue.", "Green."], [[0], [1]], "row 1"),
        ("Sky colour?", None, ["Blue.", "Green."], [[0], [1]], 1)]
    assert import_preferences(fresh, explicit).records == 1


@pytest.mark.parametrize("fmt", ["hf", "hf-messages"])
def test_our_parquet_loads_in_hugging_face_datasets(tmp_path, store, monkeypatch, fmt):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    ours, lines = tmp_path / "ours.parquet", tmp_path / "ours.jsonl"
    export_rankings(store, ours, include_simulated=True, fmt=fmt)
    export_rankings(store, lines, include_simulated=True, fmt=fmt)
    loaded = datasets.load_dataset("parquet", data_files=str(ours), split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    # Parquet has a column for every row; the JSONL leaves "messages" out where there are none.
    expected = [{"messages": None, **r} if fmt == "hf" else r for r in read(lines)]
    assert loaded.to_list() == expected and len(expected) == 34


def test_argilla_reads_ours_and_we_read_what_argilla_writes(tmp_path, store, fresh):
    rg = pytest.importorskip("argilla")
    from argilla.records._io._generic import GenericIO
    from argilla.records._io._json import JsonIO    # what Dataset.records.to_json calls

    ours = tmp_path / "ours.json"
    export_rankings(store, ours, include_simulated=True, fmt="argilla")
    theirs = [rg.Record.from_dict(d) for d in json.loads(ours.read_text())]
    assert [len(r.responses) for r in theirs] == [2, 2, 2, 1]
    assert theirs[3].fields["prompt"][-1] == {"role": "user", "content": "Add 2 and 3."}
    # Records made with Argilla's own classes, written by its own exporter.
    users = ["0b0c6f1e-8a7a-4b8e-9d3c-3f2d8c1a9b10", "5d7e0a34-4c61-4bd0-a3a3-2a1f54b6e0f2"]
    made = [rg.Record(fields={"instruction": "Name a colour.", "response-1": "Blue",
                              "response-2": "Seven", "response-3": "Red"},
                      metadata={"source": "demo"},
                      responses=[rg.Response("preference", order, user_id=u, status="submitted")
                                 for u, order in zip(users, (
                                     ["response-1", "response-3", "response-2"],
                                     ["response-3", "response-1", "response-2"]))]),
            rg.Record(fields={"instruction": "Unranked.", "response-1": "x", "response-2": "y",
                              "response-3": "z"})]
    nested = JsonIO.to_json(made, tmp_path / "records.json")
    flat = tmp_path / "flat.jsonl"
    flat.write_text("".join(json.dumps(r) + "\n" for r in GenericIO.to_list(made, flatten=True)))
    for path in (nested, flat):
        records, problems = read_preferences(path)
        assert problems == []
        assert [(r.prompt, r.answers, r.ranking, r.annotator) for r in records] == [
            ("Name a colour.", ["Blue", "Seven", "Red"], [[0], [2], [1]], f"argilla:{users[0]}"),
            ("Name a colour.", ["Blue", "Seven", "Red"], [[2], [0], [1]], f"argilla:{users[1]}")]
    assert import_preferences(fresh, nested).items == 1


def test_the_export_command_writes_every_format_and_refuses_a_wrong_suffix(
        tmp_path, store, monkeypatch, capsys):
    from tests.test_annotate_cli import wb
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "workbench.toml").write_text("")
    store.close()
    (tmp_path / "a.db").rename(proj / "workbench.db")
    out = tmp_path / "prefs.parquet"
    rc, said, _ = wb(monkeypatch, capsys, "preferences", "export", "--project", proj, "--out", out,
                     "--format", "hf-messages", "--human-only")
    assert rc == 0 and said == f"wrote 16 Hugging Face message pairs to {out} from 4 " \
                               "ranking(s): 4 human, 0 simulated\n"
    other = tmp_path / "other"
    other.mkdir()
    (other / "workbench.toml").write_text("")
    rc, said, _ = wb(monkeypatch, capsys, "preferences", "import", "--project", other, out)
    assert rc == 0 and said.startswith("imported 16 ranking(s) of 16 item(s) as batch 1")
    rc, said, err = wb(monkeypatch, capsys, "preferences", "export", "--project", proj,
                       "--out", tmp_path / "x.jsonl", "--format", "argilla", "--human-only")
    assert (rc, said) == (2, "") and err == "workbench preferences export: argilla files end " \
                                            "in .json, not 'x.jsonl'\n"
    assert not (tmp_path / "x.jsonl").exists()


def test_missing_fields_are_named_with_file_and_record(tmp_path, fresh):
    """An empty JSON list is not an empty file; a Label Studio task without 'data', and a
    message without 'content', name the field (not a generic shape, not a Python type)."""
    empty = tmp_path / "empty.json"
    empty.write_text("[]\n")
    ls = tmp_path / "ls.json"
    ls.write_text(json.dumps([{"id": 1, "annotations": [{"result": []}]},
                              {"id": 2, "data": "q", "annotations": []}]))
    msgs = write(tmp_path / "msgs.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}],
         "prompt": "hi", "answers": ["a", "b"], "ranking": [[0], [1]]},
        {"prompt": [{"role": "user", "content": None}], "chosen": "a", "rejected": "b"},
        {"prompt": [{"content": "q"}], "chosen": "a", "rejected": "b"},
        [],
    ])
    expected = {
        empty: [f"{empty}: no preference records (the file holds an empty JSON list, [])"],
        ls: [f"{ls}:record 1: field 'data': missing (a Label Studio task holds its prompt and "
             "answers there)",
             f"{ls}:record 2: field 'data': must be an object, got a string (a Label Studio "
             "task holds its prompt and answers there)"],
        msgs: [f"{msgs}:1: field 'messages[1].content': missing",
               f"{msgs}:2: field 'prompt[0].content' must be a string, got null",
               f"{msgs}:3: field 'prompt[0].role': missing",
               f"{msgs}:4: expected a JSON object, got a list"],
    }
    refused_with(fresh, expected)
