"""The Agreement tab and the reward page's agreement options, driven through their widgets on
the made-up class batch of tests/test_agreement_figures.py (its docstring has the rankings,
its tests the hand computations of every figure shown here)."""
from __future__ import annotations

import contextlib
import json
import shutil

from PySide6.QtCore import QRect, Qt
from PySide6.QtWidgets import QPushButton

from test_agreement_figures import make_class
from ui.ranking_view import RankingView
from ui_driver import click, click_tab, go, replace_text, wait_preview
from workbench.store import Store

RM_RUN = "reward-20250101-000000"


def _cells(table, row: int, columns: int) -> list[str]:
    return [table.item(row, c).text() for c in range(columns)]


def test_agreement_tab_shows_every_figure_and_leads_back_to_ranking(qtbot, tmp_path, rm_ckpt):
    with Store.for_project(tmp_path) as store:
        batch, _ = make_class(store)
        item_2 = store.items(batch)[1].id          # the most disagreed item
    run = tmp_path / "runs" / RM_RUN              # a finished reward run: its held-out accuracy
    shutil.copytree(rm_ckpt, run)
    (run / "summary.json").write_text(json.dumps({"val/accuracy": 0.5, "val_rankings": 12}))
    view = RankingView(tmp_path)
    qtbot.addWidget(view)
    view.resize(1100, 800)
    view.show()
    qtbot.waitExposed(view)
    try:
        click_tab(qtbot, view.tabs, "Agreement")
        page = view.agreement
        # The whole project: 4 annotators (dee has a session, no ranking), items 1, 2, 4
        # ranked by two or more, agreement 16/33, alpha 13/336, W 185/319, ceiling 15/28.
        assert page.summary.text() == (
            "4 annotators · 3 items ranked by two or more · agreement 48.5% · α 0.039 · "
            "Kendall's W 0.580 (mean over items) · human-human ceiling 53.6% of 28 comparisons")
        click_tab(qtbot, page.sections, "Annotators")
        assert _cells(page.annotators, 0, 8) == ["ann", "5", "6", "6", "3", "24", "62.5%", "-0.432"]
        assert _cells(page.annotators, 2, 8) == ["cy", "2", "4", "6", "2", "18", "16.7%", "0.442"]
        assert _cells(page.annotators, 3, 8) == ["dee", "0", "1", "6", "0", "0", "n/a", "0.039"]
        assert _cells(page.between, 0, 7) == ["ann ~ bob", "3", "15", "86.7%", "0.442", "0.442",
                                              "100.0% of 12"]
        assert _cells(page.between, 3, 7) == ["all", "3", "33", "48.5%", "0.039", "-0.152",
                                              "53.6% of 28"]
        assert page.repeats.item(0, 0).text() == "no hidden repeats ranked yet"
        # One batch: progress counts that batch only.
        page.batch.setCurrentIndex(page.batch.findData(batch))
        assert _cells(page.annotators, 0, 4) == ["ann", "4", "4", "4"]

        click_tab(qtbot, page.sections, "Items")
        assert page.items.rowCount() == 3
        assert _cells(page.items, 0, 5) == ["27.8%", "0.103", "3: ann, bob, cy", "class", "prompt 1"]
        assert [page.items.item(r, 1).text() for r in range(3)] == ["0.103", "0.636", "1.000"]

        click_tab(qtbot, page.sections, "Reward model")
        assert [v for _, v in page.ceiling.rows] == [0.5, 15 / 28]
        assert "50.0% of held-out answer pairs" in page.ceiling_note.text()
        assert f"{RM_RUN}, on 12 held-out rankings" in page.ceiling_note.text()
        assert page.rm.currentText() == RM_RUN

        # Re-rank from the items list: the item opens on the Rank tab in the annotator's session.
        click_tab(qtbot, view.tabs, "Rank")
        replace_text(qtbot, view.start.annotator.lineEdit(), "ann")
        click_tab(qtbot, view.tabs, "Agreement")
        click_tab(qtbot, page.sections, "Items")
        click(qtbot, page.items.cellWidget(0, 5))
        assert view.tabs.currentIndex() == 0
        assert view.current.item_id == item_2 and view.current.previous is not None

        # Left without a new ranking, the old one is back: clicking Re-rank loses nothing.
        def anns(item_id):
            with Store.for_project(tmp_path) as s:
                return [r for r in s.rankings(item_id=item_id) if r.annotator == "ann"]
        before = [r.ordering for r in anns(item_2)]
        assert before == []                        # withdrawn while the item is open again
        end = next(b for b in view.page.findChildren(QPushButton) if b.text() == "End session")
        click(qtbot, end)
        assert len(anns(item_2)) == 1
        # Ranked again, the new ranking is the one that stays.
        click_tab(qtbot, view.tabs, "Agreement")
        click_tab(qtbot, page.sections, "Items")
        click(qtbot, page.items.cellWidget(0, 5))
        old = anns(item_2) or None
        view.session.submit([[n] for n in range(1, len(view.current.answers) + 1)])
        new = anns(item_2)
        click(qtbot, end)
        assert old is None and anns(item_2) == new and len(new) == 1
    finally:
        view.close_store()


