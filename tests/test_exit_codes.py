"""One exit code for "refused before starting" (2) across the workbench's commands and the
stages, with the reason on stderr and nothing on stdout that reads as an error."""
from __future__ import annotations

import json

import pytest

from engine import reward
from workbench import cli


def workbench(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:     # argparse's own refusals exit 2 as well
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv, reason", [
    (["pipeline"], "give --project DIR"),
    (["pipeline", "--project", "{tmp}/nowhere"], "nowhere"),
    (["pipeline", "--demo", "--project", "{tmp}/p", "--until", "nothing"], "invalid choice: 'nothing'"),
    (["demo", "--project", "{tmp}/p"], "already holds a project"),
    (["batches", "--project", "{tmp}/p"], "has no workbench.db yet"),
    (["import-model", "{tmp}/nowhere", "--project", "{tmp}/p"], "nowhere: no such folder, and no model of that name"),
    (["batches", "--project", "{tmp}/p/workbench.toml"], "workbench.toml is a file, not a project folder"),
    (["run", "pretrain", "--run-dir", "{tmp}/p/workbench.toml"], "workbench.toml is a file, not a run folder"),
    (["rank", "--project", "{tmp}/p", "--batch", "1", "--annotator", "al\udce9"], "an argument is not UTF-8 text"),
    (["rank", "--project", "{tmp}/p", "--batch", "1", "--annotator", "al", "--repeats", "2"],
     "--repeats is a fraction of the items, from 0 to 1, got 2"),
])
def test_workbench_commands_refuse_with_2_on_stderr(tmp_path, capsys, argv, reason):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "workbench.toml").write_text('name = "p"\n')
    rc, out, err = workbench(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert rc == 2 and reason in err and "Traceback" not in err
    assert "error" not in out.lower()
    assert not (tmp_path / "p" / "runs").exists()


def test_run_names_the_value_just_given_and_a_folder_of_another_stage(tmp_path, capsys):
    # On a new folder the setting typed wrong comes first, before the ones still missing.
    rc, _, err = workbench(capsys, "run", "sft", "--run-dir", tmp_path / "new", "--set", "max_steps=abc")
    assert rc == 2 and "config field 'max_steps': expected an integer, got 'abc'" in err
    assert not (tmp_path / "new" / "config.json").exists()
    # Another stage's run folder is named for what it is, not for the first setting that differs.
    sft = tmp_path / "runs" / "sft-20250101-000000"
    sft.mkdir(parents=True)
    (sft / "events.jsonl").write_text(json.dumps({"type": "start", "stage": "sft", "time": 0}) + "\n")
    (sft / "config.json").write_text('{"init": "x"}')
    for argv in (["--set", "lr=1"], []):
        rc, _, err = workbench(capsys, "run", "dpo", "--run-dir", sft, *argv)
        assert rc == 2 and f"{sft} holds a run of the sft stage, not of dpo: give dpo a new folder" in err
    assert (sft / "config.json").read_text() == '{"init": "x"}'


def test_a_refused_import_leaves_no_run_behind(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "workbench.toml").write_text('name = "p"\n')
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    rc, out, err = workbench(capsys, "import-model", tmp_path / "gpt2", "--project", tmp_path / "p",
                             "--log-format", "json")
    assert rc == 2 and "model_type 'gpt2'" in out + err and "nothing was imported" in err
    assert list((tmp_path / "p" / "runs").iterdir()) == []


@pytest.mark.parametrize("toml, reason", [
    (b'name = "p"\n\xff\xfe\n', "workbench.toml: not UTF-8 text (byte 11)"),
    (b'name = "p"\n[defaults.data]\npretrain = 5\n', "[defaults.data] 'pretrain' must be a path or a list of paths"),
    (b'name = "p"\n[defaults.data]\npretrain = "gone.txt"\n', "[defaults.data] 'pretrain' names "),
    (b'name = "p"\n[defaults.data]\nsfft = "sft.jsonl"\n',
     "workbench.toml: [defaults.data] has an unknown key 'sfft' (known: eval_tasks, pretrain, prompts, sft)"),
    (b'name = "p"\n[defaults.modle]\npreset = "tiny"\n', "workbench.toml: unknown section [defaults.modle]"),
    (b'name = "p"\n[defaults.tokenizer]\nvocab_size = "big"\n',
     "workbench.toml: [defaults.tokenizer] vocab_size: expected an integer, got 'big'"),
])
def test_a_broken_workbench_toml_is_one_line_before_any_stage(tmp_path, capsys, toml, reason):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "workbench.toml").write_bytes(toml)
    rc, out, err = workbench(capsys, "pipeline", "--project", tmp_path / "p")
    assert rc == 2 and reason in err and "Traceback" not in err
    assert not (tmp_path / "p" / "runs").exists()


def test_a_stage_refused_for_bad_data_exits_2_with_the_problems_on_stderr(tmp_path, capsys):
    run_dir = tmp_path / "rm"
    run_dir.mkdir()
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "p", "chosen": "a"}\nnot json\n')
    (run_dir / "config.json").write_text(json.dumps(
        {"init": str(tmp_path / "no-model"), "data": [str(tmp_path / "prefs.jsonl")], "device": "cpu"}))
    rc = reward.main(["--run-dir", str(run_dir), "--log-format", "human"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "2 problem(s) in the preference data" in err and "prefs.jsonl:2: malformed JSON" in err
    assert "failed" not in out and "problem" not in out


def test_run_set_checks_the_whole_config_before_writing_it(tmp_path, capsys):
    run_dir = tmp_path / "pre"
    run_dir.mkdir()
    # A config.json that is not JSON: one line naming the file, nothing rewritten.
    (run_dir / "config.json").write_text('{"max_steps": 10,,}')
    rc, out, err = workbench(capsys, "run", "pretrain", "--run-dir", run_dir, "--set", "max_steps=20")
    assert rc == 2 and f"{run_dir / 'config.json'}: invalid JSON at line 1" in err
    assert "Traceback" not in err and (run_dir / "config.json").read_text() == '{"max_steps": 10,,}'
    # A bad value is named by its field, and the folder keeps what it had.
    (run_dir / "config.json").write_text(json.dumps({"tokenizer": "../tok", "inputs": ["c.txt"]}))
    rc, out, err = workbench(capsys, "run", "pretrain", "--run-dir", run_dir, "--set", "lr=-1")
    assert rc == 2 and "config field 'lr'" in err and "nothing was written" in err
    assert json.loads((run_dir / "config.json").read_text()) == {"tokenizer": "../tok", "inputs": ["c.txt"]}
    rc, out, err = workbench(capsys, "run", "pretrain", "--run-dir", run_dir, "--set", "max_steps")
    assert rc == 2 and "expects key=value" in err
    # A value the stage itself refuses before any work (a device this machine lacks; a setting
    # the checkpoints cannot take on resume): the folder keeps the config that describes it.
    rc, out, err = workbench(capsys, "run", "pretrain", "--run-dir", run_dir, "--set", "device=tpu")
    assert rc == 2 and "unknown device 'tpu'" in err and "is as it was before --set" in err
    assert json.loads((run_dir / "config.json").read_text()) == {"tokenizer": "../tok", "inputs": ["c.txt"]}
    # A config.json that is not text, or not a file, is one line too.
    (run_dir / "config.json").write_bytes(b"\xff\xfe{}")
    rc, out, err = workbench(capsys, "run", "pretrain", "--run-dir", run_dir)
    assert rc == 2 and "not UTF-8 text (byte 0)" in err and "Traceback" not in err
