"""`workbench` with no arguments: the desktop app.

Opens the project given with --project, else the last one, else the demo project (written on
the first start into the user's data folder, on a worker thread while the window shows).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QTimer
from PySide6.QtWidgets import QApplication, QSplashScreen

from ui.collector import install_gc
from ui.launcher import demo_location

APP_NAME = "workbench"


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


def show_splash(app: QApplication) -> QSplashScreen:
    """The app's icon and a line saying what is happening, painted before anything heavy."""
    from ui.icons import app_icon
    splash = QSplashScreen(app_icon().pixmap(160, 160))
    splash.showMessage("Workbench\nloading…", Qt.AlignmentFlag.AlignBottom | Qt.AlignmentFlag.AlignHCenter)
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
    # Something alive at once: loading PyTorch and building the window take seconds.
    splash = show_splash(app)
    from ui.main_window import MainWindow
    from ui.workers import Worker
    settings = settings or QSettings()
    window = MainWindow(settings)
    path, write_demo = choose_project(args, settings)
    window.placeholder.setText(f"Opening {path} …")
    window.show()
    splash.finish(window)
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
        return app.exec()
    finally:
        tick.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench app", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("QT_API", "pyside6")
    sys.exit(main())
