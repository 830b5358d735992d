"""The desktop app driven as a user would: panels start real (tiny) jobs in child processes,
plots fill from their events, stop / resume, the runs browser, re-attaching after a restart."""
import json
import os
import signal
from pathlib import Path

import pytest
from PySide6.QtCore import QSettings

from ui_driver import JOB_TIMEOUT_MS, TINY as FAST

pytestmark = pytest.mark.slow


@pytest.fixture
def project(demo_project):
    return demo_project


def run_panel(qtbot, panel, values=None, action="start"):
    if values:
        current = panel.form.values()
        current.update(values)
        panel.form.set_values(current)
    assert panel.form.error is None, panel.form.error
    job = getattr(panel, action)()
    assert job is not None
    if job.running:
        with qtbot.waitSignal(job.finished, timeout=JOB_TIMEOUT_MS):
            pass
    return job


def test_a_failed_job_shows_its_error(qtbot, project, make_window):
    w = make_window(project)
    panel = w.pages["pretrain"]
    missing = project / "no-such-tokenizer.json"
    job = run_panel(qtbot, panel, dict(FAST["pretrain"], tokenizer=str(missing)))
    assert job.status == "failed"
    assert panel.error_box.isVisible() or not panel.isVisible()
    assert "no-such-tokenizer.json" in panel.error_text.text()
    assert panel.run.status == "failed"


def test_an_open_project_is_frozen_from_the_collector_and_thawed_on_close(qtbot, project, make_window):
    import gc
    w = make_window(project)
    frozen = gc.get_freeze_count()
    # the window, its pages and every module are out of the timer's full collections
    assert frozen > 50_000 and len(gc.get_objects()) < frozen / 4
    w.close_project()
    assert gc.get_freeze_count() == 0          # dropped pages can be collected again


def test_new_project_on_a_project_offers_to_open_it_and_asks_no_name(qtbot, project, make_window,
                                                                      monkeypatch, tmp_path):
    from PySide6.QtWidgets import QInputDialog, QMessageBox
    from ui import file_dialogs
    w = make_window(project)
    other = tmp_path / "other"
    other.mkdir()
    (other / "workbench.toml").write_text('name = "Other"\n')
    asked = []
    monkeypatch.setattr(file_dialogs, "existing_dir", lambda *a, **k: str(other))
    monkeypatch.setattr(QInputDialog, "getText", lambda *a, **k: pytest.fail("a name asked for"))
    monkeypatch.setattr(QMessageBox, "question", lambda _p, _t, text, *a: asked.append(text) or QMessageBox.Yes)
    w.new_project()
    assert asked == [f"{other} already holds a project. Open it?"]
    assert w.ctx.project.path == other.absolute()


def test_a_run_saved_before_a_setting_existed_opens_with_its_default(qtbot, project, make_window):
    w = make_window(project)
    panel = w.pages["pretrain"]
    job = run_panel(qtbot, panel, dict(FAST["pretrain"], tokenizer=str(project / "none.json"), nproc=1))
    config = json.loads((job.run_dir / "config.json").read_text())
    del config["nproc"]
    (job.run_dir / "config.json").write_text(json.dumps(config))
    panel.form.set_values({"nproc": 0})
    panel.show_run(panel.run)
    assert panel.form.values()["nproc"] == 1
    assert panel.form.error is None or panel.form.error.field != "nproc"


def test_a_crash_without_a_done_event_is_an_error_too(qtbot, project, make_window):
    w = make_window(project)
    run_panel(qtbot, w.pages["tokenizer"], FAST["tokenizer"])
    panel = w.pages["pretrain"]
    current = panel.form.values()
    current.update(dict(FAST["pretrain"], max_steps=100_000, checkpoint_every=100_000, eval_every=100_000))
    panel.form.set_values(current)
    job = panel.start()
    qtbot.waitUntil(lambda: "train/loss" in job.history.keys(), timeout=JOB_TIMEOUT_MS)
    with qtbot.waitSignal(job.finished, timeout=10_000):
        os.kill(job.pid, signal.SIGKILL)
    assert job.status == "failed" and "without a done event" in job.error
    assert "without a done event" in panel.error_text.text()


