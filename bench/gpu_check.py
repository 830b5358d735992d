"""The GPU path against the CPU: the first training steps' losses, each precision and option.

    python bench/gpu_check.py [--preset small] [--steps 8] [--out docs/PERFORMANCE.md]

One model (random init, fixed seed) and one fixed stream of batches train for `--steps` steps
in each configuration the trainer offers, through the trainer's own pieces (make_optimizer,
autocast, setup_backends): CPU fp32 is the reference, then CUDA fp32 with TF32 matmuls, CUDA
bf16 autocast (fused AdamW, flash SDPA), and the same compiled. Each row gives the largest
difference of a step's loss from the reference and the steady tokens/s. The attention backend is
checked by forcing flash SDPA on the training shape: if that raises, flash is not in use.

Without CUDA only the reference (and, with --compile-cpu, a compiled CPU run) is measured, so
the script can be tried anywhere; the GPU rows need a CUDA machine.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import markdown_table, publish  # noqa: E402
from engine.device import autocast, peak_flops, setup_backends  # noqa: E402
from engine.model import Transformer, config_from_preset  # noqa: E402
from engine.trainer import TrainConfig, make_optimizer  # noqa: E402

MARKER = "## The GPU path against CPU fp32"
# bf16 keeps 8 bits of mantissa: the first steps' losses agree to about 1e-2 with fp32.
TOLERANCE = {"float32": 2e-3, "bfloat16": 5e-2}


def train_losses(cfg, state, batches, device, dtype, compile_model=False):
    """(losses per step, tokens/s over the steps after the first two)."""
    model = Transformer(cfg)
    model.load_state_dict(state)
    model.to(device).train()
    opt = make_optimizer(model, TrainConfig(lr=1e-3), device)
    step_model = torch.compile(model) if compile_model else model
    losses, times = [], []
    for x, y in batches:
        t0 = time.perf_counter()
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            loss = step_model(x, y, loss_only=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))   # a sync, so the step's time is its own
        times.append(time.perf_counter() - t0)
    steady = times[2:] or times
    return losses, batches[0][0].numel() * len(steady) / sum(steady)


def flash_available(cfg, device, dtype, batch, seq) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(batch, cfg.n_head, seq, cfg.head_dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return "flash"
    except RuntimeError as e:
        return f"not flash ({str(e).splitlines()[0][:80]})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--compile-cpu", action="store_true", help="also a compiled CPU run (slow to build)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = config_from_preset(args.preset, args.vocab_size)
    seq = cfg.max_seq_len
    state = {k: v.clone() for k, v in Transformer(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps):
        xy = torch.randint(0, args.vocab_size, (args.batch_size, seq + 1), generator=g)
        batches.append((xy[:, :-1].contiguous(), xy[:, 1:].contiguous()))
    fpt = Transformer(cfg).flops_per_token(seq)

    runs = [("cpu", "float32", False)]
    if args.compile_cpu:
        runs.append(("cpu", "float32", True))
    if torch.cuda.is_available():
        runs += [("cuda", "float32", False), ("cuda", "bfloat16", False), ("cuda", "bfloat16", True)]
    ref, rows, ok = None, [], True
    for dev_name, dtype_name, comp in runs:
        device, dtype = torch.device(dev_name), getattr(torch, dtype_name)
        setup_backends(device)
        losses, tok_s = train_losses(cfg, state, batches, device, dtype, comp)
        ref = ref or losses
        diff = max(abs(a - b) for a, b in zip(losses, ref))
        within = diff <= TOLERANCE[dtype_name]
        ok &= within
        peak, how = peak_flops(device, dtype)
        attention = flash_available(cfg, device, dtype, args.batch_size, seq) if dtype != torch.float32 else "-"
        name = f"{dev_name} {dtype_name}" + (" + TF32" if dev_name == "cuda" and dtype_name == "float32" else "") \
            + (" compiled" if comp else "")
        rows.append((name, f"{losses[0]:.4f}", f"{losses[-1]:.4f}", f"{diff:.2e}", "yes" if within else "NO",
                     f"{tok_s:,.0f}", f"{tok_s * fpt / peak:.1%} of {peak / 1e12:.1f} TFLOP/s ({how})", attention))
        print(rows[-1], flush=True)
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()

    header = ("configuration", "loss step 1", f"loss step {args.steps}", "max loss diff from CPU fp32",
              "within tolerance", "tokens/s", "MFU", "attention")
    table = markdown_table(header, rows)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    section = (f"{MARKER}\n\n`python bench/gpu_check.py --preset {args.preset} --steps {args.steps}` on "
               f"{platform.machine()}, {gpu}, torch {torch.__version__}. Preset `{args.preset}` "
               f"({Transformer(cfg).num_params():,} params), batch {args.batch_size} x {seq}, the same "
               f"initial weights and batches in every row, AdamW (fused on CUDA), lr 1e-3. Tolerance: "
               f"{TOLERANCE['float32']} for fp32/TF32, {TOLERANCE['bfloat16']} for bf16.\n\n{table}\n")
    publish(args.out, MARKER, section, table)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
