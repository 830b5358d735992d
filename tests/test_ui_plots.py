"""Live plots (ui/plots.py) and the UI-stall probe (ui/stall_probe.py)."""
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt, QTimer  # noqa: E402
from PySide6.QtGui import QTextDocument  # noqa: E402

from pyqtgraph.widgets.GraphicsView import GraphicsView  # noqa: E402

from ui.plots import (FIGURES, OTHER, PLOT_SPECS, PLOT_X, REDRAW_MS, SLOWEST_MS, PlotGrid,  # noqa: E402
                      RunHistory, Series)
from ui.stall_probe import StallProbe  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]


def metrics(step, **values):
    return {"type": "metrics", "step": step, "time": 0.0, **{k.replace("__", "/"): v for k, v in values.items()}}


@pytest.fixture
def grid(qtbot):
    def make(stage="pretrain"):
        g = PlotGrid(stage)
        qtbot.addWidget(g)
        g.resize(900, 600)
        g.show()
        qtbot.waitExposed(g)
        return g
    return make


# ----- buffers


def test_series_holds_exactly_what_was_appended_across_growth():
    s = Series(capacity=4)
    for i in range(1000):
        s.append(i, i * 0.5)
    x, y = s.arrays()
    assert len(s) == 1000
    np.testing.assert_array_equal(x, np.arange(1000))
    np.testing.assert_array_equal(y, np.arange(1000) * 0.5)


def test_a_resumed_run_replaces_the_steps_it_repeats():
    s = Series()
    for i in range(1, 11):
        s.append(i, 1.0)
    s.append(6, 2.0)                   # resumed from the checkpoint at step 5
    s.append(7, 2.0)
    np.testing.assert_array_equal(s.arrays()[0], [1, 2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(s.arrays()[1], [1] * 5 + [2, 2])
    assert s.rewinds == 1


def test_bulk_load_equals_event_by_event():
    events = [metrics(i, train__loss=1 / i, train__tokens=i * 10) for i in range(1, 50)]
    events += [metrics(i, train__loss=2 / i, train__tokens=i * 10) for i in range(30, 60)]  # a resume
    events += [{"type": "progress", "step": 3, "total": 9}, metrics(60, val__loss=0.5, note="x")]
    one = RunHistory()
    for ev in events:
        one.add_event(ev)
    bulk = RunHistory.from_events(events)
    assert one.keys() == bulk.keys() == ["train/loss", "train/tokens", "val/loss"]
    for k in one.keys():
        for a, b in zip(one.arrays(k), bulk.arrays(k)):
            np.testing.assert_array_equal(a, b)
    x, y = bulk.arrays("train/loss")
    np.testing.assert_array_equal(x, np.r_[np.arange(1, 30), np.arange(30, 60)])
    assert y[-1] == 2 / 59


def test_values_are_parsed_as_the_engine_writes_them():
    h = RunHistory.from_events([metrics(1, a__x="nan", a__y="inf", a__z=None, a__w="text", a__n=3)])
    assert math.isnan(h.last("a/x")) and h.last("a/y") == math.inf and h.last("a/n") == 3.0
    assert "a/z" not in h and "a/w" not in h


def test_tokens_are_interpolated_and_extrapolated_for_steps_without_a_count():
    h = RunHistory()
    for step, tok in ((10, 100), (20, 250), (30, 300)):
        h.add_event(metrics(step, train__tokens=tok))
    for step in (15, 20, 40):
        h.add_event(metrics(step, val__loss=1.0))
    h.add_events([metrics(5, val__acc=1.0), metrics(40, val__acc=2.0)])
    np.testing.assert_allclose(h.arrays("val/loss", "tokens")[0], [175, 250, 400])
    np.testing.assert_allclose(h.arrays("val/acc", "tokens")[0], [50, 400])
    # A count arrives for step 40: the extrapolated point moves onto it.
    h.add_event(metrics(40, train__tokens=420))
    np.testing.assert_allclose(h.arrays("val/loss", "tokens")[0], [175, 250, 420])
    np.testing.assert_array_equal(h.arrays("val/loss", "step")[0], [15, 20, 40])
    # A run with no counts (PPO) falls back to steps.
    ppo = RunHistory.from_events([metrics(3, objective__kl=0.1)])
    np.testing.assert_array_equal(ppo.arrays("objective/kl", "tokens")[0], [3])


def test_every_key_in_the_plot_specs_is_one_the_engine_emits():
    source = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "engine").glob("*.py"))
    keys = {k for spec in PLOT_SPECS.values() for _, ks in spec for k in ks}
    keys |= {k for figures in FIGURES.values() for _, k, _ in figures}
    keys |= {x for against in PLOT_X.values() for x, _ in against.values()}
    missing = sorted(k for k in keys if f'"{k}"' not in source)
    assert missing == []
    from workbench import stages
    assert set(PLOT_SPECS) == set(stages.NAMES)       # every stage, even one with no curves ([])


