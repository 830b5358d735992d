"""The stage catalogue (workbench/stages.py) is the one list of stages: every fact in it names
something real, and nothing else in the application lists the stages."""
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from workbench import stages

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"tokenizer", "checkpoint", "reward"}
DATA_KINDS = {"pretrain", "sft", "prompts", "tasks", "preferences"}


@pytest.mark.parametrize("spec", stages.STAGES, ids=lambda s: s.name)
def test_every_fact_of_a_stage_names_a_setting_of_its_config(spec):
    fields = {f.name for f in dataclasses.fields(spec.config_class())}
    assert spec.module.split(".")[-1] == spec.name
    named = ([p.field for p in spec.parents] + [d.field for d in spec.data] + list(spec.basic)
             + list(spec.demo) + list(spec.follows) + list(spec.work) + list(spec.project_defaults)
             + ([spec.steps_field] if spec.steps_field else []) + ([spec.origin] if spec.origin else []))
    assert set(named) <= fields, set(named) - fields
    for p in spec.parents:
        assert p.kind in KINDS and set(p.expects) <= set(stages.NAMES)
        assert all(stages.BY_NAME[s].produces == p.kind for s in p.expects), p
    assert {d.kind for d in spec.data} <= DATA_KINDS
    assert spec.title and spec.heading and spec.blurb and spec.action
    from engine.memory_plan import SHAPES
    assert spec.memory in SHAPES + ("",)
    # The demo's settings pass the stage's own checks, by name and type.
    from engine.config import _check_type
    import typing
    hints = typing.get_type_hints(spec.config_class())
    for name, value in spec.demo_settings().items():
        _check_type(name, value, hints[name])


def test_intervals_follow_the_run_length():
    pre = stages.spec("pretrain")
    assert stages.follow_steps(pre, 1000)["eval_every"] == 166
    assert stages.follow_steps(pre, 150) == {"warmup_steps": 7, "eval_every": 25, "sample_every": 50,
                                             "checkpoint_every": 50, "log_every": 1}
    assert stages.follow_steps(pre, 3)["log_every"] == 1      # never 0


def test_the_ui_tables_are_keyed_by_the_catalogue():
    pytest.importorskip("pytestqt")
    from ui.main_window import SIDEBAR
    from ui.plot_figures import FIGURES
    from ui.plots import PLOT_SPECS
    from ui.runs_browser import KEY_METRICS
    from workbench.pipeline import FIGURES as TABLE_FIGURES, steps
    assert set(PLOT_SPECS) | set(FIGURES) | set(KEY_METRICS) | set(TABLE_FIGURES) <= set(stages.NAMES)
    # Every stage says how its run went in the sidebar and the runs table (DPO once said nothing):
    # its spec names the figures, and the metric names are the engine's (a group and a name).
    assert all(s.key_metrics for s in stages.STAGES)
    assert all(re.fullmatch(r"[a-z_]+/[a-z_]+", key) for s in stages.STAGES for key, _, _ in s.key_metrics)
    assert KEY_METRICS == {s.name: list(s.key_metrics) for s in stages.STAGES}
    pages = [key for key, _ in SIDEBAR]
    assert all((s.page or s.name) in pages for s in stages.STAGES if s.sidebar)
    assert [s for s in steps() if s in stages.NAMES] == [s.name for s in stages.STAGES if s.pipeline]


def _stage_lists(path: Path) -> list[str]:
    """Literal lists, tuples and sets in a module that hold three or more stage names (a table
    keyed by stage, such as the plots of each, is checked against the catalogue above)."""
    names = set(stages.NAMES)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            continue
        items = node.elts
        hits = {e.value for e in items if isinstance(e, ast.Constant) and e.value in names}
        if len(hits) >= 3:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {sorted(hits)}")
    return found


def test_nothing_but_the_catalogue_lists_the_stages():
    offenders = []
    for package in ("engine", "workbench", "ui"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name != "stages.py":
                offenders += _stage_lists(path)
    assert offenders == []


def test_the_check_finds_a_list_of_stages(tmp_path, monkeypatch):
    bad = tmp_path / "ui" / "bad.py"
    bad.parent.mkdir()
    bad.write_text('PAGES = ("tokenizer", "pretrain", "sft")\n')
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert _stage_lists(bad) == ["ui/bad.py:1: ['pretrain', 'sft', 'tokenizer']"]
