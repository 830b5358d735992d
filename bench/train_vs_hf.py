"""Training throughput of our Transformer against Hugging Face's LlamaForCausalLM, same shape.

    python bench/train_vs_hf.py [--presets tiny mini small] [--batch-size 16] [--rounds 10]
                                [--device cpu|cuda] [--compile] [--threads N] [--out docs/PERFORMANCE.md]

Both models live in one process and start from the same weights (ours copied into HF's, the
names match one to one). Each runs the full step a training loop runs: forward with the loss,
backward, clip_grad_norm, AdamW step, zero_grad. Same batch, sequence length and precision.
Ours is what engine.trainer's step runs: the loss of `model(x, y, loss_only=True)` (the fused
head + cross-entropy of engine.fused_loss) and the optimizer of engine.trainer.make_optimizer.
HF's is what transformers' Trainer runs by default: its model's own loss function, given the
already shifted targets (`shift_labels`, so both average over the same positions and the initial
losses must agree), and torch's AdamW as the Trainer's default `optim` builds it (fused, as
`adamw_torch_fused`, where transformers defaults to that, as it does with torch >= 2.8).

After warm-up the two models alternate in rounds, the order flipped every round (A B, B A, ...),
so a slow patch of a shared machine lands on both. Tokens/s is the median over all timed steps.
MFU uses the same FLOPs per token for both (the shapes are identical) against, on CPU, the
dense-matmul ceiling measured in this run (the best of a measurement before and after the
rounds), on CUDA the datasheet bf16 peak. CPU runs fp32; CUDA runs bf16 autocast with TF32 on.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import publish  # noqa: E402
from engine.device import autocast, fused_adamw, measure_matmul_flops, peak_flops, setup_backends  # noqa: E402
from engine.hf_model import hf_config  # noqa: E402
from engine.model import Transformer, config_from_preset  # noqa: E402
from engine.trainer import TrainConfig, make_optimizer  # noqa: E402

MARKER = "## Training step against Hugging Face transformers"
LR, WEIGHT_DECAY = 3e-4, 0.1


def sync(device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: time them, not their launch
        torch.cuda.synchronize(device)


def build_pair(preset: str, vocab: int, seq_len: int, device):
    import transformers

    torch.manual_seed(0)
    ours = Transformer(config_from_preset(preset, vocab, max_seq_len=seq_len)).to(device)
    # sdpa is HF's fastest attention on CPU (eager materialises the score matrix) and is the one
    # our model uses too, so the comparison is about everything around attention.
    hf_cfg = transformers.LlamaConfig(**hf_config(ours.config), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_cfg).to(device)
    hf.load_state_dict(ours.state_dict(), strict=True)
    return ours, hf


def our_loss(model, x, y):
    return model(x, y, loss_only=True)   # as the pretrain and SFT stages' training steps


def hf_loss(model, x, y):
    return model(input_ids=x, labels=y, shift_labels=y).loss


def our_optimizer(model, device):
    return make_optimizer(model, TrainConfig(lr=LR, weight_decay=WEIGHT_DECAY), device)


def hf_default_optim() -> str:
    """The `optim` transformers' Trainer uses when none is given (it depends on the torch version)."""
    import transformers
    optim = transformers.TrainingArguments.__dataclass_fields__["optim"].default
    return str(getattr(optim, "value", optim))   # a plain string, or an OptimizerNames member


def hf_uses_fused() -> bool:
    return {"adamw_torch": False, "adamw_torch_fused": True}[hf_default_optim()]


def hf_optimizer(model):
    # As the Trainer's _get_adamw_torch builds it for adamw_torch / adamw_torch_fused.
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=hf_uses_fused())


class Trainer:
    """One model, its optimizer and its timed step (the seconds of each recorded step in `times`)."""

    def __init__(self, name, model, loss_fn, opt, device, dtype, compile_: bool):
        self.name, self.model, self.device, self.dtype = name, model, device, dtype
        self.loss_fn, self.opt = loss_fn, opt
        self.fwd = torch.compile(model) if compile_ else model
        model.train()
        self.times: list[float] = []

    def loss(self, x, y):
        with autocast(self.device, self.dtype):
            return self.loss_fn(self.fwd, x, y)

    def step(self, x, y, record: bool) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        loss = self.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - t0)


def run_preset(preset, args, device, dtype) -> dict:
    seq = args.seq_len or config_from_preset(preset, args.vocab_size).max_seq_len
    ours, hf = build_pair(preset, args.vocab_size, seq, device)
    g = torch.Generator().manual_seed(1)
    # A few distinct batches, shared by both models; the speed does not depend on the tokens.
    batches = []
    for _ in range(4):
        seqs = torch.randint(0, args.vocab_size, (args.batch_size, seq + 1), generator=g).to(device)
        batches.append((seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()))

    a = Trainer("ours", ours, our_loss, our_optimizer(ours, device), device, dtype, args.compile)
    b = Trainer("HF", hf, hf_loss, hf_optimizer(hf), device, dtype, args.compile)
    with torch.no_grad():  # correctness first: identical weights, identical loss
        l_ours, l_hf = (t.loss(*batches[0]).item() for t in (a, b))
    for t in (a, b):
        for i in range(args.warmup):
            t.step(*batches[i % len(batches)], record=False)
    k = 0
    for r in range(args.rounds):
        for t in ((a, b) if r % 2 == 0 else (b, a)):
            for _ in range(args.steps_per_round):
                t.step(*batches[k % len(batches)], record=True)
                k += 1
    fpt = ours.flops_per_token(seq)
    tok = args.batch_size * seq
    res = dict(preset=preset, seq=seq, params=ours.num_params(), fpt=fpt, loss_ours=l_ours, loss_hf=l_hf)
    for t in (a, b):
        res[t.name] = tok / statistics.median(t.times)
    print(f"{preset}: loss ours {l_ours:.6f} HF {l_hf:.6f} | tokens/s ours {res['ours']:,.0f} "
          f"HF {res['HF']:,.0f} ({res['ours'] / res['HF']:.2f}x)", flush=True)
    return res