# ----- the grid


def test_events_reach_the_curves_on_the_redraw_timer(grid, qtbot):
    g = grid("pretrain")
    for i in range(1, 21):
        g.add_event(metrics(i, train__loss=3.0 - i / 10, train__lr=1e-3, train__tokens=i * 64))
    g.add_event(metrics(20, val__loss=1.5))
    with pytest.raises(KeyError):
        g.curve("Loss", "train/loss")           # add_event only buffers; the timer draws
    # The timer draws one plot per event-loop turn: wait for the last plot that has data.
    qtbot.waitUntil(lambda: _has_curve(g, "Loss", "val/loss") and _has_curve(g, "Learning rate", "train/lr"),
                    timeout=10_000)
    x, y = g.curve("Loss", "train/loss").getData()
    np.testing.assert_array_equal(x, np.arange(1, 21))
    np.testing.assert_allclose(y, 3.0 - np.arange(1, 21) / 10)
    np.testing.assert_array_equal(g.curve_data("Learning rate", "train/lr")[1], [1e-3] * 20)
    # More points later are appended to the same curve.
    g.add_event(metrics(21, train__loss=0.5))
    qtbot.waitUntil(lambda: len(g.curve_data("Loss", "train/loss")[0]) == 21, timeout=10_000)


def legend_text(g, title):
    """The legend under one plot, as the user reads it."""
    doc = QTextDocument()
    doc.setHtml(g.legend(title).text())
    return (doc.toPlainText().replace("\xa0", " ").replace("\u2060", "").replace("━", "").replace("╍", "")
            .replace("┉", ""))


def _has_curve(g, title, key, run=0):
    try:
        g.curve(title, key, run)
    except KeyError:
        return False
    return True


def test_a_hidden_grid_draws_when_shown(qtbot):
    g = PlotGrid("sft")
    qtbot.addWidget(g)
    g.add_event(metrics(1, train__loss=2.0))
    qtbot.wait(200)
    assert not _has_curve(g, "Loss", "train/loss")
    g.show()
    qtbot.waitUntil(lambda: _has_curve(g, "Loss", "train/loss"), timeout=10_000)


def test_tokens_x_axis(grid):
    g = grid("sft")
    g.load_events([metrics(s, train__loss=1.0, train__tokens=s * 1000) for s in (10, 20, 30)]
                  + [metrics(20, val__loss=2.0, eval__task_accuracy=0.5)])
    g.set_x_axis("tokens")
    g.redraw()
    np.testing.assert_array_equal(g.curve_data("Loss", "train/loss")[0], [10000, 20000, 30000])
    np.testing.assert_array_equal(g.curve_data("Loss", "val/loss")[0], [20000])
    np.testing.assert_array_equal(g.curve_data("Task accuracy", "eval/task_accuracy")[0], [20000])
    assert g.plot_item("Loss").getAxis("bottom").labelText == "tokens"
    assert g.x_axis_box.currentData() == "tokens"
    g.x_axis_box.setCurrentIndex(g.x_axis_box.findData("step"))     # the user's way back
    g.redraw()
    assert g.x_axis() == "step"
    np.testing.assert_array_equal(g.curve_data("Loss", "train/loss")[0], [10, 20, 30])
    with pytest.raises(ValueError):
        g.set_x_axis("time")


