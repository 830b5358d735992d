"""How much a verifiable-reward method could gain: greedy accuracy, sampled accuracy and pass@k
on held-out tasks, per kind, for one checkpoint.

    python bench/task_headroom.py --checkpoint RUN_OR_DIR --tasks PROJECT/data/eval_tasks.jsonl [--k 16]
    python bench/task_headroom.py --checkpoint SFT_RUN --checkpoint GRPO_RUN --tasks ...   (side by side)

GRPO (and any method that reinforces the answers a policy already samples) can make a sampled
right answer the policy's first choice; it cannot easily teach an answer the policy never
samples. So pass@k, the share of tasks with at least one right answer among k samples, is about
the ceiling of what it can reach on greedy accuracy, and "mean at T" (the expected accuracy of one
sample at the temperature it trains with) is what its updates raise first: a run whose sampled
accuracy rises while greedy accuracy stays put has sharpened the distribution toward the answer
greedy decoding already gave. Prints a table per checkpoint; writes nothing.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import markdown_table, torch_machine  # noqa: E402
from engine.artifacts import load_artifact  # noqa: E402
from engine.chat import reply_batch  # noqa: E402
from engine.generate import generate_batch  # noqa: E402
from engine.sft_data import read_tasks  # noqa: E402
from engine.tasks import check  # noqa: E402


def headroom(model, tok, tasks, k: int, temperature: float, max_new_tokens: int) -> dict:
    """{kind: [n, greedy right, expected sampled right, tasks with a right one of k]}"""
    greedy = [text for text, _ in reply_batch(model, tok, [t.prompt for t in tasks], max_new_tokens)]
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0, 0.0, 0])
    for i, t in enumerate(tasks):
        ids = tok.render_chat([{"role": "user", "content": t.prompt}], add_generation_prompt=True)[0]
        answers = generate_batch(model, [ids] * k, max_new_tokens, temperature=temperature,
                                 seed=[1000 * i + j for j in range(k)], stop_ids=tok.stop_ids, pad_id=tok.pad_id)
        right = [check(t, tok.decode([x for x in a if x not in tok.stop_ids], skip_special=True)) for a in answers]
        row = out[t.kind]
        row[0] += 1
        row[1] += check(t, greedy[i])
        row[2] += sum(right) / k
        row[3] += any(right)
    return dict(out)


def table(counts: dict, k: int, temperature: float) -> str:
    total = [sum(c[i] for c in counts.values()) for i in range(4)]
    rows = [(kind, c[0], f"{c[1] / c[0]:.1%}", f"{c[2] / c[0]:.1%}", f"{c[3] / c[0]:.1%}")
            for kind, c in sorted(counts.items())] + [("all", *(f"**{x / total[0]:.1%}**" for x in total[1:]))]
    rows[-1] = ("all", total[0], *rows[-1][1:])
    return markdown_table(("kind", "tasks", "greedy", f"mean at T {temperature:g}", f"pass@{k}"), rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True, help="a run folder or checkpoint (repeatable)")
    ap.add_argument("--tasks", required=True, help="held-out tasks, JSONL (the demo's data/eval_tasks.jsonl)")
    ap.add_argument("--limit", type=int, default=200, help="the first N tasks (0: all)")
    ap.add_argument("--k", type=int, default=16, help="samples per task")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = read_tasks(Path(args.tasks), args.limit)
    print(f"{len(tasks)} tasks of {args.tasks}, {args.k} samples each at temperature {args.temperature:g}; "
          f"{torch_machine()}\n")
    for where in args.checkpoint:
        art = load_artifact(Path(where), prefer="latest")
        model = art.model.eval()
        with torch.no_grad():
            counts = headroom(model, art.tokenizer, tasks, args.k, args.temperature, args.max_new_tokens)
        print(f"{art.checkpoint}\n\n{table(counts, args.k, args.temperature)}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
