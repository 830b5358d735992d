"""KV-cached generation speed of ours against Hugging Face's `generate`, same weights, same prompts.

    python bench/generation_vs_hf.py [--preset small] [--new-tokens 256] [--batches 1 16]
                                     [--repeats 3] [--threads N] [--out docs/PERFORMANCE.md]

Our `engine.generate.generate_batch` against `LlamaForCausalLM.generate` (its default dynamic KV
cache, sdpa attention) holding a copy of our randomly initialised weights. Prompts of 12-20
tokens, left-padded for HF with an attention_mask (ours pads and masks inside generate_batch).
No stop token on either side (HF's generation config is replaced by one with eos_token_id None),
so every row produces exactly --new-tokens tokens; that is checked. Tokens/s counts new tokens
over all rows.

Greedy decoding on both sides must give the same tokens: the correctness check, reported per
batch as identical rows (the exit status is 1 if a batch-1 row differs). Sampling (temperature 1,
top-k 50) is timed too; its draws come from different generators, so only its speed is compared.
Each figure is the best of --repeats runs, ours and HF alternating (order flipped every repeat)
so a busy moment on the machine costs both.
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
from engine.hf_model import hf_config  # noqa: E402
from engine.model import Transformer, config_from_preset  # noqa: E402

MARKER = "## Generation against Hugging Face transformers"
PAD = 0


def build_pair(preset: str, vocab: int, max_len: int):
    import transformers

    torch.manual_seed(0)
    ours = Transformer(config_from_preset(preset, vocab, max_seq_len=max_len)).eval()
    hf_cfg = transformers.LlamaConfig(**hf_config(ours.config), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    # Replace, not override per call: generate() treats a None it is passed as "use the model's
    # default", and LlamaConfig's default eos_token_id 2 would end rows early.
    hf.generation_config = transformers.GenerationConfig(pad_token_id=PAD, eos_token_id=None, bos_token_id=None)
    return ours, hf


def left_pad(prompts):
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (P - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def run_ours(model, prompts, n, greedy: bool):
    if greedy:
        return generate_batch(model, prompts, n, temperature=0.0, pad_id=PAD)
    return generate_batch(model, prompts, n, temperature=1.0, top_k=50, seed=0, pad_id=PAD)


def run_hf(model, prompts, n, greedy: bool):
    ids, mask = left_pad(prompts)
    sampling = {} if greedy else dict(top_k=50, temperature=1.0, top_p=1.0)
    if not greedy:
        torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=not greedy, use_cache=True,
                         **sampling)
    return out[:, ids.shape[1]:].tolist()


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-sampling", action="store_true", help="time greedy decoding only")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: torch's choice); 1 is steadier on a shared machine")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = ap.parse_args()
    n = args.new_tokens

    if args.threads:
        torch.set_num_threads(args.threads)
    # The context is raised to prompt + new tokens so no row stops at max_seq_len; RoPE has no
    # learned positions, so this changes no weight.
    ours, hf = build_pair(args.preset, args.vocab_size, 20 + max(n, 16))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(6, args.vocab_size, (12 + (i * 5) % 9,), generator=g).tolist()
               for i in range(max(args.batches))]
    for greedy in (True, False):  # warm-up: first-call allocations, kernel choices, HF's lazy setup
        run_ours(ours, prompts[:2], 8, greedy)
        run_hf(hf, prompts[:2], 8, greedy)

    modes = [True] if args.no_sampling else [True, False]
    rows, all_same = [], True
    for b in args.batches:
        batch = prompts[:b]
        for greedy in modes:
            best = {"ours": float("inf"), "HF": float("inf")}
            outs = {}
            for r in range(args.repeats):
                order = [("ours", run_ours, ours), ("HF", run_hf, hf)]
                for name, fn, model in (order if r % 2 == 0 else order[::-1]):
                    dt, outs[name] = timed(fn, model, batch, n, greedy)
                    best[name] = min(best[name], dt)
            for name, out in outs.items():
                lens = {len(o) for o in out}
                if lens != {n}:
                    raise SystemExit(f"{name} produced {sorted(lens)} new tokens per row, not {n}")
            same_rows = sum(a == h for a, h in zip(outs["ours"], outs["HF"])) if greedy else None
            if greedy and b == 1:  # batched rows may flip a near-tie on float rounding; one row must not
                all_same &= same_rows == b
            tps = {k: b * n / v for k, v in best.items()}
            rows.append((b, "greedy" if greedy else "top-k 50, T 1", f"{tps['ours']:,.0f}", f"{tps['HF']:,.0f}",
                         f"{tps['ours'] / tps['HF']:.2f}x", f"{same_rows}/{b}" if greedy else "n/a"))
            print(rows[-1], flush=True)

    import transformers

    header = ("batch", "decoding", "tokens/s ours", "tokens/s HF", "ours / HF", "identical rows")
    table = markdown_table(header, rows)
    cfg = ours.config
    machine = torch_machine(f"transformers {transformers.__version__}")
    cmd = (f"python bench/generation_vs_hf.py --new-tokens {n}" + (f" --preset {args.preset}"
           if args.preset != "small" else "") + (f" --threads {args.threads}" if args.threads else "")
           + (f" --repeats {args.repeats}" if args.repeats != 3 else ""))
    section = (f"{MARKER}\n\n"
               f"`{cmd}` on {machine}. Preset `{args.preset}` ({ours.num_params():,} params, d_model "
               f"{cfg.d_model}, {cfg.n_layer} layers, {cfg.n_head} heads), random init, vocab "
               f"{args.vocab_size}, fp32, the same weights in both. Ours is `engine.generate.generate_batch` "
               f"with its preallocated KV cache; HF is `LlamaForCausalLM.generate` with its default dynamic "
               f"cache and `attn_implementation=\"sdpa\"`. Prompts of 12-20 tokens, left-padded (HF gets the "
               f"attention_mask), {n} new tokens per row with no stop token on either side. Tokens/s counts "
               f"new tokens over all rows, best of {args.repeats} runs, ours and HF alternating. Identical "
               f"rows: greedy outputs of ours equal to HF's, token for token; sampling draws from different "
               f"generators, so only its speed is compared.\n\n"
               f"{table}\n")
    publish(args.out, MARKER, section, table)
    return 0 if all_same else 1


if __name__ == "__main__":
    raise SystemExit(main())
