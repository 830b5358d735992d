"""The methods side by side: which runs are compared, the command, and the app's Methods tab."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from test_ui_stage_forms import fake_run
from workbench.methods import MethodsError, choose, read_result
from workbench.runs import RunInfo

ROOT = Path(__file__).resolve().parents[1]


def info(name, status="completed", **parents):
    return RunInfo(name=name, stage=name.split("-")[0], path=Path(name), status=status, parents=parents,
                   created_at=0.0)


def test_the_sft_run_most_methods_started_from_and_the_newest_run_of_each():
    runs = [info("sft-1"), info("sft-2"),
            info("ppo-1", policy="sft-1"), info("ppo-3", policy="sft-1"), info("ppo-4", "failed", policy="sft-1"),
            info("dpo-2", init="sft-1"), info("dpo-5", init="sft-2"),
            info("reward-1", init="sft-1"), info("reward-2", init="sft-2")]
    sft, chosen, judge = choose(runs)
    assert sft.name == "sft-1" and judge.name == "reward-1"
    assert {m: r.name for m, r in chosen.items()} == {"ppo": "ppo-3", "dpo": "dpo-2"}   # failed ppo-4 is not
    sft, chosen, judge = choose(runs, "sft-2")
    assert {m: r.name for m, r in chosen.items()} == {"dpo": "dpo-5"} and judge.name == "reward-2"
    with pytest.raises(MethodsError, match="no completed method run starts from sft-9|no run named sft-9"):
        choose(runs, "sft-9")
    # The run's folder names it too (a run of that name elsewhere does not).
    assert choose(runs, str(Path("sft-2").absolute()))[0].name == "sft-2"
    with pytest.raises(MethodsError, match="no run named /elsewhere/sft-2"):
        choose(runs, "/elsewhere/sft-2")
    with pytest.raises(MethodsError, match="no completed PPO/DPO"):
        choose([info("sft-1"), info("ppo-1", "stopped", policy="sft-1")])


@pytest.fixture
def methods_project(demo_project, tiny_lm_ckpt):
    """An SFT run and a DPO and a PPO run from it (the same tiny weights: they cannot differ)."""
    fake_run(demo_project, "sft-20260101-000000", {}, 5, 1.0, checkpoint=tiny_lm_ckpt)
    fake_run(demo_project, "dpo-20260101-000100", {"init": "../sft-20260101-000000"}, 5, 30.0,
             checkpoint=tiny_lm_ckpt)
    fake_run(demo_project, "ppo-20260101-000200", {"policy": "../sft-20260101-000000"}, 5, 90.0,
             checkpoint=tiny_lm_ckpt)
    return demo_project


def test_compare_methods_evaluates_each_against_sft_and_keeps_the_result(methods_project):
    cmd = [sys.executable, "-m", "workbench.cli", "compare-methods", "--project", str(methods_project),
           "--prompts", "6"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "against sft-20260101-000000 on 6 held-out prompts" in proc.stdout
    result = read_result(methods_project)
    assert [r["method"] for r in result["rows"]] == ["ppo", "dpo"]          # the catalogue's order
    for r in result["rows"]:
        # The same weights as SFT: every answer ties, and KL to SFT is exactly zero.
        assert (r["n"], r["ties"], r["win_rate"], r["kl"]) == (6, 6, 0.5, 0.0)
    assert result["rows"][1]["seconds"] == pytest.approx(30.0)


def test_task_accuracy_checks_a_held_out_task_by_its_own_answer_however_its_prompt_is_worded():
    from engine.tasks import Task
    from workbench.evaluate import Answers, accuracy, tasks_of
    own = [Task("add", f"Please compute {a} + {b} for me.", str(a + b), {"a": a, "b": b})
           for a, b in [(2, 3), (10, 5)]]
    prompts = own + ["What is 12 + 7?", "Tell me about the sea."]   # a demo-worded text; no task
    tasks = tasks_of(prompts)
    assert tasks[:2] == own and tasks[2].answer == "19" and tasks[3] is None
    assert accuracy(tasks, Answers(["5", "15", "19", "waves"], [True] * 4)) == 1.0
    assert accuracy(tasks, Answers(["5", "16", "20", "waves"], [True] * 4)) == pytest.approx(1 / 3)
    assert accuracy(tasks_of(["Tell me about the sea."]), Answers(["waves"], [True])) is None


def test_a_bad_held_out_task_file_is_one_line_and_exit_2(methods_project):
    tasks = methods_project / "data" / "eval_tasks.jsonl"
    n = len(tasks.read_text().splitlines())
    with open(tasks, "a") as f:
        f.write('{"kind": "add", "prompt": "What is 1 plus 1?"}\n')     # no answer
    cmd = [sys.executable, "-m", "workbench.cli", "compare-methods", "--project", str(methods_project)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"eval_tasks.jsonl:{n + 1}:" in proc.stderr and "answer" in proc.stderr


def test_nothing_to_compare_is_one_line_and_exit_2(demo_project):
    cmd = [sys.executable, "-m", "workbench.cli", "compare-methods", "--project", str(demo_project)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no completed PPO/DPO")
    assert "Traceback" not in proc.stderr


def test_the_methods_tab_compares_plots_and_hands_a_pair_to_blind_ab(qtbot, methods_project, make_window, tiny_lm_ckpt):
    w = make_window(methods_project, show=True)
    w.go("chat")
    tabs = w.pages["chat"]
    tabs.setCurrentWidget(w.methods)
    view = w.methods
    assert "No comparison yet" in view.status.text() and not view.ab_btn.isEnabled()
    view.prompts.setValue(4)
    qtbot.mouseClick(view.compare_btn, Qt.LeftButton)
    assert not view.compare_btn.isEnabled()
    qtbot.waitUntil(lambda: view.worker is None, timeout=120_000)
    assert view.status.text().startswith("Against sft-20260101-000000 on 4 held-out prompts")
    assert view.table.rowCount() == 2 and view.table.item(0, 0).text() == "PPO"
    assert view.table.item(1, 6).text() == "0.00"
    points = [i for i in view.plot.getPlotItem().items if hasattr(i, "points")]
    assert len(points) == 2
    saved = json.loads((methods_project / "methods.json").read_text())["rows"]
    # Drawn in percent, as the axis says, each against its KL.
    assert sorted((float(p.getData()[0][0]), float(p.getData()[1][0])) for p in points) == \
        sorted((r["kl"], 100 * r["win_rate"]) for r in saved)
    view.table.selectRow(1)
    qtbot.mouseClick(view.ab_btn, Qt.LeftButton)
    assert tabs.currentWidget() is w.compare and w.compare.blind.isChecked()
    assert [p.path().name for p in w.compare.pickers] == ["sft-20260101-000000", "dpo-20260101-000100"]
    assert json.loads((methods_project / "methods.json").read_text())["prompts"] == 4

    # A newer DPO run, then the PPO run deleted: the tab says the comparison is out of date, and
    # the deleted run cannot be handed to Blind A/B.
    tabs.setCurrentWidget(w.chat)
    fake_run(methods_project, "dpo-20260101-000300", {"init": "../sft-20260101-000000"}, 5, 30.0,
             checkpoint=tiny_lm_ckpt)
    shutil.rmtree(methods_project / "runs" / "ppo-20260101-000200")
    w.ctx.sync()
    tabs.setCurrentWidget(w.methods)
    assert ("Out of date: ppo-20260101-000200 was deleted; DPO has a newer run from sft-20260101-000000, "
            "dpo-20260101-000300") in view.status.text()
    assert view.table.item(0, 1).text() == "ppo-20260101-000200 (deleted)"
    qtbot.mouseClick(view.table.viewport(), Qt.LeftButton, pos=view.table.visualItemRect(view.table.item(0, 1)).center())
    assert view.selected()["run"] == "ppo-20260101-000200" and not view.ab_btn.isEnabled()
    qtbot.mouseClick(view.table.viewport(), Qt.LeftButton, pos=view.table.visualItemRect(view.table.item(1, 1)).center())
    assert view.ab_btn.isEnabled()