def test_the_form_refuses_bad_settings_before_start(qtbot, project, make_window):
    w = make_window(project)
    panel = w.pages["pretrain"]
    panel.show_run(None)
    # No tokenizer run yet: the form says what is missing first.
    assert panel.form.error is not None and panel.form.error.field == "tokenizer"
    assert not panel.start_btn.isEnabled()
    values = panel.form.values()
    values["tokenizer"] = str(project / "tokenizer.json")
    values["lr"] = -1.0
    panel.form.set_values(values)
    assert panel.form.error is not None and panel.form.error.field == "lr"
    assert not panel.start_btn.isEnabled()
    assert panel.form.messages["lr"].text() == panel.form.error.message     # said under the field
    assert panel.start() is None
    values["lr"] = 1e-3
    panel.form.set_values(values)
    assert panel.form.error is None


def test_recent_projects_and_window_state_persist(qtbot, project, make_window, tmp_path):
    w = make_window(project)
    w.go("runs")
    w.close()
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    assert settings.value("lastProject") == str(project)
    assert str(project) in settings.value("recentProjects")
    w2 = make_window(project)
    assert w2.sidebar.currentItem().text().startswith("Runs")


def test_first_start_writes_and_opens_the_demo_project(qtbot, tmp_path, monkeypatch):
    import argparse
    from ui import app as app_module
    demo = tmp_path / "data" / "demo-project"
    monkeypatch.setattr(app_module, "demo_location", lambda: demo)
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)   # a first start
    w = app_module.open_window(argparse.Namespace(project=None, demo=False), settings)
    qtbot.addWidget(w)
    qtbot.waitUntil(lambda: w.ctx is not None, timeout=60_000)
    assert w.ctx.path == demo and (demo / "workbench.toml").exists()
    assert "Demo" in w.windowTitle() and settings.value("lastProject") == str(demo)
    # The panels start from the demo's data: the tokenizer reads its corpus.
    assert [Path(p).name for p in w.pages["tokenizer"].form.values()["inputs"]] == ["python_docs.txt", "tasks.txt"]
    w.close_project()


