"""The ranking view: rank by keyboard alone and by drag, labels, undo, skip, close and resume,
guidelines, import/export, a new batch, agreement and the reward model's disagreements.

Every check on what was stored reads the store through a connection of its own, in answer ids,
so it tests what survives the view, not what the view believes.
"""
from __future__ import annotations

import json

import pytest
from PySide6.QtCore import QPoint, Qt
from shiboken6 import isValid

from ui import file_dialogs
from ui.ranking_view import RankingView
from workbench import guidelines
from workbench.annotation import AnnotationSession
from workbench.store import InputError, Store

K = 4
N_ITEMS = 4




@pytest.fixture
def project(tmp_path):
    """A project folder whose store holds one batch of N_ITEMS prompts with K answers each."""
    with Store.for_project(tmp_path) as store:
        store.create_batch("demo batch", [
            {"prompt": f"What is {i} plus {i}?",
             "answers": [{"text": f"answer {j} to item {i}", "meta": {"finished": j != 3,
                                                                      "n_tokens": 5 + j}}
                         for j in range(K)]}
            for i in range(N_ITEMS)], k=K)
    return tmp_path


def make_view(qtbot, project, register=True) -> RankingView:
    view = RankingView(project)
    if register:                 # qtbot closes it after the test
        qtbot.addWidget(view)
    view.resize(1000, 760)
    view.show()
    qtbot.waitExposed(view)
    return view


@pytest.fixture
def view(qtbot, project):
    v = make_view(qtbot, project)
    yield v
    v.close_store()


def stored(project, **kw):
    with Store.for_project(project) as store:
        return store.rankings(**kw)


def press(qtbot, view, keys) -> int:
    """Send keys to the view (characters, or Qt key codes); returns how many were pressed."""
    for key in keys:
        if isinstance(key, str):
            qtbot.keyClicks(view, key)
        else:
            qtbot.keyClick(view, key)
    return len(keys)


def ids(view, groups):
    """Display-number groups of the item on screen as answer-id groups."""
    by_number = {a.number: a.answer_id for a in view.current.answers}
    return [[by_number[n] for n in g] for g in groups]


def start(qtbot, view, batch=1, name="ana", repeats=None):
    view.open_session(batch, name, repeats)
    assert view.stack.currentWidget() is view.guide   # first session: the guidelines come first
    press(qtbot, view, [Qt.Key_Return])
    assert view.stack.currentWidget() is view.page


def test_rank_a_whole_batch_by_keyboard_alone(qtbot, view, project):
    start(qtbot, view)
    ret = Qt.Key_Return
    plans = [  # keys, the ordering they mean (display numbers), at most this many keys
        (["3", "1", "2", ret], [[3], [1], [2], [4]], 4),            # the last one is implied
        (["3", "1", "=", "2", ret], [[3], [1, 2], [4]], 5),          # = ties
        (["1", "2", "3", " ", ret], [[1], [2], [3, 4]], 5),          # Space ties the implied last
        (["4", "3", "2", "1", ret], [[4], [3], [2], [1]], 5),        # typing the last one is fine
    ]
    expected, positions = {}, []
    for keys, groups, most in plans:
        want = ids(view, groups)
        positions.append(view.current.position)
        item = view.current.item_id
        assert press(qtbot, view, keys) <= most
        expected[item] = want
    assert view.current is None and "All 4 items" in view.page.done.text()
    got = stored(project)
    assert {r.item_id: r.ordering for r in got} == expected
    assert positions == [0, 1, 2, 3] and all(r.annotator == "ana" and not r.simulated for r in got)
    assert all(r.duration_s is not None for r in got)
    assert view.page.bar.format() == "4 / 4 ranked"


def test_a_ranking_typed_for_an_item_another_window_ranked_is_not_stored_on_the_next(qtbot, view, project):
    """The same annotator in a terminal ranks the item on screen: Enter here stores nothing,
    says why, and shows the next item; nothing lands on an item the person never saw."""
    start(qtbot, view)
    on_screen = view.current.item_id
    with Store.for_project(project) as store:
        other = AnnotationSession(store, 1, "ana")
        theirs = other.submit("1 2 3 4", shown=other.current())
    press(qtbot, view, ["4", "3", "2", Qt.Key_Return])
    assert "ranked or skipped this item meanwhile" in view.page.status.text()
    assert [(r.id, r.item_id) for r in stored(project)] == [(theirs, on_screen)]
    shown_now = view.current.item_id
    assert shown_now != on_screen
    press(qtbot, view, ["4", "3", "2", Qt.Key_Return])
    assert [r.item_id for r in stored(project)] == [on_screen, shown_now]


