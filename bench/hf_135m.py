"""An imported 135M Llama (SmolLM2-135M's shape, random weights): one SFT step and generation,
ours against transformers on the same folder, in one run.

    python bench/hf_135m.py [--batch-size 4] [--seq-len 256] [--rounds 4] [--new-tokens 64]
                            [--lora-rank 16] [--threads N] [--out docs/PERFORMANCE.md]

A random `LlamaForCausalLM` of SmolLM2-135M's shape (576 wide, 30 layers, 9 heads, 3 KV heads,
1536 MLP, 49152 tokens, tied embeddings) is saved with `save_pretrained` and imported with
engine.hf_model, the path `workbench import-model` takes. Both models then run what a training
loop runs (forward with the loss, backward, clip, AdamW step) on the same batch, alternating in
rounds with the order flipped each round so a busy moment costs both; the median step is
reported. Full fine-tuning, and LoRA (rank --lora-rank on all seven projections, peft on both
sides) when engine.lora is present. Generation: greedy, batch 1, --new-tokens new tokens with a
KV cache, ours against `generate`, the tokens checked equal. fp32 on CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import publish  # noqa: E402
from engine.generate import generate_batch  # noqa: E402
from engine.hf_model import load_hf_model  # noqa: E402

MARKER = "## A 135M Hugging Face model: SFT step and generation against transformers"
SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
             tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(folder: Path):
    import transformers
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, attn_implementation="sdpa"))
    hf.save_pretrained(folder)
    ours = load_hf_model(folder)
    return ours, transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa")


def with_lora(ours, hf, rank: int):
    """Both models with the same LoRA layout (peft on both); None in a checkout with no engine.lora,
    so the script also measures an older commit."""
    try:
        from engine import lora
    except ImportError:
        return None
    import peft
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
    settings = lora.LoRASettings(lora_rank=rank, lora_alpha=2.0 * rank, lora_targets=list(LORA_TARGETS))
    return lora.add_adapters(ours, settings, seed=0), peft.get_peft_model(hf, cfg)


class Step:
    """One model's training step, timed."""

    def __init__(self, name, model, loss_fn):
        self.name, self.model, self.loss_fn = name, model, loss_fn
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0)
        self.times: list[float] = []

    def run(self, x, y, record=True) -> float:
        t0 = time.perf_counter()
        loss = self.loss_fn(self.model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if record:
            self.times.append(time.perf_counter() - t0)
        return loss.item()


def time_steps(pair, x, y, rounds: int) -> dict:
    a, b = pair
    for s in pair:
        s.run(x, y, record=False)                         # warm-up: allocator, AdamW state
    for r in range(rounds):
        for s in (pair if r % 2 == 0 else (b, a)):
            s.run(x, y)
    return {s.name: statistics.median(s.times) for s in pair}


def time_generation(ours, hf, new_tokens: int, repeats: int) -> tuple[float, float, bool]:
    ours.eval(), hf.eval()
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(3))
    best = {"ours": float("inf"), "HF": float("inf")}
    same = True
    for r in range(repeats):
        for name in (("ours", "HF") if r % 2 == 0 else ("HF", "ours")):
            t0 = time.perf_counter()
            with torch.no_grad():
                if name == "ours":
                    out = generate_batch(ours, [prompt[0].tolist()], new_tokens, temperature=0.0)[0]
                else:
                    gen = hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
                    theirs = gen[0, prompt.shape[1]:].tolist()
            best[name] = min(best[name], time.perf_counter() - t0)
        same = same and out == theirs
    return new_tokens / best["ours"], new_tokens / best["HF"], same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = build(Path(tmp) / "smollm2-135m-shape")
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, SHAPE["vocab_size"], (args.batch_size, args.seq_len + 1), generator=g)
    x, y = seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()
    with torch.no_grad():
        l_ours, l_hf = ours(x, y)[1].item(), hf(input_ids=x, labels=y, shift_labels=y).loss.item()
    print(f"{ours.num_params() / 1e6:.1f}M parameters; initial loss ours {l_ours:.5f} HF {l_hf:.5f}", flush=True)
    gen_ours, gen_hf, same = time_generation(ours, hf, args.new_tokens, args.repeats)
    print(f"generation: ours {gen_ours:.1f} tokens/s, HF {gen_hf:.1f} ({gen_ours / gen_hf:.2f}x), "
          f"greedy tokens {'identical' if same else 'DIFFER'}", flush=True)
    rows = []
    full = time_steps((Step("ours", ours, lambda m, a, b: m(a, b)[1]),
                       Step("HF", hf, lambda m, a, b: m(input_ids=a, labels=b, shift_labels=b).loss)), x, y,
                      args.rounds)
    rows.append(("full fine-tuning", full))
    print(f"full SFT step: ours {full['ours']:.2f} s, HF {full['HF']:.2f} s ({full['HF'] / full['ours']:.2f}x)",
          flush=True)
    lora = with_lora(ours, hf, args.lora_rank)
    if lora is not None:
        res = time_steps((Step("ours", lora[0], lambda m, a, b: m(a, b)[1]),
                          Step("HF", lora[1], lambda m, a, b: m(input_ids=a, labels=b, shift_labels=b).loss)),
                         x, y, args.rounds)
        rows.append((f"LoRA rank {args.lora_rank}", res))
        print(f"LoRA SFT step: ours {res['ours']:.2f} s, HF {res['HF']:.2f} s ({res['HF'] / res['ours']:.2f}x)",
              flush=True)
    tok = args.batch_size * args.seq_len
    table = "\n".join(["| what | ours | transformers | ours / transformers |", "|---|---|---|---|"]
                      + [f"| SFT step, {name} ({args.batch_size} x {args.seq_len} tokens) | "
                         f"{tok / r['ours']:,.0f} tokens/s | {tok / r['HF']:,.0f} tokens/s | {r['HF'] / r['ours']:.2f}x |"
                         for name, r in rows]
                      + [f"| generation, batch 1, greedy, {args.new_tokens} new tokens | {gen_ours:.1f} tokens/s | "
                         f"{gen_hf:.1f} tokens/s | {gen_ours / gen_hf:.2f}x |"])
    if args.out:
        section = (f"{MARKER}\n\n`python bench/hf_135m.py{' --threads ' + str(args.threads) if args.threads else ''}`"
                   f" ({torch.get_num_threads()} threads, fp32, CPU). A random model of SmolLM2-135M's shape "
                   f"({ours.num_params() / 1e6:.1f}M parameters) saved by transformers and imported; initial "
                   f"losses {l_ours:.5f} (ours) and {l_hf:.5f} (transformers); greedy tokens "
                   f"{'identical' if same else 'DIFFERENT'}.\n\n{table}\n")
        publish(args.out, MARKER, section, table)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
