"""The run store: an index of run folders with status, lineage and last metrics."""
import json
import os
import subprocess
import sys
import time

import pytest

from workbench.jobs import LOST
from engine.osproc import alive as process_alive
from workbench.runfold import EventTail
from workbench.runs import RunStore, parent_runs


def make_run(project, name, config=None, events=()):
    run = project / "runs" / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config or {}))
    with open(run / "events.jsonl", "w") as f:
        for ev in events:
            f.write(json.dumps(ev) + "\n")
    return run


def test_sync_reads_status_metrics_and_lineage_from_folders(tmp_path):
    make_run(tmp_path, "tokenizer-1", {}, [{"type": "start", "stage": "tokenizer", "pid": 1, "time": 10.0},
                                           {"type": "metrics", "step": 0, "tokenizer/vocab_size": 300},
                                           {"type": "done", "status": "completed", "time": 12.5}])
    make_run(tmp_path, "pretrain-1", {"tokenizer": "../tokenizer-1/tokenizer.json", "inputs": ["/elsewhere/c.txt"]},
             [{"type": "start", "stage": "pretrain", "pid": 1, "time": 20.0},
              {"type": "metrics", "step": 5, "train/loss": 3.0},
              {"type": "metrics", "step": 10, "train/loss": 2.5, "val/loss": 2.7},
              {"type": "done", "status": "stopped", "time": 30.0}])
    make_run(tmp_path, "sft-1", {"init": "../pretrain-1"})   # created, never started
    store = RunStore(tmp_path)
    runs = {r.name: r for r in store.sync()}
    assert runs["tokenizer-1"].status == "completed" and runs["tokenizer-1"].duration_s == 2.5
    p = runs["pretrain-1"]
    assert (p.stage, p.status, p.step) == ("pretrain", "stopped", 10)
    assert p.metrics == {"train/loss": 2.5, "val/loss": 2.7}
    assert p.parents == {"tokenizer": "tokenizer-1"}           # the file outside the project is no parent
    assert runs["sft-1"].status == "created" and runs["sft-1"].parents == {"init": "pretrain-1"}
    assert [r.name for r in store.lineage("sft-1")] == ["sft-1", "pretrain-1", "tokenizer-1"]
    assert [r.name for r in store.children("tokenizer-1")] == ["pretrain-1"]
    store.close()


def test_sync_reads_only_appended_events_and_sees_a_resume(tmp_path):
    run = make_run(tmp_path, "pretrain-1", {}, [{"type": "start", "stage": "pretrain", "pid": os.getpid(), "time": 1.0},
                                                {"type": "metrics", "step": 1, "train/loss": 4.0},
                                                {"type": "done", "status": "stopped", "time": 2.0}])
    store = RunStore(tmp_path)
    store.sync()
    offset = store.store.conn.execute("SELECT events_offset FROM runs").fetchone()[0]
    assert offset == (run / "events.jsonl").stat().st_size
    with open(run / "events.jsonl", "a") as f:   # a resumed session, this test's process as its pid
        f.write(json.dumps({"type": "start", "stage": "pretrain", "pid": os.getpid(), "time": 3.0}) + "\n")
        f.write(json.dumps({"type": "metrics", "step": 2, "train/loss": 3.0}) + "\n")
        f.write('{"type": "metrics", "step": 3, "tra')              # half-written: not read yet
    info = store.sync()[0]
    # Alive pid, but its command line does not name the run: a recycled pid, so not running.
    assert info.status == "failed" and info.error == LOST
    assert info.metrics["train/loss"] == 3.0 and info.step == 2 and info.started_at == 1.0
    store.close()


def test_a_live_process_is_running_and_a_dead_one_failed(tmp_path):
    run = make_run(tmp_path, "pretrain-1")
    proc = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(30)", str(run)])
    try:
        with open(run / "events.jsonl", "w") as f:
            f.write(json.dumps({"type": "start", "stage": "pretrain", "pid": proc.pid, "time": 1.0}) + "\n")
        # Until the child has exec'd, its command line is still this process's: wait for it.
        deadline = time.monotonic() + 10
        while not process_alive(proc.pid, run) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process_alive(proc.pid, run)
        store = RunStore(tmp_path)
        assert store.sync()[0].status == "running"
        with pytest.raises(RuntimeError, match="running"):
            store.delete("pretrain-1")
    finally:
        proc.kill()
        proc.wait()
    assert store.sync()[0].status == "failed"
    store.delete("pretrain-1")
    assert not run.exists() and store.sync() == []
    store.close()


def test_a_vanished_folder_leaves_the_index(tmp_path):
    run = make_run(tmp_path, "tokenizer-1")
    store = RunStore(tmp_path)
    assert len(store.sync()) == 1
    (run / "config.json").unlink()
    (run / "events.jsonl").unlink()
    run.rmdir()
    assert store.sync() == []
    store.close()