def test_the_start_pages_buttons_are_reached_by_tab_and_pressed_by_enter(qtbot, view, monkeypatch):
    from PySide6.QtWidgets import QApplication
    imported = []
    monkeypatch.setattr(view, "import_clicked", lambda: imported.append(True))
    view.start.importRequested.disconnect()
    view.start.importRequested.connect(view.import_clicked)
    view.start.batches.setFocus()
    reached = []
    for _ in range(12):
        qtbot.keyClick(QApplication.focusWidget(), Qt.Key_Tab)
        reached.append(QApplication.focusWidget())
    buttons = {b.text() for b in reached if hasattr(b, "text") and callable(b.text)}
    assert {"Import…", "Export…", "Packs…", "Simulated ranking…", "New batch…"} <= buttons
    imp = next(b for b in reached if getattr(b, "text", lambda: "")() == "Import…")
    imp.setFocus()
    qtbot.keyClick(imp, Qt.Key_Return)
    assert imported == [True] and view.stack.currentWidget() is view.start     # not a session


def test_a_session_scrolls_its_answers_and_ends_by_keys(qtbot, view):
    start(qtbot, view)
    view.resize(700, 300)                               # too small for the cards: they scroll
    qtbot.waitUntil(lambda: view.page.scroll.verticalScrollBar().maximum() > 0, timeout=5_000)
    bar = view.page.scroll.verticalScrollBar()
    press(qtbot, view, [Qt.Key_PageDown])
    assert bar.value() > 0
    press(qtbot, view, [Qt.Key_PageUp])
    assert bar.value() == 0
    qtbot.keyClick(view, Qt.Key_W, Qt.ControlModifier)
    assert view.stack.currentWidget() is view.start and view.session is None


def test_keyboard_mistakes_are_refused_and_can_be_taken_back(qtbot, view, project):
    start(qtbot, view)
    press(qtbot, view, ["2", "2"])
    assert "already ranked" in view.page.status.text()
    press(qtbot, view, ["9"])
    assert "1–4" in view.page.status.text()
    press(qtbot, view, ["f", "5"])             # a flag for an answer there is not: said whole
    assert "no answer '5': answers are 1–4; the flag was not set (F and the answer's number" \
        in view.page.status.text()
    press(qtbot, view, [Qt.Key_Return])
    assert "more answer" in view.page.status.text() and stored(project) == []
    press(qtbot, view, ["1", Qt.Key_Backspace, "3", Qt.Key_Escape, "4", "1", "3"])
    assert view.input.describe() == "4 > 1 > 3 > (2)"
    assert view.page.cards.card(4).badge.text() == "best"
    want = ids(view, [[4], [1], [3], [2]])
    press(qtbot, view, [Qt.Key_Return])
    assert [r.ordering for r in stored(project)] == [want]


def drag(qtbot, card, to: QPoint) -> None:
    """Press on the card, move it in steps to `to` (in the card list's coordinates), release."""
    cards = card.parentWidget()
    start_pos = card.rect().center()
    qtbot.mousePress(card, Qt.LeftButton, pos=start_pos)
    goal = card.mapFrom(cards, to)
    for step in range(1, 6):
        qtbot.mouseMove(card, start_pos + (goal - start_pos) * (step / 5))
    qtbot.mouseRelease(card, Qt.LeftButton, pos=card.mapFrom(cards, to))


def test_rank_by_drag_and_submit_the_card_order(qtbot, view, project):
    start(qtbot, view)
    cards = view.page.cards
    assert cards.order() == [1, 2, 3, 4]
    top = cards.card(1).geometry().top()
    drag(qtbot, cards.card(4), QPoint(20, top + 2))            # 4 to the top
    assert cards.order() == [4, 1, 2, 3]
    assert view.input.describe() == "4 > 1 > 2 > 3"
    bottom = cards.card(3).geometry().bottom()
    drag(qtbot, cards.card(1), QPoint(20, bottom - 2))          # 1 to the bottom
    assert cards.order() == [4, 2, 3, 1]
    want = ids(view, [[4], [2], [3], [1]])
    first = view.current.item_id
    press(qtbot, view, [Qt.Key_Return])
    # Without a drag, Ctrl+Enter submits the order the cards are in.
    second, want2 = view.current.item_id, ids(view, [[1], [2], [3], [4]])
    qtbot.keyClick(view, Qt.Key_Return, Qt.ControlModifier)
    assert {r.item_id: r.ordering for r in stored(project)} == {first: want, second: want2}


