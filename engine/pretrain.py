"""Pretraining: next-token prediction on raw text.

    python -m engine.pretrain --run-dir DIR

reads DIR/config.json (`PretrainConfig`), encodes the corpus into DIR/data/ (once; reused on
resume), trains through engine.trainer, and writes DIR/checkpoints/step-NNNNNN/,
DIR/events.jsonl and, at the end, DIR/summary.json. A run folder that already has checkpoints
resumes from the newest one, and the losses after the resume are exactly those of an
uninterrupted run (on CPU).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from engine import distributed
from engine.config import ConfigError, require, resolve_path
from engine.corpus import config_corpus_files
from engine.data import TokenData, encode_corpus, shards_ready, unigram_baseline
from engine.device import describe, setup
from engine.generate import generate
from engine.model import PRESETS, ModelConfig, Transformer, config_from_preset
from engine.runio import Emitter, NeverStop, Sink, StageError, stage_main, write_summary
from engine.tokenizer import Tokenizer
from engine.trackers import TrackerSettings
from engine.trainer import Stage, TrainConfig, check_resume_preflight, run_summary, train, trained_fixed

SAMPLE_PROMPTS = ["The ", "Question: What is 12 + 7?\nAnswer:"]


@dataclass(kw_only=True)
class PretrainConfig(TrainConfig, TrackerSettings):
    tokenizer: str                      # tokenizer.json, or the tokenizer run's folder
    inputs: list[str]                   # .txt / .jsonl files or folders
    preset: str = "tiny"                # model size: see engine.model.PRESETS
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's fields
    seq_len: int = 0                    # 0: the preset's max_seq_len
    val_fraction: float = 0.05          # share of the corpus held out for validation
    eval_batches: int = 10              # batches of batch_size windows per validation
    sample_prompts: list[str] = field(default_factory=SAMPLE_PROMPTS.copy)  # prompts continued at each sample step
    sample_tokens: int = 48             # tokens generated per sample
    sample_temperature: float = 0.8     # temperature of the samples (0: greedy)

    def validate(self) -> None:
        self.validate_training()
        self.validate_trackers()
        require(bool(self.tokenizer), "tokenizer", "a tokenizer path is required")
        require(len(self.inputs) > 0, "inputs", "at least one corpus file or folder is required")
        require(self.preset in PRESETS, "preset", f"unknown preset '{self.preset}' (known: {', '.join(PRESETS)})")
        known = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
        for key in self.model:
            require(key in known, f"model.{key}", f"unknown model setting (known: {', '.join(sorted(known))})")
        require(self.seq_len >= 0, "seq_len", "must be zero or positive")
        require(self.eval_batches > 0, "eval_batches", "must be a positive integer")
        require(self.sample_tokens > 0, "sample_tokens", "must be a positive integer")
        require(0 < self.val_fraction < 0.5, "val_fraction", "must be between 0 and 0.5")
        require(self.sample_temperature >= 0, "sample_temperature", "must be zero or positive")

    def model_config(self, vocab_size: int) -> ModelConfig:
        return pretrain_model_config(self.preset, self.model, self.seq_len, vocab_size)


def pretrain_model_config(preset: str, model: dict, seq_len: int, vocab_size: int) -> ModelConfig:
    """The model a pretraining of these settings builds: the preset, its overrides, and a
    seq_len above the preset's context raising the context to it (the memory plan asks too,
    of a form whose other settings may not be valid yet)."""
    overrides = dict(model or {})
    if seq_len:
        overrides["max_seq_len"] = max(seq_len, overrides.get("max_seq_len", 0))
    return config_from_preset(preset, vocab_size, **overrides)


FIXED_ON_RESUME = ("tokenizer", "inputs", "preset", "model", "seq_len", "val_fraction")


def load_tokenizer(run_dir: Path, path: str) -> tuple[Tokenizer, Path]:
    tok_path = resolve_path(run_dir, path)
    if tok_path.is_dir():
        tok_path = tok_path / "tokenizer.json"
    try:
        return Tokenizer.from_file(tok_path), tok_path
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ConfigError("tokenizer", f"cannot load a tokenizer from {tok_path}: {e}") from None


def preflight(cfg: PretrainConfig, run_dir: Path) -> None:
    """What would end a run of `cfg` at once, found before it starts (see engine.sft)."""
    check_resume_preflight(run_dir, cfg, trained_fixed(FIXED_ON_RESUME))


def run(cfg: PretrainConfig, run_dir: Path, sink: Optional[Sink] = None, control=None) -> str:
    ev = Emitter(sink)
    control = control or NeverStop()
    run_dir = Path(run_dir)
    device, dtype = setup(cfg.device, cfg.dtype)

    tok, tok_path = load_tokenizer(run_dir, cfg.tokenizer)
    files = config_corpus_files(run_dir, cfg.inputs, "inputs")
    mcfg = cfg.model_config(tok.vocab_size)
    seq_len = cfg.seq_len or mcfg.max_seq_len

    data_dir = run_dir / "data"
    encoded = True
    if distributed.is_main() and not shards_ready(data_dir, tok, files, val_fraction=cfg.val_fraction,
                                                  seed=cfg.seed):
        ev.log(f"encoding {len(files)} file(s) into {data_dir}")
        meta = encode_corpus(tok, files, data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                             control=control)
        encoded = meta is not None and not control.should_stop()
    if not distributed.from_main(encoded):  # the other ranks wait here for rank 0's shards
        return "stopped"
    data = TokenData(data_dir)
    for split in ("train", "val"):
        if data.n_tokens(split) < seq_len + 1:
            raise StageError(f"the {split} split has {data.n_tokens(split)} tokens, fewer than "
                             f"seq_len + 1 = {seq_len + 1}: add text or lower seq_len")
    baseline = unigram_baseline(data)

    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg).to(device)
    ev.log(f"device {describe(device, dtype)}; model {cfg.preset}: {model.num_params():,} params, "
           f"vocab {mcfg.vocab_size}, seq {seq_len}; {data.n_tokens('train'):,} train / "
           f"{data.n_tokens('val'):,} val tokens; unigram baseline {baseline:.3f} nats")

    def next_batch(gen: torch.Generator):
        x, y = data.get_batch("train", cfg.batch_size, seq_len, gen)
        return x.to(device), y.to(device)

    def loss(m, batch):
        x, y = batch
        return m(x, y, loss_only=True), x.numel()

    def evaluate(m) -> dict[str, float]:
        # The same windows at every evaluation, from a generator of their own, so val curves are
        # comparable across steps and evaluating never shifts the training batches.
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        total = 0.0
        for _ in range(cfg.eval_batches):
            x, y = data.get_batch("val", cfg.batch_size, seq_len, gen)
            total += float(m(x.to(device), y.to(device), loss_only=True))
        return {"val/loss": total / cfg.eval_batches, "val/unigram_baseline": baseline}

    def sample(m, step: int) -> None:
        for i, prompt in enumerate(cfg.sample_prompts):
            out = generate(m, [tok.bos_id] + tok.encode(prompt), cfg.sample_tokens,
                           temperature=cfg.sample_temperature, top_k=50, seed=cfg.seed + i,
                           stop_ids=(tok.end_id, tok.bos_id))
            ev.emit("sample", step=step, prompt=prompt, text=tok.decode(out, skip_special=True))

    stage = Stage("pretrain", next_batch, loss, evaluate, sample, fixed_on_resume=FIXED_ON_RESUME,
                  state=lambda: {"tokenizer_fingerprint": tok.fingerprint()},
                  extra_files={"tokenizer.json": tok_path}, flops_per_token=model.flops_per_token(seq_len),
                  uniform_loss=math.log(mcfg.vocab_size))
    status = train(cfg, run_dir, model, stage, device=device, dtype=dtype, sink=sink, control=control,
                   init_metrics={"val/unigram_baseline": baseline})
    if status == "completed" and distributed.is_main():
        summary = {"stage": "pretrain", **run_summary(run_dir, cfg), "unigram_baseline": baseline,
                   "params": model.num_params()}
        write_summary(run_dir, summary)
    return status


def main(argv: list[str] | None = None) -> int:
    return stage_main("pretrain", PretrainConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
