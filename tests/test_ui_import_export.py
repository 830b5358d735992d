"""File > Import Model... and Export... on the Runs page, clicked as a person does."""
from pathlib import Path

import pytest
import torch
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QInputDialog

transformers = pytest.importorskip("transformers")

from engine.artifacts import load_artifact  # noqa: E402
from tests.hf_fixtures import save_model_folder  # noqa: E402
from ui import file_dialogs
from ui.token_view import TokenInspector  # noqa: E402
from ui_driver import TINY, go, start_and_wait, type_settings, wait_preview  # noqa: E402


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_model_folder(tmp_path_factory.mktemp("hf") / "SmolLM2-tiny", "smollm2", "llama",
                             tie_word_embeddings=True)


def finished(window, stage):
    jobs = [j for j in window.ctx.jobs.values() if j.stage == stage]
    return bool(jobs) and all(j.status in ("completed", "failed", "stopped") for j in jobs)


def test_import_from_the_file_menu_fine_tune_it_and_export_from_the_runs_page(make_window, demo_project, model_folder,
                                                                             tmp_path, qtbot, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))     # no cached models: a folder
    monkeypatch.setattr(file_dialogs, "existing_dir", lambda *a, **k: str(model_folder))
    w = make_window(demo_project, show=True)
    w.import_action.trigger()
    qtbot.waitUntil(lambda: finished(w, "hf_import"), timeout=60_000)
    job = next(j for j in w.ctx.jobs.values() if j.stage == "hf_import")
    assert job.status == "completed", job.error
    assert w.stack.currentWidget() is w.runs_browser
    browser = w.runs_browser
    assert browser.selected_names() == [job.run_dir.name]
    row = next(r for r in range(browser.table.rowCount()) if browser.table.item(r, 0).text() == job.run_dir.name)
    assert "params" in browser.table.item(row, browser.table.columnCount() - 1).text()
    assert browser.table.item(row, 3).text() == model_folder.name          # Started from: the folder

    # The SFT page starts from the import, and its Data tab draws the model's own template.
    go(qtbot, w, "sft")
    sft = w.pages["sft"]
    wait_preview(qtbot, sft)
    assert Path(sft.form.values()["init"]).name == job.run_dir.name
    assert "<|im_start|>" in sft.preview.view.toPlainText()
    type_settings(qtbot, sft, {**TINY["sft"], "eval_task_limit": 0, "sample_every": 0})
    sft_job = start_and_wait(qtbot, w, sft)
    assert sft_job.status == "completed", sft_job.error

    go(qtbot, w, "runs")
    browser.select([sft_job.run_dir.name])
    assert browser.export_btn.isEnabled()
    qtbot.mouseClick(browser.export_btn, Qt.MouseButton.LeftButton)
    dialog = browser.last_export
    labels = [dialog.format.itemText(i) for i in range(dialog.format.count())]
    dialog.format.setCurrentIndex(next(i for i, t in enumerate(labels) if t.startswith("GGUF, 16-bit")))
    out = tmp_path / "exported.gguf"
    dialog.path.clear()
    qtbot.keyClicks(dialog.path, str(out))
    qtbot.mouseClick(dialog.export_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: dialog.status.text().startswith(("Exported", "Not exported")), timeout=30_000)
    assert dialog.status.text() == f"Exported to {out}"
    from engine.gguf_export import read_gguf_fields
    assert read_gguf_fields(out)["general.architecture"] == "llama"

    dialog.format.setCurrentIndex(0)                                       # Hugging Face folder
    assert dialog.path.text() == str(tmp_path / "exported")                # the typed name, as a folder
    qtbot.mouseClick(dialog.export_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: dialog.status.text().startswith("Exported to ") and "gguf" not in dialog.status.text(),
                    timeout=30_000)
    # Exporting over that export asks first; No keeps it as it was.
    from PySide6.QtWidgets import QMessageBox
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.No)
    stamp = (Path(dialog.path.text()) / "config.json").stat().st_mtime_ns
    qtbot.mouseClick(dialog.export_btn, Qt.MouseButton.LeftButton)
    assert "holds a model (an earlier export?)" in asked[-1] and "is kept as it was" in dialog.status.text()
    assert (Path(dialog.path.text()) / "config.json").stat().st_mtime_ns == stamp
    back = transformers.AutoModelForCausalLM.from_pretrained(dialog.path.text()).eval()
    art = load_artifact(sft_job.run_dir, prefer="latest")
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, art.model.eval()(x), atol=1e-4, rtol=1e-4)

    # The bfloat16 choice: its own default folder beside the others, the weights stored in bf16.
    dialog.path.clear()
    dialog.format.setCurrentIndex(next(i for i, t in enumerate(labels) if "bfloat16" in t))
    default = sft_job.run_dir.parent.parent / "exports" / f"{sft_job.run_dir.name}-bfloat16"
    assert dialog.path.text() == str(default)
    qtbot.mouseClick(dialog.export_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: dialog.status.text().startswith(("Exported", "Not exported")), timeout=30_000)
    assert dialog.status.text() == f"Exported to {default}"
    half = transformers.AutoModelForCausalLM.from_pretrained(default, dtype="auto")
    assert half.dtype == torch.bfloat16
    dialog.close()


def test_a_cached_model_is_offered_by_name(make_window, demo_project, model_folder, tmp_path, qtbot, monkeypatch):
    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-tiny" / "snapshots" / "0123"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(model_folder, target_is_directory=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    offered = []

    def pick(parent, title, label, items, current, editable):
        offered.extend(items)
        return "HuggingFaceTB/SmolLM2-tiny", True

    monkeypatch.setattr(QInputDialog, "getItem", pick)
    monkeypatch.setattr(file_dialogs, "existing_dir", lambda *a, **k: pytest.fail("no folder asked for"))
    w = make_window(demo_project)
    w.import_action.trigger()
    assert offered[1:] == ["HuggingFaceTB/SmolLM2-tiny"]
    qtbot.waitUntil(lambda: finished(w, "hf_import"), timeout=60_000)
    assert next(j for j in w.ctx.jobs.values() if j.stage == "hf_import").status == "completed"


def test_the_token_inspector_draws_an_imported_template(qtbot, model_folder):
    view = TokenInspector()
    qtbot.addWidget(view)
    view.set_tokenizer(model_folder)
    assert "<code>&lt;|im_start|&gt;</code>" in view.header.text()
    view.chat_box.setChecked(True)
    view.set_text("Hi there")
    assert view.counts["special"] >= 2                     # <|im_start|> and <|im_end|> at least
    texts = "".join(p.text for p in view.view.pieces)
    assert "<|im_start|>user\nHi there<|im_end|>" in texts
