"""The app on Windows and macOS too: no POSIX-only module at import time, POSIX process calls in
one platform module (engine/osproc.py), and its Windows branches taken when os.name is "nt"."""
import ast
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from engine import osproc

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "workbench", "ui")
POSIX_ONLY = ("resource", "fcntl", "termios", "pwd")

IMPORT_ALL = r'''
import importlib, pkgutil, sys
sys.path.insert(0, ROOT)
# Third-party libraries first, as any platform loads them; then the POSIX-only modules are gone.
import torch, numpy, tokenizers, safetensors, psutil, filelock, jinja2, PySide6.QtWidgets, pyqtgraph  # noqa
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r} (POSIX only)")
for m in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
    del sys.modules[m]
sys.meta_path.insert(0, Block())
failed = []
for pkg in PACKAGES:
    for info in pkgutil.iter_modules([ROOT + "/" + pkg]):
        try:
            importlib.import_module(pkg + "." + info.name)
        except Exception as e:
            failed.append(f"{pkg}.{info.name}: {type(e).__name__}: {e}")
print("\n".join(failed) or "ok")
'''


def test_every_module_imports_without_the_posix_only_modules():
    code = f"ROOT = {str(ROOT)!r}\nBLOCKED = {set(POSIX_ONLY)!r}\nPACKAGES = {PACKAGES!r}\n" + IMPORT_ALL
    # Windows always names the user in USERNAME (getpass reads it there, pwd elsewhere: torch's
    # compiler asks for it on import); a shell without USER or LOGNAME would need pwd.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"USERNAME": "user", **os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert out.stdout.strip() == "ok", out.stdout + out.stderr


def test_the_checker_sees_a_module_that_needs_one(tmp_path):
    pkg = tmp_path / "engine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("import fcntl\n")
    code = f"ROOT = {str(tmp_path)!r}\nBLOCKED = {set(POSIX_ONLY)!r}\nPACKAGES = ('engine',)\n" + IMPORT_ALL
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert "engine.bad: ImportError" in out.stdout


def _posix_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(a.name in POSIX_ONLY for a in node.names):
            found.append(f"import {node.names[0].name}")
        elif isinstance(node, ast.ImportFrom) and node.module in POSIX_ONLY:
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.keyword) and node.arg == "preexec_fn":
            found.append("preexec_fn")
        elif isinstance(node, ast.Attribute) and (
                (node.attr in ("nice", "killpg") and getattr(node.value, "id", "") == "os")
                or (node.attr == "SIGKILL" and getattr(node.value, "id", "") == "signal")):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_posix_process_calls_live_only_in_the_platform_module():
    offenders = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if path == ROOT / "engine" / "osproc.py":
                continue
            if calls := _posix_calls(path):
                offenders[str(path.relative_to(ROOT))] = calls
    assert offenders == {}
    assert _posix_calls(ROOT / "engine" / "osproc.py") == ["import resource"]   # macOS's peak memory


def windows(monkeypatch):
    """osproc as it runs on Windows: os.name "nt" and the constants only Windows' modules have."""
    fake_os = types.SimpleNamespace(**{k: getattr(os, k) for k in ("environ", "getpid")}, name="nt",
                                    kill=lambda pid, sig: calls.append(("kill", pid, sig)))
    calls: list = []
    monkeypatch.setattr(osproc, "os", fake_os)
    monkeypatch.setattr(osproc.subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
    monkeypatch.setattr(osproc.subprocess, "BELOW_NORMAL_PRIORITY_CLASS", 0x4000, raising=False)
    monkeypatch.setattr(osproc.signal, "CTRL_BREAK_EVENT", 1, raising=False)
    monkeypatch.setattr(osproc.psutil, "BELOW_NORMAL_PRIORITY_CLASS", 0x4000, raising=False)
    return calls


def test_windows_branches_start_a_process_group_below_normal_and_stop_with_ctrl_break(monkeypatch, tmp_path):
    calls = windows(monkeypatch)
    seen = {}

    class Popen:
        def __init__(self, cmd, **kw):
            seen.update(kw)
            self.pid = 4242

    monkeypatch.setattr(osproc.subprocess, "Popen", Popen)
    osproc.spawn(["python", "-c", "pass"], tmp_path, {}, None, None)
    assert seen["creationflags"] == 0x200 | 0x4000 and "start_new_session" not in seen
    osproc._children.clear()

    class Proc:
        def __init__(self, pid=None):
            self.pid = pid

        def children(self, recursive=False):
            return []

        def nice(self, value=None):
            calls.append(("nice", value))

        def memory_info(self):
            return types.SimpleNamespace(rss=1 << 20, peak_wset=3 << 20)

    monkeypatch.setattr(osproc.psutil, "Process", Proc)
    osproc.lower_priority(4242)
    assert ("nice", 0x4000) in calls
    assert osproc.terminate(4242) and ("kill", 4242, 1) in calls          # CTRL_BREAK, not SIGTERM
    assert osproc.peak_rss_mb() == 3.0                                     # the peak working set


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Linux branch")
def test_linux_peak_memory_is_the_high_water_mark():
    import resource
    assert osproc.peak_rss_mb() == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rel=0.05)