def ceiling(device, dtype) -> tuple[float, str]:
    if device.type == "cuda":
        return peak_flops(device, dtype)
    return max(measure_matmul_flops(device, dtype, seconds=0.5) for _ in range(3)), "measured fp32 matmul ceiling"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "mini", "small"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=0, help="default: the preset's max_seq_len")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model (compiling takes the first two)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps-per-round", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="largest initial-loss difference accepted (fp32; bf16 gets 100x)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    setup_backends(device)  # TF32 matmuls on CUDA
    tol = args.tolerance * (1 if dtype == torch.float32 else 100)

    peak, how = ceiling(device, dtype)
    results = [run_preset(p, args, device, dtype) for p in args.presets]
    if device.type == "cpu":  # the ceiling is a best case: keep the better of the two readings
        peak = max(peak, ceiling(device, dtype)[0])

    header = ("preset", "params", "batch x seq", "initial loss ours / HF", "tokens/s ours",
              "tokens/s HF", "ours / HF", "MFU ours", "MFU HF")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ok = True
    for r in results:
        same = abs(r["loss_ours"] - r["loss_hf"]) <= tol
        ok &= same
        lines.append("| " + " | ".join([
            r["preset"], f"{r['params']:,}", f"{args.batch_size} x {r['seq']}",
            f"{r['loss_ours']:.5f} / {r['loss_hf']:.5f}" + ("" if same else " (MISMATCH)"),
            f"{r['ours']:,.0f}", f"{r['HF']:,.0f}", f"{r['ours'] / r['HF']:.2f}x",
            f"{r['ours'] * r['fpt'] / peak:.1%}", f"{r['HF'] * r['fpt'] / peak:.1%}"]) + " |")
    table = "\n".join(lines)

    import transformers

    n_thr = torch.get_num_threads()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"{platform.machine()}, {n_thr} torch thread{'s' * (n_thr != 1)}")
    machine = (f"{where}, torch {torch.__version__}, transformers {transformers.__version__}, "
               f"Python {platform.python_version()}")
    precision = "bf16 autocast, TF32 matmuls" if dtype == torch.bfloat16 else "fp32"
    cmd = ("python bench/train_vs_hf.py" + (f" --presets {' '.join(args.presets)}"
           if args.presets != ["tiny", "mini", "small"] else "")
           + (f" --device {args.device}" if args.device != "cpu" else "")
           + (" --compile" if args.compile else "") + (f" --threads {args.threads}" if args.threads else "")
           + (f" --rounds {args.rounds}" if args.rounds != 10 else "")
           + (f" --steps-per-round {args.steps_per_round}" if args.steps_per_round != 1 else "")
           + (f" --batch-size {args.batch_size}" if args.batch_size != 16 else "")
           + (f" --seq-len {args.seq_len}" if args.seq_len else ""))
    shapes = "; ".join(f"`{r['preset']}` d_model {c.d_model}, {c.n_layer} layers, {c.n_head} heads, d_ff {c.d_ff}"
                       for r in results for c in [config_from_preset(r["preset"], args.vocab_size)])
    section = (f"{MARKER}\n\n"
               f"`{cmd}` on {machine}. Our `engine.model.Transformer` against `transformers."
               f"LlamaForCausalLM` of identical shape ({shapes}; vocab {args.vocab_size}), HF with "
               f"`attn_implementation=\"sdpa\"`, our weights copied into HF's so both start identical. "
               f"Both run the full training step (forward with loss, backward, clip_grad_norm 1.0, "
               f"AdamW step, zero_grad) on the same batches (batch x seq in the table), {precision}"
               f"{', both torch.compile-d' if args.compile else ''}. Ours is engine.trainer's step: "
               f"the loss of `model(x, y, loss_only=True)` (engine.fused_loss: head and cross-entropy "
               f"fused, chunk by chunk of rows, never the whole logits tensor) and make_optimizer's "
               f"torch AdamW{' (fused)' if fused_adamw(device.type) else ''}. HF's is transformers' Trainer's "
               f"default: its model's own loss (labels with shift_labels) and its default optim, "
               f"`{hf_default_optim()}` (torch AdamW{' fused' if hf_uses_fused() else ''}). "
               f"After {args.warmup} warm-up steps each, {args.rounds} interleaved rounds of "
               f"{args.steps_per_round} step{'s' * (args.steps_per_round != 1)} per model, the order "
               f"flipped every round; tokens/s is the median step. MFU = tokens/s x "
               f"model.flops_per_token(seq) (6 x non-embedding params + attention, the same for both) "
               f"over the {how} ({peak / 1e9:,.0f} GFLOP/s). Initial losses agree within {tol:g}: {ok}.\n\n"
               f"{table}\n")
    publish(args.out, MARKER, section, table)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