def test_flags_scores_and_note_are_stored_with_the_ranking(qtbot, view, project):
    start(qtbot, view)
    press(qtbot, view, ["f", "2", "h", "f", "2", "m", "f", "1", "o", "f", "1", "o"])  # 1: on, off
    press(qtbot, view, ["g", "3", "6", "g", "1", "2", "g", "1", "0"])                 # 1: set, cleared
    assert "harmful" in view.page.cards.card(2).flags_label.text()
    assert view.page.cards.card(3).score_label.text() == "score 6/7"
    press(qtbot, view, ["g", "3", "9"])
    assert "expected a score" in view.page.status.text()
    press(qtbot, view, ["n"])
    assert view.page.note.hasFocus()
    qtbot.keyClicks(view.page.note, "answer 2 makes up a rule")
    qtbot.keyClick(view.page.note, Qt.Key_Return)
    assert view.hasFocus()
    view.page.note.setFocus()
    qtbot.mouseClick(view.page.cards.card(1), Qt.LeftButton)     # a click on a card: keys again
    assert view.hasFocus()
    n2, n3 = ids(view, [[2], [3]])
    press(qtbot, view, ["2", "3", "1", Qt.Key_Return])
    (r,) = stored(project)
    assert r.flags == {n2[0]: ["harmful", "made_up_facts"]}
    assert r.scores == {n3[0]: 6}
    assert r.note == "answer 2 makes up a rule"
    assert view.page.note.text() == ""          # the next item starts without labels


def test_undo_offers_the_ranking_again_and_skip_sends_an_item_to_the_back(qtbot, view, project):
    start(qtbot, view)
    first = view.current.item_id
    press(qtbot, view, ["1", "2", "3", Qt.Key_Return])
    second = view.current.item_id
    press(qtbot, view, ["g", "1", "7", "2", "1", "3", Qt.Key_Return])
    qtbot.keyClick(view, Qt.Key_Z, Qt.ControlModifier)
    assert view.current.item_id == second
    assert view.input.describe() == "2 > 1 > 3 > 4" and view.input.scores == {1: 7}
    assert [r.item_id for r in stored(project)] == [first]     # withdrawn, not active
    want, (one,) = ids(view, [[4], [3], [2], [1]]), ids(view, [[1]])
    press(qtbot, view, ["4", "3", "2", Qt.Key_Return])           # typing replaces the old one
    (r,) = stored(project, item_id=second)
    assert r.ordering == want and r.scores == {one[0]: 7}
    skipped = view.current.item_id
    press(qtbot, view, ["s"])
    assert view.current.item_id != skipped and "1 skipped" in view.page.pace.text()
    press(qtbot, view, ["1", "2", "3", Qt.Key_Return])
    assert view.current.item_id == skipped                        # back, at the end
    press(qtbot, view, ["1", "2", "3", Qt.Key_Return])
    assert view.current is None
    assert len(stored(project)) == N_ITEMS
    assert len(stored(project, include_withdrawn=True)) == N_ITEMS + 1


def test_closing_the_view_mid_session_loses_nothing_and_a_new_view_resumes(qtbot, project):
    view = make_view(qtbot, project, register=False)
    start(qtbot, view)
    expected = {}
    for keys, groups in ((["2", "1", "3"], [[2], [1], [3], [4]]),
                         (["1", "=", "2", "3"], [[1, 2], [3], [4]])):
        expected[view.current.item_id] = ids(view, groups)
        press(qtbot, view, keys + [Qt.Key_Return])
    press(qtbot, view, ["3", "4"])              # a half-typed ranking is not a submit
    showing = [a.answer_id for a in view.current.answers]
    view.close()
    view.deleteLater()                          # no close_store(): the view is just dropped
    qtbot.waitUntil(lambda: not isValid(view), timeout=10_000)
    assert {r.item_id: r.ordering for r in stored(project)} == expected

    again = make_view(qtbot, project)
    assert again.start.name() == "ana" and again.start.selected_batch() == 1
    press(qtbot, again, [Qt.Key_Return])        # start page: Enter resumes
    assert again.stack.currentWidget() is again.page   # guidelines already seen for this batch
    assert [a.answer_id for a in again.current.answers] == showing   # same item, same order
    assert again.page.bar.format() == "2 / 4 ranked"
    press(qtbot, again, ["1", "2", "3", Qt.Key_Return])
    assert len(stored(project)) == 3
    again.close_store()


