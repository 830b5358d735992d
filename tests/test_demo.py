"""workbench.demo: the offline demo project, written at scale "tiny"."""
from __future__ import annotations

import argparse
import ast
import json
import operator
import re
from pathlib import Path

import pytest

from engine.tasks import Task, answer_for, check
from workbench import demo
from workbench.demo import SCALES, collect_python_docs, write_demo_project

ROOT = Path(__file__).resolve().parents[1]
ARITH = re.compile(r"(\d+) (\+|plus|-|minus|\*|times|x) (\d+)")
OPS = {"+": operator.add, "plus": operator.add, "-": operator.sub, "minus": operator.sub,
       "*": operator.mul, "times": operator.mul, "x": operator.mul}


def _read_all(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return demo.run_from_args(parser.parse_args(argv))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """One tiny project, written through the CLI entry point."""
    root = tmp_path_factory.mktemp("demo") / "proj"
    assert _cli(["--project", str(root), "--scale", "tiny", "--seed", "0"]) == 0
    return root


@pytest.fixture(scope="module")
def sft_records(project) -> list[dict]:
    lines = (project / "data/sft.jsonl").read_text("utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _pairs(record: dict) -> list[tuple[str, str]]:
    """(prompt, answer) pairs in a record of any of the three formats."""
    if "prompt" in record:
        return [(record["prompt"], record["response"])]
    if "instruction" in record:
        text = record["instruction"] + ("\n" + record["input"] if record["input"] else "")
        return [(text, record["output"])]
    msgs = [m for m in record["messages"] if m["role"] != "system"]
    return [(u["content"], a["content"]) for u, a in zip(msgs[::2], msgs[1::2])]


def test_files_exist_and_toml_parses(project):
    for rel in ["workbench.toml", *demo.FILES.values()]:
        assert (project / rel).is_file() and (project / rel).stat().st_size > 0, rel
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the project itself needs 3.10
    cfg = tomllib.loads((project / "workbench.toml").read_text("utf-8"))
    assert cfg["name"] == "Demo"
    assert cfg["demo"] == {"seed": 0, "scale": "tiny"}
    d = cfg["defaults"]
    assert d["tokenizer"]["vocab_size"] == 2048 and d["model"]["preset"] == "tiny"
    paths = d["data"]["pretrain"] + [d["data"][k] for k in ("sft", "eval_tasks", "prompts")]
    assert len(paths) == 5 and all((project / p).is_file() for p in paths)


def test_sft_mixes_the_three_formats(sft_records):
    assert len(sft_records) == SCALES["tiny"]["sft"]
    seen = dict.fromkeys(["prompt", "alpaca", "alpaca_input", "messages", "system", "two_turns"], 0)
    for r in sft_records:
        if set(r) == {"prompt", "response"}:
            seen["prompt"] += 1
        elif set(r) == {"instruction", "input", "output"}:
            seen["alpaca"] += 1
            seen["alpaca_input"] += bool(r["input"])
        else:
            assert set(r) == {"messages"}, r
            seen["messages"] += 1
            assert all(set(m) == {"role", "content"} and m["content"] for m in r["messages"])
            roles = [m["role"] for m in r["messages"]]
            if roles[0] == "system":
                seen["system"] += 1
                roles = roles[1:]
            assert roles in (["user", "assistant"], ["user", "assistant"] * 2), roles
            seen["two_turns"] += len(roles) == 4
        assert all(p and a for p, a in _pairs(r))
    assert all(v >= 10 for v in seen.values()), seen


def test_sft_answers_are_right(sft_records):
    checked = 0
    for r in sft_records:
        if r.get("instruction") == "Reverse the following word.":
            assert r["output"] == r["input"][::-1]
            checked += 1
        for prompt, answer in _pairs(r):
            m = ARITH.search(prompt)
            if m:
                assert int(answer) == OPS[m[2]](int(m[1]), int(m[3])), (prompt, answer)
                checked += 1
    assert checked > 50


def test_eval_and_prompts_are_held_out(project, sft_records):
    lines = (project / "data/eval_tasks.jsonl").read_text("utf-8").splitlines()
    tasks = [Task.from_dict(json.loads(line)) for line in lines]
    assert len(tasks) == SCALES["tiny"]["eval"]
    for t in tasks:
        assert t.answer == answer_for(t.kind, t.data) and check(t, t.answer)
    prompts = (project / "data/prompts.txt").read_text("utf-8").splitlines()
    assert len(prompts) == SCALES["tiny"]["prompts"] and all(prompts)
    eval_prompts = {t.prompt for t in tasks}
    assert len(eval_prompts) == len(tasks) and len(set(prompts)) == len(prompts)
    assert not eval_prompts & set(prompts)
    trained = {p for r in sft_records for p, _ in _pairs(r)}
    corpus = (project / "data/corpus/tasks.txt").read_text("utf-8")
    trained |= set(re.findall(r"^Question: (.*)$", corpus, flags=re.M))
    assert not (eval_prompts | set(prompts)) & trained


def test_corpus_sizes_and_content(project):
    docs = (project / "data/corpus/python_docs.txt").read_bytes()
    tasks = (project / "data/corpus/tasks.txt").read_bytes()
    cap = SCALES["tiny"]["docs_bytes"]
    assert 0.9 * cap <= len(docs) <= cap
    assert 0.2 <= len(tasks) / (len(docs) + len(tasks)) <= 0.3
    text = docs.decode("utf-8")
    entries = text.split("\n\n")
    assert len(entries) > 200
    # Docstring prose, not code: most entries start with a dotted name, words dominate.
    names = [e.split("\n", 1)[0] for e in entries if "\n" in e]
    assert sum(bool(re.fullmatch(r"[\w.]+", n)) for n in names) > 100
    assert len(re.findall(r"\b(the|a|of|to|is|Return)\b", text)) > 5000
    assert "\r" not in text and "\x00" not in text
    assert re.match(r"(Question: [^\n]+\nAnswer: [^\n]+\n\n)+\Z", tasks.decode("utf-8"))


def test_rerun_is_byte_identical_seeds_differ_and_overwrite_is_refused(project, tmp_path):
    other = tmp_path / "again"
    summary = write_demo_project(other, seed=0, scale="tiny")
    assert _read_all(other) == _read_all(project)
    assert summary["files"] == {k: len(v) for k, v in _read_all(other).items()}

    before = _read_all(other)
    with pytest.raises(FileExistsError):
        write_demo_project(other, seed=1, scale="tiny")
    assert _read_all(other) == before
    write_demo_project(other, seed=1, scale="tiny", overwrite=True)
    after = _read_all(other)
    for rel in ("data/sft.jsonl", "data/eval_tasks.jsonl", "data/prompts.txt",
                "data/corpus/tasks.txt", "data/corpus/python_docs.txt"):
        assert after[rel] != before[rel], rel


def test_cli_refuses_without_force(project, capsys):
    before = _read_all(project)
    assert _cli(["--project", str(project), "--scale", "tiny"]) == 2      # refused before any work
    assert "already holds a project" in capsys.readouterr().err
    assert _read_all(project) == before
    with pytest.raises(ValueError, match="scale"):
        write_demo_project(project / "x", scale="huge")


def test_a_folder_that_is_not_a_project_keeps_its_files(tmp_path, capsys):
    from workbench.project import DEMO_WRITING as WRITING
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "sft.jsonl").write_text('{"prompt": "my", "response": "own"}\n')
    assert _cli(["--project", str(mine), "--scale", "tiny", "--force"]) == 2
    assert f"{mine / 'data' / 'sft.jsonl'} is already there and {mine} is not a workbench project" \
        in capsys.readouterr().err
    assert (mine / "data" / "sft.jsonl").read_text() == '{"prompt": "my", "response": "own"}\n'
    assert not (mine / "workbench.toml").exists()
    # A demo cut short (its marker, some files, no workbench.toml) is written again whole.
    (mine / WRITING).touch()
    write_demo_project(mine, scale="tiny")
    assert (mine / "workbench.toml").is_file() and not (mine / WRITING).exists()
    assert "my" not in (mine / "data" / "sft.jsonl").read_text()
    (tmp_path / "afile").write_text("")
    assert _cli(["--project", str(tmp_path / "afile"), "--scale", "tiny"]) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err


def test_force_never_replaces_a_project_that_is_not_a_demo(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "workbench.toml").write_text('name = "mine"\n')
    assert _cli(["--project", str(mine), "--scale", "tiny", "--force"]) == 2
    assert "holds a project that is not a demo" in capsys.readouterr().err
    assert (mine / "workbench.toml").read_text() == 'name = "mine"\n' and not (mine / "data").exists()


def test_a_forced_demo_cut_short_is_refused_until_written_again(tmp_path, capsys):
    # `demo --force` killed half way: some files of the new seed, some of the old.
    from workbench.project import DEMO_WRITING, Project, ProjectError
    project = tmp_path / "p"
    write_demo_project(project, scale="tiny")
    (project / DEMO_WRITING).touch()
    (project / "data" / "prompts.txt").write_text("from another seed\n")
    with pytest.raises(ProjectError, match="writing its demo files was cut short"):
        Project.open(project)
    assert _cli(["--project", str(project), "--scale", "tiny"]) == 0       # no --force needed
    assert "another seed" not in (project / "data" / "prompts.txt").read_text()
    assert Project.open(project).path == project.absolute()


def test_cli_refuses_an_empty_project_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _cli(["--project", "", "--scale", "tiny"]) == 2
    assert "--project is empty" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def _fake_stdlib(root: Path) -> None:
    files = {
        "alpha.py": '"""Alpha module docstring here."""\n'
                    'class Thing:\n    """A thing with a long enough docstring."""\n'
                    '    def run(self):\n        """Run the thing, carefully, twice."""\n'
                    'def helper():\n    """Run the thing, carefully, twice."""\n'
                    'def short():\n    """Tiny."""\n',
        "pkg/__init__.py": '"""The pkg package does package things."""\n',
        "pkg/tests/test_x.py": '"""SKIPPED tests folder docstring."""\n',
        "test/x.py": '"""SKIPPED test folder docstring text."""\n',
        "idlelib/x.py": '"""SKIPPED idlelib docstring text here."""\n',
        "site-packages/x.py": '"""SKIPPED third party docstring."""\n',
        "test_beta.py": '"""SKIPPED test module docstring."""\n',
        "broken.py": '"""SKIPPED broken file docstring."""\ndef (:\n',
        "escapes.py": '"""Has an old escape \\d and a NUL \\x00 inside."""\n'
                      'def ok():\n    """Fine docstring after the bad one."""\n',
        "pydoc_data/topics.py": "topics = {'assert': 'The assert statement\\n\\nExplained.'}\n",
    }
    for rel, src in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(src, "utf-8")


def test_collect_python_docs_rules(tmp_path):
    _fake_stdlib(tmp_path)
    text, n = collect_python_docs(10_000, seed=0, root=tmp_path)
    assert "SKIPPED" not in text and "Tiny." not in text and "\x00" not in text
    for piece in ("alpha\nAlpha module docstring here.", "alpha.Thing\nA thing with",
                  "alpha.Thing.run\nRun the thing", "pkg\nThe pkg package",
                  "escapes.ok\nFine docstring", "The assert statement\n\nExplained."):
        assert piece in text, piece
    assert "alpha.helper" not in text  # same docstring as Thing.run: kept once
    assert n == 6 and text.count("\n\n") >= n
    assert collect_python_docs(10_000, seed=0, root=tmp_path) == (text, n)
    small, _ = collect_python_docs(60, seed=0, root=tmp_path)
    assert 0 < len(small.encode()) <= 60


def test_layering_of_owned_modules():
    forbidden = {"engine/tasks.py": ("PySide6", "sqlite3", "workbench", "ui"),
                 "workbench/demo.py": ("PySide6.QtWidgets", "ui")}
    for rel, bad in forbidden.items():
        tree = ast.parse((ROOT / rel).read_text("utf-8"))
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        for name in names:
            assert not any(name == b or name.startswith(b + ".") for b in bad), (rel, name)
        assert "pickle" not in names
