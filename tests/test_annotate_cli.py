"""The annotation commands of `workbench`, driven through cli.main with stdin replaced."""
from __future__ import annotations

import io
import json
import re
import sys

import pytest

from workbench import cli
from workbench.agreement import agreement
from workbench.store import Store

K = 4
PROMPTS = ["What is 2 + 2?", "Reverse the word 'cat'.", "Sort 3 1 2."]


def write_run(folder, status="completed", prompts=PROMPTS, events=True, samples=True):
    """A sample run as engine.sample leaves it (see tests/test_samples.py for the format)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "provenance.json").write_text(json.dumps(
        {"checkpoint": "runs/sft/checkpoints/step-000010", "seed": 3, "k": K,
         "settings": {"temperature": 0.9}}))
    if samples:
        (folder / "samples.jsonl").write_text("".join(json.dumps(
            {"prompt": p, "prompt_index": i,
             "answers": [{"text": f"answer {i}.{j}", "n_tokens": 3, "finished": True, "seed": j}
                         for j in range(K)]}) + "\n" for i, p in enumerate(prompts)))
    lines = [{"type": "start", "stage": "sample"}]
    if status is not None:
        lines.append({"type": "done", "status": status, "error": None})
    if events:
        (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return folder


def wb(monkeypatch, capsys, *argv, stdin: str = ""):
    """(exit status, stdout, stderr) of `workbench ARGV` with `stdin` as its input."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:   # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def project(tmp_path, monkeypatch, capsys):
    """A project with one imported batch of 3 items (id 1)."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "workbench.toml").write_text("")
    rc, out, _ = wb(monkeypatch, capsys, "import-samples", "--project", proj,
                    write_run(tmp_path / "sample-run"))
    assert rc == 0 and "batch 1 'sample-run': 3 items, K=4" in out
    return proj


def shown(store: Store, annotator: str, item_id: int) -> list[int]:
    """The answer ids of an item in the order the session showed them (display number - 1)."""
    row = store.conn.execute(
        "SELECT o.answer_ids FROM shown_orders o JOIN sessions s ON s.id = o.session_id JOIN "
        "annotators a ON a.id = s.annotator_id WHERE a.name = ? AND o.item_id = ? AND "
        "o.is_repeat = 0", (annotator, item_id)).fetchone()
    return json.loads(row[0])


def as_ids(order: list[int], typed: list[list[int]]) -> list[list[int]]:
    return [[order[n - 1] for n in g] for g in typed]


def test_import_samples_refuses_unfinished_runs_and_reimport_finds_the_batch(
        tmp_path, monkeypatch, capsys, project):
    rc, out, _ = wb(monkeypatch, capsys, "import-samples", "--project", project, tmp_path / "sample-run")
    assert rc == 0 and out.startswith("already imported as batch 1")
    for name, kw, why in [("running", {"status": None}, "no done event"),
                          ("stopped", {"status": "stopped"}, "says 'stopped'"),
                          ("no-events", {"events": False}, "no done event"),
                          ("no-samples", {"samples": False}, "has no samples.jsonl")]:
        rc, out, err = wb(monkeypatch, capsys, "import-samples", "--project", project,
                          write_run(tmp_path / name, **kw))
        assert rc == 2 and out == "", name
        assert err.startswith(f"workbench import-samples: {tmp_path / name} ") and why in err, name
    with Store.for_project(project) as store:
        assert [b.n_items for b in store.batches()] == [3]
    # A bad samples.jsonl in a completed run: every problem as FILE:LINE.
    bad = write_run(tmp_path / "bad")
    (bad / "samples.jsonl").write_text('{"prompt": "p"}\nnot json\n')
    rc, _, err = wb(monkeypatch, capsys, "import-samples", "--project", project, bad)
    assert rc == 2 and f"{bad / 'samples.jsonl'}:1:" in err and f"{bad / 'samples.jsonl'}:2:" in err


def test_rank_with_labels_skip_and_undo_stores_exact_orderings(monkeypatch, capsys, project):
    script = "\n".join([
        "?",                    # help
        "f2 harm", "s1 6", "n first try",
        "1 2=3 4",              # item A (labels go with it)
        "s",                    # skip item B: it goes to the back, C comes next
        "u",                    # take back A: A again, its labels kept
        "f9 harmful", "s2 8", "zz", "2 1",   # refused: no answer 9, score > 7, unknown, incomplete
        "4 3 2 1",              # A again
        "2 1 3=4",              # C
        "31=24",                # B, compact form
    ]) + "\n"
    rc, out, _ = wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1,
                    "--annotator", "alice", stdin=script)
    assert rc == 0
    assert "f2 harmful" in out                         # the help was shown
    assert "you ranked this before: 1 2=3 4" in out    # undo offered the old ranking
    assert "answers are numbered 1-4, got '9'" in out
    assert "a score is a whole number from 1 to 7" in out
    assert "unknown command 'zz'" in out
    assert "answers 3, 4 not ranked" in out
    assert "[3 / 3 ranked" in out and "3 / 3 ranked, all stored" in out
    with Store.for_project(project) as store:
        a, b, c = store.item_ids(1)
        got = store.rankings(batch_id=1, include_withdrawn=True)
        assert [(r.item_id, r.withdrawn_at is not None) for r in got] == [
            (a, True), (a, False), (c, False), (b, False)]
        oa, ob, oc = (shown(store, "alice", i) for i in (a, b, c))
        assert got[0].ordering == as_ids(oa, [[1], [2, 3], [4]])
        assert got[1].ordering == as_ids(oa, [[4], [3], [2], [1]])
        assert got[2].ordering == as_ids(oc, [[2], [1], [3, 4]])
        assert got[3].ordering == as_ids(ob, [[3], [1, 2], [4]])
        for r in got[:2]:   # the re-ranked A kept the labels typed before the undo
            assert r.flags == {oa[1]: ["harmful"]} and r.scores == {oa[0]: 6}
            assert r.note == "first try"
        assert (got[2].flags, got[2].scores, got[2].note) == ({}, {}, "")
        assert all(r.annotator == "alice" and not r.simulated for r in got)


def test_quit_midway_then_resume(monkeypatch, capsys, project):
    rc, out, _ = wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1,
                    "--annotator", "bob", stdin="1 2 3 4\nq\nthis line is never read\n")
    assert rc == 0 and "1 / 3 ranked, all stored; run the same command to continue" in out
    with Store.for_project(project) as store:
        assert len(store.rankings(batch_id=1)) == 1
    # End of input is a quit too; the next run starts at the second item.
    rc, out, _ = wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1,
                    "--annotator", "bob", stdin="4 3 2 1\n")
    assert rc == 0 and "resuming bob's session: 1 / 3 ranked" in out
    assert PROMPTS[1] in out and PROMPTS[0] not in out
    rc, out, _ = wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1,
                    "--annotator", "bob", stdin="1=2=3=4\n")
    assert "3 / 3 ranked, all stored\n" in out
    with Store.for_project(project) as store:
        items = store.item_ids(1)
        got = store.rankings(batch_id=1)
        assert [r.item_id for r in got] == items
        assert got[1].ordering == as_ids(shown(store, "bob", items[1]), [[4], [3], [2], [1]])
        assert got[2].ordering == [shown(store, "bob", items[2])]   # one group: all tied
    rc, out, err = wb(monkeypatch, capsys, "batches", "--project", project)
    assert rc == 0 and "sample-run" in out and "bob 3/3" in out


def test_simulated_ranking_is_labelled_and_kept_apart(monkeypatch, capsys, project):
    rc, out, _ = wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--simulated")
    assert rc == 0 and "ranked 3 item(s)" in out and "simulated" in out
    with Store.for_project(project) as store:
        assert [r.simulated for r in store.rankings(batch_id=1)] == [True] * 3
    # A human's name cannot be reused for simulated rankings, nor the other way round.
    wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--annotator", "carol",
       stdin="q\n")
    rc, _, err = wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1,
                    "--simulated", "--annotator", "carol")
    assert rc == 2 and "exists as human" in err
    _, out, _ = wb(monkeypatch, capsys, "batches", "--project", project)
    assert "(simulated) 3/3" in out and "carol 0/3" in out
    # Export must be told whether simulated rankings go in.
    rc, _, err = wb(monkeypatch, capsys, "preferences", "export", "--project", project,
                    "--out", project / "x.jsonl")
    assert rc == 2 and "--include-simulated --human-only is required" in err
    rc, out, _ = wb(monkeypatch, capsys, "preferences", "export", "--project", project,
                    "--out", project / "h.jsonl", "--human-only")
    assert rc == 0 and "wrote 0 K-way rankings" in out
    rc, out, _ = wb(monkeypatch, capsys, "preferences", "export", "--project", project,
                    "--out", project / "all.jsonl", "--include-simulated")
    assert "wrote 3 K-way rankings" in out and "0 human, 3 simulated" in out


def test_export_pairs_and_import_them_into_another_project(tmp_path, monkeypatch, capsys, project):
    wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--annotator", "alice",
       stdin="1 2 3 4\n1=2 3 4\n")   # 6 pairs, then 5 (the tie gives none); third item unranked
    out_file = tmp_path / "pairs.jsonl"
    rc, out, _ = wb(monkeypatch, capsys, "preferences", "export", "--project", project,
                    "--out", out_file, "--format", "pairs", "--human-only")
    assert rc == 0 and "wrote 11 pairs" in out and "2 ranking(s): 2 human, 0 simulated" in out
    pairs = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(pairs) == 11 and {p["annotator"] for p in pairs} == {"alice"}
    other = tmp_path / "other"
    other.mkdir()
    (other / "workbench.toml").write_text("")
    rc, out, _ = wb(monkeypatch, capsys, "preferences", "import", "--project", other, out_file)
    assert rc == 0 and "imported 11 ranking(s) of 11 item(s) as batch 1" in out
    rc, out, _ = wb(monkeypatch, capsys, "preferences", "import", "--project", other, out_file)
    assert rc == 0 and "already imported as batch 1" in out
    # Into the project it came from, it brings nothing back: those rankings are there.
    rc, out, _ = wb(monkeypatch, capsys, "preferences", "import", "--project", project, out_file)
    assert rc == 0 and "every record in" in out and "(11 of 2 ranking(s)) is already" in out
    with Store.for_project(project) as store:
        assert len(store.batches()) == 1 and len(store.rankings()) == 2
    with Store.for_project(other) as store:
        got = store.rankings()
        items = {i.id: i for i in store.items(1)}
        assert len(got) == 11 and {(r.annotator, r.simulated) for r in got} == {("alice", False)}
        back = sorted((items[r.item_id].prompt, *(a.text for g in r.ordering for a in items[r.item_id].answers
                                                  if a.id in g)) for r in got)
    assert back == sorted((p["prompt"], p["chosen"], p["rejected"]) for p in pairs)


def test_a_colleagues_rankings_of_an_exported_batch_join_it_and_the_line_says_so(tmp_path, monkeypatch, capsys,
                                                                                 project):
    wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--annotator", "alice",
       stdin="1 2 3 4\n1=2 3 4\n")
    mine = tmp_path / "mine.jsonl"
    assert wb(monkeypatch, capsys, "preferences", "export", "--project", project, "--out", mine,
              "--human-only")[0] == 0
    theirs = [dict(json.loads(line), annotator="bob") for line in mine.read_text().splitlines()]
    theirs.append({"prompt": "a prompt of their own", "answers": ["p", "q"], "ranking": [[1], [0]],
                   "annotator": "bob"})
    path = tmp_path / "bob.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in theirs))
    rc, out, _ = wb(monkeypatch, capsys, "preferences", "import", "--project", project, path)
    assert rc == 0, out
    assert "imported 3 ranking(s): 2 ranking(s) joined 2 item(s) the project had (batch " in out
    assert "the other 1 of 1 new item(s) as batch 2 'bob.jsonl'" in out
    rc, out, _ = wb(monkeypatch, capsys, "agreement", "--project", project)
    assert rc == 0 and re.search(r"alice ~ bob +2 +12 +1\.000", out), out


def test_an_export_never_writes_over_the_project_and_an_unknown_batch_writes_nothing(
        tmp_path, monkeypatch, capsys, project):
    wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--annotator", "alice",
       stdin="1 2 3 4\n")
    (project / "runs").mkdir(exist_ok=True)
    (project / "data").mkdir(exist_ok=True)
    sft = project / "data" / "sft.jsonl"
    sft.write_text('{"prompt": "p", "response": "r"}\n')
    (project / "workbench.toml").write_text('name = "p"\n[defaults.data]\nsft = "data/sft.jsonl"\n')
    for out, why in ((project / "workbench.db", "is a project's own file"),
                     (project / "workbench.db-wal", "is a project's own file"),
                     (project / "runs" / "x.jsonl", "is inside the project's runs folder"),
                     (sft, "would replace the project's data")):
        rc, _, err = wb(monkeypatch, capsys, "preferences", "export", "--project", project, "--out", out,
                        "--human-only")
        assert rc == 2 and f"{out} {why}: write the export elsewhere" in err
    assert sft.read_text() == '{"prompt": "p", "response": "r"}\n'
    # An earlier export beside the data (the app's default place) is the person's to replace.
    earlier = project / "data" / "preferences.jsonl"
    for _ in range(2):
        assert wb(monkeypatch, capsys, "preferences", "export", "--project", project, "--out", earlier,
                  "--human-only")[0] == 0
    with Store.for_project(project) as store:
        assert len(store.rankings()) == 1
    good = tmp_path / "good.jsonl"
    assert wb(monkeypatch, capsys, "preferences", "export", "--project", project, "--out", good,
              "--human-only")[0] == 0
    kept = good.read_text()
    rc, _, err = wb(monkeypatch, capsys, "preferences", "export", "--project", project, "--out", good,
                    "--human-only", "--batch", 99)
    assert rc == 2 and "no batch with id 99" in err and good.read_text() == kept
    with Store.for_project(project) as store:
        assert len(store.rankings()) == 1


def test_pairs_leave_out_two_answers_of_one_text_ranked_apart(tmp_path, monkeypatch, capsys):
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps({"prompt": "P", "answers": ["x", "x", "y"], "ranking": [[0], [2], [1]]}) + "\n")
    proj, other = tmp_path / "proj", tmp_path / "other"
    proj.mkdir()
    other.mkdir()
    for folder in (proj, other):
        (folder / "workbench.toml").write_text("")
    assert wb(monkeypatch, capsys, "preferences", "import", "--project", proj, dup, "--annotator", "ana")[0] == 0
    for fmt in ("hf", "pairs"):
        out = tmp_path / f"dup-{fmt}.jsonl"
        rc, said, _ = wb(monkeypatch, capsys, "preferences", "export", "--project", proj, "--format", fmt,
                         "--out", out, "--human-only")
        pairs = [json.loads(line) for line in out.read_text().splitlines()]
        assert rc == 0 and sorted((p["chosen"], p["rejected"]) for p in pairs) == [("x", "y"), ("y", "x")]
        # what the export writes, the import reads back
        assert wb(monkeypatch, capsys, "preferences", "import", "--project", other, out)[0] == 0


def test_bad_import_file_lists_file_and_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\nnot json\n'
                   '{"prompt": "q", "answers": ["a", "b"], "ranking": [[0]]}\n')
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "workbench.toml").write_text("")
    rc, out, err = wb(monkeypatch, capsys, "preferences", "import", "--project", proj, bad)
    assert rc == 2 and out == ""
    assert f"{bad}:2: malformed JSON" in err and f"{bad}:3: field 'ranking'" in err
    assert f"{bad}:1" not in err
    with Store.for_project(proj) as store:
        assert store.batches() == []                 # nothing of a bad file goes in
    rc, out, err = wb(monkeypatch, capsys, "preferences", "import", "--project", proj, bad,
                      "--skip-bad", "--annotator", "dana")
    assert rc == 0 and "imported 1 ranking(s)" in out and f"{bad}:2" in err
    # Commands that read a project refuse a folder that is not one.
    rc, _, err = wb(monkeypatch, capsys, "agreement", "--project", tmp_path / "missing")
    assert rc == 2 and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = wb(monkeypatch, capsys, "preferences", "import", "--project", empty, bad)
    assert rc == 2 and "is not a workbench project (no workbench.toml)" in err    # nothing made there
    assert list(empty.iterdir()) == []
    (empty / "workbench.toml").write_text("")
    rc, _, err = wb(monkeypatch, capsys, "rank", "--project", empty, "--batch", 1, "--annotator", "x")
    assert rc == 2 and "has no workbench.db" in err and not (empty / "workbench.db").exists()
    rc, _, err = wb(monkeypatch, capsys, "rank", "--project", proj, "--batch", 7, "--annotator", "x")
    assert rc == 2 and "no batch with id 7" in err


def test_an_empty_preference_file_is_refused_and_makes_no_batch(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "workbench.toml").write_text("")
    rc, out, err = wb(monkeypatch, capsys, "preferences", "import", "--project", proj, empty)
    assert (rc, out) == (2, "")
    assert err == (f"workbench preferences import: 1 problem(s) in the preference file {empty}:\n"
                   f"  {empty}: no preference records (the file is empty)\n")
    rc, out, err = wb(monkeypatch, capsys, "batches", "--project", proj)
    assert rc == 0 and out.startswith("no batches yet")


def test_agreement_between_two_annotators_and_repeats(monkeypatch, capsys, project):
    rc, out, _ = wb(monkeypatch, capsys, "agreement", "--project", project)
    assert rc == 0 and "no item has been ranked twice" in out
    wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--annotator", "alice",
       stdin="1 2 3 4\n1 2 3 4\n1 2 3 4\n")
    wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--annotator", "bob",
       stdin="1 2 3 4\n4 3 2 1\n1 2 3=4\n")
    rc, out, _ = wb(monkeypatch, capsys, "agreement", "--project", project)
    assert rc == 0
    with Store.for_project(project) as store:
        expect = agreement(store, between="annotators")
    assert expect.items == 3 and expect.comparisons == 18
    row = next(line for line in out.splitlines() if line.strip().startswith("alice ~ bob"))
    assert row.split()[3:] == ["3", "18", f"{expect.agreement:.3f}", f"{expect.alpha:.3f}",
                               f"{expect.alpha_interval:.3f}"]
    assert "Krippendorff" in out
    # Hidden repeats: with --repeats 1 every item comes back once, shuffled anew. Each run
    # below answers the repeat on screen (its shuffle is recorded when shown) in the same
    # preference order as the first ranking, so erin agrees with herself fully.
    rc, out, _ = wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--annotator",
                    "erin", "--repeats", "1", stdin="1 2 3 4\n" * 3)
    # the three items; their three hidden repeats are still to come, and the count says so
    assert "3 / 6 ranked (with 3 repeats), all stored; run the same command" in out
    for _ in range(3):
        with Store.for_project(project) as store:
            mine = store.rankings(batch_id=1)
            firsts = {r.item_id: r.ordering for r in mine if r.annotator == "erin" and not r.is_repeat}
            done = {r.item_id for r in mine if r.annotator == "erin" and r.is_repeat}
            (item, order), = [(i, json.loads(o)) for i, o in store.conn.execute(
                "SELECT o.item_id, o.answer_ids FROM shown_orders o JOIN sessions s ON "
                "s.id = o.session_id JOIN annotators a ON a.id = s.annotator_id WHERE "
                "a.name = 'erin' AND o.is_repeat = 1") if i not in done]
        line = " ".join(str(order.index(aid) + 1) for g in firsts[item] for aid in g)
        rc, out, _ = wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1,
                        "--annotator", "erin", stdin=line + "\n")
        assert rc == 0
    with Store.for_project(project) as store:
        assert sum(r.is_repeat for r in store.rankings(batch_id=1)) == 3
    rc, out, _ = wb(monkeypatch, capsys, "agreement", "--project", project, "--between", "repeats")
    assert rc == 0
    row = next(line for line in out.splitlines() if line.strip().startswith("erin"))
    assert row.split()[1:4] == ["3", "18", "1.000"]


def test_terminal_ranking_shows_copies_and_one_number_per_answer_ranks_them(tmp_path, monkeypatch, capsys):
    (tmp_path / "workbench.toml").write_text("")
    with Store.for_project(tmp_path) as store:
        store.create_batch("copies", [{"prompt": "How long is 'bed'?",
                                       "answers": [{"text": t} for t in ("3", "4", "3", "3")]}], k=None)
    rc, out, _ = wb(monkeypatch, capsys, "rank", "--project", tmp_path, "--batch", 1,
                    "--annotator", "ana", stdin="")
    shown = [line.split(")", 1) for line in out.splitlines() if line.startswith("  (")]
    threes = [int(n.strip(" (")) for n, text in shown if text.strip() in ("3", "")
              or "same answer as" in text]
    four = next(int(n.strip(" (")) for n, text in shown if text.strip() == "4")
    assert len(threes) == 3 and sum("same answer as" in text for _, text in shown) == 2
    rc, out, _ = wb(monkeypatch, capsys, "rank", "--project", tmp_path, "--batch", 1,
                    "--annotator", "ana", stdin=f"{four} {threes[0]}\n")
    assert rc == 0
    with Store.for_project(tmp_path) as store:
        [r] = store.rankings()
        texts = {a.id: a.text for a in store.items(1)[0].answers}
        assert [sorted(texts[a] for a in g) for g in r.ordering] == [["4"], ["3", "3", "3"]]


def test_a_session_resumed_with_other_settings_is_refused_in_the_commands_flags(
        monkeypatch, capsys, project):
    wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--annotator", "alice",
       stdin="q\n")
    rc, out, err = wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1,
                      "--annotator", "alice", "--repeats", 0.5, stdin="1 2 3 4\n")
    assert (rc, out) == (2, "")
    assert err == ("workbench rank: alice's session on batch 1 'sample-run' was started with "
                   "--repeats 0; resume it with --repeats 0 or without --repeats\n")
    assert wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--simulated",
              "--seed", 3)[0] == 0
    rc, _, err = wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1,
                    "--simulated", "--seed", 4)
    assert rc == 2 and "was started with --seed 3; resume it with --seed 3 or without --seed" in err
    assert "repeat_fraction" not in err and "None" not in err
    assert wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--simulated")[0] == 0


def test_an_import_of_the_projects_own_pairs_counts_records_and_rankings(
        tmp_path, monkeypatch, capsys, project):
    wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--annotator", "alice",
       stdin="1 2 3 4\n1 2 3=4\n")
    for fmt, line in (("pairs", "every record in {f} (11 of 2 ranking(s)) is already"),
                      ("kway", "every ranking in {f} (2) is already")):
        f = tmp_path / f"{fmt}.jsonl"
        wb(monkeypatch, capsys, "preferences", "export", "--project", project, "--out", f,
           "--format", fmt, "--human-only")
        rc, out, _ = wb(monkeypatch, capsys, "preferences", "import", "--project", project, f)
        assert rc == 0 and line.format(f=f) in out, out


def test_an_export_makes_its_folder_and_names_a_file_in_the_way(tmp_path, monkeypatch, capsys,
                                                                 project):
    wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--annotator", "alice",
       stdin="1 2 3 4\n")
    for fmt, name in (("kway", "x.jsonl"), ("label-studio", "x.json")):
        out = tmp_path / "new" / fmt / name
        rc, _, err = wb(monkeypatch, capsys, "preferences", "export", "--project", project,
                        "--out", out, "--format", fmt, "--human-only")
        assert rc == 0 and out.is_file(), err
    (tmp_path / "afile").write_text("x")
    rc, _, err = wb(monkeypatch, capsys, "preferences", "export", "--project", project,
                    "--out", tmp_path / "afile" / "x.jsonl", "--human-only")
    assert rc == 2 and err == (f"workbench preferences export: --out {tmp_path}/afile/x.jsonl: "
                               f"{tmp_path}/afile is a file, not a folder\n")


def test_agreement_with_a_simulated_annotator_does_not_call_its_ceiling_human(
        monkeypatch, capsys, project):
    wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--annotator", "alice",
       stdin="1 2 3 4\n")
    wb(monkeypatch, capsys, "rank", "--project", project, "--batch", 1, "--simulated",
       "--annotator", "robo")
    rc, out, _ = wb(monkeypatch, capsys, "agreement", "--project", project)
    assert rc == 0 and "human-human" not in out
    assert "annotator-annotator ceiling (simulated annotators included) for a reward model" in out
    ceiling = out[out.index("annotator-annotator ceiling"):]
    assert any(line.split()[:4] in (["robo", "(simulated)", "~", "alice"],
                                    ["alice", "~", "robo", "(simulated)"])
               for line in ceiling.splitlines())
    rc, out, _ = wb(monkeypatch, capsys, "agreement", "--project", project, "--human-only")
    assert rc == 0 and "simulated" not in out


def test_a_closed_pipe_ends_a_command_quietly(project):
    """`workbench batches | head -1`: the reader has gone; no 'Broken pipe' line, exit 0."""
    import os
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    code = ("import sys; from workbench import cli; sys.exit(cli.main(sys.argv[1:]))")
    for buffered in ("1", ""):
        r, w = os.pipe()
        os.close(r)                                  # the reader is gone before the first line
        env = dict(os.environ, PYTHONUNBUFFERED=buffered)
        done = subprocess.run([sys.executable, "-c", code, "batches", "--project", str(project)],
                              stdout=w, stderr=subprocess.PIPE, text=True, cwd=root, env=env,
                              timeout=120)
        os.close(w)
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