def test_guidelines_are_shown_once_per_annotator_and_batch_and_edits_persist(qtbot, view, project):
    assert guidelines.read_guidelines(project) == guidelines.DEFAULT_GUIDELINES
    start(qtbot, view)
    press(qtbot, view, [Qt.Key_F1])
    assert view.stack.currentWidget() is view.guide and "Back to ranking" in view.guide.go.text()
    view.guide.edit.click()
    assert view.guide.editing
    view.guide.editor.setPlainText("# Our rules\n\nCorrect beats short.\n")
    view.guide.edit.click()                      # Save
    assert guidelines.read_guidelines(project) == "# Our rules\n\nCorrect beats short.\n"
    assert "Correct beats short." in view.guide.view.toPlainText()
    press(qtbot, view, [Qt.Key_Return])
    assert view.stack.currentWidget() is view.page
    view.end_session()
    view.open_session(1, "ana")                  # seen this version: straight to ranking
    assert view.stack.currentWidget() is view.page
    view.open_session(1, "bo")                   # another annotator sees them first
    assert view.stack.currentWidget() is view.guide
    assert "Correct beats short." in view.guide.view.toPlainText()


def test_export_and_import_round_trip_through_the_view(qtbot, view, project, tmp_path_factory):
    start(qtbot, view)
    press(qtbot, view, ["f", "1", "h", "3", "1", "=", "2", Qt.Key_Return])
    press(qtbot, view, ["1", "2", "3", Qt.Key_Return])
    out = tmp_path_factory.mktemp("out")
    counts = view.export_preferences(out / "kway.jsonl")
    assert counts == {"records": 2, "rankings": 2, "human": 2, "simulated": 0}
    records = [json.loads(line) for line in (out / "kway.jsonl").read_text().splitlines()]
    assert records[0]["annotator"] == "ana" and len(records[0]["ranking"]) == 3
    assert view.export_preferences(out / "pairs.jsonl", fmt="pairs")["records"] == 5 + 6

    other = tmp_path_factory.mktemp("other")
    second = RankingView(other)
    qtbot.addWidget(second)
    result = second.import_preferences(out / "kway.jsonl")
    assert result.records == 2 and not result.existing
    assert second.start.selected_batch() == result.batch_id
    with Store.for_project(other) as store:
        items = {it.id: it for it in store.items(result.batch_id)}
        back = store.rankings()
    with Store.for_project(project) as store:
        orig = store.rankings()
        orig_items = {it.id: it for it in store.items(1)}

    def texts(rankings, items):
        return [[sorted(next(a.text for a in items[r.item_id].answers if a.id == i) for i in g)
                 for g in r.ordering] for r in rankings]

    assert texts(back, items) == texts(orig, orig_items)
    assert [r.annotator for r in back] == ["ana", "ana"]
    assert list(back[0].flags.values()) == [["harmful"]]
    bad = out / "bad.jsonl"
    bad.write_text('{"prompt": "p", "answers": ["a", "b"], "ranking": [[0], [0]]}\nnot json\n')
    with pytest.raises(InputError) as e:
        second.import_preferences(bad)
    assert "bad.jsonl:1:" in str(e.value) and "bad.jsonl:2:" in str(e.value)
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\nnot json\n')
    partial = second.import_preferences(bad, skip_bad=True)    # "Import the other records"
    assert partial.records == 1 and partial.skipped == [f"{bad}:2: malformed JSON at column 1: "
                                                        "Expecting value"]
    second.close_store()


def test_new_batch_dialog_makes_a_sample_config_and_an_imported_run_opens(qtbot, view, project,
                                                                          tmp_path_factory):
    from ui.ranking_dialogs import NewBatchDialog

    ckpt = tmp_path_factory.mktemp("sft-run")
    prompts = project / "prompts.txt"
    prompts.write_text("What is 2 plus 2?\nReverse the word cat.\n")
    grpo = tmp_path_factory.mktemp("grpo-run")
    dialog = NewBatchDialog(project, lambda: [("grpo-20260101-000000", grpo), ("sft-20250101-000000", ckpt)],
                            view)
    qtbot.addWidget(dialog)
    assert dialog.checkpoint.currentText() == "sft-20250101-000000"     # answers to rank come from SFT
    dialog.accept()                                     # no prompt file yet: refused, says why
    assert "prompts" in dialog.error.text() and dialog.result() == 0
    dialog.prompts.setText(str(project / "nope.txt"))   # a file that is not there: no job that must fail
    dialog.accept()
    assert "nope.txt" in dialog.error.text() and dialog.result() == 0
    dialog.prompts.setText(str(prompts))
    dialog.k.setValue(3)
    dialog.temperature.setValue(0.7)
    cfg = dialog.config()
    assert (cfg.checkpoint, cfg.prompts, cfg.k, cfg.temperature) == (str(ckpt), [str(prompts)], 3, 0.7)
    with qtbot.waitSignal(view.sampleRequested, timeout=10_000) as sig:
        view.request_sample(cfg)
    assert sig.args[0] is cfg

    run = tmp_path_factory.mktemp("sample-run")
    (run / "provenance.json").write_text(json.dumps(
        {"checkpoint": str(ckpt), "settings": {}, "seed": 0, "k": 3}))
    (run / "samples.jsonl").write_text("".join(json.dumps(
        {"prompt": p, "prompt_index": i, "answers": [
            {"text": f"{p} -> {j}", "n_tokens": 3, "finished": True, "seed": j} for j in range(3)]}
    ) + "\n" for i, p in enumerate(["What is 2 plus 2?", "Reverse the word cat."])))
    view.start.annotator.setEditText("cleo")
    batch_id = view.import_sample_run(run)
    assert view.session.batch.id == batch_id and view.session.annotator.name == "cleo"
    press(qtbot, view, [Qt.Key_Return])                 # the guidelines
    assert view.current.k == 3
    press(qtbot, view, ["2", Qt.Key_Return])             # K=3 needs two answers typed
    assert stored(project, batch_id=batch_id) == []
    press(qtbot, view, ["1", Qt.Key_Return])             # 2 > 1 > (3)
    assert len(stored(project, batch_id=batch_id)) == 1


