"""What a stage's page says before Start, driven through its real widgets: intervals that follow
the run's length, a time estimate, a warning when an input run is of an unexpected stage, the
next step when an input is missing, and the menus (View, Help) as a person reads them."""
import json
import shutil
import time
from pathlib import Path

import pytest
from PySide6.QtCore import Qt, QUrl
from PySide6.QtWidgets import QApplication, QDialog

from ui_driver import click_tab, go, press, sidebar_text, type_settings


@pytest.fixture
def project(demo_project):
    return demo_project


def fake_run(project: Path, name: str, config: dict, steps: int, seconds: float, checkpoint: Path | None = None,
             metrics: dict | None = None):
    """A finished run folder as a stage leaves it (config, events, maybe metrics and a checkpoint)."""
    run = project / "runs" / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    t0 = time.time() - 100
    events = [{"type": "start", "stage": name.split("-")[0], "pid": 1, "time": t0},
              {"type": "progress", "step": steps, "total": steps, "elapsed_s": seconds, "time": t0 + seconds},
              {"type": "done", "status": "completed", "error": None, "time": t0 + seconds}]
    if metrics:
        events.insert(1, {"type": "metrics", "step": steps, "time": t0 + seconds, **metrics})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if checkpoint is not None:
        shutil.copytree(checkpoint / "checkpoints", run / "checkpoints")
    return run


def test_a_long_sidebar_state_wraps_instead_of_losing_its_warning(qtbot, project, make_window):
    run = fake_run(project, "reward-20260101-000000", {}, 10, 5.0, metrics={"val/accuracy": 0.5})
    (run / "summary.json").write_text(json.dumps({"val_rankings": 1}))
    w = make_window(project, show=True)
    w.resize(1000, 700)
    assert sidebar_text(w, "reward") == "Reward model\ncompleted · val acc 50.0% (only 1 held out)"
    from ui.main_window import SIDEBAR
    rows = {k: w.sidebar.visualItemRect(w.sidebar.item(i)) for i, (k, _) in enumerate(SIDEBAR)}
    one_line = w.sidebar.fontMetrics().lineSpacing()
    # every word of it is on screen: the item is a line taller than a two-line one (SFT's)
    assert rows["reward"].height() >= rows["sft"].height() + one_line - 1
    assert w.sidebar.fontMetrics().horizontalAdvance("completed · val acc 50.0% (only 1 held out)") \
        > rows["reward"].width() - w.sidebar.iconSize().width()


def test_the_reward_page_counts_rankings_with_a_pair_and_says_how_many_tie(qtbot, project, make_window):
    from workbench.annotation import AnnotationSession
    from workbench.store import Store
    with Store.for_project(project) as store:
        b = store.create_batch("b", [{"prompt": f"q{i}", "answers": [{"text": "x"}, {"text": "y"}]}
                                     for i in range(3)], k=2)
        s = AnnotationSession(store, b, "ann")
        s.submit([[1], [2]])
        s.submit([[2], [1]])
        s.submit([[1, 2]])                       # both answers tied: nothing to learn
    w = make_window(project, show=True)
    go(qtbot, w, "reward")
    page = w.pages["reward"]
    assert page.counts.text() == ("2 human and 0 simulated rankings in this project "
                                  "(1 more tie every answer: no pair to learn from)")
    assert sidebar_text(w, "rank").endswith("1 batch · 2 rankings to train on")     # the same count
    # A ranking made elsewhere (the terminal ranker, another window) while the page is on screen.
    with Store.for_project(project) as store:
        AnnotationSession(store, b, "bo").submit([[1], [2]])
    qtbot.waitUntil(lambda: page.counts.text().startswith("3 human"), timeout=10_000)


def test_a_long_log_line_wraps_in_the_log_tab(qtbot, project, make_window):
    run = fake_run(project, "pretrain-20260101-000000", {}, 10, 5.0)
    message = "device cpu (2 threads), torch.float32; " + "a long path/" * 40 + " end of the line"
    with open(run / "events.jsonl", "a") as f:
        f.write(json.dumps({"type": "log", "message": message, "time": time.time()}) + "\n")
    w = make_window(project, show=True)
    w.resize(1000, 700)
    go(qtbot, w, "pretrain")
    panel = w.pages["pretrain"]
    qtbot.waitUntil(lambda: "end of the line" in panel.log.toPlainText())
    click_tab(qtbot, panel.tabs, "Log")
    assert panel.log.isVisible() and panel.log.horizontalScrollBar().maximum() == 0


