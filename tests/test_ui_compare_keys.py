"""The Compare tab's vote keys in the real main window: they vote, and the window's Ctrl+digit
page keys still change pages while the tab is shown (no shortcut is claimed twice)."""
import pytest
from PySide6.QtCore import QSettings, Qt

from engine.chat import SamplingSettings
from engine.checkpoint import resolve_checkpoint, save_checkpoint
from engine.model import Transformer, config_from_preset
from engine.weights import safetensors_state
from engine.tokenizer import Tokenizer
from workbench.demo import write_demo_project
from workbench.store import Store


@pytest.fixture
def window(qtbot, tmp_path):
    from ui.main_window import MainWindow
    project = tmp_path / "project"
    write_demo_project(project, seed=0, scale="tiny")
    w = MainWindow(QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    assert w.open_project(project)
    yield w
    w.close_project()


@pytest.fixture
def second_ckpt(tiny_lm_ckpt, tmp_path):
    import torch
    first = resolve_checkpoint(tiny_lm_ckpt)
    tok = Tokenizer.from_file(first / "tokenizer.json")
    torch.manual_seed(1)
    model = Transformer(config_from_preset("tiny", tok.vocab_size, d_model=32, n_layer=1, n_head=2,
                                           n_kv_head=2, d_ff=64, max_seq_len=48))
    weights, meta = safetensors_state(model)
    save_checkpoint(tmp_path / "other" / "checkpoints", 5, model=weights, model_metadata=meta,
                    state={"tokenizer_fingerprint": tok.fingerprint(), "stage": "ppo"},
                    extra_files={"tokenizer.json": first / "tokenizer.json"})
    return tmp_path / "other"


def page(w):
    return w.stack.currentWidget()


def page_key(name):
    """The digit key of a page's Ctrl shortcut: its place in the sidebar (Ctrl+0 for the tenth),
    so adding a stage's page before Chat does not break the test."""
    from ui.main_window import SIDEBAR
    return Qt.Key_0 + ([k for k, _ in SIDEBAR].index(name) + 1) % 10


def test_vote_keys_vote_and_page_keys_still_change_pages(qtbot, qtlog, window, tiny_lm_ckpt, second_ckpt):
    w = window
    with qtbot.waitActive(w):           # shortcuts work in the active window
        w.show()
        w.activateWindow()
    qtbot.keyClick(w, page_key("chat"), Qt.ControlModifier)
    chat = w.pages["chat"]
    assert page(w) is chat
    tabs = chat.tabBar()
    qtbot.mouseClick(tabs, Qt.LeftButton, pos=tabs.tabRect(1).center())
    compare = w.compare
    assert chat.currentWidget() is compare
    # The demo project has no trained run yet: both models come from folders (Browse…).
    compare.pickers[0].set_path(tiny_lm_ckpt)
    compare.pickers[1].set_path(second_ckpt)
    compare.sampling.set_settings(SamplingSettings(seed=0, max_new_tokens=4))
    compare.blind.setChecked(False)
    compare.annotator.setText("ada")

    for verdict, key in (("left", Qt.Key_1), ("tie", Qt.Key_2), ("right", Qt.Key_3)):
        qtbot.mouseClick(compare.input, Qt.LeftButton)
        qtbot.keyClicks(compare.input, f"question {verdict}")
        with qtbot.waitSignal(compare.roundFinished, timeout=30_000):
            qtbot.keyClick(compare.input, Qt.Key_Return)
        assert "Alt+" in compare.vote_buttons[verdict].text()
        with qtbot.waitSignal(compare.voteStored, timeout=10_000) as sig:
            qtbot.keyClick(compare.input, key, Qt.AltModifier)   # the focus is in the prompt box
        left, right = sig.args[0].answer_ids
        with Store.for_project(w.ctx.path) as store:
            [ranking] = [r for r in store.rankings() if r.item_id == sig.args[0].item_id]
        assert ranking.ordering == {"left": [[left], [right]], "tie": [[left, right]],
                                    "right": [[right], [left]]}[verdict]
        # The page keys the vote keys used to shadow: they change pages from the Compare tab.
        qtbot.keyClick(compare.input, key, Qt.ControlModifier)
        assert page(w) is w.pages[["tokenizer", "pretrain", "sft"][key - Qt.Key_1]]
        qtbot.keyClick(w, page_key("chat"), Qt.ControlModifier)
        assert page(w) is chat and chat.currentWidget() is compare

    ambiguous = [r.message for r in qtlog.records if "mbiguous" in r.message]
    assert ambiguous == []
    assert "Alt+1" in compare.legend.text() and "Alt+3" in compare.legend.text()