@pytest.fixture(scope="module")
def tiny_rm(tiny_lm_ckpt, tmp_path_factory):
    """A random reward model on the tiny language model's backbone."""
    import torch

    from engine import checkpoint as ckpt
    from engine.artifacts import load_artifact
    from engine.model import ScalarModel
    from engine.weights import safetensors_state

    lm = load_artifact(tiny_lm_ckpt)
    torch.manual_seed(0)
    weights, meta = safetensors_state(ScalarModel.from_lm(lm.model))
    root = tmp_path_factory.mktemp("reward-run")
    ckpt.save_checkpoint(root / "checkpoints", 1, model=weights, model_metadata=meta,
                         state={"tokenizer_fingerprint": lm.tokenizer.fingerprint(), "stage": "reward"},
                         extra_files={"tokenizer.json": lm.tokenizer_path})
    return root


def test_agreement_figures_and_rm_disagreements_lead_back_to_ranking(qtbot, view, project, tiny_rm):
    start(qtbot, view, repeats=1.0)              # every item comes back once, unannounced
    while view.current is not None:   # the same preference every time: answer 0 best, ...
        best_first = sorted(view.current.answers, key=lambda a: a.text)
        press(qtbot, view, [str(a.number) for a in best_first[:-1]] + [Qt.Key_Return])
    assert len(stored(project, include_repeats=True)) == 2 * N_ITEMS
    with Store.for_project(project) as store:    # a second annotator, outside the view
        other = AnnotationSession(store, 1, "bo", seed=5)
        while other.current() is not None:
            other.submit("4 3 2 1")
    view.tabs.setCurrentIndex(1)
    agreement = view.agreement
    assert agreement.repeats.item(0, 0).text() == "ana"
    assert agreement.repeats.item(0, 3).text() == "100.0%"
    assert agreement.between.item(0, 0).text() == "ana ~ bo"

    worker = agreement.score_with(tiny_rm)
    with qtbot.waitSignal(agreement.scored, timeout=20_000) as sig:
        pass
    worker.wait()
    rows = sig.args[0]
    assert rows and all(d.margin > 0 for d in rows)
    assert [d.margin for d in rows] == sorted((d.margin for d in rows), reverse=True)
    assert agreement.pairs.rowCount() == len(rows)
    ana = next(d for d in rows if d.annotator == "ana")
    row = rows.index(ana)
    before = {r.item_id: r.id for r in stored(project, include_repeats=False) if r.annotator == "ana"}
    agreement.pairs.cellWidget(row, 5).click()
    assert view.tabs.currentIndex() == 0 and view.stack.currentWidget() is view.page
    assert view.current.item_id == ana.item_id and view.current.previous is not None
    assert ana.item_id not in {r.item_id for r in stored(project, include_repeats=False)
                               if r.annotator == "ana"}
    press(qtbot, view, [Qt.Key_Return])          # resubmit the offered ranking as it was
    after = {r.item_id: r.id for r in stored(project, include_repeats=False) if r.annotator == "ana"}
    assert set(after) == set(before) and after[ana.item_id] != before[ana.item_id]


