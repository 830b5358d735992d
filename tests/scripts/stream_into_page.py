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

# The bench's writer: a pretrain run streaming metrics and progress as fast as a file takes them.
from bench.ui_stall import WRITER  # noqa: E402


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
    w.ctx.sync()                 # the window follows a run another process writes
    job = w.ctx.job_for(run.name)
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