def test_a_job_started_beside_a_running_one_spins_briefly(tmp_path):
    """Two jobs whose OpenMP threads both spin take each other's turns (each ran ~13x slower
    than alone on 2 cores): a job started while another runs gets SHARED_CPU_ENV, the first
    keeps its spin, and the user's own OpenMP settings are left alone."""
    import subprocess
    osproc.reap()
    assert not osproc.children()
    show = "import os, sys, time; open(sys.argv[1], 'w').write(os.environ.get('GOMP_SPINCOUNT', '-')); time.sleep(float(sys.argv[2]))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_WAIT_POLICY")}
    first = osproc.spawn([sys.executable, "-c", show, str(tmp_path / "a"), "30"], tmp_path, env,
                         subprocess.DEVNULL, subprocess.DEVNULL)
    try:
        second = osproc.spawn([sys.executable, "-c", show, str(tmp_path / "b"), "0"], tmp_path, env,
                              subprocess.DEVNULL, subprocess.DEVNULL)
        user = osproc.spawn([sys.executable, "-c", show, str(tmp_path / "c"), "0"], tmp_path,
                            {**env, "OMP_WAIT_POLICY": "ACTIVE"}, subprocess.DEVNULL, subprocess.DEVNULL)
        for p in (second, user):
            p.wait(timeout=60)
        assert (tmp_path / "b").read_text() == osproc.SHARED_CPU_ENV["GOMP_SPINCOUNT"]
        assert (tmp_path / "c").read_text() == "-"
        deadline = time.monotonic() + 60
        while not (tmp_path / "a").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "a").read_text() == "-"
    finally:
        first.kill()
        first.wait()
        osproc.reap()


def test_the_app_spins_briefly_itself_but_a_job_it_starts_alone_does_not(tmp_path):
    """The app's own model work (chat) beside a job collapsed both like two spinning jobs: the
    app takes SHARED_CPU_ENV before torch loads; a job it starts alone gets the default back."""
    script = (
        "import os, subprocess, sys\n"
        "from engine import osproc\n"
        "osproc.spin_briefly()\n"
        "mine = os.environ.get('GOMP_SPINCOUNT', '-')\n"
        "show = \"import os, sys; open(sys.argv[1], 'w').write(os.environ.get('GOMP_SPINCOUNT', '-'))\"\n"
        "p = osproc.spawn([sys.executable, '-c', show, sys.argv[1]], sys.argv[2], dict(os.environ),\n"
        "                 subprocess.DEVNULL, subprocess.DEVNULL)\n"
        "p.wait()\n"
        "print(mine, open(sys.argv[1]).read())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_WAIT_POLICY")}
    run = lambda extra: subprocess.run(  # noqa: E731
        [sys.executable, "-c", script, str(tmp_path / "job"), str(tmp_path)], cwd=ROOT,
        env={**env, **extra}, capture_output=True, text=True, timeout=120).stdout.split()
    assert run({}) == [osproc.SHARED_CPU_ENV["GOMP_SPINCOUNT"], "-"]
    assert run({"OMP_WAIT_POLICY": "ACTIVE"}) == ["-", "-"]      # the user's choice stands