def test_import_and_export_buttons_without_modal_dialogs(qtbot, view, project, monkeypatch):
    import ui.ranking_files as rf

    start(qtbot, view)
    press(qtbot, view, ["2", "1", "3", Qt.Key_Return])
    told = []
    monkeypatch.setattr(rf.QMessageBox, "information", lambda _p, _t, text: told.append(text))

    class Export(rf.ExportDialog):
        def exec(self):
            self.set_format("pairs")
            self.path.setText(str(project / "out" / "pairs.jsonl"))
            return 1

    monkeypatch.setattr(rf, "ExportDialog", Export)
    view.export_clicked()
    assert "Wrote 6 record(s) from 1 ranking(s) (1 human, 0 simulated)" in told[-1]
    assert len((project / "out" / "pairs.jsonl").read_text().splitlines()) == 6

    class ToParquet(rf.ExportDialog):      # the format list suggests the file ending it takes
        def exec(self):
            self.set_format("hf")
            assert self.path.text().endswith("preferences-hf.parquet")
            self.path.setText(str(project / "out" / "prefs.parquet"))
            return 1

    monkeypatch.setattr(rf, "ExportDialog", ToParquet)
    view.export_clicked()
    assert "Wrote 6 record(s)" in told[-1] and (project / "out" / "prefs.parquet").stat().st_size

    mine = project / "mine.jsonl"           # a file of the person's own, typed as the path
    mine.write_text("my own data\n")

    class OverMine(rf.ExportDialog):
        def exec(self):
            self.path.setText(str(mine))
            return 1

    monkeypatch.setattr(rf, "ExportDialog", OverMine)
    asked = []
    monkeypatch.setattr(rf.QMessageBox, "question", lambda _p, _t, text, *a: asked.append(text) or rf.QMessageBox.No)
    n = len(told)
    view.export_clicked()
    assert asked == [f"{mine} already exists. Replace it with the export?"]
    assert mine.read_text() == "my own data\n" and len(told) == n

    bad = project / "mixed.jsonl"        # credited to the file: not rankings the project holds
    pairs = [json.loads(line) for line in (project / "out" / "pairs.jsonl").read_text().splitlines()]
    bad.write_text("".join(json.dumps({k: v for k, v in p.items() if k != "annotator"}) + "\n"
                           for p in pairs) + "{oops\n")
    monkeypatch.setattr(file_dialogs, "open_file", lambda *a, **k: str(bad))
    refused = []
    monkeypatch.setattr(rf, "show_error", lambda _p, _t, e, go_on=None: refused.append(e) or True)
    view.import_clicked()
    assert f"{bad}:7:" in str(refused[0])
    assert "Imported 6 ranking(s) of 6 item(s)" in told[-1] and "leaving out 1 bad" in told[-1]
    view.import_clicked()
    assert "imported before" in told[-1]
    # The project's own export brings nothing back: no ranking is trained on twice.
    monkeypatch.setattr(file_dialogs, "open_file", lambda *a, **k: str(project / "out" / "pairs.jsonl"))
    n, picked = len(stored(project)), view.start.selected_batch()
    view.import_clicked()
    assert "Every record in this file (6 of 1 ranking(s)) is already in the project" in told[-1]
    assert len(stored(project)) == n
    assert view.start.selected_batch() == picked != 1      # not moved to the rankings' batch
    # A colleague's ranking of the item ranked here, from another tool: it joins that item.
    mine = stored(project)[0]
    with Store.for_project(project) as store:
        item = store.item(mine.item_id)
    texts = {a.id: a.text for a in item.answers}
    theirs = project / "colleague.jsonl"
    theirs.write_text(json.dumps({"prompt": item.prompt, "answers": [texts[a] for g in mine.ordering for a in g],
                                  "ranking": [[i] for i in range(len(item.answers))], "annotator": "cy"}) + "\n")
    monkeypatch.setattr(file_dialogs, "open_file", lambda *a, **k: str(theirs))
    view.import_clicked()
    assert told[-1].startswith("Imported 1 ranking(s): 1 ranking(s) joined 1 item(s) the project had (batch ")
    assert {r.annotator for r in stored(project) if r.item_id == item.id} == {mine.annotator, "cy"}


# ----- the simulated annotator, from the start page


