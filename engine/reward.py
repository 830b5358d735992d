"""The reward model: an SFT network whose unembedding is replaced by a scalar head, trained on
rankings so that preferred answers score higher.

    python -m engine.reward --run-dir DIR

reads DIR/config.json (`RewardConfig`), loads the SFT checkpoint `init` with its tokenizer,
checks every preference record before any work (engine.reward_data), and trains one epoch by
default. Each step takes `batch_size` rankings; all answers of a ranking go through the model in
the same batch (one forward pass per answer), and the loss over all C(K,2) pairs of a ranking is
scaled by 1/C(K,2) once, ties giving no pair. At the end, every kept checkpoint gets
`reward_norm.json`: the mean and std of the reward over the data's answers (sampled from the SFT
model), which PPO uses to normalise scores. That pass scores every answer once per kept
checkpoint (the final one's scores also give the summary's validation figures) and reports
progress in answers, since it can take a good part of the stage's time. With lora_rank > 0 the
SFT backbone stays frozen and its LoRA adapters train with the new scalar head (engine.lora).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from engine import checkpoint as ckpt
from engine import distributed
from engine.artifacts import Peeked, RunInputs
from engine.config import ConfigError, require, resolve_path
from engine.device import autocast, describe, setup
from engine.fsutil import atomic_write_text
from engine.lora import LORA_FIELDS, LoRASettings, add_adapters, describe as describe_lora, uses_lora
from engine.model import ScalarModel, freeze
from engine.weights import load_model
from engine.reward_data import (Ranking, encode_answer, pack_answers, ranking_loss, read_rankings,
                                split_by_prompt)
from engine.runio import Emitter, NeverStop, Sink, stage_main, write_summary
from engine.sft_data import EpochSampler, data_fingerprint
from engine.trackers import TrackerSettings
from engine.trainer import Stage, TrainConfig, check_resume_preflight, run_summary, train, trained_fixed

NORM_FILE = "reward_norm.json"


def peek_reward_model(inputs: RunInputs, path: Path) -> Peeked:
    """The reward model PPO and GRPO would score with, checked without loading it: a scalar
    model whose run saved its normalisation statistics. A ConfigError names `reward_model`."""
    peeked = inputs.peek("reward_model", path, kind="scalar")
    norm_path = peeked.checkpoint / NORM_FILE
    if not norm_path.exists():
        raise ConfigError("reward_model", f"{norm_path} is missing: run the reward stage to its end "
                                          "(it saves the normalisation statistics)")
    return peeked


def load_reward_model(inputs: RunInputs, path: Path, tok_fingerprint: str,
                      device: torch.device) -> tuple[ScalarModel, dict, Path]:
    """(frozen RM, its normalisation statistics, its checkpoint), each checked, or a ConfigError
    naming `reward_model`: what PPO and GRPO score answers with."""
    peeked = peek_reward_model(inputs, path)
    art = inputs.load("reward_model", path, device=device)
    if art.tokenizer.fingerprint() != tok_fingerprint:
        raise ConfigError("reward_model", "the reward model was trained with another tokenizer than the policy")
    return freeze(art.model), ckpt.read_json(peeked.checkpoint / NORM_FILE), art.checkpoint


@dataclass(kw_only=True)
class RankingsConfig(LoRASettings, TrainConfig, TrackerSettings):
    """What a stage that trains an SFT model on rankings (reward, DPO) starts from and reads."""
    init: str                             # SFT checkpoint, or its run folder
    data: list[str]                       # JSONL rankings or chosen/rejected pairs
    tokenizer: Optional[str] = None       # None: the init checkpoint's own tokenizer.json
    val_data: list[str] = field(default_factory=list)  # empty: hold out val_fraction of prompts
    val_fraction: float = 0.1             # share of prompts held out for validation (when val_data is empty)
    epochs: float = 1.0                   # > 0 sets max_steps from the data; 0: use max_steps
    seq_len: int = 0                      # 0: the model's max_seq_len
    batch_size: int = 8                   # rankings per step (each brings its K answers)

    def validate_rankings(self) -> None:
        self.validate_training()
        self.validate_lora()
        self.validate_trackers()
        require(bool(self.init.strip()), "init", "an SFT checkpoint or run folder is required")
        require(len(self.data) > 0, "data", "at least one JSONL file of rankings is required")
        if not self.val_data:
            require(0 < self.val_fraction < 0.5, "val_fraction", "must be between 0 and 0.5 (or give val_data)")
        require(self.epochs >= 0 and math.isfinite(self.epochs), "epochs",
                "must be 0 (train max_steps) or a positive number of passes over the data")
        require(self.seq_len == 0 or self.seq_len >= 4, "seq_len", "0 (the model's context) or at least 4")

    def read_data(self, run_dir: Path) -> tuple[list[Ranking], list[Ranking], list[Path]]:
        """(train rankings, held-out rankings, every file read): val_data, or val_fraction of the
        prompts held out. Every problem in every file is reported before any work."""
        data_paths = [resolve_path(run_dir, p) for p in self.data]
        val_paths = [resolve_path(run_dir, p) for p in self.val_data]
        items = read_rankings(data_paths)
        if val_paths:
            return items, read_rankings(val_paths), data_paths + val_paths
        return *split_by_prompt(items, self.val_fraction, self.seed), data_paths

    def with_steps_for(self, n_train: int):
        """A copy whose max_steps makes `epochs` passes over n_train rankings (epochs 0: this
        config). Never written back into config.json: the trainer gets the copy."""
        if self.epochs <= 0:
            return self
        per_step = self.batch_size * self.grad_accum
        return dataclasses.replace(self, max_steps=max(1, math.ceil(self.epochs * n_train / per_step)))

    def unused_max_steps(self, sized) -> Optional[str]:
        """A warning when max_steps was set but `epochs` decides the steps (`sized`: the copy
        with_steps_for made): a value that would otherwise be ignored without a word."""
        default = next(f.default for f in dataclasses.fields(self) if f.name == "max_steps")
        if self.epochs <= 0 or self.max_steps == default:
            return None
        return (f"max_steps {self.max_steps} is not used: epochs {self.epochs:g} sets the steps "
                f"({sized.max_steps}); set epochs to 0 to train for max_steps")


@dataclass(kw_only=True)
class RewardConfig(RankingsConfig):
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    eval_every: int = 25
    sample_every: int = 0
    checkpoint_every: int = 100
    log_every: int = 5

    def validate(self) -> None:
        self.validate_rankings()


FIXED_ON_RESUME = ("init", "tokenizer", "data", "val_data", "val_fraction", "seq_len", *LORA_FIELDS)


class Scorer:
    """Turns rankings into padded batches and rewards; keeps running train statistics."""

    def __init__(self, tok, max_len: int, device):
        self.tok, self.max_len, self.device = tok, max_len, device
        # Answers cut to the context, by (record, answer): each is counted once however many
        # epochs, evaluations and normalisation passes encode it again.
        self.truncated: set[tuple[str, int]] = set()
        self._stats: list[tuple[float, float, int]] = []   # (sum of correct, sum of margin, n pairs)
        self._rewards: list[torch.Tensor] = []

    def batch(self, items: list[Ranking]):
        """(Packed answers, each ranking's (first answer, K, pairs), tokens run)."""
        groups, spans, n = [], [], 0
        for r in items:
            seqs = []
            for j, a in enumerate(r.answers):
                ids, cut = encode_answer(self.tok, r.prompt, a, self.max_len)
                if cut:
                    self.truncated.add((r.where, j))
                seqs.append(ids)
            groups.append(seqs)
            spans.append((n, len(seqs), r.pairs()))
            n += len(seqs)
        packed = pack_answers(groups, self.tok.pad_id, self.max_len)
        return packed.to(self.device), spans, packed.tokens

    def loss(self, model, batch, record: bool = True):
        packed, spans, n_tok = batch
        rewards = packed.rewards(model)
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


@torch.no_grad()
def score_items(model, scorer: Scorer, items: list[Ranking], batch_size: int,
                on_batch: Optional[Callable[[int], None]] = None) -> list[torch.Tensor]:
    """The rewards of each ranking's answers (fp32, on the CPU); `on_batch(answers)` after each batch."""
    out: list[torch.Tensor] = []
    for i in range(0, len(items), batch_size):
        packed, spans, _n = scorer.batch(items[i:i + batch_size])
        r = packed.rewards(model).float().cpu()
        out += [r[start:start + k] for start, k, _pairs in spans]
        if on_batch is not None:
            on_batch(sum(k for _start, k, _pairs in spans))
    return out


def ranking_metrics(items: list[Ranking], rewards: list[torch.Tensor]) -> dict[str, float]:
    """Validation figures from each ranking's rewards: the loss averaged over rankings."""
    losses, margins = [], []
    for item, r in zip(items, rewards):
        loss, m = ranking_loss(r, item.pairs(), len(item.answers))
        losses.append(float(loss))
        margins.append(m)
    m, r = torch.cat(margins), torch.cat(rewards)
    return {"val/loss": sum(losses) / len(items), "val/accuracy": float((m > 0).float().mean()),
            "val/margin": float(m.mean()), "val/reward_mean": float(r.mean()), "val/reward_std": float(r.std())}


def evaluate_rankings(model, scorer: Scorer, items: list[Ranking], batch_size: int) -> dict[str, float]:
    return ranking_metrics(items, score_items(model, scorer, items, batch_size))


def norm_stats(rewards: list[torch.Tensor]) -> dict:
    """Mean and std of the reward over every answer: PPO's normalisation."""
    r = torch.cat(rewards)
    return {"mean": float(r.mean()), "std": float(r.std().clamp(min=1e-6)), "n_answers": r.numel()}


def normalise_checkpoints(run_dir: Path, scorer: Scorer, train_items: list[Ranking],
                          val_items: list[Ranking], batch_size: int, device, dtype,
                          ev: Emitter) -> Optional[dict]:
    """reward_norm.json for every kept checkpoint that lacks one, each over its own rewards, so
    PPO can use whichever one the user picks. One scoring pass per checkpoint, reported as
    progress in answers; the final checkpoint's pass also gives its validation figures, which
    are returned (None if it already had its file). A crash here is mended by running again."""
    final = ckpt.resolve_checkpoint(run_dir)
    todo = [path for _s, path in ckpt.list_checkpoints(run_dir / "checkpoints")
            if not (path / NORM_FILE).exists()]
    items = train_items + val_items
    total = len(todo) * sum(len(r.answers) for r in items)
    done, t0, shown = 0, time.monotonic(), 0.0
    val_metrics = None

    def advance(n: int) -> None:
        nonlocal done, shown
        done += n
        elapsed = time.monotonic() - t0
        if done == total or elapsed - shown >= 1.0:    # a line a second is enough to see it move
            shown = elapsed
            ev.progress(done, total, None, elapsed, elapsed * (total - done) / done, unit="answers")

    for path in todo:
        model = load_model(path / "model.safetensors", device=device).eval()
        with autocast(device, dtype):
            rewards = score_items(model, scorer, items, batch_size, advance)
        stats = norm_stats(rewards)
        atomic_write_text(path / NORM_FILE, json.dumps(stats, indent=2) + "\n")
        ev.log(f"{path.name}: reward mean {stats['mean']:.4f}, std {stats['std']:.4f} over "
               f"{stats['n_answers']} answers (saved as {NORM_FILE})")
        if path == final:
            val_metrics = ranking_metrics(val_items, rewards[len(train_items):])
    return val_metrics


def preflight(cfg: RewardConfig, run_dir: Path) -> None:
    """What would end a run of `cfg` at once, found without loading a model (see engine.sft):
    init may be a language model (InstructGPT's start) or a reward model trained further."""
    RunInputs(run_dir, cfg).peek("init", resolve_path(run_dir, cfg.init),
                                                        required=uses_lora(cfg))
    check_resume_preflight(run_dir, cfg, trained_fixed(FIXED_ON_RESUME))


def run(cfg: RewardConfig, run_dir: Path, sink: Optional[Sink] = None, control=None) -> str:
    ev = Emitter(sink)
    control = control or NeverStop()
    run_dir = Path(run_dir)
    device, dtype = setup(cfg.device, cfg.dtype)

    train_items, val_items, files = cfg.read_data(run_dir)
    tok_arg = str(resolve_path(run_dir, cfg.tokenizer)) if cfg.tokenizer else None
    inputs = RunInputs(run_dir, cfg, ev.log)
    # Under LoRA a resume rebuilds the frozen base from init; else its weights come from the run's own.
    loaded = inputs.load("init", resolve_path(run_dir, cfg.init), required=uses_lora(cfg), tokenizer=tok_arg,
                         device=device)
    tok = loaded.tokenizer
    torch.manual_seed(cfg.seed)
    model = loaded.model if isinstance(loaded.model, ScalarModel) else ScalarModel.from_lm(loaded.model)
    model = model.to(device)
    if uses_lora(cfg):
        add_adapters(model, cfg, cfg.seed)
        ev.log(describe_lora(model))
    max_len = min(cfg.seq_len or model.config.max_seq_len, model.config.max_seq_len)

    tcfg = cfg.with_steps_for(len(train_items))
    if note := cfg.unused_max_steps(tcfg):
        ev.log(note, level="warning")
    n_pairs = sum(len(r.pairs()) for r in train_items)
    ev.log(f"device {describe(device, dtype)}; reward model from {loaded.checkpoint} "
           f"({model.num_params():,} params); {len(train_items)} train rankings ({n_pairs} pairs), "
           f"{len(val_items)} validation rankings on held-out prompts; {tcfg.max_steps} steps")

    scorer = Scorer(tok, max_len, device)
    sampler = EpochSampler(len(train_items), cfg.seed)
    fingerprint = data_fingerprint(files)

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
                       "tokenizer_fingerprint": tok.fingerprint(), **inputs.state()},
        restore=restore,
        train_metrics=scorer.take_stats,
        extra_files=loaded.tokenizer_files,
        flops_per_token=model.flops_per_token(max_len),
        skip_batch=lambda _gen: sampler.take(cfg.batch_size))
    status = train(tcfg, run_dir, model, stage, device=device, dtype=dtype, sink=sink, control=control)
    if scorer.truncated:
        n_answers = sum(len(r.answers) for r in train_items + val_items)
        ev.log(f"{len(scorer.truncated)} of {n_answers} answer sequences were longer than the "
               f"context ({max_len}) and lost prompt tokens first", level="warning")
    if status != "completed" or not distributed.is_main():
        return status

    val_metrics = normalise_checkpoints(run_dir, scorer, train_items, val_items, cfg.batch_size,
                                        device, dtype, ev)
    final = ckpt.resolve_checkpoint(run_dir)
    if val_metrics is None:     # a rerun of a finished run: its final checkpoint was normalised
        with autocast(device, dtype):
            val_metrics = evaluate_rankings(load_model(final / "model.safetensors", device=device).eval(),
                                            scorer, val_items, cfg.batch_size)
    summary = {"stage": "reward", **run_summary(run_dir, tcfg),
               "reward_norm": json.loads((final / NORM_FILE).read_text()),
               "train_rankings": len(train_items), "val_rankings": len(val_items), **val_metrics}
    ev.log(f"{final.name}: held-out accuracy {summary['val/accuracy']:.1%} rests on {len(val_items)} "
           f"ranking(s) ({sum(len(r.pairs()) for r in val_items)} pairs) of prompts it did not train on")
    write_summary(run_dir, summary)
    return "completed"


def main(argv: list[str] | None = None) -> int:
    return stage_main("reward", RewardConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
