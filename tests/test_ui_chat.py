"""Chat and compare views with a tiny checkpoint, and the model cache behind them.

The tiny model writes gibberish, but it streams like a real one. Its forward pass is slowed a
little (a hook that sleeps), so an answer takes long enough to be seen streaming and stopped.
"""
import gc
import json
import random
import shutil
import threading
import time
import weakref

import pytest
import torch
from PySide6.QtCore import Qt
from PySide6.QtGui import QTextCursor

from engine.artifacts import load_artifact
from engine.chat import ChatSession, SamplingSettings
from engine.checkpoint import resolve_checkpoint, save_checkpoint
from engine.model import Transformer, config_from_preset
from engine.weights import safetensors_state
from engine.tokenizer import Tokenizer
from ui import file_dialogs
from ui.chat_view import ChatView
from ui.compare_view import CompareView
from ui.sampling_controls import PRESETS, SamplingControls
from ui.workers import running_workers
from workbench.model_cache import ModelCache, ModelCacheError, OutOfMemory, short_name
from workbench.preferences import write_rm_dataset
from workbench.store import Store

STEP_DELAY_S = 0.01


@pytest.fixture(scope="module")
def two_ckpts(tiny_lm_ckpt, tmp_path_factory):
    """The shared tiny checkpoint and a second one: same tokenizer, other random weights."""
    first = resolve_checkpoint(tiny_lm_ckpt)
    tok = Tokenizer.from_file(first / "tokenizer.json")
    root = tmp_path_factory.mktemp("tiny_lm_2")
    torch.manual_seed(1)
    model = Transformer(config_from_preset("tiny", tok.vocab_size, d_model=32, n_layer=1, n_head=2,
                                           n_kv_head=2, d_ff=64, max_seq_len=48))
    weights, meta = safetensors_state(model)
    save_checkpoint(root / "checkpoints", 20, model=weights, model_metadata=meta,
                    state={"tokenizer_fingerprint": tok.fingerprint(), "stage": "ppo"},
                    extra_files={"tokenizer.json": first / "tokenizer.json"})
    return tiny_lm_ckpt, root


def slow_loader(path, device="cpu"):
    loaded = load_artifact(path, device=device)
    loaded.model.register_forward_pre_hook(lambda *_: time.sleep(STEP_DELAY_S))
    return loaded


@pytest.fixture
def cache():
    return ModelCache(capacity=2, device="cpu", loader=slow_loader)




def make_chat(qtbot, tmp_path, ckpts, cache, **settings):
    view = ChatView(tmp_path, lambda: [(f"model {i + 1}", p) for i, p in enumerate(ckpts)], cache)
    qtbot.addWidget(view)
    view.sampling.set_settings(SamplingSettings(**{"seed": 0, "max_new_tokens": 12, **settings}))
    # A random model may draw an end token at any step; the tests want answers of full length.
    view.session.stop_ids = ()
    return view


def hold_each_piece(view) -> threading.Event:
    """Sent answers wait after each streamed piece of text until the returned gate is set: a
    tiny model on a loaded machine can otherwise finish between two looks of a test, which then
    never sees text streaming. Set the gate in a `finally`."""
    gate, send = threading.Event(), view.session.send

    def held_send(text, on_token=None):
        def then_wait(delta):
            on_token(delta)
            gate.wait(30)
        return send(text, then_wait)
    view.session.send = held_send
    return gate


def say(qtbot, view, text):
    view.input.setPlainText(text)
    with qtbot.waitSignal(view.replyFinished, timeout=20_000) as sig:
        qtbot.keyClick(view.input, Qt.Key_Return)
    assert not view.busy  # replyFinished comes once the view is idle again
    return sig.args[0]


# --- chat -----------------------------------------------------------------------------------

