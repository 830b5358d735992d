"""How long the app takes to show something, to paint its window, to open a project, and to quit.

    xvfb-run -a python bench/app_start.py [--project DIR] [--repeats 5] [--out docs/PERFORMANCE.md]

Each repeat starts `python -m ui.launcher --project DIR` as a user's `workbench` does, with
WORKBENCH_STARTUP_LOG set: the app then writes the time of each milestone (ui/app.py,
StartupLog). Times are from just before the process is started: *splash* when the splash screen
has been shown, *first paint* when the main window has painted (its "Opening …" placeholder),
*project open* when the project's pages are built and shown. Then, a second later, SIGINT asks
the window to close (what Ctrl-C in the terminal does, the same path as Ctrl+Q): *quit* is until
the process has exited, *event loop left* until app.exec() returned. Medians over the repeats,
min-max beside them. Without --project a demo project (scale small) is written to a temporary
folder first and its pipeline is not run: the app opens a project with no runs.

Bars (the speed issue): first paint within 1.5 s of launch on an idle 2-core machine, quit in
under 1 s.
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402

HEADING = "## Start-up and quit"
MILESTONES = ("splash-shown", "window-painted", "project-open", "event-loop-left")


def read_log(path: Path) -> dict[str, float]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    return {name: float(t) for t, name in (line.split(" ", 1) for line in lines if " " in line)}


def one_start(project: Path, work: Path, timeout_s: float = 120.0) -> dict[str, float]:
    log = work / f"startup-{time.monotonic_ns()}.log"
    env = {**os.environ, "WORKBENCH_STARTUP_LOG": str(log)}
    env.setdefault("QT_QPA_PLATFORM", "xcb" if os.environ.get("DISPLAY") else "offscreen")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "ui.launcher", "--project", str(project)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while "project-open" not in read_log(log):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the app did not open the project: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    time.sleep(1.0)
    t_quit = time.time()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    t_exit = time.time()
    proc.stderr.close()
    marks = read_log(log)
    out = {name: marks[name] - t0 for name in MILESTONES[:3]}
    out["event loop left"] = marks.get("event-loop-left", float("nan")) - t_quit
    out["quit"] = t_exit - t_quit
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="write the table into this markdown file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        project = args.project
        if project is None:
            from workbench.demo import write_demo_project
            project = work / "demo"
            write_demo_project(project, seed=0, scale="small")
        one_start(project, work)        # warm the file cache: a first start reads every library
        runs = [one_start(project, work) for _ in range(args.repeats)]
    names = ["splash-shown", "window-painted", "project-open", "event loop left", "quit"]
    labels = {"splash-shown": "splash shown", "window-painted": "first paint",
              "project-open": "project open"}
    rows = []
    for name in names:
        xs = [r[name] for r in runs]
        rows.append(f"| {labels.get(name, name)} | {statistics.median(xs):.2f} s | "
                    f"{min(xs):.2f}-{max(xs):.2f} s |")
    paint, quit_ = (statistics.median(r[k] for r in runs) for k in ("window-painted", "quit"))
    table = "\n".join([
        HEADING, "",
        f"`python bench/app_start.py --repeats {args.repeats}` on {platform.machine()}, "
        f"{os.cpu_count()} cores, Qt platform `{os.environ.get('QT_QPA_PLATFORM') or ('xcb' if os.environ.get('DISPLAY') else 'offscreen')}`, "
        f"project {'given' if args.project else 'a fresh demo project (no runs)'}. Seconds from "
        "launching `python -m ui.launcher --project DIR` (splash, first paint, project open) and "
        "from asking the window to close (event loop left, quit = the process gone); medians "
        f"of {args.repeats} starts after a warm-up one. Bars: first paint under 1.5 s "
        f"({'met' if paint < 1.5 else 'NOT met'}), quit under 1 s ({'met' if quit_ < 1 else 'NOT met'}).",
        "", "| milestone | median | min-max |", "|---|---|---|", *rows])
    print(table)
    if args.out:
        write_section(args.out, HEADING, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
