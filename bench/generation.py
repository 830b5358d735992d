"""Generation speed with and without the KV cache, at batch 1 and 16, on CPU.

    python bench/generation.py [--preset small] [--new-tokens 256] [--batches 1 16] [--out docs/PERFORMANCE.md]

A randomly initialised model of the preset (vocabulary 4096: speed does not depend on what the
weights say), prompts of 12-20 tokens (so the batch is left-padded, as real prompts are), no
stop ids, so every row runs the full length. Tokens/s counts new tokens over all rows. The
context is raised to prompt + new tokens so the cached path is not cut at max_seq_len; RoPE
has no learned positions, so this changes no weight. Each cached measurement is the best of
`--repeats` runs (the machine may be shared); the uncached one runs once, it is the slow one.
Greedy cached and uncached outputs are compared as a correctness check.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import markdown_table, publish, torch_machine  # noqa: E402
from engine.generate import generate_batch  # noqa: E402
from engine.model import Transformer, config_from_preset  # noqa: E402

MARKER = "## Generation with and without the KV cache"


def timed(model, prompts, n, use_cache, seed=0) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = generate_batch(model, prompts, n, temperature=1.0, top_k=50, seed=seed, use_cache=use_cache)
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--no-cache-tokens", type=int, default=None,
                    help="new tokens for the uncached runs (default: --new-tokens); fewer if too slow")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: torch's choice); 1 is steadier on a shared machine")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = ap.parse_args()
    n_cache = args.new_tokens
    n_plain = args.no_cache_tokens or args.new_tokens

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(config_from_preset(args.preset, args.vocab_size,
                                           max_seq_len=20 + max(n_cache, n_plain, 16)))
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(6, args.vocab_size, (12 + (i * 5) % 9,), generator=g).tolist()
               for i in range(max(args.batches))]
    timed(model, prompts[:2], 8, True)  # warm-up: first-call allocations and kernel choices

    # Correctness before speed: greedy decoding must not depend on the cache.
    check = prompts[:4]
    same = (generate_batch(model, check, 16, temperature=0.0, use_cache=True)
            == generate_batch(model, check, 16, temperature=0.0, use_cache=False))
    print(f"greedy cached == uncached (4 left-padded rows x 16 tokens): {same}", flush=True)

    rows = []
    for b in args.batches:
        batch = prompts[:b]
        cached = min(timed(model, batch, n_cache, True)[0] for _ in range(args.repeats))
        plain = timed(model, batch, n_plain, False)[0]
        tps_c, tps_p = b * n_cache / cached, b * n_plain / plain
        rows.append((b, n_cache, f"{tps_c:,.0f}", n_plain, f"{tps_p:,.0f}", f"{tps_c / tps_p:.1f}x"))
        print(rows[-1], flush=True)

    header = ("batch", "new tokens (cache)", "tokens/s with cache", "new tokens (no cache)",
              "tokens/s without cache", "speed-up")
    table = markdown_table(header, rows)
    cfg = model.config
    machine = torch_machine()
    cmd = f"python bench/generation.py --new-tokens {n_cache}" + (
        f" --no-cache-tokens {n_plain}" if n_plain != n_cache else "") + (
        f" --threads {args.threads}" if args.threads else "")
    section = (f"{MARKER}\n\n"
               f"`{cmd}` on {machine}. Preset `{args.preset}` ({model.num_params():,} params, "
               f"d_model {cfg.d_model}, {cfg.n_layer} layers), random init, vocab {args.vocab_size}, "
               f"prompts of 12-20 tokens left-padded, temperature 1, top-k 50, fp32. Tokens/s counts "
               f"new tokens over all rows; the cached figure is the best of {args.repeats} runs. "
               f"Without the cache every step re-reads the whole sequence, so its cost per token grows "
               f"with the length generated; with it, each step runs the newest token only. "
               f"Greedy outputs with and without the cache are identical: {same}."
               + (" `--threads 1` keeps the figures steady when another job shares the CPU: "
                  "threads that spin-wait against it run several times slower." if args.threads == 1 else "")
               + "\n\n"
               f"{table}\n")
    publish(args.out, MARKER, section, table)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
