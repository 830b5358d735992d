"""workbench.samples: a sample run folder becomes a ranking batch, once, or a list of problems."""
from __future__ import annotations

import json
import shutil

import pytest

from workbench.samples import import_sample_run, read_sample_run
from workbench.store import InputError, Store

PROVENANCE = {"checkpoint": "runs/sft-1/checkpoints/step-000200", "seed": 7, "k": 3,
              "settings": {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 32}}


def answer(text, n, finished=True, seed=0):
    return {"text": text, "n_tokens": n, "finished": finished, "seed": seed}


LINES = [
    {"prompt": "What is 2 + 2?", "prompt_index": 0,
     "answers": [answer("4", 2, seed=10), answer("The answer is 4.", 6, seed=11),
                 answer("5 5 5 5 5", 32, finished=False, seed=12)]},
    {"prompt": "Reverse the word 'cat'.", "prompt_index": 1,
     "answers": [answer("tac", 2, seed=13), answer("act", 2, seed=14), answer("", 1, seed=15)]},
]


def write_run(folder, lines=LINES, provenance=PROVENANCE):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "provenance.json").write_text(json.dumps(provenance))
    (folder / "samples.jsonl").write_text("".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return folder


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "workbench.db")
    yield s
    s.close()


def test_import_makes_a_batch_with_provenance(tmp_path, store):
    run = write_run(tmp_path / "runs" / "sample-20250101-120000")
    b = import_sample_run(store, run)
    batch = store.batch(b)
    assert (batch.name, batch.kind, batch.k, batch.n_items) == ("sample-20250101-120000", "sampled", 3, 2)
    assert batch.source == str(run.resolve())
    assert batch.settings == {"checkpoint": PROVENANCE["checkpoint"], "seed": 7, "k": 3,
                              "sampling": PROVENANCE["settings"]}
    first, second = store.items(b)
    assert (first.prompt, first.meta) == ("What is 2 + 2?", {"prompt_index": 0})
    assert [a.text for a in second.answers] == ["tac", "act", ""]
    assert first.answers[2].meta == {"checkpoint": PROVENANCE["checkpoint"], "n_tokens": 32,
                                     "finished": False, "seed": 12}


def test_importing_the_same_run_twice_returns_the_first_batch(tmp_path, store):
    run = write_run(tmp_path / "run")
    b = import_sample_run(store, run)
    assert import_sample_run(store, run) == b
    # A copy of the folder is the same run: the key is the content, not the path.
    copy = tmp_path / "elsewhere" / "run-copy"
    shutil.copytree(run, copy)
    assert import_sample_run(store, copy) == b
    assert len(store.batches()) == 1
    # A different run with the same folder name gets its own, uniquely named batch.
    other = write_run(tmp_path / "more" / "run", LINES[:1])
    b2 = import_sample_run(store, other)
    assert b2 != b and store.batch(b2).name == "run (2)"
    with pytest.raises(ValueError, match="already exists"):
        import_sample_run(store, write_run(tmp_path / "third", LINES[1:]), name="run")


def test_bad_run_lists_every_problem_with_file_line_and_field(tmp_path, store):
    bad_answer = {"prompt": "p", "prompt_index": 3,
                  "answers": [answer("a", 1), {"text": 5, "n_tokens": -1, "finished": "yes"},
                              answer("c", 1)]}
    run = write_run(tmp_path / "run", [
        LINES[0],
        "{not json",
        {"prompt": "", "prompt_index": 0, "answers": LINES[0]["answers"]},
        {"prompt": "p", "prompt_index": 2, "answers": LINES[0]["answers"][:2]},
        bad_answer,
        "[1, 2]",
    ], {**PROVENANCE, "seed": "seven"})
    with pytest.raises(InputError) as e:
        import_sample_run(store, run)
    samples, prov = run / "samples.jsonl", run / "provenance.json"
    assert e.value.problems == [
        f"{prov}: field 'seed' must be an integer",
        f"{samples}:2: malformed JSON at column 2: Expecting property name enclosed in double quotes",
        f"{samples}:3: field 'prompt' must be a non-empty string",
        f"{samples}:3: field 'prompt_index' 0 repeats line 1",
        f"{samples}:4: field 'answers' has 2 answers, provenance.json says k=3",
        f"{samples}:5: field 'answers[1].text' must be a string",
        f"{samples}:5: field 'answers[1].n_tokens' must be an integer >= 0",
        f"{samples}:5: field 'answers[1].finished' must be true or false",
        f"{samples}:5: field 'answers[1].seed' must be an integer",
        f"{samples}:6: expected a JSON object, got list",
    ]
    assert store.batches() == []


def test_missing_or_empty_files(tmp_path, store):
    with pytest.raises(InputError, match=r"provenance.json: missing[\s\S]*samples.jsonl: missing"):
        read_sample_run(tmp_path)
    run = write_run(tmp_path / "empty", [])
    with pytest.raises(InputError, match="no samples in the file"):
        read_sample_run(run)
    run = write_run(tmp_path / "k", LINES, {**PROVENANCE, "k": 12})
    with pytest.raises(InputError, match="'k' must be an integer from 2 to 9, got 12"):
        read_sample_run(run)
