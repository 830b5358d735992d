"""A new user's walk through the whole pipeline in the real window: every page reached by a
click in the sidebar, the page's own suggested settings kept (only the size settings typed in,
to make each run tiny), Start clicked, and at each page what a person would check: Start is
enabled with no error before anything is typed, each input picker shows the newest run of the
stage it expects, and the plots end at the run's last step."""
import json
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from ui_driver import (JOB_TIMEOUT_MS, TINY, answer_next_dialog, click, click_tab, go, press, start_and_wait,
                       sidebar_text, type_settings,
                       wait_preview)
from workbench.runfold import fold_run

pytestmark = pytest.mark.slow


@pytest.fixture
def project(demo_project):
    return demo_project


@pytest.fixture
def window(qtbot, project, make_window):
    w = make_window(project, show=True)
    w.resize(1600, 1000)
    qtbot.waitExposed(w)
    return w


def ready(qtbot, panel) -> None:
    """The page as a person finds it: its suggested settings valid, its data read, Start on."""
    wait_preview(qtbot, panel)
    qtbot.waitUntil(lambda: panel.form.error is None and not panel.form._debounce.isActive(), timeout=5_000)
    assert panel.form.error is None, panel.form.error
    assert panel.start_btn.isEnabled(), panel.status_label.text()
    assert panel.preview.problems == [], panel.preview.problems


def picks(panel, field: str) -> str:
    return Path(panel.form.values()[field]).name


def ends_at_last_step(panel, run_dir: Path, key: str) -> None:
    """The page's curve is the run's whole curve, as a fresh read of its events gives it."""
    xs, ys = panel.plots.history.arrays(key)
    fresh_x, fresh_y = fold_run(run_dir).history.arrays(key)
    assert len(xs) and list(xs) == list(fresh_x) and list(ys) == list(fresh_y)


def button_with_text(root, text: str):
    from PySide6.QtWidgets import QPushButton
    return next(b for b in root.findChildren(QPushButton) if b.text() == text and b.isVisible())


