"""Pretraining: next-token prediction on raw text.

    python -m engine.pretrain --run-dir DIR

reads DIR/config.json (`PretrainConfig`), encodes the corpus into DIR/data/ (once; reused on
resume), trains, and writes DIR/checkpoints/step-NNNNNN/, DIR/events.jsonl and, at the end,
DIR/summary.json. A run folder that already has checkpoints resumes from the newest one, and
the losses after the resume are exactly those of an uninterrupted run (on CPU).
"""
from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from engine import checkpoint as ckpt
from engine.config import ConfigError, require, resolve_path
from engine.corpus import list_corpus_files
from engine.data import TokenData, encode_corpus, shards_ready, unigram_baseline
from engine.device import autocast, describe, peak_flops, resolve_device, resolve_dtype, setup_backends
from engine.fsutil import atomic_write_text
from engine.generate import generate
from engine.model import (PRESETS, ModelConfig, Transformer, config_from_preset, safetensors_state,
                          with_tied_head)
from engine.runio import Emitter, NeverStop, Sink, StageError, stage_main
from engine.tokenizer import Tokenizer


@dataclass
class PretrainConfig:
    tokenizer: str                      # tokenizer.json, or the tokenizer run's folder
    inputs: list[str]                   # .txt / .jsonl files or folders
    preset: str = "tiny"                # model size: see engine.model.PRESETS
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's fields
    seq_len: int = 0                    # 0: the preset's max_seq_len
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1           # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0              # 0 disables clipping
    val_fraction: float = 0.05
    eval_every: int = 100
    eval_batches: int = 10
    sample_every: int = 200             # 0 disables samples
    sample_prompts: list[str] = field(default_factory=lambda: ["The ", "Question: What is 12 + 7?\nAnswer:"])
    sample_tokens: int = 48
    sample_temperature: float = 0.8
    checkpoint_every: int = 200
    keep_last: int = 2                  # newest checkpoints kept, besides the best by val loss
    log_every: int = 10
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"                 # auto (bf16 on CUDA, else fp32) | float32 | bfloat16
    compile: bool = False

    def validate(self) -> None:
        require(bool(self.tokenizer), "tokenizer", "a tokenizer path is required")
        require(len(self.inputs) > 0, "inputs", "at least one corpus file or folder is required")
        require(self.preset in PRESETS, "preset", f"unknown preset '{self.preset}' (known: {', '.join(PRESETS)})")
        known = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
        for key in self.model:
            require(key in known, f"model.{key}", f"unknown model setting (known: {', '.join(sorted(known))})")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches",
                     "checkpoint_every", "log_every", "sample_tokens"):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("seq_len", "warmup_steps", "sample_every", "keep_last"):
            require(getattr(self, name) >= 0, name, "must be zero or positive")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be between 0 and 1")
        require(self.weight_decay >= 0, "weight_decay", "must be zero or positive")
        require(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        require(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        require(self.grad_clip >= 0, "grad_clip", "must be zero or positive")
        require(0 < self.val_fraction < 0.5, "val_fraction", "must be between 0 and 0.5")
        require(self.sample_temperature >= 0, "sample_temperature", "must be zero or positive")
        require(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
                "auto, float32, bfloat16 or float16")

    def model_config(self, vocab_size: int) -> ModelConfig:
        overrides = dict(self.model)
        if self.seq_len:
            overrides["max_seq_len"] = max(self.seq_len, overrides.get("max_seq_len", 0))
        return config_from_preset(self.preset, vocab_size, **overrides)


# Settings that define what the run *is*: changing them on resume would silently train a
# different run under the old name, so it is refused. Others are warned about.
FIXED_ON_RESUME = ("tokenizer", "inputs", "preset", "model", "seq_len", "batch_size",
                   "grad_accum", "val_fraction", "seed")
WARN_ON_RESUME = ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip")


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps (`step` is 0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Norm gains are not decayed: shrinking them toward 0 fights the normalisation itself.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def rng_state(data_gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng(states: dict[str, torch.Tensor], data_gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    data_gen.set_state(states["data"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def check_resume(saved: dict, cfg: PretrainConfig, ev: Emitter) -> None:
    now = dataclasses.asdict(cfg)
    changed = [k for k in FIXED_ON_RESUME if saved.get(k) != now.get(k)]
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(changed[0], f"cannot change on resume ({detail}); start a new run instead")
    for k in WARN_ON_RESUME:
        if saved.get(k) != now.get(k):
            ev.log(f"'{k}' changed on resume: {saved.get(k)!r} -> {now.get(k)!r}; "
                   "the run is no longer an exact continuation", level="warning")


@torch.no_grad()
def evaluate(model, data: TokenData, cfg: PretrainConfig, seq_len: int, device, dtype) -> float:
    # The same windows at every evaluation, drawn from a generator of their own, so val curves
    # are comparable across steps and evaluating never shifts the training batches.
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model.eval()
    total = 0.0
    for _ in range(cfg.eval_batches):
        x, y = data.get_batch("val", cfg.batch_size, seq_len, gen)
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        total += float(loss)
    model.train()
    return total / cfg.eval_batches


def write_samples(model, tok: Tokenizer, cfg: PretrainConfig, step: int, ev: Emitter) -> None:
    for i, prompt in enumerate(cfg.sample_prompts):
        ids = [tok.bos_id] + tok.encode(prompt)
        out = generate(model, ids, cfg.sample_tokens, temperature=cfg.sample_temperature,
                       top_k=50, seed=cfg.seed + i, stop_ids=(tok.end_id, tok.bos_id))
        ev.emit("sample", step=step, prompt=prompt, text=tok.decode(out, skip_special=True))
    model.train()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(cfg: PretrainConfig, run_dir: Path, sink: Optional[Sink] = None, control=None) -> str:
    ev = Emitter(sink)
    control = control or NeverStop()
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    setup_backends(device)

    tok_path = resolve_path(run_dir, cfg.tokenizer)
    try:
        tok = Tokenizer.from_file(tok_path)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ConfigError("tokenizer", f"cannot load a tokenizer from {tok_path}: {e}") from None
    files = list_corpus_files([resolve_path(run_dir, p) for p in cfg.inputs])
    mcfg = cfg.model_config(tok.vocab_size)
    seq_len = cfg.seq_len or mcfg.max_seq_len

    data_dir = run_dir / "data"
    if not shards_ready(data_dir, tok, files, val_fraction=cfg.val_fraction, seed=cfg.seed):
        ev.log(f"encoding {len(files)} file(s) into {data_dir}")
        meta = encode_corpus(tok, files, data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                             control=control)
        if meta is None or control.should_stop():
            return "stopped"
    data = TokenData(data_dir)
    for split in ("train", "val"):
        if data.n_tokens(split) < seq_len + 1:
            raise StageError(f"the {split} split has {data.n_tokens(split)} tokens, fewer than "
                             f"seq_len + 1 = {seq_len + 1}: add text or lower seq_len")
    baseline = unigram_baseline(data)

    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg).to(device)
    opt = make_optimizer(model, cfg, device)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    ckpt_root = run_dir / "checkpoints"
    for p in ckpt.clean_partial(ckpt_root):
        ev.log(f"removed {p.name}, left by a save that was interrupted")

    step, tokens_seen, best_val, last_val = 0, 0, None, None
    latest = ckpt.latest_checkpoint(ckpt_root)
    if latest is not None:
        state = ckpt.load_checkpoint(latest)
        check_resume(state.state["config"], cfg, ev)
        model.load_state_dict(with_tied_head(mcfg, state.model))
        opt.load_state_dict(state.optimizer)
        restore_rng(state.rng, data_gen, device)
        step, tokens_seen = state.step, int(state.state["tokens_seen"])
        best_val, last_val = state.state.get("best_val_loss"), state.state.get("val_loss")
        ev.log(f"resumed from {latest.name}")
    if step >= cfg.max_steps:
        ev.log(f"already at step {step} of max_steps {cfg.max_steps}: nothing to do")
        return "completed"

    train_model = torch.compile(model) if cfg.compile else model
    flops, flops_source = peak_flops(device, dtype)
    flops_per_tok = model.flops_per_token(seq_len)
    ev.log(f"device {describe(device)}, {dtype}; model {cfg.preset}: {model.num_params():,} params, "
           f"vocab {mcfg.vocab_size}, seq {seq_len}; {data.n_tokens('train'):,} train / "
           f"{data.n_tokens('val'):,} val tokens; unigram baseline {baseline:.3f} nats; "
           f"MFU against {flops / 1e9:.1f} GFLOP/s ({flops_source})")
    ev.metrics(step, {"val/unigram_baseline": baseline})

    def save(reason: str) -> None:
        state = {"stage": "pretrain", "tokens_seen": tokens_seen, "val_loss": last_val,
                 "best_val_loss": best_val, "lr": lr_at(max(step - 1, 0), cfg), "reason": reason,
                 "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(mcfg),
                 "tokenizer_fingerprint": tok.fingerprint()}
        weights, weights_meta = safetensors_state(model)
        try:
            path = ckpt.save_checkpoint(
                ckpt_root, step, model=weights, optimizer=opt.state_dict(), state=state,
                rng=rng_state(data_gen, device), model_metadata=weights_meta,
                extra_files={"tokenizer.json": tok_path if tok_path.is_file() else tok_path / "tokenizer.json"})
        except ValueError as e:
            raise StageError(str(e)) from None
        removed = ckpt.prune(ckpt_root, cfg.keep_last)
        ev.emit("checkpoint", step=step, path=str(path.relative_to(run_dir)),
                best=last_val is not None and last_val == best_val, removed=[p.name for p in removed])

    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len
    model.train()
    t_start = t_last = time.perf_counter()
    steps_since, busy = 0, 0.0
    while step < cfg.max_steps:
        if control.should_stop():
            save("stop")
            return "stopped"
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            x, y = data.get_batch("train", cfg.batch_size, seq_len, data_gen)
            with autocast(device, dtype):
                _, loss = train_model(x.to(device), y.to(device))
            (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
        loss_value = loss_sum / cfg.grad_accum
        if not math.isfinite(loss_value):
            raise StageError(f"non-finite loss ({loss_value}) at step {step + 1}; stopped without "
                             f"saving it. Lower lr (now {lr:.3g}) or check the data, then resume "
                             "from the last checkpoint.")
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))
        if not math.isfinite(grad_norm):
            raise StageError(f"non-finite gradient norm at step {step + 1}; stopped before the update")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        steps_since += 1
        busy += time.perf_counter() - t0

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            tok_s = steps_since * tokens_per_step / max(busy, 1e-9)
            ev.metrics(step, {"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm,
                              "train/tokens": tokens_seen, "perf/tokens_per_s": round(tok_s, 1),
                              "perf/mfu": round(tok_s * flops_per_tok / flops, 4),
                              "perf/peak_rss_mb": round(peak_rss_mb(), 1)})
            # Wall time per step (evaluation and saving included) for the ETA; tokens/s counts
            # training time only, so it is comparable across eval settings.
            step_time = (now - t_last) / steps_since
            ev.progress(step, cfg.max_steps, round(tok_s, 1), now - t_start,
                        (cfg.max_steps - step) * step_time)
            t_last, steps_since, busy = now, 0, 0.0
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            last_val = evaluate(model, data, cfg, seq_len, device, dtype)
            best_val = last_val if best_val is None else min(best_val, last_val)
            ev.metrics(step, {"val/loss": last_val, "val/best_loss": best_val,
                              "val/unigram_baseline": baseline})
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.max_steps):
            write_samples(model, tok, cfg, step, ev)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            save("final" if step == cfg.max_steps else "periodic")

    summary = {"stage": "pretrain", "step": step, "tokens_seen": tokens_seen, "val_loss": last_val,
               "best_val_loss": best_val, "unigram_baseline": baseline,
               "params": model.num_params(), "peak_rss_mb": round(peak_rss_mb(), 1),
               "checkpoint": str(ckpt.resolve_checkpoint(ckpt_root).relative_to(run_dir))}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return "completed"


def main(argv: list[str] | None = None) -> int:
    return stage_main("pretrain", PretrainConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
