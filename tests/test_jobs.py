"""The Qt-free job (workbench/jobs.py) over the portable process layer (engine/osproc.py):
start, re-attach by pid, follow events with a byte budget, tell its own end from an earlier
session's, and stop with escalation down to killing the whole process tree."""
import json
import subprocess
import sys
import time

import psutil
import pytest

from engine import osproc as process
from workbench import jobs
from workbench.jobs import Job


def events(path, *evs):
    with open(path, "a", encoding="utf-8") as f:
        for ev in evs:
            f.write(json.dumps(ev) + "\n")


def fake_stage(monkeypatch, script: str):
    """Make a job's command a small Python script instead of an engine stage (argv[1] is the
    run folder, as in a stage's command line)."""
    monkeypatch.setattr(jobs, "stage_command",
                        lambda stage, run_dir, fmt="json": [sys.executable, "-c", script, str(run_dir)])


def poll_until_done(job, timeout_s=30.0, **kw):
    deadline = time.monotonic() + timeout_s
    seen = []
    while job.running and time.monotonic() < deadline:
        seen += job.poll(**kw)
        time.sleep(0.02)
    assert not job.running, "the job did not end"
    return seen


# The start of a fake stage: events written as a stage writes them.
EMITS = """
import json, os, sys, time
path = os.path.join(sys.argv[1], "events.jsonl")
def emit(**ev):
    with open(path, "a") as f:
        f.write(json.dumps(ev) + "\\n")
emit(type="start", pid=os.getpid())
"""
WRITES_A_RUN = EMITS + """
for step in range(1, 4):
    emit(type="metrics", step=step, **{"train/loss": 4.0 - step})
    time.sleep(0.05)
emit(type="done", status="completed", error=None)
"""


def test_a_resumed_run_ends_on_its_own_done_and_keeps_its_history(tmp_path, monkeypatch):
    # The folder holds an earlier session that stopped: its `done` must not end the new job,
    # and its curve stays in the fold (from step 1, not from where the resume starts).
    run = tmp_path / "pretrain-1"
    run.mkdir()
    events(run / "events.jsonl", {"type": "start", "pid": 1},
           {"type": "metrics", "step": 1, "train/loss": 9.0}, {"type": "done", "status": "stopped"})
    fake_stage(monkeypatch, WRITES_A_RUN)
    job = Job("pretrain", run).start()
    assert job.running
    poll_until_done(job)
    job.wait()
    assert job.status == "completed" and job.returncode == 0
    xs, ys = job.fold.history.arrays("train/loss")
    assert list(xs) == [1, 2, 3] and list(ys) == [3.0, 2.0, 1.0]     # the resume replaced step 1
    assert [e["type"] for e in job.fold.listed] == ["start", "done", "start", "done"]


def test_a_crash_before_the_first_event_says_so_with_the_stderr_tail(tmp_path, monkeypatch):
    run = tmp_path / "sft-1"
    run.mkdir()
    fake_stage(monkeypatch, "import sys; sys.stderr.write('ImportError: no module named x\\n'); sys.exit(1)")
    job = Job("sft", run).start()
    poll_until_done(job)
    assert job.status == "failed"
    assert "exited before it started" in job.error and "ImportError: no module named x" in job.error


def test_attach_catches_up_a_slice_at_a_time_and_ends_only_on_the_last_done(tmp_path):
    run = tmp_path / "pretrain-2"
    run.mkdir()
    lines = [{"type": "start", "pid": 1}, {"type": "done", "status": "stopped"}]
    lines += [{"type": "start", "pid": 2}] + [{"type": "metrics", "step": i, "train/loss": 1.0, "pad": "x" * 80}
                                                for i in range(1, 200)]
    events(run / "events.jsonl", *lines)
    # A live process working on this folder (its command line names it).
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(run)])
    try:
        job = Job("pretrain", run).attach(proc.pid)
        first = job.poll(max_bytes=4096)
        assert 0 < len(first) < 100 and job.running      # the old session's done did not end it
        poll = lambda: job.poll(max_bytes=4096)           # noqa: E731
        for _ in range(100):
            if not poll():
                break
        assert job.running and job.fold.step == 199
        events(run / "events.jsonl", {"type": "done", "status": "completed"})
        poll_until_done(job, max_bytes=4096)
        assert job.status == "completed"
    finally:
        proc.kill()
        proc.wait()


STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
open(sys.argv[1] + "/child.pid", "w").write(str(child.pid))
time.sleep(120)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is not ignorable there")
def test_stop_escalates_to_killing_the_whole_tree(tmp_path, monkeypatch):
    # A job that ignores STOP and SIGTERM, with a child that does too: after two grace
    # periods both are gone.
    run = tmp_path / "ppo-1"
    run.mkdir()
    fake_stage(monkeypatch, STUBBORN)
    job = Job("ppo", run).start()
    deadline = time.monotonic() + 30
    while not (run / "child.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    grandchild = int((run / "child.pid").read_text())
    job.stop(grace_s=0.3)
    assert (run / "STOP").exists() and job.stopping
    poll_until_done(job)
    assert job.status == "failed" and not process.alive(job.pid)
    psutil.wait_procs([psutil.Process(grandchild)] if psutil.pid_exists(grandchild) else [], timeout=10)
    assert not process.alive(grandchild)
    job.wait()


def test_the_eta_follows_the_recent_pace_not_the_average():
    from workbench.runfold import RunFold
    fold = RunFold()
    # 100 steps in 100 s, then the machine gets busy: 10 s a step.
    for step in range(0, 101, 10):
        fold.add({"type": "progress", "step": step, "total": 300, "elapsed_s": float(step), "eta_s": 1.0})
    for i, step in enumerate(range(101, 121), start=1):
        fold.add({"type": "progress", "step": step, "total": 300, "elapsed_s": 100.0 + 10 * i, "eta_s": 1.0})
    eta = fold.eta_s()
    assert 1500 < eta < 1900            # ~180 steps left at ~9-10 s each, not 180 s at the average
    fold.add({"type": "done", "status": "stopped"})
    assert fold.eta_s() is None         # no ETA for a run that is not running


STOPS_ON_REQUEST = EMITS + """
emit(type="metrics", step=1, **{"train/loss": 3.0})
while not os.path.exists(os.path.join(sys.argv[1], "STOP")):
    time.sleep(0.02)
emit(type="done", status="stopped", error=None)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM cannot be sent to oneself there")
def test_a_sigterm_to_the_runner_stops_its_stage_instead_of_orphaning_it(tmp_path, monkeypatch):
    # `kill PID`, a CI cancel or `timeout` on `workbench pipeline` used to leave the stage
    # training on, a child of init holding its run folder.
    import os
    import signal
    run = tmp_path / "pretrain-1"
    run.mkdir()
    fake_stage(monkeypatch, STOPS_ON_REQUEST)
    before = signal.getsignal(signal.SIGTERM)

    def on_event(ev):
        if ev["type"] == "metrics":
            os.kill(os.getpid(), signal.SIGTERM)
    result = jobs.run_job("pretrain", run, on_event=on_event, poll_s=0.02)
    assert result.status == "stopped" and result.returncode is not None
    assert signal.getsignal(signal.SIGTERM) is before