def test_intervals_follow_max_steps_unless_set_by_hand(qtbot, project, make_window):
    w = make_window(project, show=True)
    go(qtbot, w, "pretrain")
    panel = w.pages["pretrain"]
    assert "Next: train a tokenizer on the Tokenizer page" in panel.status_label.text()
    assert panel.form.values()["eval_every"] == 166         # the demo's 1,000 steps
    type_settings(qtbot, panel, {"max_steps": 150}, valid=False)
    v = panel.form.values()
    assert (v["eval_every"], v["sample_every"], v["checkpoint_every"], v["warmup_steps"]) == (25, 50, 50, 7)
    # A value the user typed is theirs: it stays, and the page says it only applies at the end.
    type_settings(qtbot, panel, {"eval_every": 400, "max_steps": 300}, valid=False)
    v = panel.form.values()
    assert v["eval_every"] == 400 and v["checkpoint_every"] == 100
    assert "eval_every is above max_steps (300)" in panel.notes.text()


def test_the_page_estimates_a_run_from_the_last_runs_pace(qtbot, project, make_window):
    fake_run(project, "pretrain-20260101-000000", {"batch_size": 16, "grad_accum": 1, "seq_len": 128}, 100, 60.0)
    w = make_window(project, show=True)
    go(qtbot, w, "pretrain")
    panel = w.pages["pretrain"]
    panel.run_combo.setFocus()              # back to a new run (the page opened on the old one)
    qtbot.keyClick(panel.run_combo, Qt.Key.Key_Home)
    assert panel.run is None
    type_settings(qtbot, panel, {"max_steps": 200, "batch_size": 32}, valid=False)
    # 0.6 s a step at batch 16 -> 1.2 s at batch 32, times 200 steps.
    assert "About 4m00s at the pace of pretrain-20260101-000000" in panel.notes.text()


def test_a_base_model_as_ppo_policy_is_named_and_a_missing_input_says_what_to_do(
        qtbot, project, make_window, tiny_lm_ckpt):
    fake_run(project, "pretrain-20260101-000000", {}, 10, 5.0, checkpoint=tiny_lm_ckpt)
    w = make_window(project, show=True)
    go(qtbot, w, "ppo")
    ppo = w.pages["ppo"]
    assert Path(ppo.form.values()["policy"]).name == "pretrain-20260101-000000"
    assert "policy is a pretrain run" in ppo.notes.text()
    # No reward model yet: the page names the next step instead of a bare "is required".
    assert not ppo.start_btn.isEnabled()
    assert "train a reward model on the Reward model page" in ppo.status_label.text()


def test_menus_read_as_written_and_help_lists_the_keys(qtbot, project, make_window, monkeypatch):
    w = make_window(project, show=True)
    view = next(a.menu() for a in w.menuBar().actions() if a.text() == "&View")
    texts = [a.text() for a in view.actions()]
    assert "Sample && Rank" in texts            # shown "Sample & Rank", not "Sample _Rank"
    assert "1 run" not in sidebar_text(w, "runs") and "0 runs" in sidebar_text(w, "runs")
    shown = []
    monkeypatch.setattr(QDialog, "exec", lambda self: shown.append(self) or 0)
    press(qtbot, w, Qt.Key.Key_Slash, Qt.KeyboardModifier.ControlModifier)      # Help ▸ Keyboard shortcuts
    text = shown[-1].text.toPlainText()
    assert "Ctrl+3" in text and "SFT" in text and "Enter" in text and "tie with the previous" in text
    helpm = next(a.menu() for a in w.menuBar().actions() if a.text() == "&Help")
    guide = next(a.menu() for a in helpm.actions() if a.text() == "&Guide")
    next(a for a in guide.actions() if a.text() == "The command line").trigger()
    dialog = shown[-1]
    browser = dialog.text
    dialog.show()
    qtbot.waitExposed(dialog)
    block = browser.document().begin()
    while not (block.blockFormat().headingLevel() > 0 and block.text() == "The command line"):
        block = block.next()
    layout = browser.document().documentLayout()
    # the section's heading at the top of the view, not somewhere below
    qtbot.waitUntil(lambda: abs(layout.blockBoundingRect(block).top() - browser.verticalScrollBar().value()) < 2)
    # a link to a file beside the README opens it outside; the guide stays as it was
    opened = []
    monkeypatch.setattr("ui.help.QDesktopServices.openUrl", lambda url: opened.append(url) or True)
    before = browser.toPlainText()
    browser.anchorClicked.emit(QUrl("docs/PERFORMANCE.md"))
    assert browser.toPlainText() == before and opened[-1].toLocalFile().endswith("docs/PERFORMANCE.md")
    dialog.close()


