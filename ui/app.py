"""`workbench` with no arguments: the desktop app.

Opens the project given with --project, else the last one, else the demo project (written on
the first start into the user's data folder, on a worker thread while the window shows).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from PySide6.QtCore import QEvent, QObject, QSettings, Qt, QTimer
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QApplication, QLabel, QVBoxLayout, QWidget

from ui.collector import install_gc
from ui.launcher import demo_location

APP_NAME = "workbench"


def fit_to_screen(window: QWidget, width: int, height: int) -> None:
    """Size a window width x height, or to most of its screen's free area where that is smaller
    (a 1366x768 laptop, a screen scaled to 150%): a window taller than the screen hides the
    buttons at its foot."""
    screen = window.screen() or QGuiApplication.primaryScreen()
    if screen is not None:
        free = screen.availableGeometry()
        width, height = min(width, int(free.width() * 0.96)), min(height, int(free.height() * 0.92))
    window.resize(width, height)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--project", type=Path, default=None,
                   help="project folder to open (default: the last one, or the demo project)")
    p.add_argument("--demo", action="store_true",
                   help="open the demo project (written on first use into the user's data folder)")
    p.add_argument("--pack", type=Path, default=None, metavar="FILE",
                   help="rank an annotation pack (a .wbpack file) instead of opening a project")


def make_app(argv: list[str] | None = None) -> QApplication:
    app = QApplication.instance() or QApplication(argv or sys.argv[:1])
    app.setApplicationName(APP_NAME)
    app.setOrganizationName(APP_NAME)
    app.setApplicationDisplayName("Workbench")
    from ui.icons import app_icon
    app.setWindowIcon(app_icon())
    install_gc()
    return app


def choose_project(args, settings: QSettings) -> tuple[Path, bool]:
    """(folder, is_demo_to_write)."""
    if args.project is not None:
        return args.project.absolute(), False
    last = settings.value("lastProject")
    if not args.demo and last and (Path(last) / "workbench.toml").exists():
        return Path(last), False
    demo = demo_location()
    return demo, not (demo / "workbench.toml").exists()


class StartupLog(QObject):
    """Milestones of start-up and quit as `seconds-since-the-epoch name` lines in the file named
    by WORKBENCH_STARTUP_LOG (bench/app_start.py reads them); without it, nothing is written."""

    def __init__(self, path: str):
        super().__init__()
        self.path, self.painted = path, False

    def mark(self, name: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{time.time():.6f} {name}\n")

    def eventFilter(self, obj, event) -> bool:
        if event.type() == QEvent.Type.Paint and not self.painted:
            self.painted = True
            self.mark("window-painted")
        return False


def startup_log() -> StartupLog | None:
    path = os.environ.get("WORKBENCH_STARTUP_LOG")
    return StartupLog(path) if path else None


def show_splash(app: QApplication) -> QWidget:
    """The app's icon and a line saying what is happening, painted before anything heavy.

    A frameless widget rather than QSplashScreen: QSplashScreen's show() and finish() each wait
    for the window system to confirm the window is exposed, up to a second each where no window
    manager answers (a bare X server), and a splash must not delay what it stands in for."""
    from ui.icons import app_icon
    splash = QWidget(None, Qt.WindowType.SplashScreen | Qt.WindowType.FramelessWindowHint)
    lay = QVBoxLayout(splash)
    picture = QLabel()
    picture.setPixmap(app_icon().pixmap(160, 160))
    words = QLabel("Workbench\nloading…")
    for label in (picture, words):
        label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        lay.addWidget(label)
    splash.show()
    app.processEvents()
    return splash


def open_pack(path: Path):
    """A window ranking one annotation pack (None, after an error box, if it is not one)."""
    from ui.pack_window import open_pack_window
    return open_pack_window(path)


def open_window(args, settings: QSettings | None = None):
    """The main window on the chosen project; the demo project is written first if needed,
    on a worker thread while the window shows. Returns the window (shown)."""
    app = make_app()
    log = app.startup_log = startup_log()
    # Something alive at once: loading PyTorch and building the window take seconds.
    splash = show_splash(app)
    if log:
        log.mark("splash-shown")
    from ui.main_window import MainWindow
    from ui.workers import Worker
    settings = settings or QSettings()
    window = MainWindow(settings)
    path, write_demo = choose_project(args, settings)
    window.placeholder.setText(f"Opening {path} …")
    if log:
        window.installEventFilter(log)
        window.projectOpened.connect(lambda: log.mark("project-open"))
    window.show()
    splash.close()
    app.processEvents()     # paint the window before the project's pages are built
    if write_demo:
        from workbench.demo import write_demo_project
        window.placeholder.setText(f"Writing the demo project to {path} …")
        window._demo_writer = Worker(lambda emit, cancelled: write_demo_project(path, seed=0, scale="small"))
        window._demo_writer.finished.connect(lambda _r: window.open_project(path))
        window._demo_writer.errored.connect(
            lambda text: window.placeholder.setText(f"Could not write the demo project: {text}"))
        window._demo_writer.start()
    else:
        QTimer.singleShot(0, lambda: window.open_project(path))
    return window


def run(args) -> int:
    # The window's own model work (chat, compare) comes in bursts beside jobs: it must not
    # spin-wait on cores a job is using (engine/osproc.py). Before anything loads torch.
    from engine.osproc import spin_briefly
    spin_briefly()
    app = make_app()
    window = open_pack(args.pack) if getattr(args, "pack", None) else open_window(args)
    if window is None:
        return 2
    # Ctrl-C in the terminal closes the window (the Python handler needs the event loop to
    # come back to Python now and then, hence the idle timer).
    signal.signal(signal.SIGINT, lambda *_: window.close())
    tick = QTimer()
    tick.start(250)
    tick.timeout.connect(lambda: None)
    try:
        code = app.exec()
    finally:
        tick.stop()
        if getattr(app, "startup_log", None):
            app.startup_log.mark("event-loop-left")
    quick_exit(code, window)
    return code


def quick_exit(code: int, window) -> None:
    """Leave now, once the window has closed. What must outlive the app is on disk by then:
    closing the window closed the project's stores (each ranking was committed as it was
    made) and jobs run in processes of their own. Tearing PyTorch, Qt and every module down
    object by object writes nothing and takes most of a second. A worker thread still running
    (a demo project being written) gets the ordinary, waiting exit instead."""
    from ui.workers import running_workers
    if running_workers():
        return
    settings = getattr(window, "settings", None)     # the main window's geometry, last project
    (settings if isinstance(settings, QSettings) else QSettings()).sync()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench app", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("QT_API", "pyside6")
    sys.exit(main())
