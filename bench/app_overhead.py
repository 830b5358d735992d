"""What running a stage from the app costs, against running the engine's command line directly.

    xvfb-run -a python bench/app_overhead.py [--steps 200] [--repeats 3] [--out docs/PERFORMANCE.md]
    (or QT_QPA_PLATFORM=offscreen python bench/app_overhead.py ...)

One small pretrain run (tiny preset, the app's pretrain settings from the catalogue, workbench/stages.py
with max_steps cut to `--steps`, on the demo corpus) started four ways:

  cli     `python -m engine.pretrain --run-dir DIR` in a subprocess, its stdout to a file
  cli +5  the same at the app's job priority (nice +5): on an idle machine it changes nothing;
          when other processes want the cores, it yields them, and this row shows how much
  runner  workbench.jobs.run_job: the same command, followed through its events.jsonl
          (the `workbench run` / `workbench pipeline` path)
  app     the pretrain panel's Start (StagePanel.start -> ProjectContext.launch -> ui.jobs),
          the panel on screen with its live plots; the job runs niced +5 and the app follows it
          through events.jsonl on a 100 ms poll, in a Qt event loop, as the app does

"Launch to done" runs from the launch call to the time stamp of the stage's done event, the
same end for every launcher; "launcher knows" runs to when the launcher saw the end (the
process's exit, or for the app its done event read by the poll). Tokens/s is the stage's
own figure (perf/tokens_per_s in events.jsonl: training steps only, so it shows how much CPU
the launcher takes from the job). "Job CPU" is the stage process's CPU time, which says whether
the job did more work or only waited longer for the cores. "Launcher CPU" is this process's
CPU time during the run: the app's polling, plotting and run-store sync, or the runner's
parsing. The variants run interleaved, `--repeats` rounds, so drifting load hits all alike;
the table gives medians.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import torch  # noqa: E402
from PySide6.QtCore import QEventLoop, QSettings, QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from bench.report import markdown_table, publish  # noqa: E402
from engine.config import save_config, to_dict  # noqa: E402
from engine.pretrain import PretrainConfig  # noqa: E402
from engine.tokenizer import TokenizerConfig, run as run_tokenizer  # noqa: E402
from workbench.demo import write_demo_project  # noqa: E402
from workbench.jobs import run_job, stage_command  # noqa: E402
from workbench.stages import spec as stage_spec  # noqa: E402

MARKER = "## Running a stage from the app against the command line"
VARIANTS = ("cli", "cli +5", "runner", "app")


def read_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


def children_cpu() -> float:
    """CPU seconds of the children reaped so far: the job's own work, however busy the machine."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def summarise(run_dir: Path, launched: float, wall: float, cpu: float, job_cpu: float) -> dict:
    events = read_events(run_dir)
    done = next(e for e in reversed(events) if e["type"] == "done")
    assert done["status"] == "completed", done
    perf = [e["perf/tokens_per_s"] for e in events if e["type"] == "metrics" and "perf/tokens_per_s" in e]
    return {"wall": wall, "cpu": cpu, "job_cpu": job_cpu, "tok_s": statistics.median(perf[1:] or perf),
            "done": done["time"] - launched, "load": os.getloadavg()[0]}