def test_overlay_draws_every_run_in_its_own_colour(grid):
    g = grid("reward")
    a = RunHistory.from_events([metrics(s, train__loss=1.0 / s, val__accuracy=0.6) for s in range(1, 6)])
    b = RunHistory.from_events([metrics(s, train__loss=2.0 / s) for s in range(1, 9)])
    g.add_event(metrics(1, train__loss=9.0))         # the grid's own run is not drawn meanwhile
    g.set_overlay([("run a", a), ("run b", b)])
    g.redraw()
    assert len(g.curve_data("Loss", "train/loss", run=0)[0]) == 5
    assert len(g.curve_data("Loss", "train/loss", run=1)[0]) == 8
    assert _has_curve(g, "Accuracy", "val/accuracy", run=0)
    assert not _has_curve(g, "Accuracy", "val/accuracy", run=1)
    colors = {g.curve("Loss", "train/loss", run=r).opts["pen"].color().name() for r in (0, 1)}
    assert len(colors) == 2
    loss_legend = legend_text(g, "Loss")
    assert loss_legend.split() == ["run", "a", "run", "b"]          # one metric: runs only
    assert legend_text(g, "Accuracy").split() == ["run", "a"]
    # The overlay's owner appends to a run: refresh() draws it.
    b.add_event(metrics(9, train__loss=0.1))
    g.refresh()
    g.redraw()
    assert len(g.curve_data("Loss", "train/loss", run=1)[0]) == 9
    g.set_overlay(None)
    g.redraw()
    np.testing.assert_array_equal(g.curve_data("Loss", "train/loss")[1], [9.0])
    assert not _has_curve(g, "Loss", "train/loss", run=1)


def test_200k_points_load_and_draw_downsampled(grid, qtbot):
    g = grid("pretrain")
    n = 200_000
    rng = np.random.default_rng(0)
    loss = (2 + 8 * np.exp(-np.arange(n) / 5000) + rng.normal(0, 0.05, n)).tolist()
    g.load_events([{"type": "metrics", "step": i + 1, "train/loss": loss[i], "train/tokens": (i + 1) * 512}
                   for i in range(n)])
    g.redraw()
    g.grab()
    x, y = g.curve_data("Loss", "train/loss")
    assert len(x) == n and y[-1] == loss[-1]
    shown, _ = g.curve("Loss", "train/loss").getData()
    assert len(shown) < n // 10                       # peak downsampling to the plot's width
    g.set_x_axis("tokens")
    g.redraw()
    g.grab()
    assert g.curve_data("Loss", "train/loss")[0][-1] == n * 512


def test_nan_and_inf_leave_gaps_and_do_not_break_the_plot(grid):
    g = grid("ppo")
    g.add_event(metrics(1, objective__kl="nan", objective__score="inf", objective__entropy=float("nan")))
    g.redraw()
    g.grab()
    g.add_event(metrics(2, objective__kl=0.5, objective__score=1.0, objective__entropy=float("-inf")))
    g.add_event(metrics(3, objective__kl=0.7, objective__score=1.5, objective__entropy=2.0))
    g.redraw()
    g.grab()
    kl = g.curve_data("KL to reference (nats)", "objective/kl")[1]
    assert math.isnan(kl[0]) and list(kl[1:]) == [0.5, 0.7]
    score = g.curve_data("Score", "objective/score")[1]
    assert math.isnan(score[0]) and list(score[1:]) == [1.0, 1.5]    # inf is a gap on screen...
    assert g.history.last("objective/entropy") == 2.0
    assert g.history.arrays("objective/score")[1][0] == math.inf     # ...but kept in the history
    lo, hi = g.plot_item("Score").viewRange()[1]
    assert math.isfinite(lo) and math.isfinite(hi)


def test_metrics_outside_the_spec_are_offered_singly_and_by_group(grid):
    g = grid("sft")
    g.load_events([metrics(5, train__loss=1.0, eval__acc__add=0.5, eval__acc__sort=0.25,
                           perf__peak_rss_mb=100.0)])
    g.redraw()
    choices = g.other_choices()
    assert {"eval/acc/add", "eval/acc/sort", "eval/acc/*", "perf/peak_rss_mb"} <= set(choices)
    assert "train/loss" not in choices
    # Until one is picked, the first group is drawn rather than an empty plot.
    assert g.plot_item(OTHER).titleLabel.text == "eval/acc/*" and g.other_box.currentText() == "eval/acc/*"
    assert g.curve_data(OTHER, "eval/acc/sort")[1][0] == 0.25
    # The title names the group; its legend names the members by what follows the prefix.
    assert legend_text(g, OTHER).split() == ["add", "sort"]
    g.show_other("perf/peak_rss_mb")
    g.redraw()
    assert legend_text(g, OTHER).split() == ["perf/peak_rss_mb"]
    g.show_other("eval/acc/*")
    g.redraw()
    assert g.curve_data(OTHER, "eval/acc/add")[1][0] == 0.5
    assert g.plot_item(OTHER).titleLabel.text == "eval/acc/*"
    # A member that appears later joins the chosen group.
    g.add_event(metrics(6, eval__acc__count=1.0))
    g.redraw()
    assert g.curve_data(OTHER, "eval/acc/count")[1][0] == 1.0
    g.show_other("perf/peak_rss_mb")
    g.redraw()
    assert not _has_curve(g, OTHER, "eval/acc/add")
    with pytest.raises(KeyError):
        g.show_other("no/such")


