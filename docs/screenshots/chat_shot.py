"""Screenshots of the chat and compare views: docs/img/chat.png and docs/img/compare.png.

    xvfb-run -a python3 docs/screenshots/chat_shot.py [--project DIR] [--out docs/img]

Without --project it makes the demo project in a temporary folder and trains what the views
need, on the CPU: a tokenizer, a short pretraining and a short SFT (a few minutes on 2 cores;
the models are small and undertrained, so their answers are often wrong, but they are real).
With --project it uses the newest pretrain and SFT runs already there.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from PySide6.QtCore import QEventLoop, QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

SIZE = (1200, 800)
CHAT = ["What is 12 + 7?", "Reverse the word 'kite'.", "Name the capital city of Portugal."]
COMPARE = "Spell 'honey' backwards."


def build_project(where: Path) -> Path:
    project = where / "demo"
    subprocess.run([sys.executable, "-m", "workbench.cli", "pipeline", "--demo", "--project",
                    str(project), "--scale", "tiny", "--until", "sft", "--steps", "300",
                    "--sft-steps", "200", "--eval-tasks", "20", "--device", "cpu"],
                   check=True, cwd=ROOT)
    return project


def newest_run(project: Path, stage: str) -> Path:
    runs = sorted(p for p in (project / "runs").glob(f"{stage}-*") if (p / "checkpoints").is_dir())
    if not runs:
        raise SystemExit(f"{project}: no {stage} run with checkpoints")
    return runs[-1]


def wait_for(signal, timeout_ms: int = 120_000) -> None:
    loop = QEventLoop()
    signal.connect(loop.quit)
    QTimer.singleShot(timeout_ms, loop.quit)
    loop.exec()


def settle(ms: int = 300) -> None:
    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def shoot(widget, path: Path) -> None:
    settle()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not widget.grab().save(str(path)):
        raise SystemExit(f"could not write {path}")
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, help="a project with pretrain and SFT runs")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = ap.parse_args()

    from engine.chat import SamplingSettings
    from ui.chat_view import ChatView
    from ui.compare_view import CompareView
    from workbench.model_cache import ModelCache

    with tempfile.TemporaryDirectory() as tmp:
        project = args.project or build_project(Path(tmp))
        pre, sft = newest_run(project, "pretrain"), newest_run(project, "sft")
        choices = [(f"{sft.name} (SFT)", sft), (f"{pre.name} (pretrained)", pre)]
        app = QApplication.instance() or QApplication(sys.argv)
        app.setApplicationName("Workbench")
        cache = ModelCache(device="cpu")

        chat = ChatView(project, lambda: choices, cache)
        chat.setWindowTitle("Workbench: chat")
        chat.resize(*SIZE)
        chat.system.setPlainText("You are a helpful assistant.")
        chat.sampling.set_settings(SamplingSettings(temperature=0.3, top_k=20, top_p=0.9,
                                                    max_new_tokens=48, repetition_penalty=1.1, seed=7))
        chat.show()
        wait_for(chat.modelLoaded)
        for text in CHAT:
            chat.input.setPlainText(text)
            chat.send()
            wait_for(chat.replyFinished)
        chat.input.setPlainText("And the capital of Turkey?")
        shoot(chat, args.out / "chat.png")
        chat.shutdown()
        chat.close()

        compare = CompareView(project, lambda: choices, cache)
        compare.setWindowTitle("Workbench: compare")
        compare.resize(*SIZE)
        compare.pickers[0].select_index(1)      # pretrained against SFT
        compare.pickers[1].select_index(0)
        compare.sampling.apply_preset("Precise")
        compare.sampling.max_new_tokens.setValue(48)
        compare.sampling.seed.setValue(7)
        compare.show()
        compare.input.setPlainText(COMPARE)
        compare.send()
        wait_for(compare.roundFinished)
        shoot(compare, args.out / "compare.png")
        compare.shutdown()
        compare.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