def test_a_new_user_walks_the_pipeline_from_tokenizer_to_chat(qtbot, window, project):
    w, ctx = window, window.ctx

    go(qtbot, w, "tokenizer")
    tok = w.pages["tokenizer"]
    ready(qtbot, tok)
    type_settings(qtbot, tok, TINY["tokenizer"])
    job = start_and_wait(qtbot, w, tok)
    assert job.status == "completed", job.error
    tok_run = job.run_dir.name
    # Inspect shows the tokenizer just trained (it said "No tokenizer yet" before).
    assert tok.inspector.tokenizer is not None

    # Pretrain: the tokenizer just trained is picked, and Start needs nothing typed into it.
    go(qtbot, w, "pretrain")
    pre = w.pages["pretrain"]
    ready(qtbot, pre)
    assert picks(pre, "tokenizer") == tok_run
    type_settings(qtbot, pre, TINY["pretrain"])
    job = start_and_wait(qtbot, w, pre)
    assert job.status == "completed", job.error
    pre_run = job.run_dir
    ends_at_last_step(pre, pre_run, "train/loss")
    assert pre.plots.history.arrays("train/loss")[0][-1] == 6
    assert "step 3" in pre.samples.toPlainText() and "done: completed" in pre.log.toPlainText()

    # SFT: starts from that pretraining run; its Data tab shows the examples through the chat
    # template with the tokenizer found inside the checkpoint (not "tokenizer file not found").
    go(qtbot, w, "sft")
    sft = w.pages["sft"]
    ready(qtbot, sft)
    assert picks(sft, "init") == pre_run.name
    assert "not found" not in sft.preview.note.text() and sft.preview.seq_spin.isVisibleTo(sft.preview)
    type_settings(qtbot, sft, TINY["sft"])
    job = start_and_wait(qtbot, w, sft)
    assert job.status == "completed", job.error
    sft_run = job.run_dir
    ends_at_last_step(sft, sft_run, "train/loss")

    # Sample & Rank: the sample job samples the SFT model (not the base model), then the
    # simulated annotator ranks the batch.
    go(qtbot, w, "rank")
    click_tab(qtbot, w.pages["rank"], "Sample jobs")
    sample = w.sample_panel
    ready(qtbot, sample)
    assert picks(sample, "checkpoint") == sft_run.name
    type_settings(qtbot, sample, TINY["sample"])
    job = start_and_wait(qtbot, w, sample)
    assert job.status == "completed", job.error
    qtbot.waitUntil(lambda: w.pages["rank"].currentWidget() is w.ranking, timeout=10_000)
    if w.ranking.stack.currentWidget() is w.ranking.guide:      # a session opens on it: the guidelines
        click(qtbot, w.ranking.guide.go)
    if w.ranking.stack.currentWidget() is not w.ranking.start:  # leave ranking to the simulated annotator
        click(qtbot, button_with_text(w.ranking, "End session"))
    assert w.ranking.stack.currentWidget() is w.ranking.start
    answer_next_dialog(qtbot)
    click(qtbot, w.ranking.start.simulate)
    qtbot.waitUntil(lambda: w.ranking.simulating is None and "ranked" in w.ranking.start.status.text(),
                    timeout=60_000)

    # Reward model: trains on the project's rankings; its Data tab previews exactly those.
    go(qtbot, w, "reward")
    reward = w.pages["reward"]
    ready(qtbot, reward)
    assert picks(reward, "init") == sft_run.name
    assert reward.use_store.isChecked() and reward.use_simulated.isChecked()
    assert "ranked records" in reward.preview.summary.text()
    type_settings(qtbot, reward, TINY["reward"])
    job = start_and_wait(qtbot, w, reward)
    assert job.status == "completed", job.error
    rm_run = job.run_dir
    ends_at_last_step(reward, rm_run, "train/loss")

    # PPO: the SFT policy and the reward model just trained, with no warning.
    go(qtbot, w, "ppo")
    ppo = w.pages["ppo"]
    ready(qtbot, ppo)
    assert picks(ppo, "policy") == sft_run.name and picks(ppo, "reward_model") == rm_run.name
    assert "⚠" not in ppo.notes.text()
    type_settings(qtbot, ppo, TINY["ppo"])
    job = start_and_wait(qtbot, w, ppo)
    assert job.status == "completed", job.error
    ppo_run = job.run_dir
    ends_at_last_step(ppo, ppo_run, "objective/kl")

    # DPO: from the same SFT run, on the same rankings, with no reward model.
    go(qtbot, w, "dpo")
    dpo = w.pages["dpo"]
    ready(qtbot, dpo)
    assert picks(dpo, "init") == sft_run.name and "⚠" not in dpo.notes.text()
    assert "ranked records" in dpo.preview.summary.text()
    type_settings(qtbot, dpo, TINY["dpo"])
    job = start_and_wait(qtbot, w, dpo)
    assert job.status == "completed", job.error
    dpo_run = job.run_dir
    ends_at_last_step(dpo, dpo_run, "train/reward_margin")

    # GRPO: from the SFT model too (not the newer PPO run), scored by the task checker.
    go(qtbot, w, "grpo")
    grpo = w.pages["grpo"]
    ready(qtbot, grpo)
    assert picks(grpo, "policy") == sft_run.name and "⚠" not in grpo.notes.text()
    type_settings(qtbot, grpo, TINY["grpo"])
    job = start_and_wait(qtbot, w, grpo)
    assert job.status == "completed", job.error
    grpo_run = job.run_dir
    ends_at_last_step(grpo, grpo_run, "objective/kl")

    # Methods: the three against their SFT model, compared with a click.
    go(qtbot, w, "chat")
    click_tab(qtbot, w.pages["chat"], "Methods")
    w.methods.prompts.setValue(3)
    click(qtbot, w.methods.compare_btn)
    qtbot.waitUntil(lambda: w.methods.worker is None, timeout=JOB_TIMEOUT_MS)
    assert [w.methods.table.item(r, 1).text() for r in range(w.methods.table.rowCount())] == \
        [ppo_run.name, dpo_run.name, grpo_run.name]

    # Chat: the newest fine-tuned model is picked; a message typed and sent gets a reply.
    click_tab(qtbot, w.pages["chat"], "Chat")
    chat = w.chat
    assert chat.picker.path().name == grpo_run.name
    click(qtbot, chat.input)
    qtbot.keyClicks(chat.input, "What is 2 + 3?")
    qtbot.keyClick(chat.input, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: not chat.busy and len(chat.session.messages) >= 2, timeout=60_000)
    assert chat.session.messages[-1]["role"] == "assistant"

    # The Runs page lists every run; the lineage goes back to the tokenizer; the sidebar shows
    # each stage's result (the reward model's is its chosen checkpoint's, as in its summary).
    go(qtbot, w, "runs")
    table = w.runs_browser.table
    names = {table.item(r, 0).text() for r in range(table.rowCount())}
    assert {n.split("-")[0] for n in names} == {"dpo", "grpo", "ppo", "pretrain", "reward", "sample", "sft",
                                                "tokenizer"}
    assert {r.stage for r in ctx.lineage(ppo_run.name)} == {"ppo", "sft", "reward", "pretrain", "tokenizer"}
    rm_summary = json.loads((rm_run / "summary.json").read_text())
    assert f"val acc {rm_summary['val/accuracy']:.1%}" in sidebar_text(w, "reward")
    assert "score" in sidebar_text(w, "ppo")
    assert "1 batch ·" in sidebar_text(w, "rank") and "8 runs" in sidebar_text(w, "runs")


