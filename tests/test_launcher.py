"""The `workbench` command before Qt starts: a missing system library is named with the package
that ships it, and the demo project's folder is the one the README gives."""
import os
import stat
import sys

import pytest

from ui import launcher

# ldd on PySide6 6.11's libqxcb.so on a Debian 12 machine without libxcb-icccm4 and
# libxcb-keysyms1 (abridged; each missing library is reported once per library that links it).
LDD_OUTPUT = """\
\tlinux-vdso.so.1 (0x00007fd046aa3000)
\tlibQt6XcbQpa.so.6 => /site-packages/PySide6/Qt/lib/libQt6XcbQpa.so.6 (0x00007fd046000000)
\tlibxcb-cursor.so.0 => /lib/x86_64-linux-gnu/libxcb-cursor.so.0 (0x00007fd046931000)
\tlibxcb-icccm.so.4 => not found
\tlibxcb-util.so.1 => /lib/x86_64-linux-gnu/libxcb-util.so.1 (0x00007fd046929000)
\tlibxcb-keysyms.so.1 => not found
\tlibxcb.so.1 => /lib/x86_64-linux-gnu/libxcb.so.1 (0x00007fd045d4a000)
\tlibxcb-icccm.so.4 => not found
\tlibxcb-keysyms.so.1 => not found
\t/lib64/ld-linux-x86-64.so.2 (0x00007fd046aa5000)
"""

# Every system library that the xcb plugin loads, with its package as `dpkg -S` reports it on
# Debian 12 (and Ubuntu uses the same names).
PACKAGES = {
    "libEGL.so.1": "libegl1", "libGL.so.1": "libgl1", "libGLX.so.0": "libglx0",
    "libGLdispatch.so.0": "libglvnd0", "libX11-xcb.so.1": "libx11-xcb1", "libX11.so.6": "libx11-6",
    "libXau.so.6": "libxau6", "libXdmcp.so.6": "libxdmcp6", "libbrotlicommon.so.1": "libbrotli1",
    "libbsd.so.0": "libbsd0", "libc.so.6": "libc6", "libcap.so.2": "libcap2",
    "libdbus-1.so.3": "libdbus-1-3", "libexpat.so.1": "libexpat1", "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6", "libgcc_s.so.1": "libgcc-s1", "libgcrypt.so.20": "libgcrypt20",
    "libglib-2.0.so.0": "libglib2.0-0", "libgpg-error.so.0": "libgpg-error0",
    "libgthread-2.0.so.0": "libglib2.0-0", "liblz4.so.1": "liblz4-1", "liblzma.so.5": "liblzma5",
    "libmd.so.0": "libmd0", "libpcre2-8.so.0": "libpcre2-8-0", "libpng16.so.16": "libpng16-16",
    "libstdc++.so.6": "libstdc++6", "libsystemd.so.0": "libsystemd0",
    "libxcb-cursor.so.0": "libxcb-cursor0", "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0", "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0", "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-render.so.0": "libxcb-render0", "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0", "libxcb-sync.so.1": "libxcb-sync1", "libxcb-util.so.1": "libxcb-util1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0", "libxcb-xkb.so.1": "libxcb-xkb1", "libxcb.so.1": "libxcb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0", "libxkbcommon.so.0": "libxkbcommon0",
    "libz.so.1": "zlib1g", "libzstd.so.1": "libzstd1",
}


def test_each_library_maps_to_the_package_that_ships_it():
    assert {lib: launcher.debian_package(lib) for lib in PACKAGES} == PACKAGES
    assert launcher.debian_package("not-a-library") is None


def test_ldd_not_found_lines_become_one_install_line():
    missing = launcher.not_found(LDD_OUTPUT)
    assert missing == ["libxcb-icccm.so.4", "libxcb-keysyms.so.1"]
    assert launcher.install_advice(missing) == (
        "libxcb-icccm.so.4, libxcb-keysyms.so.1 not found "
        "(Debian/Ubuntu: sudo apt-get install libxcb-icccm4 libxcb-keysyms1)")