def test_simulated_ranking_runs_off_the_ui_thread_and_is_labelled(qtbot, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QMessageBox
    from engine.tasks import generate_tasks
    from workbench.simulated import DEFAULT_NAME
    tasks = generate_tasks(3, seed=0)
    right = {t.prompt: t.answer for t in tasks}
    with Store.for_project(tmp_path) as store:
        batch = store.create_batch("tasks", [
            {"prompt": t.prompt, "answers": [{"text": "no idea", "meta": {"finished": True}},
                                             {"text": t.answer, "meta": {"finished": True}},
                                             {"text": t.answer + "\nand so on", "meta": {"finished": False}}]}
            for t in tasks], k=3)
    view = make_view(qtbot, tmp_path)
    assert view.start.selected_batch() == batch
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.No)
    view.simulate_selected()                 # declined: nothing ranked
    assert "3 item(s)" in asked[0] and "simulated" in asked[0] and stored(tmp_path) == []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.Yes)
    view.start.simulate.click()
    assert view.simulating is not None and not view.start.simulate.isEnabled()
    qtbot.waitUntil(lambda: view.simulating is None, timeout=20_000)
    assert view.start.simulate.isEnabled() and "ranked 3 item(s)" in view.start.status.text()
    rankings = stored(tmp_path)
    assert len(rankings) == 3 and all(r.simulated and r.annotator == DEFAULT_NAME for r in rankings)
    with Store.for_project(tmp_path) as store:
        for r in rankings:
            item = store.items(batch, [r.item_id])[0]
            text = {a.id: a.text for a in item.answers}
            order = [[text[a] for a in g] for g in r.ordering]
            # correct and ended, then correct but cut off (the check reads the first line), then wrong
            assert order == [[right[item.prompt]], [right[item.prompt] + "\nand so on"], ["no idea"]]
    # the batch list says who ranked it, and a second run has nothing left to do
    assert "(simulated) 3/3" in view.start.batches.topLevelItem(0).text(3)
    view.simulate_selected()
    assert "ranked every item" in view.start.status.text()
    # another batch picked: the line about the first one goes
    with Store.for_project(tmp_path) as store:
        store.create_batch("other", [{"prompt": "q", "answers": [{"text": "a"}, {"text": "b"}]}])
    view.refresh(select=batch)
    assert "ranked every item" in view.start.status.text()      # the same batch, still selected
    other = next(view.start.batches.topLevelItem(i) for i in range(view.start.batches.topLevelItemCount())
                 if view.start.batches.topLevelItem(i).text(0) == "other")
    qtbot.mouseClick(view.start.batches.viewport(), Qt.LeftButton,
                     pos=view.start.batches.visualItemRect(other).center())
    assert view.start.selected_batch() != batch and not view.start.status.isVisible()
    view.close_store()


def test_the_count_includes_the_hidden_repeat_and_the_end_disables_ranking(qtbot, view, project):
    start_page = view.start
    start_page.annotator.lineEdit().selectAll()
    qtbot.keyClicks(start_page.annotator.lineEdit(), "bea")
    start_page.repeats.lineEdit().selectAll()
    qtbot.keyClicks(start_page.repeats.lineEdit(), "25")           # 1 of the 4 items comes back
    qtbot.mouseClick(start_page.start, Qt.LeftButton)
    press(qtbot, view, [Qt.Key_Return])                            # past the guidelines
    assert view.stack.currentWidget() is view.page
    seen = []
    for n in range(N_ITEMS + 1):
        assert view.page.bar.format() == f"{n} / {N_ITEMS + 1} ranked (with 1 repeat)"
        assert view.current is not None          # the repeat comes before the count is full
        seen.append(view.current.item_id)
        press(qtbot, view, ["1", "2", "3", Qt.Key_Return])
    assert len(set(seen)) == N_ITEMS and view.current is None
    assert view.page.bar.format() == f"{N_ITEMS + 1} / {N_ITEMS + 1} ranked (with 1 repeat)"
    assert view.page.bar.width() > view.page.bar.fontMetrics().horizontalAdvance(view.page.bar.format())
    assert "All 4 items" in view.page.done.text() and "1 of them a second time" in view.page.done.text()
    assert [r.is_repeat for r in stored(project)].count(True) == 1
    page = view.page
    assert not any(b.isEnabled() for b in (page.submit_button, page.order_button, page.skip_button, page.note))
    assert "Ctrl+Z" in page.legend.text() and "flag" not in page.legend.text()
    press(qtbot, view, ["1", "2", "s", Qt.Key_Return])             # ranking keys do nothing now
    assert len(stored(project)) == N_ITEMS + 1 and view.current is None
    press(qtbot, view, ["u"])                                      # taking the last one back works
    assert view.current is not None and page.skip_button.isEnabled()
    assert page.bar.format() == f"{N_ITEMS} / {N_ITEMS + 1} ranked (with 1 repeat)"


def test_a_busy_database_keeps_the_typed_ranking_to_submit_again(qtbot, view, project, monkeypatch):
    from workbench.store import StoreBusy
    start(qtbot, view)
    item = view.current.item_id
    real = view.session.submit
    monkeypatch.setattr(view.session, "submit", lambda *a, **k: (_ for _ in ()).throw(
        StoreBusy(f"{project}/workbench.db: busy: another process held the write lock")))
    press(qtbot, view, ["3", "1", "2", Qt.Key_Return])
    assert "busy" in view.page.status.text() and view.current.item_id == item
    assert stored(project) == []
    monkeypatch.setattr(view.session, "submit", real)
    press(qtbot, view, [Qt.Key_Return])          # the same ranking, submitted again
    assert [r.item_id for r in stored(project)] == [item]