def test_the_loss_baseline_spans_the_other_curves(grid):
    g = grid("pretrain")
    g.load_events([metrics(0, val__unigram_baseline=6.0)] + [metrics(s, train__loss=3.0) for s in (10, 20)])
    g.redraw()
    x, y = g.curve_data("Loss", "val/unigram_baseline")
    assert list(x) == [0, 20] and list(y) == [6.0, 6.0]


def test_ppo_score_is_drawn_against_its_kl_as_points(grid):
    g = grid("ppo")
    g.load_events([metrics(s, objective__kl=kl, objective__score=score) for s, kl, score in
                   ((1, 0.0, -0.5), (2, 1.5, 0.2), (3, "nan", 0.4), (4, 3.0, 0.9), (5, 2.0, 0.7))]
                  + [metrics(6, objective__score=1.0)])         # no KL at step 6: no point
    g.redraw()
    title = "Score against KL"
    x, y = g.curve_data(title, "objective/score")
    assert list(x) == [0.0, 1.5, 3.0, 2.0] and list(y) == [-0.5, 0.2, 0.9, 0.7]   # KL goes back: points
    curve = g.curve(title, "objective/score")
    assert curve.opts["pen"].style() == Qt.NoPen and curve.opts["symbol"] == "o"
    assert g.plot_item(title).getAxis("bottom").labelText == "KL to reference (nats)"
    assert legend_text(g, title) == "● objective/score"
    # The step/tokens switch is not its x; a resumed run replaces its points from the step it resumed at.
    g.set_x_axis("tokens")
    g.add_event(metrics(4, objective__kl=2.5, objective__score=0.8))
    g.redraw()
    x, y = g.curve_data(title, "objective/score")
    assert list(x) == [0.0, 1.5, 2.5] and list(y) == [-0.5, 0.2, 0.8]
    assert g.plot_item(title).getAxis("bottom").labelText == "KL to reference (nats)"
    # The KL plot has the mean that kl_budget is held to beside the per-step KL.
    assert dict(PLOT_SPECS["ppo"])["KL to reference (nats)"] == ["objective/kl", "objective/kl_exact", "objective/kl_mean"]


def test_legend_click_hides_and_shows_a_curve(grid):
    g = grid("pretrain")
    g.load_events([metrics(s, train__loss=3.0, val__loss=3.5) for s in (10, 20)])
    g.redraw()
    legend = g.legend("Loss")
    assert legend_text(g, "Loss").split() == ["train/loss", "val/loss"]
    link = re.findall(r'href="([^"]+)"', legend.text())[1]
    legend.linkActivated.emit(link)
    assert not g.curve("Loss", "val/loss").isVisible() and g.curve("Loss", "train/loss").isVisible()
    assert "line-through" in legend.text()
    legend.linkActivated.emit(link)
    assert g.curve("Loss", "val/loss").isVisible()


def test_overlay_legend_has_an_entry_per_run_and_per_metric(grid):
    g = grid("pretrain")
    runs = [(f"lr {i}", RunHistory.from_events([metrics(s, train__loss=1.0, val__loss=2.0) for s in (1, 2)]))
            for i in range(3)]
    g.set_overlay(runs)
    g.redraw()
    assert legend_text(g, "Loss").split() == ["lr", "0", "lr", "1", "lr", "2", "train/loss", "val/loss"]
    links = re.findall(r'href="([^"]+)"', g.legend("Loss").text())
    g.legend("Loss").linkActivated.emit(links[1])          # run "lr 1": both its curves
    assert [g.curve("Loss", k, run=1).isVisible() for k in ("train/loss", "val/loss")] == [False, False]
    assert g.curve("Loss", "val/loss", run=0).isVisible()
    g.legend("Loss").linkActivated.emit(links[4])          # val/loss: in every run
    assert [g.curve("Loss", "val/loss", run=r).isVisible() for r in range(3)] == [False, False, False]
    assert g.curve("Loss", "train/loss", run=0).isVisible()