def test_a_first_window_fits_the_screen_it_opens_on(qtbot, tmp_path):
    """No geometry saved yet: the window opens no larger than the screen's free area (a
    1366x768 laptop hid the Rank page's buttons below its edge)."""
    from PySide6.QtCore import QSettings
    from ui.help import HelpDialog
    from ui.main_window import MainWindow
    w = MainWindow(QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    free = w.screen().availableGeometry()
    assert free.width() < 1360 or free.height() < 860, "the test screen must be smaller than the default"
    assert w.width() <= free.width() and w.height() <= free.height()
    d = HelpDialog("guide", w)
    qtbot.addWidget(d)
    assert d.height() <= free.height()


def test_a_project_whose_run_has_a_long_log_opens_and_reads_it_on(qtbot, demo_project):
    """More unread events than one slice of the first sync (a long pretraining's log): the
    project opens, and the rest is read in the next turns of the event loop."""
    from ui.project_context import SYNC_BYTES, ProjectContext
    from workbench.project import Project
    run = demo_project / "runs" / "pretrain-20250101-000000"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    lines = [json.dumps({"type": "start", "stage": "pretrain", "pid": 1, "time": 1.0})]
    step = 0
    while sum(map(len, lines)) < 3 * SYNC_BYTES:
        step += 1
        lines.append(json.dumps({"type": "metrics", "step": step, "train/loss": 1.0 + 1 / step, "time": 1.0}))
    lines.append(json.dumps({"type": "done", "status": "completed", "time": 2.0}))
    (run / "events.jsonl").write_text("\n".join(lines) + "\n")
    ctx = ProjectContext(Project.open(demo_project))
    try:
        qtbot.waitUntil(lambda: (info := ctx.run(run.name)) is not None and info.status == "completed",
                        timeout=30_000)
        assert ctx.run(run.name).step == step
    finally:
        ctx.close()


def test_a_run_another_process_started_is_followed_live_and_stopped_from_here(qtbot, demo_project, make_window):
    """A pretraining started outside this window (a terminal, another window) after the project
    opened: its page follows it live, Stop reaches it, and it ends stopped with a checkpoint."""
    import subprocess
    import sys
    from ui_driver import TINY, go, start_and_wait, type_settings
    from workbench import runfolder
    from workbench.project import Project
    w = make_window(demo_project, show=True)
    go(qtbot, w, "tokenizer")
    type_settings(qtbot, w.pages["tokenizer"], TINY["tokenizer"])
    assert start_and_wait(qtbot, w, w.pages["tokenizer"]).status == "completed"
    values = {**w.ctx.suggested_values("pretrain"), **TINY["pretrain"], "max_steps": 100_000,
              "eval_every": 100_000, "sample_every": 0, "checkpoint_every": 100_000}
    run = runfolder.new_run(Project.open(demo_project), "pretrain", values)
    proc = subprocess.Popen([sys.executable, "-m", "engine.pretrain", "--run-dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        qtbot.waitUntil(lambda: (w.ctx.sync(), w.ctx.job_for(run.name))[1] is not None, timeout=60_000)
        go(qtbot, w, "pretrain")
        panel = w.pages["pretrain"]
        panel.select_run(run.name)
        job = w.ctx.job_for(run.name)
        qtbot.waitUntil(lambda: job.core.fold.step is not None and job.core.fold.step >= 3, timeout=60_000)
        first = job.core.fold.step
        qtbot.waitUntil(lambda: job.core.fold.step > first, timeout=60_000)      # live, not read once
        assert panel.stop_btn.isEnabled()
        panel.stop_btn.click()
        assert proc.wait(timeout=120) == 0
        qtbot.waitUntil(lambda: w.ctx.run(run.name).status == "stopped", timeout=30_000)
        assert list((run / "checkpoints").glob("step-*"))
        # Resumed elsewhere again: followed anew, though this window had a job of the run.
        proc = subprocess.Popen([sys.executable, "-m", "engine.pretrain", "--run-dir", str(run)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        qtbot.waitUntil(lambda: (w.ctx.sync(), w.ctx.job_for(run.name))[1] is not job, timeout=60_000)
        again = w.ctx.job_for(run.name)
        assert again.running and panel.stop_btn.isEnabled()
        panel.stop_btn.click()
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_project_folder_moved_away_while_open_is_said_and_its_runs_stay_listed(qtbot, demo_project, make_window):
    from ui_driver import sidebar_text
    run = demo_project / "runs" / "tokenizer-20250101-000000"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "events.jsonl").write_text(json.dumps({"type": "start", "stage": "tokenizer", "pid": 1, "time": 1.0})
                                      + "\n" + json.dumps({"type": "done", "status": "completed", "time": 2.0}) + "\n")
    w = make_window(demo_project, show=True)
    assert sidebar_text(w, "runs").endswith("1 run")
    moved = demo_project.with_name("moved")
    demo_project.rename(moved)
    try:
        w.ctx.sync()
        box = getattr(w, "gone_box", None)
        assert box is not None and box.isVisible() and f"{demo_project} is not there any more" in box.text()
        w.update_states()
        assert sidebar_text(w, "runs").endswith("1 run")          # not a project of nothing
        w.pages["reward"]._count()                                  # no traceback: said on the page
        assert "cannot be read" in w.pages["reward"].counts.text()
    finally:
        moved.rename(demo_project)
    w.ctx.sync()
    assert w.gone_box is None and "is back" in w.statusBar().currentMessage()
