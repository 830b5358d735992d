"""The reward model: an SFT network whose unembedding is replaced by a scalar head, trained on
rankings so that preferred answers score higher.

    python -m engine.reward --run-dir DIR

reads DIR/config.json (`RewardConfig`), loads the SFT checkpoint `init` with its tokenizer,
checks every preference record before any work (engine.reward_data), and trains one epoch by
default. Each step takes `batch_size` rankings; all answers of a ranking go through the model in
the same batch (one forward pass per answer), and the loss over all C(K,2) pairs of a ranking is
scaled by 1/C(K,2) once, ties giving no pair. At the end, every kept checkpoint gets
`reward_norm.json`: the mean and std of the reward over the data's answers (sampled from the SFT
model), which PPO uses to normalise scores.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from engine import checkpoint as ckpt
from engine import distributed
from engine.artifacts import load_artifact
from engine.config import require, resolve_path
from engine.device import autocast, describe, setup
from engine.fsutil import atomic_write_text
from engine.model import ScalarModel, load_model
from engine.reward_data import (Ranking, collate_answers, encode_answer, ranking_loss, read_rankings,
                                split_by_prompt)
from engine.runio import Emitter, NeverStop, Sink, stage_main, write_summary
from engine.sft_data import EpochSampler, data_fingerprint
from engine.trainer import Stage, TrainConfig, run_summary, train

NORM_FILE = "reward_norm.json"


@dataclass(kw_only=True)
class RewardConfig(TrainConfig):
    init: str                             # SFT checkpoint, or its run folder
    data: list[str]                       # JSONL rankings or chosen/rejected pairs
    tokenizer: Optional[str] = None       # None: the init checkpoint's own tokenizer.json
    val_data: list[str] = field(default_factory=list)  # empty: hold out val_fraction of prompts
    val_fraction: float = 0.1             # share of prompts held out for validation (when val_data is empty)
    epochs: float = 1.0                   # > 0 sets max_steps from the data; 0: use max_steps
    seq_len: int = 0                      # 0: the model's max_seq_len
    batch_size: int = 8                   # rankings per step (each brings its K answers)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    eval_every: int = 25
    sample_every: int = 0
    checkpoint_every: int = 100
    log_every: int = 5

    def validate(self) -> None:
        self.validate_training()
        require(bool(self.init.strip()), "init", "an SFT checkpoint or run folder is required")
        require(len(self.data) > 0, "data", "at least one JSONL file of rankings is required")
        if not self.val_data:
            require(0 < self.val_fraction < 0.5, "val_fraction", "must be between 0 and 0.5 (or give val_data)")
        require(self.epochs >= 0 and math.isfinite(self.epochs), "epochs",
                "must be 0 (train max_steps) or a positive number of passes over the data")
        require(self.seq_len == 0 or self.seq_len >= 4, "seq_len", "0 (the model's context) or at least 4")


FIXED_ON_RESUME = ("init", "tokenizer", "data", "val_data", "val_fraction", "seq_len")


class Scorer:
    """Turns rankings into padded batches and rewards; keeps running train statistics."""

    def __init__(self, tok, max_len: int, device):
        self.tok, self.max_len, self.device = tok, max_len, device
        self.truncated = 0
        self._stats: list[tuple[float, float, int]] = []   # (sum of correct, sum of margin, n pairs)
        self._rewards: list[torch.Tensor] = []

    def batch(self, items: list[Ranking]):
        seqs, spans = [], []
        for r in items:
            start = len(seqs)
            for a in r.answers:
                ids, cut = encode_answer(self.tok, r.prompt, a, self.max_len)
                self.truncated += cut
                seqs.append(ids)
            spans.append((start, len(r.answers), r.pairs()))
        x, last = collate_answers(seqs, self.tok.pad_id)
        return x.to(self.device), last.to(self.device), spans, sum(len(s) for s in seqs)

    def loss(self, model, batch, record: bool = True):
        x, last, spans, n_tok = batch
        rewards = model(x)[torch.arange(x.size(0), device=x.device), last]
        losses, margins = [], []
        for start, k, pairs in spans:
            loss, m = ranking_loss(rewards[start:start + k], pairs, k)
            losses.append(loss)
            margins.append(m.detach())
        m = torch.cat(margins).float()
        if record:
            self._stats.append((float((m > 0).sum()), float(m.sum()), m.numel()))
            self._rewards.append(rewards.detach().float().cpu())
        return torch.stack(losses).mean(), n_tok, m, rewards.detach()

    def take_stats(self) -> dict:
        correct = sum(s[0] for s in self._stats)
        margin = sum(s[1] for s in self._stats)
        n = max(1, sum(s[2] for s in self._stats))
        r = torch.cat(self._rewards) if self._rewards else torch.zeros(1)
        self._stats, self._rewards = [], []
        return {"train/accuracy": correct / n, "train/margin": margin / n,
                "train/reward_mean": float(r.mean()), "train/reward_std": float(r.std()) if r.numel() > 1 else 0.0}


def evaluate_rankings(model, scorer: Scorer, items: list[Ranking], batch_size: int) -> dict[str, float]:
    losses, margins, rewards = [], [], []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        loss, _n, m, r = scorer.loss(model, scorer.batch(chunk), record=False)
        losses.append(float(loss) * len(chunk))
        margins.append(m.float().cpu())
        rewards.append(r.float().cpu())
    m, r = torch.cat(margins), torch.cat(rewards)
    return {"val/loss": sum(losses) / len(items), "val/accuracy": float((m > 0).float().mean()),
            "val/margin": float(m.mean()), "val/reward_mean": float(r.mean()), "val/reward_std": float(r.std())}


@torch.no_grad()
def reward_stats(model, scorer: Scorer, items: list[Ranking], batch_size: int) -> dict:
    """Mean and std of the reward over every answer in `items`: PPO's normalisation."""
    model.eval()
    rewards = []
    for i in range(0, len(items), batch_size):
        x, last, _spans, _n = scorer.batch(items[i:i + batch_size])
        rewards.append(model(x)[torch.arange(x.size(0), device=x.device), last].float().cpu())
    r = torch.cat(rewards)
    return {"mean": float(r.mean()), "std": float(r.std().clamp(min=1e-6)), "n_answers": r.numel()}