def test_the_answer_streams_in_and_is_kept(qtbot, tmp_path, two_ckpts, cache):
    view = make_chat(qtbot, tmp_path, two_ckpts, cache, max_new_tokens=20)
    view.input.setPlainText("alpha beta")
    view.input.moveCursor(QTextCursor.End)
    qtbot.keyClick(view.input, Qt.Key_Return, Qt.ShiftModifier)   # Shift+Enter: a new line, no send
    assert not view.busy and view.input.toPlainText() == "alpha beta\n"
    view.input.setPlainText("alpha beta")
    gate = hold_each_piece(view)
    try:
        with qtbot.waitSignal(view.replyFinished, timeout=20_000) as sig:
            qtbot.keyClick(view.input, Qt.Key_Return)
            assert view.busy and view.input.toPlainText() == ""
            assert not view.send_button.isEnabled() and view.stop_button.isEnabled()
            qtbot.waitUntil(lambda: len(view.partial_text) > 0, timeout=10_000)
            assert view.busy  # text on screen before the answer is finished
            qtbot.waitUntil(lambda: view.partial_text in view.transcript.toPlainText(), timeout=10_000)
            gate.set()
    finally:
        gate.set()
    reply = sig.args[0]
    assert not view.busy
    assert reply.n_tokens > 1 and not reply.stopped
    assert [m["role"] for m in view.session.messages] == ["user", "assistant"]
    assert view.session.messages[1]["content"] == reply.text
    assert reply.text in view.transcript.toPlainText()
    assert "tokens/s" in view.stats.text()
    assert view.session.model is None  # the model goes back to the cache between replies


def test_stop_ends_the_answer_early_and_keeps_it(qtbot, tmp_path, two_ckpts, cache):
    view = make_chat(qtbot, tmp_path, two_ckpts, cache, max_new_tokens=10_000)
    view.input.setPlainText("gamma")
    gate = hold_each_piece(view)
    try:
        with qtbot.waitSignal(view.replyFinished, timeout=20_000) as sig:
            view.send()
            qtbot.waitUntil(lambda: len(view.partial_text) > 0, timeout=10_000)
            qtbot.keyClick(view.input, Qt.Key_Escape)
            gate.set()
    finally:
        gate.set()
    assert not view.busy
    reply = sig.args[0]
    assert reply.stopped
    assert view.session.messages[-1]["content"] == reply.text
    assert "stopped" in view.stats.text()
    # The context (48 tokens) would have ended it after some 40 tokens; stop came well before.
    assert reply.n_tokens < 30


def test_regenerate_replaces_the_last_answer(qtbot, tmp_path, two_ckpts, cache):
    view = make_chat(qtbot, tmp_path, two_ckpts, cache)
    first = say(qtbot, view, "delta echo")
    with qtbot.waitSignal(view.replyFinished, timeout=20_000) as sig:
        view.regen_button.click()
    assert not view.busy
    second = sig.args[0]
    assert second.seed != first.seed and second.text != first.text
    assert [m["content"] for m in view.session.messages] == ["delta echo", second.text]
    shown = view.transcript.toPlainText()
    assert second.text in shown and first.text not in shown


def test_edit_and_resend_drops_what_came_after(qtbot, tmp_path, two_ckpts, cache):
    view = make_chat(qtbot, tmp_path, two_ckpts, cache, max_new_tokens=4)
    view.system.setPlainText("Be brief.")
    say(qtbot, view, "first question")
    say(qtbot, view, "second question")
    assert len(view.session.messages) == 5
    view.transcript.anchorClicked.emit(view.transcript.source().resolved("edit:0"))
    assert view.input.toPlainText() == "first question" and not view.banner.isHidden()
    view.input.setPlainText("first question, edited")
    reply = say(qtbot, view, view.input.toPlainText())
    assert [m["content"] for m in view.session.messages] == [
        "Be brief.", "first question, edited", reply.text]
    assert view.banner.isHidden()

    view.clear_button.click()
    assert view.session.messages == [{"role": "system", "content": "Be brief."}]
    assert "first question" not in view.transcript.toPlainText()
    assert not view.regen_button.isEnabled()
    # Clear asks nothing first, and Undo brings the conversation back.
    assert "Cleared 2 messages." == view.banner.text.text() and view.banner.action.text() == "Undo"
    view.banner.action.click()
    assert [m["content"] for m in view.session.messages] == ["Be brief.", "first question, edited", reply.text]
    assert "first question, edited" in view.transcript.toPlainText() and view.banner.isHidden()
    assert view.regen_button.isEnabled()
    # Once something new is said, the Undo of an earlier Clear is gone.
    view.clear_button.click()
    say(qtbot, view, "third question")
    assert view.banner.isHidden()