def test_clear_empties_the_grid(grid, qtbot):
    g = grid("pretrain")
    g.load_events([metrics(1, train__loss=2.0, perf__mfu=0.1, time__step=9),
                   metrics(900, train__loss=7.0)])
    g.redraw()
    assert g.curve_data("Loss", "train/loss")[1][0] == 2.0
    assert g.other_choices() == ["time/step"]
    qtbot.waitUntil(lambda: view_range(g, "Loss")[0][1] > 800, timeout=10_000)
    g.clear()
    g.redraw()
    assert not _has_curve(g, "Loss", "train/loss")
    assert g.history.keys() == [] and g.other_choices() == []
    # A new run's empty plots have a new plot's axes, not the last run's steps and losses.
    qtbot.wait(50)
    assert view_range(g, "Loss") == [[0, 1], [0, 1]]


def view_range(g, title):
    return g.plot_item(title).getViewBox().viewRange()


def test_a_lone_point_or_a_flat_line_gets_axes_around_it_not_below_zero(grid, qtbot):
    g = grid("pretrain")
    g.load_events([metrics(0, train__loss=0.05)] + [metrics(s, train__lr=1e-3) for s in range(0, 20)])
    g.redraw()
    (x0, x1), (y0, y1) = view_range(g, "Loss")
    assert 0 == x0 < x1 and 0 < y0 < 0.05 < y1 < 0.1         # pyqtgraph's own: -0.5..0.5 each
    (x0, x1), (y0, y1) = view_range(g, "Learning rate")
    # x: pyqtgraph's own margin around steps 0-19 (no limit at 0: it fought autorange into an
    # endless repaint, see test_ui_stream_x11.py); y: the flat value padded, above zero.
    assert -2 < x0 <= 0 and 19 < x1 and 0 < y0 < 1e-3 < y1 < 2e-3
    # A second value: the axis follows the data again.
    g.load_events([metrics(1, train__loss=3.0)])
    g.redraw()
    qtbot.waitUntil(lambda: view_range(g, "Loss")[1][1] >= 3.0, timeout=10_000)
    assert view_range(g, "Loss")[1][0] < 0.05


def test_a_short_run_has_ticks_on_whole_steps_only(grid, qtbot):
    g = grid("pretrain")
    g.load_events([metrics(s, train__loss=3.0 - s / 10) for s in (1, 2)])
    g.redraw()
    qtbot.waitUntil(lambda: view_range(g, "Loss")[0][1] >= 2, timeout=10_000)
    axis = g.plot_item("Loss").getAxis("bottom")
    lo, hi = view_range(g, "Loss")[0]
    ticks = [v for _spacing, values in axis.tickValues(lo, hi, axis.width()) for v in values]
    assert ticks and all(float(v).is_integer() for v in ticks) and {1.0, 2.0} <= set(ticks)


def test_one_off_figures_are_a_table_not_one_point_plots(grid):
    g = grid("tokenizer")
    assert g.titles() == [] and not g.other_box.isVisible()
    assert "when the run has finished" in g.figures.text()
    g.load_events([metrics(0, tokenizer__vocab_size=4096, tokenizer__chars_per_token=3.214,
                           tokenizer__train_chars=60000, tokenizer__new_figure=7)])
    g.redraw()
    text = _plain(g.figures.text())
    # No text held out: the figure says it was measured on the training text.
    assert "Vocabulary size 4,096 tokens" in text
    assert "Characters per token 3.21 (training text: too little to hold some out)" in text
    assert "Training text 60,000 characters" in text and "tokenizer/new_figure 7" in text
    assert "Held-out text" not in text                        # not reported by this run
    g.load_events([metrics(1, tokenizer__heldout_chars=2500)])
    g.redraw()
    text = _plain(g.figures.text())
    assert "Characters per token 3.21 (held-out text)" in text and "Held-out text 2,500" in text
    other = RunHistory.from_events([metrics(0, tokenizer__vocab_size=512)])
    g.set_overlay([("tok-a", g.history), ("tok-b", other)])
    g.redraw()
    text = _plain(g.figures.text())
    assert "tok-a tok-b" in text and "Vocabulary size 4,096 tokens 512 tokens" in text
    g.clear()
    g.redraw()
    assert "when the run has finished" in g.figures.text()