@pytest.fixture
def tokenized(project):
    """A project with a finished tokenizer run, made as the CLI makes one."""
    from workbench import runfolder
    from workbench.jobs import run_job
    from workbench.project import Project
    proj = Project.open(project)
    values = {**runfolder.suggested_values(proj, "tokenizer", lambda p: None), **TINY["tokenizer"]}
    result = run_job("tokenizer", runfolder.new_run(proj, "tokenizer", values))
    assert result.status == "completed", result.error
    return project


def start_long_pretrain(qtbot, w):
    go(qtbot, w, "pretrain")
    panel = w.pages["pretrain"]
    ready(qtbot, panel)
    type_settings(qtbot, panel, dict(TINY["pretrain"], max_steps=100_000, eval_every=100_000,
                                     checkpoint_every=100_000, sample_every=2))
    with qtbot.waitSignal(w.ctx.jobStarted, timeout=10_000) as started:
        click(qtbot, panel.start_btn)
    return panel, started.args[0]


def shows_what_a_fresh_load_shows(panel, run_dir: Path) -> None:
    """The page's curves are every metric's whole curve, and each sample is listed once."""
    fresh = fold_run(run_dir)
    assert set(panel.plots.history.keys()) == set(fresh.history.keys())
    for key in fresh.history.keys():
        ends_at_last_step(panel, run_dir, key)
    samples = [e for e in fresh.listed if e["type"] == "sample"]
    shown = [line for line in panel.samples.toPlainText().splitlines() if line.startswith("step ")]
    assert len(samples) > 0 and len(shown) == len(samples)


def test_quit_and_reopen_follows_the_running_job_to_its_end(qtbot, tokenized, make_window):
    w = make_window(tokenized, show=True)
    panel, job = start_long_pretrain(qtbot, w)
    qtbot.waitUntil(lambda: (job.fold.step or 0) >= 4, timeout=JOB_TIMEOUT_MS)

    press(qtbot, w, Qt.Key.Key_Q, Qt.KeyboardModifier.ControlModifier)       # File ▸ Quit
    assert w.ctx is None and job.core._proc.poll() is None      # the job runs on

    w2 = make_window(tokenized, show=True)
    job2 = w2.ctx.jobs[job.run_dir.name]
    panel2 = w2.pages["pretrain"]
    assert panel2.run.name == job.run_dir.name and panel2.stop_btn.isEnabled()
    reattached_at = job2.fold.step or 0
    # The curve keeps growing past the step where the app re-attached.
    qtbot.waitUntil(lambda: len(panel2.plots.history.arrays("train/loss")[0]) > reattached_at + 4,
                    timeout=JOB_TIMEOUT_MS)
    with qtbot.waitSignal(job2.finished, timeout=JOB_TIMEOUT_MS):
        click(qtbot, panel2.stop_btn)
    assert job2.status == "stopped"
    shows_what_a_fresh_load_shows(panel2, job.run_dir)
    assert "ETA" not in panel2.progress_label.text()
    job.core.wait()


def test_stop_then_resume_keeps_the_history_on_screen(qtbot, tokenized, make_window):
    w = make_window(tokenized, show=True)
    panel, job = start_long_pretrain(qtbot, w)
    qtbot.waitUntil(lambda: (job.fold.step or 0) >= 4, timeout=JOB_TIMEOUT_MS)
    with qtbot.waitSignal(job.finished, timeout=JOB_TIMEOUT_MS):
        click(qtbot, panel.stop_btn)
    assert job.status == "stopped" and panel.resume_btn.isEnabled()
    assert "ETA" not in panel.progress_label.text()
    stopped_at = panel.run.step
    type_settings(qtbot, panel, {"max_steps": stopped_at + 4})
    resumed = start_and_wait(qtbot, w, panel, "resume_btn")
    assert resumed.status == "completed", resumed.error
    xs = panel.plots.history.arrays("train/loss")[0]
    assert xs[0] == 1 and xs[-1] == stopped_at + 4      # from the first step, not the resume
    shows_what_a_fresh_load_shows(panel, job.run_dir)
    assert "resumed from step-" in panel.log.toPlainText()
