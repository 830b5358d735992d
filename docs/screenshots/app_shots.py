"""Screenshots of every page of the app, in a real window, for docs/img/.

    workbench pipeline --demo --project /tmp/shots-project      (a project with every stage run)
    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshots/app_shots.py /tmp/shots-project

Writes docs/img/app-<page>.png for every sidebar page (tokenizer, pretrain, sft, rank, reward,
ppo, dpo, grpo, chat, runs), with the tokenizer inspecting a sentence, the runs browser showing a run's
plots, and the chat having answered a question.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PySide6.QtCore import QSettings, QTimer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ui.app import make_app  # noqa: E402
from ui.main_window import SIDEBAR, MainWindow  # noqa: E402

OUT = ROOT / "docs" / "img"


def main() -> None:
    project = Path(sys.argv[1]).absolute()
    app = make_app()
    settings = QSettings(str(Path(tempfile.mkdtemp()) / "s.ini"), QSettings.Format.IniFormat)
    w = MainWindow(settings)
    w.resize(1440, 900)
    w.show()
    assert w.open_project(project)
    OUT.mkdir(parents=True, exist_ok=True)
    keys = [k for k, _ in SIDEBAR]

    def prepare(key: str) -> None:
        if key == "tokenizer":
            w.pages["tokenizer"].inspector.set_text(
                "Question: What is 12 + 7?\nAnswer: 19. The quick brown fox jumps over the lazy dog; naïve café 🙂")
        elif key == "runs":
            browser = w.runs_browser
            for row in range(browser.table.rowCount()):
                if browser.table.item(row, 1).text() == "pretrain":
                    browser.table.selectRow(row)
                    break
        elif key == "chat":
            w.chat.input.setPlainText("What is 3 + 4?")
            QTimer.singleShot(2500, w.chat.send)

    def shoot(i: int = 0) -> None:
        if i >= len(keys):
            w.close()
            app.quit()
            return
        w.go(keys[i])
        prepare(keys[i])
        delay = 6000 if keys[i] == "chat" else 1500

        def grab() -> None:
            w.grab().save(str(OUT / f"app-{keys[i]}.png"))
            shoot(i + 1)
        QTimer.singleShot(delay, grab)

    QTimer.singleShot(500, shoot)
    app.exec()


if __name__ == "__main__":
    main()