def test_one_run_is_one_run(qtbot, project, make_window, tiny_lm_ckpt):
    fake_run(project, "tokenizer-20260101-000000", {}, 1, 1.0)
    w = make_window(project, show=True)
    assert sidebar_text(w, "runs").endswith("1 run") and sidebar_text(w, "chat").endswith("0 checkpoints")
    w.close()
    fake_run(project, "sft-20260101-000000", {}, 1, 1.0, checkpoint=tiny_lm_ckpt)
    w = make_window(project, show=True)
    assert sidebar_text(w, "chat").endswith("1 checkpoint")


def test_a_run_whose_config_holds_null_for_a_number_opens_and_names_the_field(qtbot, project, make_window):
    # Written by hand or by another version: the page must open, not fail with a traceback.
    fake_run(project, "ppo-20260101-000000", {"policy": "x", "reward_model": "y", "ppo_epochs": None}, 2, 1.0)
    w = make_window(project, show=True)
    go(qtbot, w, "ppo")
    form = w.pages["ppo"].form
    assert "config.json holds null, not a whole number" in form.messages["ppo_epochs"].text()


def test_the_settings_column_is_never_narrower_than_its_fields_beside_the_scroll_bar(qtbot, project, make_window):
    # The DPO page's "…" buttons and spin arrows sat under the column's scroll bar, out of reach.
    from PySide6.QtWidgets import QToolButton
    w = make_window(project, show=True)
    w.resize(1000, 420)                 # short: the column scrolls
    go(qtbot, w, "dpo")
    page = w.pages["dpo"]
    column = page.form.parentWidget().parentWidget().parentWidget()     # form < inner < viewport < area
    qtbot.waitUntil(lambda: column.verticalScrollBar().isVisible(), timeout=5_000)
    view = column.viewport()
    for button in page.form.findChildren(QToolButton):
        if button.isVisible() and button.text() == "…":
            right = button.mapTo(view, button.rect().topRight()).x()
            assert right < view.width(), (right, view.width())


def test_the_run_list_says_running_as_soon_as_the_job_runs(qtbot, project, make_window, monkeypatch):
    # The run index reads a run's start event a moment after its job starts (a new run, or a
    # resumed one): the list said "— created" beside a status line that said running.
    from types import SimpleNamespace
    fake_run(project, "pretrain-20260101-000000", {}, 10, 5.0)
    w = make_window(project, show=True)
    go(qtbot, w, "pretrain")
    panel = w.pages["pretrain"]
    name = "pretrain-20260101-000000"
    monkeypatch.setattr(w.ctx, "job_for", lambda n: SimpleNamespace(running=True, stopping=False) if n == name else None)
    w.ctx.runsChanged.emit()
    texts = [panel.run_combo.itemText(i) for i in range(panel.run_combo.count())]
    assert f"{name} — running" in texts


def test_every_guide_entry_opens_at_a_heading_of_the_readme():
    import re
    from ui.help import README, SECTIONS
    headings = set(re.findall(r"^#{2,3} (.+)$", README.read_text(encoding="utf-8"), re.M))
    assert len(SECTIONS) >= 10 and {h for _, h in SECTIONS} <= headings
    assert {"Ranking as a class", "Agreement that informs training", "Preference data in other formats"} <= {
        h for _, h in SECTIONS}


def test_a_grpo_reward_file_that_cannot_load_is_refused_at_start_not_after(
        qtbot, project, make_window, tiny_lm_ckpt, tmp_path):
    fake_run(project, "sft-20260101-000000", {}, 10, 5.0, checkpoint=tiny_lm_ckpt)
    (tmp_path / "broken.py").write_text("def reward(prompt, answer)\n    return 1.0\n")
    (tmp_path / "other.py").write_text("def score(prompt, answer):\n    return 1.0\n")
    (tmp_path / "good.py").write_text("def reward(prompt, answer):\n    return 1.0\n")
    w = make_window(project, show=True)
    go(qtbot, w, "grpo")
    grpo = w.pages["grpo"]
    runs = len(list((project / "runs").iterdir()))
    for spec, says in ((tmp_path / "broken.py", "broken.py:1: syntax error"),
                       (tmp_path / "other.py", "defines no function 'reward'"),
                       (tmp_path / "absent.py", "absent.py: no such file")):
        type_settings(qtbot, grpo, {"user_reward": f"{spec}:reward"}, valid=False)
        assert not grpo.start_btn.isEnabled() and "(user_reward)" in grpo.status_label.text()
        assert says in grpo.form.messages["user_reward"].text()        # said under the field
    type_settings(qtbot, grpo, {"user_reward": f"{tmp_path / 'good.py'}:reward"})
    assert grpo.start_btn.isEnabled(), grpo.status_label.text()
    assert len(list((project / "runs").iterdir())) == runs          # no failed run was made