def test_completion_mode_continues_plain_text(qtbot, tmp_path, two_ckpts, cache):
    view = make_chat(qtbot, tmp_path, two_ckpts, cache, max_new_tokens=6)
    view.completion.setChecked(True)
    assert not view.system.isEnabled()
    reply = say(qtbot, view, "alpha beta gamma")
    assert view.completions == [("alpha beta gamma", reply.text)]
    assert view.session.messages == []     # no chat turns were made
    assert ("alpha beta gamma" + reply.text) in view.transcript.toPlainText().replace("\u2029", "\n")
    with qtbot.waitSignal(view.replyFinished, timeout=20_000) as sig:
        view.regenerate()
    assert not view.busy
    assert view.completions == [("alpha beta gamma", sig.args[0].text)]


def test_switching_to_completion_mode_keeps_the_chat_and_says_so(qtbot, tmp_path, two_ckpts, cache):
    view = make_chat(qtbot, tmp_path, two_ckpts, cache, max_new_tokens=4)
    view.show()
    qtbot.waitExposed(view)
    qtbot.mouseClick(view.input, Qt.LeftButton)
    qtbot.keyClicks(view.input, "first question")
    with qtbot.waitSignal(view.replyFinished, timeout=20_000):
        qtbot.keyClick(view.input, Qt.Key_Return)
    qtbot.mouseClick(view.completion, Qt.LeftButton)
    assert view.completion.isChecked()
    assert "first question" not in view.transcript.toPlainText()     # this mode's own transcript
    assert view.banner.isVisible() and "chat (2 messages) is kept" in view.banner.text.text()
    qtbot.mouseClick(view.input, Qt.LeftButton)
    qtbot.keyClicks(view.input, "alpha beta")
    with qtbot.waitSignal(view.replyFinished, timeout=20_000):
        qtbot.keyClick(view.input, Qt.Key_Return)
    qtbot.mouseClick(view.completion, Qt.LeftButton)
    assert not view.completion.isChecked()
    assert "first question" in view.transcript.toPlainText()          # the chat is back as it was
    assert len(view.session.messages) == 2
    assert "completions (1) are kept" in view.banner.text.text()
    qtbot.mouseClick(view.clear_button, Qt.LeftButton)                # Clear: this mode only
    qtbot.mouseClick(view.completion, Qt.LeftButton)
    assert "alpha beta" in view.transcript.toPlainText() and not view.banner.isVisible()


def test_a_bad_checkpoint_is_a_message_not_a_crash(qtbot, tmp_path, two_ckpts, cache):
    view = make_chat(qtbot, tmp_path, two_ckpts, cache)
    with qtbot.waitSignal(view.errorShown, timeout=10_000) as sig:
        view.picker.set_path(tmp_path / "not-a-checkpoint")
        view.load()
    qtbot.waitUntil(lambda: not view.busy, timeout=5_000)
    assert "no checkpoint found" in sig.args[0] and not view.banner.isHidden()
    assert view.picker.currentText() == "not-a-checkpoint (folder)"
    view.picker.select_index(0)
    say(qtbot, view, "still works")
    assert view.banner.isHidden()


