"""The training loop every gradient stage shares: pretraining, SFT and the reward model.

A stage builds its model and its data, then hands the trainer four small functions: how to
draw a batch, how to compute its loss, how to evaluate, how to write samples. The trainer owns
everything a run must get right the same way each time: the LR schedule, gradient accumulation
and clipping, the non-finite guard, metrics and progress events, cooperative stop, atomic
checkpoints with the optimizer and RNG state, and exact resume.
"""
from __future__ import annotations

import dataclasses
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from engine import checkpoint as ckpt
from engine import distributed
from engine.config import ConfigError, require
from engine.device import autocast, peak_flops
from engine.model import safetensors_state, with_tied_head
from engine.runio import Emitter, NeverStop, StageError


@dataclass(kw_only=True)
class TrainConfig:
    """Settings common to every training stage; stages subclass it and add their own."""
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
    eval_every: int = 100
    sample_every: int = 200             # 0 disables samples
    checkpoint_every: int = 200
    keep_last: int = 2                  # newest checkpoints kept, besides the best by val loss
    log_every: int = 10
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"                 # auto (bf16 on CUDA, else fp32) | float32 | bfloat16
    compile: bool = False
    nproc: int = 1                      # processes (one per GPU) training together with DDP, via torchrun

    def validate_training(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "checkpoint_every", "log_every",
                     "nproc"):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("warmup_steps", "sample_every", "keep_last"):
            require(getattr(self, name) >= 0, name, "must be zero or positive")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be between 0 and 1")
        require(self.weight_decay >= 0, "weight_decay", "must be zero or positive")
        require(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        require(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        require(self.grad_clip >= 0, "grad_clip", "must be zero or positive")
        require(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
                "auto, float32, bfloat16 or float16")
        if self.nproc > 1 and self.device != "cpu" and torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            require(self.nproc <= gpus, "nproc", f"{self.nproc} processes need as many GPUs; this machine has {gpus}")


# Settings that define what a run *is*: changing them on resume would silently train a different
# run under the old name, so it is refused. The schedule's settings only warn.
FIXED_ON_RESUME = ("batch_size", "grad_accum", "seed", "nproc")
WARN_ON_RESUME = ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps (`step` is 0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Norm gains are not decayed: shrinking them toward 0 fights the normalisation itself.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def check_resume(saved: dict, cfg: TrainConfig, fixed: tuple[str, ...], ev: Emitter) -> None:
    now = dataclasses.asdict(cfg)
    # A setting added after the run was saved has its default there.
    saved = {**{f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING},
             **saved}
    # The micro-batch stream does not depend on how it is split among processes, so the run stays
    # the same run on another number of processes as long as grad_accum x nproc is kept.
    before, after = saved["grad_accum"] * saved["nproc"], now["grad_accum"] * now["nproc"]
    if before != after:
        raise ConfigError("grad_accum", f"grad_accum x nproc was {saved['grad_accum']} x {saved['nproc']} "
                                        f"= {before} micro-batches per step and is now {after}: keep the "
                                        "product to resume (or start a new run)")
    changed = [k for k in fixed if k not in ("grad_accum", "nproc") and saved.get(k) != now.get(k)]
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(changed[0], f"cannot change on resume ({detail}); start a new run instead")
    for k in WARN_ON_RESUME:
        if saved.get(k) != now.get(k):
            ev.log(f"'{k}' changed on resume: {saved.get(k)!r} -> {now.get(k)!r}; "
                   "the run is no longer an exact continuation", level="warning")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


Batch = tuple
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, int]]


@dataclass
class Stage:
    """What a stage hands the trainer. `loss` returns (mean loss, tokens processed).

    Under DDP every rank walks the whole stream of micro-batches and trains on its share;
    `skip_batch` advances the stream past another rank's micro-batch without building it.
    """
    name: str
    next_batch: Callable[[torch.Generator], Batch]
    loss: LossFn
    evaluate: Callable[[torch.nn.Module], dict[str, float]]      # must include "val/loss"
    sample: Optional[Callable[[torch.nn.Module, int], None]] = None
    fixed_on_resume: tuple[str, ...] = ()                          # beyond FIXED_ON_RESUME
    state: Optional[Callable[[], dict]] = None                     # extra JSON for state.json
    restore: Optional[Callable[[dict], None]] = None               # given state.json on resume
    train_metrics: Optional[Callable[[], dict]] = None             # more train/* at each log step
    extra_files: Optional[dict[str, Path]] = None                  # copied into each checkpoint
    flops_per_token: Optional[float] = None
    skip_batch: Optional[Callable[[torch.Generator], None]] = None


def train(cfg: TrainConfig, run_dir: Path, model: torch.nn.Module, stage: Stage, *, device: torch.device,
          dtype: torch.dtype, sink=None, control=None, init_metrics: Optional[dict] = None) -> str:
    """Train `model` (already on `device`) to cfg.max_steps, resuming from run_dir/checkpoints.

    Under torchrun every rank calls this; rank 0 alone evaluates, samples and saves.
    """
    world = distributed.current()
    ev = Emitter(sink if world.is_main else None)
    control = control or NeverStop()
    run_dir = Path(run_dir)
    opt = make_optimizer(model, cfg, device)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    ckpt_root = run_dir / "checkpoints"
    if world.is_main:
        for p in ckpt.clean_partial(ckpt_root):
            ev.log(f"removed {p.name}, left by a save that was interrupted")
    distributed.barrier()

    step, tokens_seen, best_val, last_val = 0, 0, None, None
    latest = ckpt.latest_checkpoint(ckpt_root)
    if latest is not None:
        saved = ckpt.load_checkpoint(latest)
        check_resume(saved.state["config"], cfg, FIXED_ON_RESUME + stage.fixed_on_resume, ev)
        model.load_state_dict(with_tied_head(model.config, saved.model))
        opt.load_state_dict(saved.optimizer)
        torch.set_rng_state(saved.rng["torch"])
        data_gen.set_state(saved.rng["data"])
        if device.type == "cuda" and "cuda" in saved.rng:
            torch.cuda.set_rng_state(saved.rng["cuda"], device)
        step, tokens_seen = saved.step, int(saved.state["tokens_seen"])
        if stage.restore:
            stage.restore(saved.state)
        best_val, last_val = saved.state.get("best_val_loss"), saved.state.get("val_loss")
        ev.log(f"resumed from {latest.name}")
    if step >= cfg.max_steps:
        ev.log(f"already at step {step} of max_steps {cfg.max_steps}: nothing to do")
        return "completed"

    # DDP before compile, as torch recommends: the compiled graph then sees the sync hooks.
    train_model = distributed.wrap(model, device)
    train_model = torch.compile(train_model) if cfg.compile else train_model
    flops, flops_source = peak_flops(device, dtype)
    if world.enabled:
        ev.log(f"DDP over {world.size} processes: {cfg.batch_size} x {cfg.grad_accum} x {world.size} "
               f"= {cfg.batch_size * cfg.grad_accum * world.size} samples per step")
    ev.log(f"MFU is measured against {flops / 1e9:.1f} GFLOP/s per process ({flops_source})")
    if init_metrics:
        ev.metrics(step, init_metrics)
    skip = stage.skip_batch or stage.next_batch
    micro_batches = cfg.grad_accum * world.size

    def save(reason: str) -> None:
        rng = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        state = {"stage": stage.name, "tokens_seen": tokens_seen, "val_loss": last_val,
                 "best_val_loss": best_val, "lr": lr_at(max(step - 1, 0), cfg), "reason": reason,
                 "world_size": world.size,
                 "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model.config),
                 **(stage.state() if stage.state else {})}
        weights, weights_meta = safetensors_state(model)
        try:
            path = ckpt.save_checkpoint(ckpt_root, step, model=weights, optimizer=opt.state_dict(),
                                        state=state, rng=rng, model_metadata=weights_meta,
                                        extra_files=stage.extra_files)
        except ValueError as e:
            raise StageError(str(e)) from None
        removed = ckpt.prune(ckpt_root, cfg.keep_last)
        ev.emit("checkpoint", step=step, path=str(path.relative_to(run_dir)),
                best=last_val is not None and last_val == best_val, removed=[p.name for p in removed])

    model.train()
    t_start = t_last = time.perf_counter()
    steps_since, busy, tokens_since = 0, 0.0, 0
    while step < cfg.max_steps:
        # Every rank must stop at the same step, or the others wait in a collective for ever.
        if distributed.any_rank(control.should_stop()):
            if world.is_main:
                save("stop")
            return "stopped"
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum, step_tokens = 0.0, 0
        for i in range(micro_batches):
            if i % world.size != world.rank:
                skip(data_gen)
                continue
            batch = stage.next_batch(data_gen)
            with distributed.no_sync(train_model, i < micro_batches - world.size):
                with autocast(device, dtype):
                    loss, n_tok = stage.loss(train_model, batch)
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
            step_tokens += n_tok
        loss_sum, step_tokens = distributed.all_sum([loss_sum, step_tokens])
        step_tokens = int(step_tokens)
        loss_value = loss_sum / micro_batches
        if not math.isfinite(loss_value):
            raise StageError(f"non-finite loss ({loss_value}) at step {step + 1}; stopped without "
                             f"saving it. Lower lr (now {lr:.3g}) or check the data, then resume "
                             "from the last checkpoint.")
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        if not math.isfinite(grad_norm):
            raise StageError(f"non-finite gradient norm at step {step + 1}; stopped before the update")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += step_tokens
        tokens_since += step_tokens
        steps_since += 1
        busy += time.perf_counter() - t0

        log_now = step % cfg.log_every == 0 or step == cfg.max_steps
        if log_now and not world.is_main and stage.train_metrics:
            stage.train_metrics()   # drained, not reported: rank 0 reports its own share
        if log_now and world.is_main:
            now = time.perf_counter()
            tok_s = tokens_since / max(busy, 1e-9)
            values = {"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm,
                      "train/tokens": tokens_seen, "perf/tokens_per_s": round(tok_s, 1),
                      "perf/peak_rss_mb": round(peak_rss_mb(), 1)}
            if stage.flops_per_token:
                values["perf/mfu"] = round(tok_s * stage.flops_per_token / (flops * world.size), 4)
            if stage.train_metrics:
                values.update(stage.train_metrics())
            ev.metrics(step, values)
            # Wall time per step (evaluation and saving included) for the ETA; tokens/s counts
            # training time only, so it is comparable across eval settings.
            step_time = (now - t_last) / steps_since
            ev.progress(step, cfg.max_steps, round(tok_s, 1), now - t_start, (cfg.max_steps - step) * step_time)
            t_last, steps_since, busy, tokens_since = now, 0, 0.0, 0
        if not world.is_main:
            continue
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            model.eval()
            with torch.no_grad(), autocast(device, dtype):
                values = stage.evaluate(model)
            model.train()
            last_val = float(values["val/loss"])
            best_val = last_val if best_val is None else min(best_val, last_val)
            ev.metrics(step, {**values, "val/best_loss": best_val})
        if stage.sample and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.max_steps):
            stage.sample(model, step)
            model.train()
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            save("final" if step == cfg.max_steps else "periodic")
    if world.enabled:
        diverged = distributed.max_divergence(model)
        ev.metrics(step, {"ddp/max_param_divergence": diverged})
        if diverged > 0:
            ev.log(f"the ranks' parameters differ by up to {diverged:.3g} at the end", level="warning")
    return "completed"


def run_summary(run_dir: Path, cfg: TrainConfig) -> dict:
    """The figures of a finished run that the pipeline table and the app show."""
    root = Path(run_dir) / "checkpoints"
    best = ckpt.best_checkpoint(root)
    last = ckpt.latest_checkpoint(root)
    state = ckpt.read_state(last) if last else {}
    return {"step": state.get("step"), "tokens_seen": state.get("tokens_seen"),
            "val_loss": state.get("val_loss"), "best_val_loss": state.get("best_val_loss"),
            "checkpoint": str((best or last).relative_to(run_dir)) if (best or last) else None,
            "peak_rss_mb": round(peak_rss_mb(), 1)}