def run(cfg: RewardConfig, run_dir: Path, sink: Optional[Sink] = None, control=None) -> str:
    ev = Emitter(sink)
    control = control or NeverStop()
    run_dir = Path(run_dir)
    device, dtype = setup(cfg.device, cfg.dtype)

    data_paths = [resolve_path(run_dir, p) for p in cfg.data]
    items = read_rankings(data_paths)
    if cfg.val_data:
        val_paths = [resolve_path(run_dir, p) for p in cfg.val_data]
        train_items, val_items = items, read_rankings(val_paths)
    else:
        val_paths = []
        train_items, val_items = split_by_prompt(items, cfg.val_fraction, cfg.seed)
    tok_arg = str(resolve_path(run_dir, cfg.tokenizer)) if cfg.tokenizer else None
    loaded = load_artifact(resolve_path(run_dir, cfg.init), tokenizer=tok_arg, device=device, field="init")
    tok = loaded.tokenizer
    torch.manual_seed(cfg.seed)
    model = loaded.model if isinstance(loaded.model, ScalarModel) else ScalarModel.from_lm(loaded.model)
    model = model.to(device)
    max_len = min(cfg.seq_len or model.config.max_seq_len, model.config.max_seq_len)

    per_step = cfg.batch_size * cfg.grad_accum
    steps = math.ceil(cfg.epochs * len(train_items) / per_step) if cfg.epochs > 0 else cfg.max_steps
    tcfg = dataclasses.replace(cfg, max_steps=max(1, steps))
    n_pairs = sum(len(r.pairs()) for r in train_items)
    ev.log(f"device {describe(device)}, {dtype}; reward model from {loaded.checkpoint} "
           f"({model.num_params():,} params); {len(train_items)} train rankings ({n_pairs} pairs), "
           f"{len(val_items)} validation rankings on held-out prompts; {tcfg.max_steps} steps")

    scorer = Scorer(tok, max_len, device)
    sampler = EpochSampler(len(train_items), cfg.seed)
    fingerprint = data_fingerprint(data_paths + val_paths)

    def restore(state: dict) -> None:
        if state.get("data_fingerprint") != fingerprint:
            ev.log("the preference data changed since the checkpoint: the resumed run sees new data",
                   level="warning")
        sampler.load(state["sampler"])

    stage = Stage(
        "reward",
        next_batch=lambda _gen: scorer.batch([train_items[i] for i in sampler.take(cfg.batch_size)]),
        loss=lambda m, b: scorer.loss(m, b)[:2],
        evaluate=lambda m: evaluate_rankings(m, scorer, val_items, cfg.batch_size),
        fixed_on_resume=FIXED_ON_RESUME,
        state=lambda: {"sampler": sampler.state(), "data_fingerprint": fingerprint,
                       "tokenizer_fingerprint": tok.fingerprint()},
        restore=restore,
        train_metrics=scorer.take_stats,
        extra_files={"tokenizer.json": loaded.tokenizer_path},
        flops_per_token=model.flops_per_token(max_len),
        skip_batch=lambda _gen: sampler.take(cfg.batch_size))
    status = train(tcfg, run_dir, model, stage, device=device, dtype=dtype, sink=sink, control=control)
    if scorer.truncated:
        ev.log(f"{scorer.truncated} answer sequence(s) were longer than the context ({max_len}) and "
               "lost prompt tokens first", level="warning")
    if status != "completed" or not distributed.is_main():
        return status

    # Normalisation statistics for every kept checkpoint, each over its own rewards, so PPO can
    # use whichever one the user picks. A crash here is mended by running the stage again.
    for _step, path in ckpt.list_checkpoints(run_dir / "checkpoints"):
        if not (path / NORM_FILE).exists():
            scored = load_model(path / "model.safetensors", device=device)
            with autocast(device, dtype):
                stats = reward_stats(scored, scorer, train_items + val_items, cfg.batch_size)
            atomic_write_text(path / NORM_FILE, json.dumps(stats, indent=2) + "\n")
            ev.log(f"{path.name}: reward mean {stats['mean']:.4f}, std {stats['std']:.4f} over "
                   f"{stats['n_answers']} answers (saved as {NORM_FILE})")
    final = ckpt.resolve_checkpoint(run_dir)
    summary = {"stage": "reward", **run_summary(run_dir, tcfg),
               "reward_norm": json.loads((final / NORM_FILE).read_text()),
               "train_rankings": len(train_items), "val_rankings": len(val_items)}
    with torch.no_grad(), autocast(device, dtype):
        summary.update(evaluate_rankings(load_model(final / "model.safetensors", device=device),
                                         scorer, val_items, cfg.batch_size))
    ev.log(f"{final.name}: held-out accuracy {summary['val/accuracy']:.1%} rests on {len(val_items)} "
           f"ranking(s) ({sum(len(r.pairs()) for r in val_items)} pairs) of prompts it did not train on")
    write_summary(run_dir, summary)
    return "completed"


def main(argv: list[str] | None = None) -> int:
    return stage_main("reward", RewardConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