def test_running_out_of_gpu_memory_is_a_message(qtbot, tmp_path, two_ckpts):
    def oom_loader(path, device="cpu"):
        loaded = load_artifact(path, device=device)

        def fail(*_):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        loaded.model.register_forward_pre_hook(fail)
        return loaded

    view = make_chat(qtbot, tmp_path, two_ckpts, ModelCache(device="cpu", loader=oom_loader))
    view.input.setPlainText("hello")
    with qtbot.waitSignal(view.errorShown, timeout=10_000) as sig:
        view.send()
    qtbot.waitUntil(lambda: not view.busy, timeout=5_000)
    assert "ran out of memory" in sig.args[0] and "max new tokens" in sig.args[0]
    assert view.session.messages == []     # the failed exchange left the conversation as it was
    assert view.send_button.isEnabled()


def test_switching_checkpoints_frees_the_old_model(qtbot, tmp_path, two_ckpts):
    cache = ModelCache(capacity=1, device="cpu", loader=slow_loader)
    view = make_chat(qtbot, tmp_path, two_ckpts, cache)
    with qtbot.waitSignal(view.modelLoaded, timeout=10_000):
        view.show()     # the first showing loads the selected checkpoint
    qtbot.waitUntil(lambda: not view.busy, timeout=5_000)
    say(qtbot, view, "hello")
    assert "tokens/s" in view.stats.text()
    old = weakref.ref(cache.get(two_ckpts[0]).model)
    with qtbot.waitSignal(view.modelLoaded, timeout=10_000) as sig:
        view.picker.select_index(1)
    qtbot.waitUntil(lambda: not view.busy, timeout=5_000)
    assert sig.args[0]["stage"] == "ppo" and "ppo" in view.model_label.text()
    assert "tokens/s" not in view.stats.text()          # the speed shown was the other model's
    gc.collect()
    assert old() is None
    assert cache.keys() == [resolve_checkpoint(two_ckpts[1]).resolve()]
    # The conversation carries over to the new model, and each answer says whose it is.
    assert "Assistant ·" not in view.transcript.toPlainText()        # one model so far: no names
    say(qtbot, view, "and you?")
    assert len(view.session.messages) == 4
    one, two = (short_name(resolve_checkpoint(p)) for p in two_ckpts)
    shown = view.transcript.toPlainText()
    assert shown.index(f"Assistant · {one}") < shown.index("and you?") < shown.index(f"Assistant · {two}")


def test_shutdown_stops_a_reply_and_waits(qtbot, tmp_path, two_ckpts, cache):
    view = make_chat(qtbot, tmp_path, two_ckpts, cache, max_new_tokens=10_000)
    view.input.setPlainText("long")
    gate = hold_each_piece(view)
    try:
        view.send()
        qtbot.waitUntil(lambda: len(view.partial_text) > 0, timeout=10_000)
    finally:
        gate.set()
    view.shutdown()
    assert running_workers() == []
    qtbot.waitUntil(lambda: not view.busy, timeout=5_000)


def test_the_picker_offers_the_project_and_any_folder(qtbot, monkeypatch, tmp_path, two_ckpts, cache):
    choices = []
    view = ChatView(tmp_path, lambda: list(choices), cache)
    qtbot.addWidget(view)
    assert view.picker.path() is None and not view.send_button.isEnabled()
    choices.append(("model 1", two_ckpts[0]))
    view.refresh()
    assert view.picker.path() == two_ckpts[0] and view.send_button.isEnabled()

    picked = iter([str(two_ckpts[1]), ""])     # a folder, then Cancel
    monkeypatch.setattr(file_dialogs, "existing_dir", lambda *a, **k: next(picked))
    view.picker.activated.emit(view.picker.count() - 1)        # "Browse…"
    assert view.picker.path() == two_ckpts[1]
    assert view.picker.currentText() == f"{two_ckpts[1].name} (folder)"
    view.picker.activated.emit(view.picker.count() - 1)
    assert view.picker.path() == two_ckpts[1]                   # cancelling keeps the choice
    view.refresh()                                               # browsed folders stay offered
    assert view.picker.path() == two_ckpts[1] and view.picker.count() == 3