def _plain(rich: str) -> str:
    doc = QTextDocument()
    doc.setHtml(rich)
    return " ".join(doc.toPlainText().split())


def test_expensive_redraws_are_spaced_out(grid, qtbot, monkeypatch):
    g = grid("sft")
    assert g.redraw_interval_ms() == REDRAW_MS
    paint = GraphicsView.paintEvent

    def slow_paint(self, event):
        time.sleep(0.03)            # a slow machine, or a million points
        paint(self, event)

    monkeypatch.setattr(GraphicsView, "paintEvent", slow_paint)
    steps = iter(range(1, 100_000))

    def stream_until_throttled():
        g.add_event(metrics(next(steps), train__loss=1.0, train__lr=1e-3))
        return g.redraw_interval_ms() >= 3 * REDRAW_MS

    qtbot.waitUntil(stream_until_throttled, timeout=10_000)
    assert g.redraw_interval_ms() <= SLOWEST_MS


def test_a_stage_without_plots_of_its_own_shows_its_metrics_under_other(grid):
    g = grid("a-new-stage")                 # a stage added to the catalogue, no plot spec yet
    assert g.titles() == [OTHER]
    g.load_events([metrics(s, loss__dpo=1.0 / s, train__lr=1e-3) for s in range(1, 4)])
    g.redraw()
    assert g.other_choices() == ["loss/dpo", "train/lr"]
    g.show_other("loss/dpo")
    g.redraw()
    np.testing.assert_array_equal(g.curve_data(OTHER, "loss/dpo")[0], [1, 2, 3])


# ----- stall probe


def test_stall_probe_measures_a_blocked_ui_thread(qtbot):
    probe = StallProbe(interval_ms=10)
    probe.start()
    qtbot.waitUntil(lambda: probe.ticks > 3, timeout=10_000)
    blocked = []                                     # the tick count when the loop was let go
    QTimer.singleShot(0, lambda: (time.sleep(0.15), blocked.append(probe.ticks)))   # holds the loop
    qtbot.waitUntil(lambda: bool(blocked) and probe.ticks > blocked[0], timeout=10_000)   # late tick
    probe.stop()
    assert not probe.running
    assert probe.ticks > 3
    assert probe.max_stall_ms >= 100                 # slept 150 ms; the probe fires every 10
    assert probe.percentile(50) <= probe.percentile(100) == probe.max_stall_ms
    hist = probe.histogram()
    assert sum(hist.values()) == probe.ticks and hist[">1000ms"] == 0
    summary = probe.summary()
    assert summary["ticks"] == probe.ticks and summary["max_stall_ms"] == round(probe.max_stall_ms, 2)
    probe.start()                                    # starts afresh
    probe.stop()
    assert probe.max_stall_ms < 100


def test_stall_probe_refuses_a_zero_interval():
    with pytest.raises(ValueError):
        StallProbe(interval_ms=0)


def test_the_run_loader_folds_a_run_in_slices_as_one_pass_would(qtbot, tmp_path, monkeypatch):
    import json
    from engine.runio import read_events
    from ui.jobs import RunLoader
    events = [{"type": "start", "stage": "pretrain", "pid": 1, "time": 0.0}]
    for s in range(1, 301):
        events.append(metrics(s, train__loss=5.0 / s, train__tokens=64 * s))
        if s % 100 == 0:
            events.append(metrics(s, val__loss=4.0 / s))
            events.append({"type": "log", "message": f"step {s}"})
    events.append({"type": "done", "status": "completed", "error": None, "time": 1.0})
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events)
                                           + '{"type": "metrics", "step": 301, "tra')   # torn
    monkeypatch.setattr(RunLoader, "SLICE_BYTES", 2048)
    loader = RunLoader(tmp_path)
    slices = []
    loader.eventsArrived.connect(slices.append)
    with qtbot.waitSignal(loader.loaded, timeout=10_000):
        loader.start()
    assert len(slices) > 5 and not loader.busy
    history = loader.fold.history
    whole = RunHistory.from_events(read_events(tmp_path))
    assert history.keys() == whole.keys() == ["train/loss", "train/tokens", "val/loss"]
    for key in whole.keys():
        np.testing.assert_array_equal(history.arrays(key)[0], whole.arrays(key)[0])
        np.testing.assert_array_equal(history.arrays(key)[1], whole.arrays(key)[1])
    others = [e["type"] for part in slices for e in part if e["type"] != "metrics"]
    assert others == ["start", "log", "log", "log", "done"]          # in order, the torn line left