@pytest.fixture
def fake_ldd(tmp_path, monkeypatch):
    """An `ldd` first on PATH that prints LDD_OUTPUT whatever it is asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "ldd.txt").write_text(LDD_OUTPUT)
    ldd = bin_dir / "ldd"
    ldd.write_text(f"#!/bin/sh\ncat '{tmp_path / 'ldd.txt'}'\n")
    ldd.chmod(ldd.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return ldd


@pytest.mark.skipif(not sys.platform.startswith("linux") or launcher.xcb_plugin() is None,
                    reason="PySide6's xcb plugin is Linux-only")
def test_the_app_says_which_package_to_install_instead_of_starting(fake_ldd, monkeypatch, capsys):
    opened = []
    monkeypatch.setattr(launcher, "window_problem",
                        lambda real=launcher.window_problem: real({"DISPLAY": ":0"}, "linux"))
    import ui.app
    monkeypatch.setattr(ui.app, "run", lambda args: opened.append(args) or 0)
    assert launcher.main([]) == 1
    err = capsys.readouterr().err
    assert opened == [] and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "libxcb-icccm.so.4, libxcb-keysyms.so.1 not found" in err
    assert err.rstrip().endswith("sudo apt-get install libxcb-icccm4 libxcb-keysyms1)")


def test_no_check_where_the_xcb_plugin_is_not_used(fake_ldd):
    assert launcher.window_problem({"DISPLAY": ":0", "QT_QPA_PLATFORM": "offscreen"}, "linux") is None
    assert launcher.window_problem({"WAYLAND_DISPLAY": "wayland-0"}, "linux") is None
    assert launcher.window_problem({"DISPLAY": ":0"}, "darwin") is None
    assert "DISPLAY is not set" in launcher.window_problem({}, "linux")


def test_a_qt_import_that_fails_on_a_library_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(launcher, "window_problem", lambda: None)
    monkeypatch.delitem(sys.modules, "ui.app", raising=False)
    monkeypatch.setattr("builtins.__import__", _failing_import(__import__))
    assert launcher.main([]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "libEGL.so.1 not found (Debian/Ubuntu: sudo apt-get install libegl1)" in err


def _failing_import(real):
    def imp(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "ui" and fromlist and "app" in fromlist:
            raise ImportError("libEGL.so.1: cannot open shared object file: No such file or directory")
        return real(name, globals, locals, fromlist, level)
    return imp


def test_the_demo_project_is_where_the_readme_says(tmp_path):
    data = tmp_path / "share"
    assert launcher.demo_folder(data) == data / "workbench" / "demo-project"
    # One written by an older version, one level deeper, keeps working...
    old = data / "workbench" / "workbench" / "demo-project"
    old.mkdir(parents=True)
    (old / "workbench.toml").write_text("")
    assert launcher.demo_folder(data) == old
    # ...until there is one in the documented place.
    new = data / "workbench" / "demo-project"
    new.mkdir(parents=True)
    (new / "workbench.toml").write_text("")
    assert launcher.demo_folder(data) == new


def test_the_app_reaches_its_window_without_loading_pytorch():
    """The window paints before PyTorch loads (a second or more): the app's arguments are parsed
    without building every command's parser, and the main window's module imports no page."""
    import subprocess
    import sys
    code = ("import sys; from workbench import cli; seen = []\n"
            "cli.main(['--project', 'somewhere'], open_app=lambda a: seen.append(a))\n"
            "import ui.main_window, ui.app\n"
            "print(seen[0].project, seen[0].command, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "QT_QPA_PLATFORM": "offscreen"})
    assert out.stdout.split() == ["somewhere", "None", "False"], out.stderr


def test_only_plain_app_arguments_take_the_quick_path():
    from workbench.cli import app_only_args
    assert app_only_args(["app", "--demo"]).demo is True
    assert app_only_args([]).project is None
    for argv in (["--help"], ["run", "sft"], ["--project"], ["pack", "open", "x.wbpack"]):
        assert app_only_args(argv) is None, argv


def test_a_ctrl_c_that_no_command_handles_is_one_line(monkeypatch, capsys):
    # The CLI's imports take seconds: a Ctrl-C then (or in a command that does not catch it)
    # used to end in a KeyboardInterrupt traceback.
    from workbench import cli

    def interrupted(argv, open_app=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "main", interrupted)
    assert launcher.main(["batches"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "workbench: interrupted"
