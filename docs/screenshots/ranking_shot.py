"""The ranking view and the agreement tab with demo-like content, for eyeballing in real windows.

    xvfb-run -a python3 docs/screenshots/ranking_shot.py [OUT_DIR] [--dark]

Makes a temporary project with a batch of demo task prompts (engine.tasks), each with K=4
answers of the kinds a small SFT model gives (right, right but padded, wrong, cut off), has
"ana" rank a dozen of them, then shows the session mid-ranking (an ordering half typed, a flag
and a score) and the agreement tab, with a second annotator, hidden repeats and a random tiny
reward model's disagreements. Writes ranking.png and agreement.png into OUT_DIR (default
docs/img); --dark uses a dark palette, to check the view follows it.
"""
from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from PySide6.QtCore import QEventLoop, Qt, QTimer  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from engine.tasks import check, generate_tasks, parse_task  # noqa: E402
from workbench import guidelines  # noqa: E402
from workbench.annotation import AnnotationSession  # noqa: E402
from workbench.store import Store  # noqa: E402

K = 4


def settle(ms: int = 300) -> None:
    """Run the event loop a while (not a processEvents() loop: see token_shot.py)."""
    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def wrong(answer: str, rng: random.Random) -> str:
    if answer.lstrip("-").isdigit():
        return str(int(answer) + rng.choice([-10, -1, 1, 2, 11]))
    if "," in answer:
        parts = answer.split(", ")
        rng.shuffle(parts)
        return ", ".join(parts)
    return answer[::-1] if len(answer) > 1 else chr(ord("a") + (ord(answer) - 96) % 26)


def demo_items(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for task in generate_tasks(n, seed):
        answers = [
            {"text": task.answer, "meta": {"finished": True, "n_tokens": 3}},
            {"text": f"The answer is {task.answer}.", "meta": {"finished": True, "n_tokens": 7}},
            {"text": wrong(task.answer, rng), "meta": {"finished": True, "n_tokens": 3}},
            {"text": f"Let me think. {task.prompt} The answer to this question is the number of "
                     f"the", "meta": {"finished": False, "n_tokens": 32}},
        ]
        rng.shuffle(answers)
        items.append({"prompt": task.prompt, "answers": answers})
    return items


def rank_like_a_person(session: AnnotationSession, n: int, rng: random.Random) -> None:
    """Correct first, then the shorter; now and then a tie or a slip."""
    for _ in range(n):
        cur = session.current()
        if cur is None:
            return
        task = parse_task(cur.prompt)
        order = sorted(cur.answers, key=lambda a: (not check(task, a.text), len(a.text)))
        if rng.random() < 0.15:
            order[1], order[2] = order[2], order[1]
        groups = [[a.number] for a in order]
        if rng.random() < 0.2:
            groups = [groups[0] + groups[1]] + groups[2:]
        session.submit(groups, duration_s=round(rng.uniform(4.0, 11.0), 1))


def tiny_reward_model(root: Path) -> Path:
    import torch

    from engine import checkpoint as ckpt
    from engine.model import ScalarModel, Transformer, config_from_preset
    from engine.weights import safetensors_state
    from engine.tokenizer import train_from_texts

    tok = train_from_texts([" ".join(t.prompt + " " + t.answer for t in generate_tasks(300, 1))],
                           vocab_size=400)
    tok.save(root / "tok.json")
    torch.manual_seed(0)
    lm = Transformer(config_from_preset("tiny", tok.vocab_size, d_model=32, n_layer=1, n_head=2,
                                        n_kv_head=2, d_ff=64, max_seq_len=96))
    weights, meta = safetensors_state(ScalarModel.from_lm(lm))
    run = root / "runs" / "reward-demo"
    ckpt.save_checkpoint(run / "checkpoints", 1, model=weights, model_metadata=meta,
                         state={"tokenizer_fingerprint": tok.fingerprint(), "stage": "reward"},
                         extra_files={"tokenizer.json": root / "tok.json"})
    return run


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = Path(args[0]) if args else ROOT / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication(sys.argv)
    if "--dark" in sys.argv:
        from docs.screenshots.token_shot import dark_palette
        app.setPalette(dark_palette())
    from ui.ranking_view import RankingView

    project = Path(tempfile.mkdtemp(prefix="ranking-shot-"))
    rng = random.Random(0)
    with Store.for_project(project) as store:
        batch = store.create_batch("sft-20261124 samples (K=4)", demo_items(40), k=K)
        rank_like_a_person(AnnotationSession(store, batch, "ana", seed=1, repeat_fraction=0.25), 12, rng)
        rank_like_a_person(AnnotationSession(store, batch, "bo", seed=2, repeat_fraction=0.25), 40, rng)
    for name in ("ana", "bo"):
        guidelines.mark_seen(project, name, batch)
    rm_run = tiny_reward_model(project)

    view = RankingView(project)
    view.resize(1200, 800)
    view.setWindowTitle("Ranking")
    view.show()
    settle()
    view.open_session(batch, "ana")
    settle()
    # Half-way through an item: the cut-off answer flagged, the best scored, two answers placed.
    task = parse_task(view.current.prompt)
    ranked = sorted(view.current.answers, key=lambda a: (not check(task, a.text),
                                                         a.text.startswith("Let"), len(a.text)))
    cut = next(a for a in view.current.answers if a.text.startswith("Let"))
    digit = {n: getattr(Qt, f"Key_{n}") for n in range(10)}
    for key in (Qt.Key_F, digit[cut.number], Qt.Key_I, Qt.Key_G, digit[ranked[0].number],
                Qt.Key_7, digit[ranked[0].number], digit[ranked[1].number]):
        QTest.keyClick(view, key)
    view._shown_at -= 6           # as if the annotator had been reading for a few seconds
    view._tick()
    settle()
    view.grab().save(str(out / "ranking.png"))

    view.tabs.setCurrentIndex(1)
    worker = view.agreement.score_with(rm_run)
    if worker is not None:
        worker.wait()
    settle(500)
    view.grab().save(str(out / "agreement.png"))
    view.close_store()
    print(f"wrote {out / 'ranking.png'} and {out / 'agreement.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