# --- sampling controls and the model cache -------------------------------------------------------

def test_presets_set_the_style_and_editing_shows_custom(qtbot):
    w = SamplingControls()
    qtbot.addWidget(w)
    assert w.preset.currentText() == "Balanced" and w.settings() == SamplingSettings()
    w.max_new_tokens.setValue(99)
    w.seed.setValue(7)
    w.apply_preset("Precise")
    s = w.settings()
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == PRESETS["Precise"]
    assert (s.max_new_tokens, s.seed) == (99, 7)     # presets leave length and seed alone
    w.temperature.setValue(0.55)
    assert w.preset.currentText() == "Custom"
    w.seed.setValue(-1)
    assert w.settings().seed is None and w.seed.text() == "random"
    w.preset.setCurrentText("Greedy")
    assert w.settings().temperature == 0.0


def test_the_cache_keeps_the_most_recent_models(two_ckpts, tmp_path):
    a, b = two_ckpts
    c = shutil.copytree(b, tmp_path / "third")
    cache = ModelCache(capacity=2, device="cpu")
    first = cache.get(a)
    assert cache.get(resolve_checkpoint(a)) is first        # a run folder and its checkpoint: one entry
    cache.get(b)
    cache.get(a)                                             # a is now the most recent
    cache.get(c)
    assert cache.keys() == [resolve_checkpoint(p).resolve() for p in (a, c)]
    assert b not in cache and a in cache
    assert cache.evict(a) and not cache.evict(a)
    cache.clear()
    assert cache.keys() == []
    with pytest.raises(ModelCacheError, match="no checkpoint found"):
        cache.get(tmp_path / "missing")


def test_the_cache_turns_out_of_memory_into_advice(two_ckpts):
    def oom(path, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    cache = ModelCache(device="cpu", loader=oom)
    with pytest.raises(OutOfMemory, match="while loading .*max new tokens"):
        cache.get(two_ckpts[0])
    with pytest.raises(OutOfMemory, match="while generating"):
        with cache.guard("generating"):
            raise RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)")
    with pytest.raises(ValueError, match="other"):
        with cache.guard("generating"):
            raise ValueError("other")


# --- compare ---------------------------------------------------------------------------------

class _Heads(random.Random):
    """A coin that always says "swap the sides"."""

    def random(self):
        return 0.0


def make_compare(qtbot, tmp_path, ckpts, cache, **settings):
    view = CompareView(tmp_path, lambda: [("model one", ckpts[0]), ("model two", ckpts[1])], cache)
    qtbot.addWidget(view)
    view.sampling.set_settings(SamplingSettings(**{"seed": 0, "max_new_tokens": 8, **settings}))
    view.annotator.setText("ada")
    return view


def run_round(qtbot, view, prompt):
    view.input.setPlainText(prompt)
    with qtbot.waitSignal(view.roundFinished, timeout=20_000):
        qtbot.keyClick(view.input, Qt.Key_Return)
        assert view.busy and not view.send_button.isEnabled()
        assert not any(b.isEnabled() for b in view.vote_buttons.values())


def expected_answer(path, prompt, settings):
    loaded = load_artifact(path)
    return ChatSession(loaded.model, loaded.tokenizer, settings=settings).send(prompt)