def test_a_sample_run_made_outside_the_app_is_a_batch_on_the_rank_page(qtbot, project, make_window):
    # As `workbench pipeline --until sample` leaves it: finished, never imported.
    from test_annotate_cli import write_run
    run = fake_run(project, "sample-20260101-000000", {}, 1, 1.0)
    write_run(run, events=False)
    w = make_window(project, show=True)
    go(qtbot, w, "rank")
    batches = w.ranking.start.batches
    names = [batches.topLevelItem(i).text(0) for i in range(batches.topLevelItemCount())]
    assert names == ["sample-20260101-000000"]
    go(qtbot, w, "runs")
    go(qtbot, w, "rank")                        # once: the run's batch is not made again
    assert batches.topLevelItemCount() == 1


def test_inputs_a_run_could_not_start_from_are_refused_in_the_form_before_any_folder(
        qtbot, project, make_window, tiny_lm_ckpt, tmp_path):
    """No checkpoint there, a tokenizer or reward run where a language model goes, a length the
    model's context cannot hold, a device the machine lacks: each is said under its field and
    Start stays off; before, each made a run folder that failed at once."""
    import torch
    fake_run(project, "tokenizer-20260101-000000", {}, 1, 1.0)
    sft_run = fake_run(project, "sft-20260101-000000", {}, 10, 5.0, checkpoint=tiny_lm_ckpt)
    w = make_window(project, show=True)
    go(qtbot, w, "sft")
    dpo = w.pages["sft"]
    dpo.show_run(None)                  # a new run, not the SFT run the page opens on
    type_settings(qtbot, dpo, {"init": str(sft_run)}, valid=False)
    assert dpo.form.error is None, (dpo.form.error, dpo.form.values())
    runs = sorted(p.name for p in (project / "runs").iterdir())
    cases = [({"init": str(tmp_path / "nope")}, "init", "no checkpoint found in"),
             ({"init": str(project / "runs" / "tokenizer-20260101-000000")}, "init", "no checkpoint found in"),
             ({"init": str(sft_run), "seq_len": 1000}, "seq_len", "1000 is longer than the model's context (48)")]
    if not torch.cuda.is_available():
        cases.append(({"seq_len": 0, "device": "cuda"}, "device", "CUDA was asked for but no CUDA device"))
    for values, field, says in cases:
        type_settings(qtbot, dpo, values, valid=False)
        assert dpo.form.error is not None and dpo.form.error.field == field, (values, dpo.form.error)
        assert says in dpo.form.messages[field].text()
        assert not dpo.start_btn.isEnabled()
    assert sorted(p.name for p in (project / "runs").iterdir()) == runs


def test_a_resume_that_would_change_a_fixed_setting_is_refused_on_the_field_and_the_run_kept(
        qtbot, project, make_window):
    """A stopped run, its batch size edited, Resume: refused under the field; the run stays
    stopped and its config.json as it was (before, it was written and the run failed at once)."""
    from ui_driver import start_and_wait
    w = make_window(project, show=True)
    go(qtbot, w, "tokenizer")
    tok = start_and_wait(qtbot, w, w.pages["tokenizer"])
    assert tok.status == "completed", tok.error
    go(qtbot, w, "pretrain")
    pre = w.pages["pretrain"]
    type_settings(qtbot, pre, {"preset": "tiny", "max_steps": 4, "batch_size": 4, "eval_every": 4,
                               "checkpoint_every": 2, "keep_last": 2, "sample_every": 0})
    job = start_and_wait(qtbot, w, pre)
    assert job.status == "completed", job.error
    config = (job.run_dir / "config.json").read_bytes()
    with open(job.run_dir / "events.jsonl", "a") as f:       # as a resume that was stopped leaves it
        for ev in ({"type": "start", "stage": "pretrain", "pid": 1, "time": time.time()},
                   {"type": "done", "status": "stopped", "error": None, "time": time.time()}):
            f.write(json.dumps(ev) + "\n")
    w.ctx.sync()
    qtbot.waitUntil(lambda: pre.resume_btn.isEnabled(), timeout=5_000)
    type_settings(qtbot, pre, {"batch_size": 8, "max_steps": 6})
    assert pre.resume_btn.isEnabled(), pre.status_label.text()
    pre.resume_btn.click()
    assert "cannot change on resume (batch_size: 4 -> 8): set it back to resume" in pre.form.messages["batch_size"].text()
    assert "Not resumed" in pre.status_label.text()
    assert (job.run_dir / "config.json").read_bytes() == config
    assert w.ctx.run(job.run_dir.name).status == "stopped" and pre.start_btn.isEnabled()
