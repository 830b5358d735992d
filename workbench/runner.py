"""Headless job runner: one engine stage as a child process, its events parsed line by line.

This is the protocol the app's QProcess runner follows too: the child is
`python -m engine.<stage> --run-dir DIR --log-format json`, each stdout line is one JSON
event (the same lines land in DIR/events.jsonl), and a stop request is the file DIR/STOP,
then SIGTERM, then SIGKILL after a grace period.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from engine.config import save_config

STAGES = ("tokenizer", "pretrain", "sft", "sample", "reward", "ppo")


@dataclass
class JobResult:
    stage: str
    run_dir: Path
    status: str                  # completed | stopped | failed
    error: Optional[str]
    returncode: int
    events: list[dict] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """The last value of every metric the run reported."""
        out: dict[str, float] = {}
        for ev in self.events:
            if ev.get("type") == "metrics":
                out.update({k: v for k, v in ev.items() if "/" in k})
        return out


def stage_command(stage: str, run_dir: Path, log_format: str = "json") -> list[str]:
    """The command line of a stage's job: the engine module, under torchrun when the run's
    config asks for several processes (`nproc`, for the DDP stages)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}' (known: {', '.join(STAGES)})")
    stage_args = ["-m", f"engine.{stage}", "--run-dir", str(run_dir), "--log-format", log_format]
    nproc = config_nproc(run_dir)
    if nproc > 1:
        # --standalone: a rendezvous on a free local port, so several DDP jobs can run at once.
        return [sys.executable, "-u", "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", *stage_args]
    return [sys.executable, "-u", *stage_args]


def config_nproc(run_dir: Path) -> int:
    """The number of processes a run trains with (1 when the config is absent or unreadable:
    the stage itself then reports what is wrong with it)."""
    try:
        value = json.loads((Path(run_dir) / "config.json").read_text()).get("nproc", 1)
    except (OSError, ValueError, AttributeError):
        return 1
    return value if isinstance(value, int) and value > 1 else 1


def prepare_run(run_dir: Path, config) -> Path:
    """Create the run folder and write its config.json (the only input the child reads)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.json")
    return run_dir


def run_job(stage: str, run_dir: Path, on_event: Optional[Callable[[dict], None]] = None,
            stop_grace_s: float = 30.0) -> JobResult:
    """Run a stage to the end in a child process; Ctrl-C here asks the child to stop cleanly."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(stage_command(stage, run_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", env=env,
                            start_new_session=True)
    events: list[dict] = []
    try:
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue  # a stray print from a library; events.jsonl has the real record
            events.append(ev)
            if on_event is not None:
                on_event(ev)
    except KeyboardInterrupt:
        request_stop(run_dir, proc, stop_grace_s)
        for line in proc.stdout:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    stderr = proc.stderr.read()
    code = proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    done = next((e for e in reversed(events) if e.get("type") == "done"), None)
    if done is None:
        tail = stderr.strip().splitlines()[-5:]
        return JobResult(stage, run_dir, "failed",
                         f"the {stage} process exited with code {code} without a done event"
                         + (": " + " | ".join(tail) if tail else ""), code, events)
    return JobResult(stage, run_dir, done["status"], done.get("error"), code, events)


def request_stop(run_dir: Path, proc: subprocess.Popen, grace_s: float) -> None:
    (run_dir / "STOP").touch()
    deadline = time.monotonic() + grace_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