def test_a_blind_vote_is_stored_as_a_pair_with_the_right_models(qtbot, tmp_path, two_ckpts, cache):
    view = make_compare(qtbot, tmp_path, two_ckpts, cache)
    assert view.pickers[0].path() == two_ckpts[0] and view.pickers[1].path() == two_ckpts[1]
    assert view.blind.isChecked()
    view.rng = _Heads()          # Model 2 goes on the left
    run_round(qtbot, view, "alpha question")
    assert [view.panes[s].title.text() for s in ("left", "right")] == ["A", "B"]
    shown = " ".join(w.text() for pane in view.panes.values() for w in (pane.title, pane.subtitle))
    assert "model one" not in shown and "model two" not in shown and "Model 1" not in shown
    assert all(b.isEnabled() for b in view.vote_buttons.values())
    left_text, right_text = view.panes["left"].answer(), view.panes["right"].answer()

    with qtbot.waitSignal(view.voteStored, timeout=5_000) as sig:
        view.vote_buttons["left"].click()
    stored = sig.args[0]
    assert view.panes["left"].title.text() == "A: model two"     # revealed after the vote
    assert view.panes["right"].title.text() == "B: model one"
    assert not any(b.isEnabled() for b in view.vote_buttons.values())
    assert "Stored" in view.status.text()

    # What the store holds: the left answer, which model two wrote, chosen over model one's.
    settings = view.sampling.settings()
    assert left_text == expected_answer(two_ckpts[1], "alpha question", settings)
    assert right_text == expected_answer(two_ckpts[0], "alpha question", settings)
    with Store.for_project(tmp_path) as store:
        item = store.item(stored.item_id)
        assert item.meta["blind"] is True
        assert [a.meta["checkpoint"] for a in item.answers] == [
            str(resolve_checkpoint(p).resolve()) for p in (two_ckpts[1], two_ckpts[0])]
        assert write_rm_dataset(store, tmp_path / "rm.jsonl", include_simulated=False) == 1
    [rec] = [json.loads(line) for line in (tmp_path / "rm.jsonl").read_text().splitlines()]
    assert rec["prompt"] == "alpha question"
    assert rec["answers"][rec["ranking"][0][0]] == left_text
    assert rec["answers"][rec["ranking"][1][0]] == right_text

    # Ready for the next prompt; a second vote on the same round is not possible.
    assert view.send_button.isEnabled() and view.input.textCursor().hasSelection()
    view.vote("right")
    with Store.for_project(tmp_path) as store:
        assert len(store.rankings()) == 1
    # The count is by model: the next round puts model one on the left, and a vote for it
    # counts for model one although the first vote was "left" too.
    view.rng = random.Random()
    view.rng.random = lambda: 0.9            # no swap: Model 1 on the left
    run_round(qtbot, view, "beta question")
    if view.identical:
        pytest.skip("the two tiny models gave one answer")
    with qtbot.waitSignal(view.voteStored, timeout=5_000):
        view.vote_buttons["left"].click()
    one, two = (short_name(p) for p in two_ckpts)       # the runs' names, not the pickers' long labels
    assert f"These two so far: {one} 1 · {two} 1 · tie 0 (2 comparison(s) in the store)" in view.status.text()
    assert view.status.wordWrap()                    # it wraps rather than widen the window


def test_sighted_compare_and_a_tie(qtbot, tmp_path, two_ckpts, cache):
    view = make_compare(qtbot, tmp_path, two_ckpts, cache)
    view.blind.setChecked(False)
    view.system.setText("Be brief.")
    view.show()
    qtbot.waitExposed(view)
    view.activateWindow()
    qtbot.waitActive(view)      # shortcuts work in the active window
    run_round(qtbot, view, "hello")
    assert [view.panes[s].title.text() for s in ("left", "right")] == ["model one", "model two"]
    with qtbot.waitSignal(view.voteStored, timeout=5_000):
        qtbot.keyClick(view.input, Qt.Key_2, Qt.AltModifier)    # typed in the prompt box, too
    with Store.for_project(tmp_path) as store:
        [r] = store.rankings()
        item = store.item(r.item_id)
        assert len(r.ordering) == 1 and item.meta["blind"] is False
        assert item.messages[0] == {"role": "system", "content": "Be brief."}
        assert write_rm_dataset(store, tmp_path / "rm.jsonl", include_simulated=False) == 0