def test_the_reward_page_trains_on_agreed_items_or_their_borda_ranking(qtbot, demo_project,
                                                                       make_window):
    with Store.for_project(demo_project) as store:
        batch, _ = make_class(store)
    w = make_window(demo_project, show=True)
    go(qtbot, w, "reward")
    reward = w.pages["reward"]
    wait_preview(qtbot, reward)
    assert reward.use_store.isChecked() and not reward.threshold.isEnabled()
    # 9 rankings of "class" + 1 of "extra", every one.
    assert reward.rankings().min_agreement is None and "10 ranked records" in reward.preview.summary.text()
    click(qtbot, reward.use_threshold)
    assert reward.threshold.isEnabled()
    reward.threshold.selectAll()
    qtbot.keyClicks(reward.threshold, "50")
    qtbot.keyClick(reward.threshold, Qt.Key_Tab)
    wait_preview(qtbot, reward)
    # Item 2 (agreement 5/18) goes: 10 - 3 = 7.
    assert reward.rankings().min_agreement == 0.5
    assert "7 ranked records" in reward.preview.summary.text()
    assert "agree on 50% of pairs or more" in reward.preview.note.text()
    click(qtbot, reward.use_borda)
    wait_preview(qtbot, reward)
    # One Borda ranking per item left: items 1, 3, 4 of "class" and "extra" 0.
    assert reward.rankings().aggregate == "borda"
    assert "4 ranked records" in reward.preview.summary.text()


def test_start_beside_a_finished_reward_run_takes_the_projects_rankings_as_they_are_now(
        qtbot, demo_project, make_window, tiny_lm_ckpt, monkeypatch):
    # Start copied the shown run's settings, its rankings.jsonl too: a new run trained on the
    # old day's rankings while the page counted the new ones (found by a real-window walk).
    from test_ui_stage_forms import fake_run
    with Store.for_project(demo_project) as store:
        make_class(store)
    fake_run(demo_project, "reward-20260101-000000", {"init": str(tiny_lm_ckpt), "data": ["rankings.jsonl"]}, 10, 5.0)
    w = make_window(demo_project, show=True)
    go(qtbot, w, "reward")
    reward = w.pages["reward"]
    assert reward.run is not None and reward.run.name == "reward-20260101-000000"
    wait_preview(qtbot, reward)
    assert reward.use_store.isEnabled() and reward.use_store.isChecked()
    assert "10 ranked records" in reward.preview.summary.text()      # what Start would write
    launched = []
    monkeypatch.setattr(w.ctx, "launch", lambda stage, values, rankings=None: launched.append((values, rankings)))
    qtbot.waitUntil(reward.start_btn.isEnabled, timeout=5_000)
    click(qtbot, reward.start_btn)
    (values, rankings), = launched
    assert rankings is not None and values["data"] == ["rankings.jsonl"]


@contextlib.contextmanager
def agreement_page(qtbot, project):
    """The Agreement tab of a ranking view on the project, as a person opens it."""
    view = RankingView(project)
    qtbot.addWidget(view)
    view.show()
    try:
        click_tab(qtbot, view.tabs, "Agreement")
        yield view.agreement
    finally:
        view.close_store()


def test_the_ceiling_says_when_a_simulated_annotator_is_in_it(qtbot, tmp_path):
    with Store.for_project(tmp_path) as store:
        batch = store.create_batch("b", [{"prompt": f"p{i}", "answers": [{"text": "a"}, {"text": "b"}]}
                                         for i in range(2)])
        for name, kind in (("ann", "human"), ("bob", "human"), ("sim", "simulated")):
            session, _ = store.session(batch, store.annotator(name, kind).id)
            for item in store.items(batch):
                store.add_ranking(session, item.id, [[i] for i in item.answer_ids])
    with agreement_page(qtbot, tmp_path) as page:
        assert "human-human ceiling 100.0% of 2 comparisons" in page.summary.text()
        click(qtbot, page.simulated)
        assert "annotator-annotator ceiling (simulated annotators included)" in page.summary.text()
        assert page.ceiling.rows[1][0].startswith("Annotator-annotator ceiling")
        assert page.ceiling_heading.text().endswith("against the annotator-annotator ceiling "
                                                    "(simulated annotators included)")
        # The bar's label fits beside its bar (on two lines at most), not cut off.
        click_tab(qtbot, page.sections, "Reward model")
        label, bars = page.ceiling.rows[1][0], page.ceiling
        needs = bars.fontMetrics().boundingRect(QRect(0, 0, bars.label_width() - 8, 1000),
                                                Qt.AlignRight | Qt.TextWordWrap, label)
        assert needs.width() <= bars.label_width() - 8 and needs.height() <= bars.ROW - 6


def test_the_items_list_holds_the_most_disagreed_and_says_how_many_more(qtbot, tmp_path, monkeypatch):
    import ui.agreement_view as av
    monkeypatch.setattr(av, "MAX_ITEMS", 2)
    with Store.for_project(tmp_path) as store:
        make_class(store)
    with agreement_page(qtbot, tmp_path) as page:
        click_tab(qtbot, page.sections, "Items")
        assert page.items.rowCount() == 2
        assert [page.items.item(r, 1).text() for r in range(2)] == ["0.103", "0.636"]    # the first two of 3
        assert page.items_status.text().endswith("The 2 most disagreed of 3 are listed.")
