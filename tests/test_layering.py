"""The three packages depend in one direction: ui -> workbench -> engine (DESIGN.md §2)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> list[tuple[str, int, str]]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.append((str(path.relative_to(ROOT)), node.lineno, name))
    return found


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{f}:{line} imports {name}" for f, line, name in imported_modules(package)
            if any(name == bad or name.startswith(bad + ".") for bad in forbidden)]


def test_engine_imports_no_qt_workbench_or_ui():
    assert offenders("engine", ("PySide6", "PyQt5", "PyQt6", "pyqtgraph", "qtpy",
                                "workbench", "ui", "sqlite3")) == []


def test_workbench_imports_no_qt_widgets_or_ui():
    assert offenders("workbench", ("PySide6.QtWidgets", "PySide6.QtGui", "pyqtgraph", "ui")) == []


def test_the_checker_catches_a_violation(tmp_path, monkeypatch):
    # The check must be able to fail: plant a bad import in a throwaway copy of the layout.
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "bad.py").write_text("import os\nfrom PySide6 import QtCore\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert offenders("engine", ("PySide6",)) == ["engine/bad.py:2 imports PySide6"]


def test_ui_never_trains_in_its_own_process():
    """ui/ uses engine's readers, tokenizer and chat session for in-process work (previews, the
    token view, chat), but training only ever runs as a job (workbench/jobs.py): no ui module
    imports a training stage, the trainer or the distributed setup. The stages come from the
    catalogue, so one added later is covered (DPO and GRPO were missing from a list by hand)."""
    from workbench import stages
    training = tuple(s.module for s in stages.STAGES if s.produces in ("checkpoint", "reward") and not s.origin)
    assert {"engine.pretrain", "engine.sft", "engine.reward", "engine.ppo", "engine.dpo", "engine.grpo"} <= set(training)
    helpers = ("engine.trainer", "engine.ppo_core", "engine.dpo_loss", "engine.grpo_core",
               "engine.grpo_rewards", "engine.distributed")
    assert offenders("ui", training + helpers) == []