def test_identical_answers_can_only_tie_and_a_stored_vote_clears_an_old_refusal(qtbot, tmp_path, two_ckpts, cache):
    view = make_compare(qtbot, tmp_path, (two_ckpts[0], two_ckpts[0]), cache, temperature=0.0)
    view.show()
    qtbot.waitExposed(view)
    run_round(qtbot, view, "alpha question")
    assert view.panes["left"].answer() == view.panes["right"].answer()
    assert "only a tie can be stored" in view.status.text()
    assert [view.vote_buttons[v].isEnabled() for v in ("left", "right", "tie")] == [False, False, True]
    view.annotator.setText("")
    view.vote_buttons["tie"].click()                      # no name yet: refused, in the banner
    assert view.banner.isVisible() and "Enter your name" in view.banner.text.text()
    view.annotator.setText("ada")
    with qtbot.waitSignal(view.voteStored, timeout=5_000):
        view.vote_buttons["tie"].click()
    assert not view.banner.isVisible()
    assert "one model against itself" in view.status.text()


def slow_decoding(monkeypatch, seconds: float = 0.05) -> None:
    """Each decoding step takes at least `seconds` and no answer ends on a stop token, whatever
    the seed draws: an answer then lasts long enough for a Stop to land in it, however fast the
    machine (the tiny models end at their context)."""
    from engine import chat, decode, generate

    endless = chat.generate
    monkeypatch.setattr(chat, "generate", lambda *a, **k: endless(*a, **{**k, "stop_ids": ()}))

    def make_step(*args):
        step = decode.make_step(*args)

        def slow(*a):
            time.sleep(seconds)
            return step(*a)
        return slow if step is not None else None

    monkeypatch.setattr(generate, "make_step", make_step)


def test_compare_stop_and_a_failing_side(qtbot, tmp_path, two_ckpts, cache, monkeypatch):
    slow_decoding(monkeypatch)
    view = make_compare(qtbot, tmp_path, two_ckpts, cache, max_new_tokens=10_000)
    view.input.setPlainText("go on")
    with qtbot.waitSignal(view.roundFinished, timeout=20_000):
        view.send()
        qtbot.waitUntil(lambda: all(view.panes[s].answer() for s in ("left", "right")), timeout=10_000)
        view.stop_button.click()
    assert all("stopped" in view.panes[s].stats.text() for s in ("left", "right"))
    assert view.can_vote          # stopped answers are answers: they can still be judged

    view.pickers[1].set_path(tmp_path / "nowhere")
    view.blind.setChecked(False)
    view.input.setPlainText("again")
    with qtbot.waitSignal(view.roundFinished, timeout=20_000):
        view.send()
    assert "no checkpoint found" in view.banner.text.text()
    assert not view.can_vote and "No vote" in view.status.text()
    view.shutdown()


def test_the_pickers_follow_new_models_until_the_user_picks_one(qtbot, tmp_path, two_ckpts):
    # A page built when only the base model existed must offer the fine-tuned one once it is
    # trained, and Compare must not pit a model against itself.
    first, second = two_ckpts
    offered = [("base", first)]
    cache = ModelCache(device="cpu")
    chat = ChatView(tmp_path, lambda: list(offered), cache)
    compare = CompareView(tmp_path, lambda: list(offered), cache)
    qtbot.addWidget(chat)
    qtbot.addWidget(compare)
    assert chat.picker.path() == first
    offered.insert(0, ("sft, newer", second))      # the project lists the newest fine-tuned first
    chat.refresh()
    compare.refresh()
    assert chat.picker.path() == second
    assert [p.path() for p in compare.pickers] == [second, first]
    # A model the user chose stays chosen when the list changes again.
    chat.picker.setFocus()
    qtbot.keyClick(chat.picker, Qt.Key_Down)         # the keyboard picks the next entry
    assert chat.picker.path() == first
    offered.insert(0, ("ppo, newest", tmp_path))
    chat.refresh()
    assert chat.picker.path() == first


