"""A run streaming thousands of events a second into the pretrain page of a real window, until
it ends; prints "ended after N s" when the app saw the run end. Run by
tests/test_ui_stream_x11.py under a real X server: a plot setting once made the page repaint
forever there (the event loop never came back), which the offscreen platform does not show."""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from PySide6.QtCore import QSettings  # noqa: E402

WRITER = r"""
import json, os, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
t_end = time.time() + seconds
with open(path, "a") as f:
    f.write(json.dumps({"type": "start", "stage": "pretrain", "pid": os.getpid()}) + "\n")
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
    f.write(json.dumps({"type": "done", "status": "completed", "error": None}) + "\n")
"""


def main() -> None:
    from ui.app import make_app
    from ui.main_window import MainWindow
    from workbench.demo import write_demo_project
    app = make_app()
    tmp = Path(tempfile.mkdtemp())
    write_demo_project(tmp / "project", seed=0, scale="tiny")
    w = MainWindow(QSettings(str(tmp / "settings.ini"), QSettings.Format.IniFormat))
    w.resize(1400, 880)
    w.show()
    w.open_project(tmp / "project")
    run = w.ctx.new_run_dir("pretrain")
    (run / "config.json").write_text("{}")
    events = run / "events.jsonl"
    events.touch()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(events), sys.argv[1], str(run)])
    while events.stat().st_size == 0:
        time.sleep(0.01)
    w.ctx.sync()
    job = w.ctx.reattach()[0]
    w.go("pretrain")
    w.pages["pretrain"].select_run(run.name)
    t0 = time.time()
    while job.running and time.time() - t0 < 120:
        app.processEvents()
        time.sleep(0.002)
    writer.wait()
    print(f"ended after {time.time() - t0:.0f} s" if not job.running else "still running")
    w.close()


if __name__ == "__main__":
    main()
