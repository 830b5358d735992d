"""The fused head + cross-entropy against the plain one, by chunk size: why CHUNK_BYTES is what it is.

    python bench/fused_loss_chunks.py [--threads 1] [--out docs/PERFORMANCE.md]

Times loss + backward of the LM head alone (h @ W.T, cross-entropy, gradients of h and W) for
the shapes of the presets' training steps, plain (`F.cross_entropy(F.linear(h, W))`, what
transformers computes) and fused (engine.fused_loss.linear_cross_entropy) with chunks of
64 KiB to 8 MiB of fp32 logits, and with the default chunk (CHUNK_BYTES, at least MIN_ROWS rows).
Median of 15 runs after 3 warm-up ones; the table gives ms and, fused, the speed-up over plain.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import markdown_table, publish, torch_machine  # noqa: E402
from engine import fused_loss  # noqa: E402

MARKER = "## The fused head + cross-entropy, by chunk size"
SHAPES = ((4096, 64, 2048, "tiny, 16 x 128"), (4096, 128, 2048, "mini, 16 x 128"),
          (4096, 256, 4096, "small, 16 x 256"), (32000, 256, 1024, "vocab 32000, 8 x 128"))
CHUNKS_KIB = (64, 256, 1024, 2048, 4096, 8192)


def median_ms(fn, reps: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def step(loss_fn, h, w):
    def run():
        loss_fn().backward()
        h.grad = w.grad = None
    return run


def measure(vocab: int, d: int, n: int) -> tuple[float, list[float], float]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g)
    plain = median_ms(step(lambda: F.cross_entropy(F.linear(h, w).float(), t), h, w))
    fused = [median_ms(step(lambda: fused_loss.linear_cross_entropy(h, w, t, chunk_rows=max(1, kib * 1024 // (4 * vocab))),
                            h, w)) for kib in CHUNKS_KIB]
    default = median_ms(step(lambda: fused_loss.linear_cross_entropy(h, w, t), h, w))
    return plain, fused, default


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for vocab, d, n, what in SHAPES:
        plain, fused, default = measure(vocab, d, n)
        cells = [f"{ms:.1f} ({plain / ms:.2f}x)" for ms in fused]
        rows.append((what, f"{n} x {d}", vocab, f"{plain:.1f}", *cells, f"{default:.1f} ({plain / default:.2f}x)"))
        print(rows[-1], flush=True)
    header = ("shape", "rows x d_model", "vocab", "plain ms",
              *(f"{k // 1024} MiB" if k >= 1024 else f"{k} KiB" for k in CHUNKS_KIB), "default chunk")
    table = markdown_table(header, rows)
    section = (f"{MARKER}\n\n`python bench/fused_loss_chunks.py --threads {args.threads}` on {torch_machine()}. "
               f"Loss and backward of the LM head alone (logits h @ W.T, cross-entropy, the gradients of h and "
               f"W), fp32, all targets valid. Plain is F.cross_entropy(F.linear(h, W)), what transformers "
               f"computes; fused is engine.fused_loss.linear_cross_entropy with chunks of the named size of fp32 "
               f"logits (rows = size / (4 x vocab)), and its default (CHUNK_BYTES = "
               f"{fused_loss.CHUNK_BYTES >> 20} MiB, at least {fused_loss.MIN_ROWS} rows). Median of 15 runs "
               f"after 3 warm-up ones; in brackets the speed-up over plain.\n\n{table}\n")
    publish(args.out, MARKER, section, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
