"""The `workbench` command: the desktop app with no command (or `app`), else the headless
CLI of workbench/cli.py. Qt is imported only when the app opens, so the headless commands
start fast and work where no display or Qt library is available.

Before Qt starts, the app checks that its window can open at all. When a system library that
Qt's xcb plugin links is missing, Qt itself prints a misleading line (it names libxcb-cursor0
whatever is missing) and aborts; here `ldd` names every missing library and the Debian/Ubuntu
packages that hold them, in one line, and the command exits with status 1.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

APP_DIR = "workbench"           # the folder under the user's data folder
DEMO_DIR = "demo-project"

# Debian names a library's package after its soname (libfoo.so.1 -> libfoo1, with a hyphen
# when the name ends in a digit: libX11.so.6 -> libx11-6). These libraries do not follow it.
PACKAGE_OF = {
    "libglib-2.0.so.0": "libglib2.0-0",
    "libgthread-2.0.so.0": "libglib2.0-0",
    "libGLdispatch.so.0": "libglvnd0",
    "libgcc_s.so.1": "libgcc-s1",
    "libz.so.1": "zlib1g",
    "libbrotlidec.so.1": "libbrotli1",
    "libbrotlicommon.so.1": "libbrotli1",
}
_SONAME = re.compile(r"(lib[\w.+-]+?\.so(?:\.\d+)*)")


def debian_package(soname: str) -> str | None:
    """The Debian/Ubuntu package that ships `soname` (libxcb-icccm.so.4 -> libxcb-icccm4)."""
    if soname in PACKAGE_OF:
        return PACKAGE_OF[soname]
    m = re.fullmatch(r"(lib[\w.+-]+?)\.so\.(\d+)(?:\.\d+)*", soname)
    if m is None:
        return None
    name, version = m.group(1).lower().replace("_", "-"), m.group(2)
    return f"{name}-{version}" if name[-1].isdigit() else f"{name}{version}"


def not_found(ldd_output: str) -> list[str]:
    """The libraries ldd could not find ('libfoo.so.1 => not found'), once each, in order."""
    out: list[str] = []
    for line in ldd_output.splitlines():
        name, _, where = line.strip().partition(" => ")
        if where.strip() == "not found" and name not in out:
            out.append(name)
    return out


def install_advice(sonames: list[str]) -> str:
    """'libA.so.1, libB.so.2 not found (Debian/Ubuntu: sudo apt-get install pkgA pkgB)'."""
    packages = list(dict.fromkeys(p for p in map(debian_package, sonames) if p))
    text = f"{', '.join(sonames)} not found"
    if packages:
        text += f" (Debian/Ubuntu: sudo apt-get install {' '.join(packages)})"
    return text


def xcb_plugin() -> Path | None:
    """PySide6's xcb platform plugin, found without importing Qt."""
    spec = importlib.util.find_spec("PySide6")
    if spec is None or not spec.submodule_search_locations:
        return None
    plugin = Path(list(spec.submodule_search_locations)[0]) / "Qt/plugins/platforms/libqxcb.so"
    return plugin if plugin.exists() else None


def missing_for(library: Path) -> list[str]:
    """What `library` links that the dynamic loader cannot find ([] when ldd is unavailable)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return []
    try:
        done = subprocess.run([ldd, str(library)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return not_found(done.stdout)


def window_problem(env=None, platform: str | None = None) -> str | None:
    """Why Qt could not open a window here, as one sentence, or None when nothing is known
    to stop it. Only the X11 (xcb) case on Linux is checked: elsewhere Qt's own errors hold."""
    env = os.environ if env is None else env
    if not (platform or sys.platform).startswith("linux"):
        return None
    chosen = env.get("QT_QPA_PLATFORM", "")
    if chosen and not chosen.startswith("xcb"):
        return None     # offscreen, wayland, ...: the user chose another platform
    if not chosen and env.get("WAYLAND_DISPLAY"):
        return None     # Qt prefers Wayland in a Wayland session
    if not env.get("DISPLAY"):
        return ("there is no display to open the window on (DISPLAY is not set): start it from a "
                "desktop session, or use the headless commands (workbench --help)")
    plugin = xcb_plugin()
    missing = missing_for(plugin) if plugin is not None else []
    if not missing:
        return None
    return f"Qt's X11 plugin cannot load: {install_advice(missing)}"


def open_app(args) -> int:
    problem = window_problem()
    if problem is None:
        try:
            from ui import app
        except ImportError as e:
            # A Qt library that itself links a missing system library (libEGL.so.1, ...).
            sonames = _SONAME.findall(str(e))
            problem = f"Qt cannot load: {install_advice(sonames) if sonames else e}"
    if problem is not None:
        print(f"workbench: the app cannot start: {problem}", file=sys.stderr)
        return 1
    return app.run(args)


def demo_folder(data_home: Path) -> Path:
    """Where the demo project lives under the user's data folder (~/.local/share on Linux):
    `data_home/workbench/demo-project`. Versions before this one wrote it one level deeper
    (Qt's per-application folder adds the organisation and the application name, both
    'workbench'); a demo project there is used until one exists in the documented place."""
    here = data_home / APP_DIR / DEMO_DIR
    before = data_home / APP_DIR / APP_DIR / DEMO_DIR
    if not (here / "workbench.toml").exists() and (before / "workbench.toml").exists():
        return before
    return here


def demo_location() -> Path:
    """The demo project's folder on this machine (needs Qt: it knows each system's data folder)."""
    from PySide6.QtCore import QStandardPaths
    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.GenericDataLocation)
    return demo_folder(Path(base) if base else Path.home() / ".local" / "share")


def main(argv: list[str] | None = None) -> int:
    try:
        # The CLI's imports (torch among them) take seconds: a Ctrl-C meanwhile, or in a command
        # that does not handle it itself, ends with one line instead of a traceback.
        from workbench import cli
        return cli.main(argv, open_app=open_app)
    except KeyboardInterrupt:
        print("\nworkbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
