"""The token inspector and the data preview with real content, for eyeballing in real windows.

    xvfb-run -a python3 docs/screenshots/token_shot.py [OUT_DIR]

Writes the tiny demo project into a temporary folder, trains its tokenizer with the tokenizer
stage itself (so the run folder has the stage's figures), then shows the inspector on a mixed
text, the SFT preview of the demo data, the same two under a dark palette, then (still dark) a
file with bad lines, the chat template view and the corpus preview. Writes token_view.png,
data_preview.png, token_view_dark.png, data_preview_dark.png, data_preview_errors.png,
token_view_chat.png and data_preview_pretrain.png into OUT_DIR (default /tmp).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from PySide6.QtCore import QEventLoop, QTimer  # noqa: E402
from PySide6.QtGui import QPalette  # noqa: E402
from PySide6.QtWidgets import QApplication, QWidget  # noqa: E402

from engine.runio import EventLog  # noqa: E402
from engine.tokenizer import TokenizerConfig, run  # noqa: E402
from ui.data_preview import DataPreview  # noqa: E402
from ui.token_view import TokenInspector  # noqa: E402
from workbench.demo import FILES, write_demo_project  # noqa: E402

SAMPLE = """The tokenizer splits text into pieces the model sees as numbers.
def add(a, b):
    return a + b   # code tokenizes differently from prose
Zürich, 東京, naïve café 🙂 — rare characters fall back to bytes."""

BAD_SFT = ('{"prompt": "What is 2 + 3?", "response": "5"}\n'
           '{"prompt": "Reverse the word cat."}\n'
           '{"instruction": "Sort 3, 1, 2.", "output": 123}\n'
           'this line is not JSON\n'
           '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}\n')


def dark_palette() -> QPalette:
    p = QPalette()
    for role, color in ((QPalette.Window, "#202124"), (QPalette.WindowText, "#e8eaed"),
                        (QPalette.Base, "#17181a"), (QPalette.AlternateBase, "#202124"),
                        (QPalette.Text, "#e8eaed"), (QPalette.Button, "#2d2e31"),
                        (QPalette.ButtonText, "#e8eaed"), (QPalette.ToolTipBase, "#2d2e31"),
                        (QPalette.ToolTipText, "#e8eaed"), (QPalette.PlaceholderText, "#80868b")):
        p.setColor(role, color)
    return p


def settle(ms: int = 200) -> None:
    """Run the event loop a while. Not a processEvents() loop: PySide6 6.12's processEvents
    drops a reference to None on every call, and a busy loop soon crashes the interpreter."""
    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def shoot(widget: QWidget, path: Path) -> None:
    widget.resize(1000, 700)
    widget.show()
    settle()
    widget.grab().save(str(path))
    print(f"wrote {path}")


def preview_sft(paths: list[Path], tokenizer: Path | None) -> DataPreview:
    w = DataPreview()
    w.setWindowTitle("SFT data")
    w.set_seq_len(128)
    loop = QEventLoop()
    w.validated.connect(loop.quit)
    w.show_sft(paths, tokenizer)
    loop.exec()
    w.wait()
    return w


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp")
    tmp = Path(tempfile.mkdtemp(prefix="token_shot_"))
    project = tmp / "demo"
    write_demo_project(project, scale="tiny")
    tok_run = tmp / "tokenizer-run"
    tok_run.mkdir()
    log = EventLog(tok_run)
    corpus = [str(project / FILES["docs"]), str(project / FILES["tasks"])]
    run(TokenizerConfig(inputs=corpus, vocab_size=2048, holdout_fraction=0.05), tok_run, log)
    log.close()
    sft = project / FILES["sft"]
    bad = tmp / "bad_sft.jsonl"
    bad.write_text(BAD_SFT, encoding="utf-8")

    app = QApplication.instance() or QApplication([])
    app.setStyle("Fusion")
    keep = []
    for suffix in ("", "_dark"):
        if suffix:
            app.setPalette(dark_palette())
        inspector = TokenInspector()
        inspector.setWindowTitle("Tokenizer")
        inspector.set_tokenizer(tok_run)
        inspector.set_text(SAMPLE)
        shoot(inspector, out / f"token_view{suffix}.png")
        preview = preview_sft([sft], tok_run)
        shoot(preview, out / f"data_preview{suffix}.png")
        keep += [inspector, preview]
    errors = preview_sft([bad], tok_run)
    shoot(errors, out / "data_preview_errors.png")
    chat = TokenInspector()
    chat.set_tokenizer(tok_run)
    chat.set_text("Sort these numbers: 3, 1, 2.\nThen say <|end|> out loud.")
    chat.chat_box.setChecked(True)
    shoot(chat, out / "token_view_chat.png")
    corpus_view = DataPreview()
    loop = QEventLoop()
    corpus_view.validated.connect(loop.quit)
    corpus_view.show_pretrain([project / "data" / "corpus"])
    loop.exec()
    shoot(corpus_view, out / "data_preview_pretrain.png")
    for w in keep + [errors, chat, corpus_view]:
        w.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