def test_event_tail_never_returns_a_torn_line(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read_new() == []
    path.write_text('{"a": 1}\n{"b": ')
    assert tail.read_new() == [{"a": 1}]
    with open(path, "a") as f:
        f.write('2}\n')
    assert tail.read_new() == [{"b": 2}]
    path.write_text('{"c": 3}\n')          # replaced by a shorter file: read from the top
    assert tail.read_new() == [{"c": 3}]


def test_parent_runs_ignores_paths_outside_the_project(tmp_path):
    runs = tmp_path / "runs"
    run = runs / "ppo-1"
    cfg = {"policy": "../sft-1/checkpoints/step-000010", "reward_model": str(runs / "reward-1"),
           "value_model": "/somewhere/else"}
    assert parent_runs("ppo", cfg, run, runs) == {"policy": "sft-1", "reward_model": "reward-1"}


def test_a_reward_model_grpo_gives_no_weight_is_not_its_parent(tmp_path):
    runs = tmp_path / "runs"
    cfg = {"policy": "../sft-1", "reward_model": "../reward-1", "rm_weight": 0.0}
    assert parent_runs("grpo", cfg, runs / "grpo-1", runs) == {"policy": "sft-1"}
    # nor, named outside the project, an input the report lists as come from outside
    from types import SimpleNamespace
    from workbench.report import outside_inputs
    run = SimpleNamespace(stage="grpo", config=dict(cfg, reward_model="/elsewhere/rm"), path=runs / "grpo-1")
    assert outside_inputs(run) == []
    cfg["rm_weight"] = run.config["rm_weight"] = 0.5
    assert parent_runs("grpo", cfg, runs / "grpo-1", runs) == {"policy": "sft-1", "reward_model": "reward-1"}
    assert outside_inputs(run) == [("reward_model", "/elsewhere/rm")]


def test_parents_indexed_by_an_earlier_rule_are_derived_again_on_opening(tmp_path):
    done = [{"type": "start", "stage": "grpo", "pid": 1, "time": 1.0},
            {"type": "done", "status": "completed", "time": 2.0}]
    make_run(tmp_path, "sft-1", {}, done)
    make_run(tmp_path, "reward-1", {}, done)
    make_run(tmp_path, "grpo-1", {"policy": "../sft-1", "reward_model": "../reward-1", "rm_weight": 0.0}, done)
    store = RunStore(tmp_path)
    store.sync()
    # As an index written before a reward model at weight 0 stopped being a parent left it.
    stale = json.dumps({"policy": "sft-1", "reward_model": "reward-1"})
    store.store.conn.execute("UPDATE runs SET parents = ? WHERE name = 'grpo-1'", (stale,))
    store.store.conn.commit()
    assert {r.name: r for r in store.sync()}["grpo-1"].parents == json.loads(stale)   # not every sync
    store.close()
    store = RunStore(tmp_path)
    assert {r.name: r for r in store.sync()}["grpo-1"].parents == {"policy": "sft-1"}
    assert [r.name for r in store.children("reward-1")] == []
    store.close()
    # A config gone or broken since says nothing new: the parents indexed from it stay.
    for broken in ("{not json", None):
        config = tmp_path / "runs" / "grpo-1" / "config.json"
        config.unlink(missing_ok=True)
        if broken:
            config.write_text(broken)
        store = RunStore(tmp_path)
        assert {r.name: r for r in store.sync()}["grpo-1"].parents == {"policy": "sft-1"}
        assert [r.name for r in store.children("sft-1")] == ["grpo-1"]
        store.close()


def test_event_tail_spreads_a_long_file_over_calls(tmp_path):
    path = tmp_path / "events.jsonl"
    lines = [json.dumps({"step": i, "pad": "x" * 50}) for i in range(1000)]
    path.write_text("\n".join(lines) + "\n" + json.dumps({"long": "y" * 5000}) + "\n")
    tail = EventTail(path)
    got = []
    for _ in range(1000):
        batch = tail.read_new(max_bytes=4096)
        if not batch:
            break
        assert len(batch) <= 4096 // 60 + 1 or "long" in batch[-1]
        got.extend(batch)
    assert [e["step"] for e in got[:-1]] == list(range(1000)) and got[-1]["long"] == "y" * 5000


def test_a_completed_run_shows_its_summary_figures_not_its_last_logged_ones(tmp_path):
    # The reward stage logs val/accuracy during training, then re-evaluates its best checkpoint
    # into summary.json: the sidebar and the runs table must show the checkpoint's figure.
    run = make_run(tmp_path, "reward-1", {}, [{"type": "start", "stage": "reward", "pid": 1, "time": 1.0},
                                              {"type": "metrics", "step": 50, "val/accuracy": 0.83, "val/margin": 1.5}])
    (run / "summary.json").write_text(json.dumps({"val/accuracy": 0.87, "val_rankings": 250, "flag/x": True}))
    store = RunStore(tmp_path)
    info = store.sync()[0]
    assert info.metrics["val/accuracy"] == 0.83    # still running (as far as events say): the live figure
    with open(run / "events.jsonl", "a") as f:
        f.write(json.dumps({"type": "done", "status": "completed", "time": 2.0}) + "\n")
    info = store.sync()[0]
    assert info.status == "completed"
    assert info.metrics == {"val/accuracy": 0.87, "val/margin": 1.5}
    store.close()


def test_a_sliced_sync_catches_up_over_calls_and_never_calls_a_finished_run_lost(tmp_path):
    # pid 1 is alive but is not this run's process, so only the final `done` says it completed
    events = [{"type": "start", "stage": "pretrain", "pid": 1, "time": 1.0}]
    events += [{"type": "metrics", "step": s, "train/loss": 10.0 / s} for s in range(1, 401)]
    events += [{"type": "done", "status": "completed", "time": 2.0}]
    make_run(tmp_path, "pretrain-1", {}, events)
    store = RunStore(tmp_path)
    seen, calls = [], 0
    while True:
        calls += 1
        [info] = store.sync(max_bytes=4096)
        seen.append((info.status, info.step))
        if not store.behind:
            break
    assert calls > 3 and store.behind is False
    assert all(status == "running" for status, _ in seen[:-1])    # not LOST before its done is read
    steps = [step for _, step in seen]
    assert steps == sorted(steps) and seen[-1] == ("completed", 400)
    assert info.metrics == {"train/loss": 10.0 / 400}
    store.close()


def test_an_event_glued_onto_a_torn_line_is_recovered(tmp_path):
    # An older writer killed mid-line left a torn event, and the next start was appended to it.
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "metrics", "step": 1, "train/lo{"type": "start", "pid": 7}\n{"type": "done", "status": "completed"}\n')
    got = EventTail(path).read_new()
    assert [e["type"] for e in got] == ["start", "done"] and got[0]["pid"] == 7


def test_a_run_set_by_epochs_is_estimated_from_one_that_was_too(tmp_path):
    from workbench.runs import estimate_seconds
    events = [{"type": "start", "stage": "sft", "pid": 1, "time": 0.0},
              {"type": "progress", "step": 100, "total": 100, "elapsed_s": 50.0, "time": 50.0},
              {"type": "done", "status": "completed", "time": 50.0}]
    make_run(tmp_path, "sft-2", {"max_steps": 20, "epochs": 2, "batch_size": 16}, events)
    make_run(tmp_path, "sft-1", {"max_steps": 100, "epochs": 0, "batch_size": 16}, events)
    store = RunStore(tmp_path)
    runs = sorted(store.sync(), key=lambda r: r.name, reverse=True)       # the epochs run first
    # 20 passes where 2 took 50 s: 500 s, whatever max_steps says (epochs override it).
    assert estimate_seconds("sft", {"max_steps": 20, "epochs": 20, "batch_size": 16}, runs) == (500.0, "sft-2")
    # Without a run set by epochs there is no basis: no estimate rather than a wrong one.
    assert estimate_seconds("sft", {"max_steps": 20, "epochs": 20, "batch_size": 16}, runs[1:]) == (None, "")
    assert estimate_seconds("sft", {"max_steps": 200, "epochs": 0, "batch_size": 16}, runs[1:]) == (100.0, "sft-1")
    store.close()


def test_a_resumed_run_keeps_its_progress_until_the_new_session_reports():
    from workbench.runfold import RunFold
    fold = RunFold()
    for ev in ({"type": "start", "pid": 1, "time": 0.0},
               {"type": "progress", "step": 234, "total": 300, "elapsed_s": 30.0, "time": 30.0},
               {"type": "done", "status": "stopped", "time": 31.0},
               {"type": "start", "pid": 2, "time": 40.0}):
        fold.add(ev)
    assert fold.status == "running" and fold.progress["step"] == 234      # not 0% until it speaks
    assert fold.eta_s() is None                     # the last session's pace is not this one's


def test_a_project_opened_through_a_symlink_keeps_its_paths_relative(tmp_path):
    """A run's paths shown absolute and written back stay inside the project as it was opened
    (a resume compares them with the config its checkpoints saved)."""
    from workbench.runfolder import absolutize, relativize
    real = tmp_path / "real" / "proj"
    (real / "runs" / "dpo-1").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    run = link / "runs" / "dpo-1"
    shown = absolutize("dpo", {"init": "../sft-001", "data": ["../../data/prefs.jsonl"]}, run)
    assert shown["init"] == str(link / "runs" / "sft-001")
    assert relativize("dpo", shown, run, link) == {"init": "../sft-001", "data": ["../../data/prefs.jsonl"]}
