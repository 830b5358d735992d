"""Preview of the live plots and the icons, for eyeballing the look in a real window.

    xvfb-run -a python3 docs/screenshots/plots_shot.py [OUT_DIR]
    QT_QPA_PLATFORM=offscreen python3 docs/screenshots/plots_shot.py [OUT_DIR]

(the second where Qt's xcb plugin lacks its system libraries, e.g. libxcb-icccm4 and
libxcb-cursor0; grab() renders the same either way).

Fills PlotGrid("pretrain") and PlotGrid("ppo") with synthetic curves shaped like real runs
(warmup and cosine LR, a loss that falls towards a floor, PPO's score rising as KL grows),
renders pretrain again under a dark palette and as the runs browser's overlay of three runs,
and draws every icon at 32 and 64 px on light and dark backgrounds. Writes plots_pretrain.png,
plots_ppo.png, plots_pretrain_dark.png, plots_overlay.png and icons.png into OUT_DIR
(default /tmp).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from PySide6.QtCore import QEvent, QRect, Qt  # noqa: E402
from PySide6.QtGui import QColor, QFont, QImage, QPainter, QPalette  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from ui import icons  # noqa: E402
from ui.main_window import SIDEBAR  # noqa: E402
from ui.plots import PlotGrid, RunHistory  # noqa: E402


def pretrain_events(steps: int = 3000, log_every: int = 10, eval_every: int = 250, seed: int = 0,
                    lr_max: float = 1e-3) -> list[dict]:
    rng = np.random.default_rng(seed)
    warmup, speed = 100, (lr_max / 1e-3) ** 0.5     # a larger lr learns faster, to a point
    events = [{"type": "metrics", "step": 0, "val/unigram_baseline": 6.4}]
    tokens = 0
    for step in range(log_every, steps + 1, log_every):
        lr = lr_max * step / warmup if step < warmup else \
            lr_max * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))))
        loss = 1.9 + 8.9 * math.exp(-step * speed / 120) + 1.4 * math.exp(-step * speed / 900) \
            + rng.normal(0, 0.05)
        tokens += log_every * 16 * 256
        events.append({"type": "metrics", "step": step, "train/loss": loss, "train/lr": lr,
                       "train/grad_norm": 0.35 + 2.5 * math.exp(-step / 200) + abs(rng.normal(0, 0.08)),
                       "train/tokens": tokens, "perf/tokens_per_s": 41000 + rng.normal(0, 1500),
                       "perf/mfu": 0.21 + rng.normal(0, 0.008), "perf/peak_rss_mb": 1800 + step / 20})
        if step % eval_every == 0:
            events.append({"type": "metrics", "step": step, "val/loss": loss + 0.08 + step / 40000,
                           "val/best_loss": loss + 0.08})
    return events


def ppo_events(steps: int = 300) -> list[dict]:
    rng = np.random.default_rng(1)
    events, beta = [], 0.05
    for step in range(1, steps + 1):
        t = step / steps
        kl = 4.0 * t ** 1.3 + abs(rng.normal(0, 0.2))
        score = -0.6 + 1.9 * (1 - math.exp(-3 * t)) + rng.normal(0, 0.12)
        beta *= 1 + 0.02 * (kl - 2.0) / 2.0 / 10
        q = sorted(score + rng.normal(0, 0.8, 3))
        events.append({
            "type": "metrics", "step": step, "objective/kl": kl, "objective/kl_coef": beta,
            "objective/entropy": 2.6 - 1.1 * t + rng.normal(0, 0.05),
            "objective/score": score, "objective/score_raw": 0.3 + score * 0.7,
            "objective/rlhf_reward": score - beta * kl,
            "policy/clipfrac": 0.04 + 0.1 * t + abs(rng.normal(0, 0.02)),
            "policy/approxkl": 0.002 + 0.01 * t + abs(rng.normal(0, 0.002)),
            "loss/policy": rng.normal(-0.01, 0.02), "loss/value": 0.8 * math.exp(-4 * t) + 0.05 + abs(rng.normal(0, 0.03)),
            "value/clipfrac": 0.2 * math.exp(-3 * t) + abs(rng.normal(0, 0.02)),
            "val/ratio": 1 + rng.normal(0, 0.01), "val/ratio_first": 1.0,
            "rollout/length": 20 - 7 * t + rng.normal(0, 0.8),
            "rollout/eos_fraction": min(1.0, 0.55 + 0.45 * t + rng.normal(0, 0.03)),
            "score/std": 0.9, "score/min": q[0] - 1, "score/max": q[2] + 1,
            "score/p10": q[0], "score/p50": q[1], "score/p90": q[2],
            "time/generation_s": 0.8, "time/scoring_s": 0.2, "time/step_s": 1.6})
    return events


def dark_palette() -> QPalette:
    p = QPalette()
    for role, color in ((QPalette.Window, "#202124"), (QPalette.WindowText, "#e8eaed"),
                        (QPalette.Base, "#17181a"), (QPalette.Text, "#e8eaed"),
                        (QPalette.Button, "#2d2e31"), (QPalette.ButtonText, "#e8eaed")):
        p.setColor(role, QColor(color))
    return p


def shoot(grid: PlotGrid, path: Path, app: QApplication, other: str | None = None) -> None:
    grid.resize(1280, 900 if len(grid.titles()) > 9 else 640)
    grid.show()
    app.processEvents()
    grid.redraw()
    if other:
        grid.show_other(other)      # the choices exist once the first redraw has seen the keys
        grid.redraw()
    for _ in range(5):
        app.processEvents()
    grid.grab().save(str(path))
    print("wrote", path)


def icon_sheet(path: Path) -> None:
    rows = [(n, None) for n, _title in SIDEBAR] + [(n, "status") for n in icons.STATUS] + [("app", "app")]
    cell, label_w = 84, 90
    img = QImage(label_w + 4 * cell, 24 + len(rows) * cell, QImage.Format_ARGB32)
    backgrounds = [("#ffffff", "#1f1f1f"), ("#1e1f22", "#e8eaed")]
    p = QPainter(img)
    p.fillRect(img.rect(), QColor("#ffffff"))
    for half, (bg, _fg) in enumerate(backgrounds):
        p.fillRect(QRect(label_w + half * 2 * cell, 0, 2 * cell, img.height()), QColor(bg))
    p.setFont(QFont("Sans", 9))
    for r, (name, kind) in enumerate(rows):
        y = 24 + r * cell
        p.setPen(QColor("#333333"))
        p.drawText(QRect(4, y, label_w - 8, cell), Qt.AlignVCenter, name)
        for half, (_bg, fg) in enumerate(backgrounds):
            faint = QColor(fg)
            faint.setAlphaF(0.55)       # what status_icon gives idle under this background's palette
            ic = (icons.app_icon() if kind == "app"
                  else icons.status_icon(name, faint if name == "idle" else None) if kind == "status"
                  else icons.icon(name, QColor(fg)))
            for k, size in enumerate((32, 64)):
                x = label_w + half * 2 * cell + k * cell + (cell - size) // 2
                p.drawPixmap(x, y + (cell - size) // 2, ic.pixmap(size, size))
    p.end()
    img.save(str(path))
    print("wrote", path)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp")
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setStyle("Fusion")
    pre = PlotGrid("pretrain")
    pre.load_events(pretrain_events())
    shoot(pre, out / "plots_pretrain.png", app)
    ppo = PlotGrid("ppo")
    for ev in ppo_events():
        ppo.add_event(ev)
    shoot(ppo, out / "plots_ppo.png", app, other="time/*")
    app.setPalette(dark_palette())
    dark = PlotGrid("pretrain")
    dark.load_events(pretrain_events())
    dark.set_x_axis("tokens")
    shoot(dark, out / "plots_pretrain_dark.png", app)
    runs = PlotGrid("pretrain")
    runs.set_overlay([(f"lr {lr:g}", RunHistory.from_events(pretrain_events(seed=i, lr_max=lr)))
                      for i, lr in enumerate((3e-4, 1e-3, 3e-3))])
    shoot(runs, out / "plots_overlay.png", app)
    icon_sheet(out / "icons.png")
    # Widgets must go before the QApplication does; left to interpreter exit, the order is
    # arbitrary and Qt may crash on the way out.
    for grid in (pre, ppo, dark, runs):
        grid.close()
        grid.deleteLater()
    app.sendPostedEvents(None, QEvent.DeferredDelete)


if __name__ == "__main__":
    main()
