"""How long the UI thread stalls while jobs stream events into the app.

A QTimer probe (ui/stall_probe.py) ticks every 10 ms on the UI thread; every late tick is a
stall. Scenarios, each with the stage's panel visible and its plots redrawing:

  training   a real pretrain job (tiny model, metrics every step) started from the panel
  flood      a writer process appending metrics events as fast as it can (far above any real
             stage) to a run the app re-attached to
  reopen     opening a finished run with 100k metrics events (the one-off load of its plots)

    xvfb-run -a python bench/ui_stall.py            (a real window; or QT_QPA_PLATFORM=offscreen)

The bar: no stall above 50 ms while a job streams events (training, flood).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PySide6.QtCore import QSettings  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from bench.report import write_section  # noqa: E402

WRITER = r"""
import json, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
t_end = time.time() + seconds
with open(path, "a") as f:
    f.write(json.dumps({"type": "start", "stage": "pretrain", "pid": __import__("os").getpid(), "time": time.time()}) + "\n")
    step = 0
    while time.time() < t_end:
        for _ in range(50):
            step += 1
            f.write(json.dumps({"type": "metrics", "step": step, "train/loss": 5.0 / (1 + step / 1000),
                                "train/lr": 1e-3, "train/grad_norm": 1.0, "train/tokens": step * 2048,
                                "perf/tokens_per_s": 30000.0, "time": time.time()}) + "\n")
            f.write(json.dumps({"type": "progress", "step": step, "total": 10**9, "unit": "steps",
                                "tokens_per_s": 30000.0, "elapsed_s": 1.0, "eta_s": 100.0}) + "\n")
        f.flush()
        time.sleep(0.01)
    f.write(json.dumps({"type": "done", "status": "completed", "error": None, "time": time.time()}) + "\n")
print(step)
"""


def wait(app, cond, timeout_s: float) -> None:
    t_end = time.time() + timeout_s
    while not cond() and time.time() < t_end:
        app.processEvents()
        time.sleep(0.002)


def scenario_training(app, window, probe, steps: int) -> dict:
    window.go("pretrain")
    panel = window.pages["pretrain"]
    panel.show_run(None)
    values = panel.form.values()
    values.update(preset="tiny", model={"d_model": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 4, "d_ff": 192,
                                        "max_seq_len": 64},
                  max_steps=steps, batch_size=8, log_every=1, eval_every=50, eval_batches=2, sample_every=100,
                  sample_tokens=16, checkpoint_every=steps, device="cpu")
    panel.form.set_values(values)
    job = panel.start()
    wait(app, lambda: "train/loss" in job.history.keys(), 120)
    probe.reset()
    probe.start()
    t0 = time.time()
    wait(app, lambda: not job.running, 600)
    probe.stop()
    n = len(job.history.series["train/loss"])          # metrics events (each also brings a progress event)
    return dict(probe.summary(), events=n, seconds=time.time() - t0, status=job.status)


def scenario_flood(app, window, probe, seconds: float) -> dict:
    ctx = window.ctx
    run = ctx.new_run_dir("pretrain")
    (run / "config.json").write_text("{}")
    events = run / "events.jsonl"
    events.touch()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(events), str(seconds), str(run)],
                            stdout=subprocess.PIPE, text=True)
    wait(app, lambda: events.stat().st_size > 0, 10)
    ctx.sync()
    jobs = ctx.reattach()
    window.go("pretrain")
    window.pages["pretrain"].select_run(run.name)
    probe.reset()
    probe.start()
    t0 = time.time()
    wait(app, lambda: all(not j.running for j in jobs), seconds + 30)
    probe.stop()
    steps = int(proc.communicate()[0].strip() or 0)
    elapsed = time.time() - t0
    return dict(probe.summary(), events=steps, seconds=elapsed, status=jobs[0].status if jobs else "not attached")


def scenario_reopen(app, window, probe, n: int) -> dict:
    run = window.ctx.new_run_dir("pretrain")
    (run / "config.json").write_text("{}")
    with open(run / "events.jsonl", "w") as f:
        f.write(json.dumps({"type": "start", "stage": "pretrain", "pid": 1, "time": 0.0}) + "\n")
        for step in range(1, n + 1):
            f.write(json.dumps({"type": "metrics", "step": step, "train/loss": 5.0 / (1 + step / 1000),
                                "train/lr": 1e-3, "train/grad_norm": 1.0, "train/tokens": step * 2048}) + "\n")
        f.write(json.dumps({"type": "done", "status": "completed", "error": None, "time": 1.0}) + "\n")
    window.ctx.sync()
    probe.reset()
    probe.start()
    t0 = time.time()
    window.pages["pretrain"].select_run(run.name)
    wait(app, lambda: time.time() - t0 > 1.5, 5)
    probe.stop()
    return dict(probe.summary(), events=n, seconds=time.time() - t0, status="completed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="pretrain steps of the training scenario")
    parser.add_argument("--flood-seconds", type=float, default=10.0)
    parser.add_argument("--reopen-events", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = parser.parse_args()

    from engine.tokenizer import TokenizerConfig
    from ui.app import make_app
    from ui.main_window import MainWindow
    from ui.stall_probe import StallProbe
    from workbench.demo import write_demo_project
    from workbench.jobs import run_job
    from workbench.runfolder import prepare_run

    app = make_app()
    tmp = Path(tempfile.mkdtemp(prefix="ui-stall-"))
    project = tmp / "project"
    write_demo_project(project, seed=0, scale="tiny")
    tok = prepare_run(project / "runs" / "tokenizer-0", TokenizerConfig(
        inputs=[str(p) for p in (project / "data" / "corpus").iterdir()], vocab_size=512, max_train_chars=200_000))
    assert run_job("tokenizer", tok).status == "completed"

    window = MainWindow(QSettings(str(tmp / "settings.ini"), QSettings.Format.IniFormat))
    window.resize(1400, 880)
    window.show()
    window.open_project(project)
    probe = StallProbe(interval_ms=10)
    rows = [("training (real pretrain job)", scenario_training(app, window, probe, args.steps)),
            ("flood (synthetic writer)", scenario_flood(app, window, probe, args.flood_seconds)),
            (f"reopen a run of {args.reopen_events // 1000}k events", scenario_reopen(app, window, probe, args.reopen_events))]
    window.close()

    platform_name = os.environ.get("QT_QPA_PLATFORM") or QApplication.platformName()
    lines = ["## UI responsiveness while jobs stream events", "",
             f"`python bench/ui_stall.py` on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"Qt platform `{platform_name}`: a 10 ms QTimer probe on the UI thread with the pretrain panel and "
             "its plots on screen. A stall is how late a tick came. Bar: under 50 ms while a job streams (training, flood); plots redraw one per event-loop turn.", "",
             "| scenario | metrics events | per s | ticks | max stall | p99 | p50 | status |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['events']:,} | {r['events'] / max(r['seconds'], 1e-9):,.0f} | {r['ticks']:,} | "
                     f"{r['max_stall_ms']:.0f} ms | {r['p99_ms']:.1f} ms | {r['p50_ms']:.1f} ms | {r['status']} |")
    section = "\n".join(lines) + "\n"
    print(section)
    write_section(args.out, "## UI responsiveness while jobs stream events", section)


if __name__ == "__main__":
    main()