def run_cli(run_dir: Path, niceness: int = 0) -> dict:
    launched, t0, c0, j0 = time.time(), time.perf_counter(), time.process_time(), children_cpu()
    with open(run_dir / "stdout.log", "wb") as out:
        code = subprocess.call(stage_command("pretrain", run_dir)[:-2], stdout=out, stderr=subprocess.STDOUT,
                               preexec_fn=(lambda: os.nice(niceness)) if niceness else None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert code == 0, (run_dir / "stdout.log").read_text()[-2000:]
    return summarise(run_dir, launched, wall, cpu, children_cpu() - j0)


def run_runner(run_dir: Path) -> dict:
    launched, t0, c0, j0 = time.time(), time.perf_counter(), time.process_time(), children_cpu()
    res = run_job("pretrain", run_dir)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert res.status == "completed", res.error
    return summarise(run_dir, launched, wall, cpu, children_cpu() - j0)


def same_run(app_dir: Path, cfg: PretrainConfig) -> None:
    """The app's run must be the very run the CLI makes, bar where its paths point from."""
    theirs = json.loads((app_dir / "config.json").read_text())
    ours = to_dict(cfg)
    diff = {k for k in ours if k not in ("tokenizer", "inputs") and theirs.get(k) != ours[k]}
    assert not diff, {k: (theirs.get(k), ours[k]) for k in diff}


def run_app(window, values: dict, cfg: PretrainConfig) -> dict:
    from workbench import process
    panel = window.pages["pretrain"]
    panel.show_run(None)
    panel.form.set_values(values)
    loop = QEventLoop()
    launched, t0, c0, j0 = time.time(), time.perf_counter(), time.process_time(), children_cpu()
    job = panel.start()
    assert job is not None, panel.form.error
    job.finished.connect(lambda *_: loop.quit())
    if job.running:
        loop.exec()         # the app's own way of waiting: sleep until a timer or an event
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert job.status == "completed", job.error
    same_run(job.run_dir, cfg)
    assert len(job.history.series["train/loss"]) > 0      # the plots were fed
    # The done event comes just before the process exits; its CPU time is known once reaped.
    while any(p.pid == job.pid for p in process.children()):
        settle(0.05)
        process.reap()
    return summarise(job.run_dir, launched, wall, cpu, children_cpu() - j0)


def settle(seconds: float) -> None:
    loop = QEventLoop()
    QTimer.singleShot(int(seconds * 1000), loop.quit)
    loop.exec()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of every stage process (OMP_NUM_THREADS; default: torch's choice); "
                         "1 is steadier on a shared machine")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = ap.parse_args()
    if args.threads:
        # Inherited by every launcher's child alike (ui.jobs and the runner copy os.environ).
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)

    from ui.app import make_app
    from engine.osproc import LOWER_PRIORITY as JOB_NICENESS
    from ui.main_window import MainWindow

    app = make_app()
    tmp = Path(tempfile.mkdtemp(prefix="app-overhead-"))
    project = tmp / "project"
    write_demo_project(project, seed=0, scale="small")
    corpus = project / "data" / "corpus"
    tok_dir = project / "runs" / "tokenizer-0"
    tok_dir.mkdir(parents=True)
    assert run_tokenizer(TokenizerConfig(inputs=[str(corpus)], vocab_size=4096), tok_dir) == "completed"
    settings = dict(stage_spec("pretrain").demo_settings(), max_steps=args.steps, device="cpu")
    cfg = PretrainConfig(tokenizer=str(tok_dir), inputs=[str(corpus)], preset="tiny", **settings)

    window = MainWindow(QSettings(str(tmp / "settings.ini"), QSettings.Format.IniFormat))
    window.resize(1400, 880)
    window.show()
    window.open_project(project)
    window.go("pretrain")
    values = window.pages["pretrain"].form.values()
    values.update(tokenizer=str(tok_dir), inputs=[str(corpus)], preset="tiny", model={}, **settings)

    # The CLI runs live outside the project: the app's run-store sync must not read them.
    outside = tmp / "cli-runs"
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(args.repeats):
        for variant in VARIANTS:
            if variant == "app":
                r = run_app(window, values, cfg)
            else:
                run_dir = outside / f"{variant}-{rep}"
                run_dir.mkdir(parents=True)
                save_config(cfg, run_dir / "config.json")
                r = (run_runner(run_dir) if variant == "runner"
                     else run_cli(run_dir, JOB_NICENESS if variant == "cli +5" else 0))
            results[variant].append(r)
            print(f"round {rep + 1} {variant}: " + ", ".join(f"{k} {v:,.2f}" for k, v in r.items()), flush=True)
            settle(1.0)   # the app's run-store sync and last redraw happen here, not in the next run
    window.close()
    app.processEvents()
    shutil.rmtree(tmp, ignore_errors=True)

    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in results.items()}
    base = med["cli"]
    rows = []
    for v in VARIANTS:
        m = med[v]
        rows.append((v, f"{m['done']:.1f}", f"{m['done'] / base['done']:.3f}", f"{m['wall']:.1f}",
                     f"{m['job_cpu']:.1f}",
                     f"{m['tok_s']:,.0f}", f"{m['tok_s'] / base['tok_s']:.3f}", f"{m['cpu']:.2f}", f"{m['load']:.1f}",
                     " / ".join(f"{r['done']:.1f}" for r in results[v])))
    header = ("launched by", "launch to done s", "/ cli", "launcher knows s", "job CPU s", "tokens/s",
              "tokens/s / cli", "launcher CPU s", "load average", "launch to done s per round")
    table = markdown_table(header, rows)
    platform_name = os.environ.get("QT_QPA_PLATFORM") or QApplication.platformName()
    n_thr = torch.get_num_threads()
    threads = f"{n_thr} torch thread{'s' * (n_thr != 1)}"
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({threads} "
               f"in the stage), torch {torch.__version__}, Python {platform.python_version()}, Qt platform "
               f"`{platform_name}`")
    section = (f"{MARKER}\n\n"
               f"`python bench/app_overhead.py --steps {args.steps} --repeats {args.repeats}"
               f"{f' --threads {args.threads}' if args.threads else ''}` on {machine}. "
               f"One pretrain run, preset tiny, {args.steps} steps of batch {cfg.batch_size}, the app's pretrain "
               f"settings otherwise (log every {cfg.log_every}, eval every {cfg.eval_every} steps), on the demo "
               f"corpus (scale small, encoded by each run), started four ways: *cli* is `python -m engine.pretrain "
               f"--run-dir DIR`; *cli +5* the same at the app's job priority (nice +{JOB_NICENESS}); *runner* is "
               f"workbench.jobs.run_job (the same job as the app's, followed through its events.jsonl every 0.2 s); *app* is the pretrain "
               f"panel's Start with the panel and its live plots on screen, the job at nice +{JOB_NICENESS}, followed "
               f"through events.jsonl every 100 ms. *Launch to done* runs from the launch call to the time stamp of the "
               f"stage's done event (the same end for all four; it includes ~2 s of Python and torch start-up); "
               f"*launcher knows* runs to when the launcher saw the end: the process's exit for cli and runner "
               f"(which adds the interpreter's shutdown), the done event read by the 100 ms poll for the app; job CPU is the stage "
               f"process's user + system time (more of it for the same work means its threads spun waiting for a "
               f"core); tokens/s is the stage's own (training steps only); launcher CPU is the benchmark process's "
               f"CPU time meanwhile (the app's polling, plots and run-store sync); load average is the 1-minute "
               f"figure at the run's end and counts the job's own {threads}: above that, other processes were "
               f"competing for the cores, and a niced job yields to them. {args.repeats} interleaved rounds, "
               f"medians."
               + (" `--threads 1` keeps the figures steady when other jobs share the CPU: two threads spin-wait "
                  "against them and then vary several-fold from run to run." if args.threads == 1 else "")
               + "\n\n"
               f"{table}\n")
    publish(args.out, MARKER, section, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