def test_an_empty_answer_says_so_and_a_long_model_line_does_not_widen_the_window(qtbot, tmp_path, two_ckpts, cache):
    view = make_chat(qtbot, tmp_path, two_ckpts, cache)
    view.resize(1000, 700)
    view.show()
    qtbot.waitExposed(view)
    view.session.stop_ids = tuple(range(300))    # every id of the tiny vocabulary: the first one ends it
    reply = say(qtbot, view, "alpha beta")
    assert reply.text == "" and "(empty answer: the model ended it at once)" in view.transcript.toPlainText()
    # The line under the transcript wraps: a long one (a base model's advice) used to widen the
    # window past a laptop's screen, Send and the settings with it.
    wide = view.minimumSizeHint().width()
    view.model_label.setText("a-long-checkpoint-path " * 20 + "— a base model: completion mode suits it better")
    assert view.minimumSizeHint().width() <= wide


def test_picking_other_models_clears_the_last_rounds_answers(qtbot, tmp_path, two_ckpts, cache):
    # Methods ▸ "Blind A/B against SFT" sets both pickers: the panes kept the round before,
    # headed with the names of two models that were no longer the pair.
    view = make_compare(qtbot, tmp_path, two_ckpts, cache)
    view.blind.setChecked(False)
    view.show()
    qtbot.waitExposed(view)
    run_round(qtbot, view, "alpha question")
    assert view.panes["left"].answer() and view.panes["left"].title.text() != "Left"
    picker = view.pickers[0]
    picker.setFocus()
    qtbot.keyClick(picker, Qt.Key_Down)         # the other model, as a person picks it
    assert picker.path() == two_ckpts[1]
    assert [view.panes[s].title.text() for s in ("left", "right")] == ["Left", "Right"]
    assert not view.panes["left"].answer() and not view.can_vote


def test_compare_votes_under_the_name_last_ranked_as_unless_one_is_typed(qtbot, tmp_path, two_ckpts, cache):
    from workbench.annotation import AnnotationSession
    from workbench.store import Store
    with Store.for_project(tmp_path) as store:
        b = store.create_batch("b", [{"prompt": "q", "answers": [{"text": "x"}, {"text": "y"}]}], k=2)
        AnnotationSession(store, b, "newbie").submit([[1], [2]])
    view = CompareView(tmp_path, lambda: [("model one", two_ckpts[0]), ("model two", two_ckpts[1])], cache)
    qtbot.addWidget(view)
    view.show()
    qtbot.waitExposed(view)
    assert view.annotator.text() == "newbie"
    view.hide()
    view.annotator.selectAll()
    qtbot.keyClicks(view.annotator, "ada")
    view.show()
    assert view.annotator.text() == "ada"


def test_a_reply_cut_by_max_new_tokens_says_so(qtbot, tmp_path, two_ckpts, cache):
    view = make_chat(qtbot, tmp_path, two_ckpts, cache, max_new_tokens=2)
    view.session.stop_ids = ()       # an untrained model may draw an end token at any step
    reply = say(qtbot, view, "alpha beta")
    assert reply.cut == "length" and "cut off at max new tokens" in view.stats.text()


def test_tab_leaves_the_system_prompt_instead_of_typing_a_tab(qtbot, tmp_path, two_ckpts, cache):
    from PySide6.QtWidgets import QApplication
    view = make_chat(qtbot, tmp_path, two_ckpts, cache)
    view.show()
    qtbot.waitExposed(view)
    view.system.setFocus()
    qtbot.keyClick(view.system, Qt.Key_Tab)
    assert view.system.toPlainText() == "" and QApplication.focusWidget() is not view.system