def test_a_live_round_redraws_one_plot_per_turn_of_the_event_loop(grid):
    """Qt repaints every changed plot of a window in one pass: one plot per timer tick keeps
    each pass to one plot's repaint while a job streams."""
    g = grid("pretrain")
    g.load_events([metrics(s, train__loss=1.0 / s, train__lr=1e-3, train__grad_norm=0.5,
                           perf__tokens_per_s=100.0) for s in range(1, 30)])
    drawn = []
    for _ in range(20):
        g._tick()
        drawn.append(sum(1 for t in ("Loss", "Learning rate", "Gradient norm", "Throughput (tokens/s)")
                         if _has_curve(g, t, {"Loss": "train/loss", "Learning rate": "train/lr",
                                              "Gradient norm": "train/grad_norm",
                                              "Throughput (tokens/s)": "perf/tokens_per_s"}[t])))
        if drawn[-1] == 4:
            break
    assert drawn[:4] == [1, 2, 3, 4]                  # one more plot each tick, then all
    assert g.redraw_interval_ms() >= 66               # rounds are still spaced by the throttle


def _plots_in(qtbot, stage: str, width: int, height: int):
    from PySide6.QtWidgets import QScrollArea
    from ui.plots import PlotGrid
    grid = PlotGrid(stage)
    qtbot.addWidget(grid)
    grid.resize(width, height)
    grid.show()
    qtbot.waitExposed(grid)
    qtbot.wait(50)
    heights = [cell.frame.height() for cell in grid._cells.values()]
    return heights, grid.findChild(QScrollArea).verticalScrollBar().maximum()


def test_many_plots_in_a_short_space_scroll_instead_of_shrinking(qtbot):
    from ui.plots import MIN_PLOT_HEIGHT
    heights, scroll = _plots_in(qtbot, "ppo", 1000, 320)
    assert len(heights) >= 9 and min(heights) >= MIN_PLOT_HEIGHT
    assert max(heights) < 2 * MIN_PLOT_HEIGHT          # a readable height, not each its preferred
    assert scroll > 0


def test_few_plots_in_a_tall_space_share_it_without_scrolling(qtbot):
    from ui.plots import MIN_PLOT_HEIGHT
    heights, scroll = _plots_in(qtbot, "pretrain", 1000, 700)
    cols = 2 if len(heights) in (2, 4) else 3
    rows = -(-len(heights) // cols)
    assert scroll == 0
    assert min(heights) > MIN_PLOT_HEIGHT and min(heights) * rows > 0.8 * 700    # they fill it


def _wheel(widget, modifiers=Qt.NoModifier):
    from PySide6.QtCore import QPoint, QPointF
    from PySide6.QtGui import QWheelEvent
    from PySide6.QtWidgets import QApplication
    pos = widget.rect().center()
    QApplication.sendEvent(widget, QWheelEvent(QPointF(pos), QPointF(widget.mapToGlobal(pos)), QPoint(0, 0),
                                               QPoint(0, -120), Qt.NoButton, modifiers,
                                               Qt.NoScrollPhase, False))


def test_the_wheel_over_a_plot_scrolls_a_grid_that_scrolls_and_ctrl_wheel_zooms(qtbot):
    from PySide6.QtWidgets import QScrollArea
    from ui.plots import PlotGrid
    for stage, height, scrolls in (("ppo", 320, True), ("pretrain", 700, False)):
        grid = PlotGrid(stage)
        qtbot.addWidget(grid)
        grid.resize(1000, height)
        grid.show()
        qtbot.waitExposed(grid)
        grid.load_events([metrics(i, **{k.replace("/", "__"): float(i % 5) for c in grid._cells.values()
                                        for k in c.keys}) for i in range(1, 20)])
        grid.redraw()
        bar = grid.findChild(QScrollArea).verticalScrollBar()
        plot = next(iter(grid._cells.values())).widget
        box = plot.getPlotItem().getViewBox()
        before = box.viewRange()
        _wheel(plot.viewport())
        assert (bar.value() > 0) == scrolls                      # the page moved, or
        assert (box.viewRange() != before) == (not scrolls)      # the plot zoomed
        if scrolls:
            _wheel(plot.viewport(), Qt.ControlModifier)
            assert box.viewRange() != before
