"""Where a decoding step's time goes: the weight matmuls alone, against a whole generate step.

    python bench/decode_floor.py [--preset small] [--threads 1 2] [--out docs/PERFORMANCE.md]

One decoding step of a model reads every weight once: per layer the q/k/v, o, gate/up and down
projections, then the unembedding. This times exactly those matmuls (F.linear on the preset's
shapes, random weights, nothing else) for one new token per row, at batch 1 and 16, in fp32 and
in bf16, and beside them one step of `engine.generate.generate_batch` (greedy, 128 new tokens,
fp32) on the same preset. The matmuls are a floor no decoding loop in that dtype can go under;
the gap between the floor and the whole step is what less Python or a compiled step could win.
Best of 5 runs of 100 steps each.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import markdown_table, publish, torch_machine  # noqa: E402
from engine.generate import generate_batch  # noqa: E402
from engine.model import Transformer, config_from_preset  # noqa: E402

MARKER = "## Decoding: the weight-matmul floor"


def step_weights(cfg, dtype) -> list[torch.Tensor]:
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    qkv = (cfg.n_head + 2 * cfg.n_kv_head) * hd
    ws = []
    for _ in range(cfg.n_layer):
        ws += [torch.randn(qkv, d), torch.randn(d, cfg.n_head * hd), torch.randn(2 * f, d),
               torch.randn(d, f)]
    ws.append(torch.randn(cfg.vocab_size, d))
    return [w.to(dtype) for w in ws]


def best_ms(fn, n: int = 100, tries: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1000)
    return best


def matmul_floor_ms(cfg, batch: int, dtype) -> float:
    ws = step_weights(cfg, dtype)
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=dtype) for w in ws}

    def step():
        for w in ws:
            F.linear(xs[w.shape[1]], w)
    return best_ms(step)


def generate_step_ms(model, batch: int, new: int = 128) -> float:
    def run():
        generate_batch(model, [[5, 6, 7]] * batch, new, temperature=0)
    return best_ms(run, n=1, tries=3) / new


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cfg = config_from_preset(args.preset, args.vocab)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    mb = sum(w.numel() for w in step_weights(cfg, torch.float32)) * 4 / 2**20
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in (1, 16):
            fp32 = matmul_floor_ms(cfg, batch, torch.float32)
            bf16 = matmul_floor_ms(cfg, batch, torch.bfloat16)
            whole = generate_step_ms(model, batch)
            rows.append([threads, batch, f"{fp32:.2f} ms", f"{bf16:.2f} ms", f"{whole:.2f} ms",
                         f"{fp32 / whole:.0%}"])
    table = markdown_table(["threads", "batch", "matmuls fp32", "matmuls bf16",
                            "generate_batch step (fp32)", "floor share of the step"], rows)
    section = (f"{MARKER}\n\n`python bench/decode_floor.py --preset {args.preset}` on "
               f"{torch_machine()} (threads as in the table). Preset `{args.preset}` ({mb:.1f} MiB of fp32 weights read per "
               "step, vocab {0}). {1}\n\n{2}\n").format(
        args.vocab, " ".join(__doc__.split("\n\n")[2].split()), table)
    if args.out:
        publish(args.out, MARKER, section, table)
    else:
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