def test_start_ranking_without_a_batch_says_to_make_one(qtbot, tmp_path):
    # It said "Pick a batch and type your name first." with the name already typed.
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication, QMessageBox
    with Store.for_project(tmp_path):
        pass
    v = make_view(qtbot, tmp_path)
    try:
        seen = []

        def read_and_close():
            box = QApplication.activeModalWidget()
            if isinstance(box, QMessageBox):
                seen.append(box.text())
                box.close()
            else:
                QTimer.singleShot(20, read_and_close)
        QTimer.singleShot(0, read_and_close)
        qtbot.mouseClick(v.start.start, Qt.LeftButton)
        qtbot.waitUntil(lambda: bool(seen), timeout=5_000)
        assert seen[0].startswith("There is no batch to rank yet: make one with New batch…")
    finally:
        v.close_store()


def test_copies_of_one_answer_are_ranked_together(qtbot, tmp_path):
    """Six of eight sampled answers say "6": typing one places all six, tied, and the two "5"s
    are implied last; each copy's card says which answer it repeats."""
    texts = ["6", "6", "5", "6", "6", "6", "6", "5"]
    with Store.for_project(tmp_path) as store:
        store.create_batch("copies", [{"prompt": "How long is 'bedroom'?",
                                       "answers": [{"text": t} for t in texts]},
                                      {"prompt": "And 'bed'?",
                                       "answers": [{"text": t} for t in ("3", "4", "3")]}], k=None)
    view = make_view(qtbot, tmp_path)

    def sorted_groups(groups):
        return [sorted(g) for g in groups]

    def by_text(numbers):
        shown = {a.number: a.text for a in view.current.answers}
        groups: dict[str, list[int]] = {}
        for n in numbers:
            groups.setdefault(shown[n], []).append(n)
        return list(groups.values())

    try:
        start(qtbot, view)
        six, five = sorted(by_text(range(1, 9)), key=len, reverse=True)
        cards = {c.number: c for c in view.page.cards.cards}
        assert not cards[six[0]].same_label.isVisibleTo(view)
        assert all(cards[n].same_label.text() == f"same answer as {six[0]}" for n in six[1:])
        assert all(cards[n].same_label.isVisibleTo(view) for n in six[1:] + five[1:])
        press(qtbot, view, [str(six[2])])
        assert view.page.submit_button.isEnabled()           # the "5"s can only go last
        press(qtbot, view, [Qt.Key_Backspace])               # takes back all six
        assert not view.page.submit_button.isEnabled() and view.input.groups == []
        press(qtbot, view, [str(five[1]), str(six[0])])      # typing the implied last is fine
        want = ids(view, [five, six])
        press(qtbot, view, [Qt.Key_Return])
        [r] = stored(tmp_path)
        assert sorted_groups(r.ordering) == sorted_groups(want)
        # Dragging a copy above the other answer brings its copies with it, on screen too.
        cards = view.page.cards
        threes = by_text(range(1, 4))
        three, four = (threes[0], threes[1]) if len(threes[0]) == 2 else (threes[1], threes[0])
        drag(qtbot, cards.card(four[0]), QPoint(20, cards.cards[0].geometry().top() + 2))
        drag(qtbot, cards.card(three[1]), QPoint(20, cards.cards[0].geometry().top() + 2))
        assert set(cards.order()[:2]) == set(three)
        assert cards.order()[2] == four[0] and view.input.describe().endswith(f"> {four[0]}")
        # The lower copy dragged to the bottom takes the other with it: the dragged card leads.
        lower = cards.order()[1]
        drag(qtbot, cards.card(lower), QPoint(20, cards.cards[-1].geometry().bottom() - 2))
        assert cards.order()[0] == four[0] and set(cards.order()[1:]) == set(three)
        # Ctrl+Enter submits the cards' order: copies tie where the first of them lies.
        want = ids(view, by_text(view.page.cards.order()))
        assert len(want) == 2
        qtbot.keyClick(view, Qt.Key_Return, Qt.ControlModifier)
        assert sorted_groups(stored(tmp_path)[-1].ordering) == sorted_groups(want)
    finally:
        view.close_store()


def test_a_batch_another_process_made_is_listed_when_the_rank_tab_is_opened(qtbot, view, project):
    from ui_driver import click_tab
    before = view.start.batches.topLevelItemCount()
    click_tab(qtbot, view.tabs, "Agreement")
    with Store.for_project(project) as other:          # as `workbench import-samples` would
        other.create_batch("from the CLI", [{"prompt": "q", "answers": [{"text": "a"}, {"text": "b"}]}])
    click_tab(qtbot, view.tabs, "Rank")
    names = [view.start.batches.topLevelItem(i).text(0) for i in range(view.start.batches.topLevelItemCount())]
    assert len(names) == before + 1 and "from the CLI" in names
