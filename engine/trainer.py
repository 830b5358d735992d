"""The training loop every gradient stage shares: pretraining, SFT, the reward model and DPO.

A stage builds its model and its data, then hands the trainer four small functions: how to
draw a batch, how to compute its loss, how to evaluate, how to write samples. The trainer owns
everything a run must get right the same way each time: the LR schedule, gradient accumulation
and clipping, the non-finite guard, metrics and progress events, cooperative stop, atomic
checkpoints with the optimizer and RNG state, and exact resume. A model with LoRA adapters
(engine.lora) is saved merged, with its adapters beside it, and resumes from its adapters.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from engine import checkpoint as ckpt
from engine import distributed
from engine import lora
from engine.config import ConfigError, require
from engine.device import autocast, check_train_dtype, fused_adamw, peak_flops, precision_warning
from engine.weights import check_weights, read_config, with_tied_head
from engine.osproc import peak_rss_mb
from engine.runio import Emitter, NeverStop, StageError, check_folder


@dataclass(kw_only=True)
class TrainConfig:
    """Settings common to every training stage; stages subclass it and add their own."""
    batch_size: int = 16                # examples per optimizer step (times grad_accum)
    grad_accum: int = 1                 # micro-batches accumulated before each optimizer step
    max_steps: int = 1000               # optimizer steps to train for; raise it and resume to train longer
    lr: float = 1e-3                    # peak learning rate (after warmup)
    min_lr_ratio: float = 0.1           # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50              # steps of linear warmup from 0 to lr
    weight_decay: float = 0.1           # AdamW weight decay (not applied to norm gains)
    beta1: float = 0.9                  # AdamW beta1
    beta2: float = 0.95                 # AdamW beta2
    grad_clip: float = 1.0              # 0 disables clipping
    eval_every: int = 100               # validation every N steps (and at the end)
    sample_every: int = 200             # 0 disables samples
    checkpoint_every: int = 200         # save a checkpoint every N steps (and always at the end or on stop)
    keep_last: int = 2                  # newest checkpoints kept, besides the best by val loss
    log_every: int = 10                 # training metrics every N steps
    seed: int = 0                       # random seed: the same seed and settings give the same run
    device: str = "auto"                # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"                 # auto (bf16 on CUDA, else fp32) | float32 | bfloat16
    compile: bool = False               # torch.compile the model (CUDA only; slower start, faster steps)
    grad_checkpointing: bool = False    # recompute each layer's activations in the backward pass: less memory, about a third more compute
    nproc: int = 1                      # processes (one per GPU) training together with DDP, via torchrun

    def validate_training(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "checkpoint_every", "log_every",
                     "nproc"):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("warmup_steps", "sample_every"):
            require(getattr(self, name) >= 0, name, "must be zero or positive")
        # 0 would delete each checkpoint as it is saved, until an evaluation names a best one.
        require(self.keep_last > 0, "keep_last", "must be a positive integer (checkpoints kept besides the best)")
        require(self.lr > 0, "lr", "must be a positive number")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be between 0 and 1")
        require(self.weight_decay >= 0, "weight_decay", "must be zero or positive")
        require(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        require(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        require(self.grad_clip >= 0, "grad_clip", "must be zero or positive")
        check_train_dtype(self.dtype)
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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused_adamw(device.type))


def policy_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.AdamW:
    """The RL stages' optimizer (PPO's policy and value model, GRPO's policy): no weight decay,
    which would pull the policy away from its SFT start for no reward."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                             weight_decay=0.0, fused=fused_adamw(device.type))


def trained_fixed(stage_fixed: tuple[str, ...]) -> tuple[str, ...]:
    """What cannot change on resume in a stage that `train` runs: the trainer's and the stage's own."""
    return FIXED_ON_RESUME + tuple(stage_fixed)


def resume_conflict(saved: dict, cfg, fixed: tuple[str, ...]) -> Optional[ConfigError]:
    """Why a run saved with `saved` cannot go on with `cfg` (a setting of `fixed` changed), or None."""
    now, saved = dataclasses.asdict(cfg), _with_defaults(saved, cfg)
    if "grad_accum" in now:
        # The micro-batch stream does not depend on how it is split among processes, so the run
        # stays the same run on another number of processes as long as grad_accum x nproc is kept.
        before, after = saved["grad_accum"] * saved["nproc"], now["grad_accum"] * now["nproc"]
        if before != after:
            return ConfigError("grad_accum", f"grad_accum x nproc was {saved['grad_accum']} x {saved['nproc']} "
                                             f"= {before} micro-batches per step and is now {after}: keep the "
                                             "product to resume (or start a new run)")
    changed = [k for k in fixed if k not in ("grad_accum", "nproc") and saved.get(k) != now.get(k)]
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        return ConfigError(changed[0], f"cannot change on resume ({detail}): set it back to resume, "
                                       "or start a new run")
    return None


def check_resume_preflight(run_dir: Path, cfg, fixed: tuple[str, ...]) -> None:
    """The refusal check_resume would give a resume of `run_dir` with `cfg`, found before the run
    starts: against its newest checkpoint (none, or one that cannot be read: the resume says)."""
    latest = ckpt.latest_checkpoint(Path(run_dir) / "checkpoints")
    try:
        state = ckpt.read_state(latest) if latest is not None else {}
    except ckpt.CheckpointError:
        return
    problem = resume_conflict(state.get("config") or {}, cfg, fixed) if state.get("config") else None
    if problem is not None:
        raise problem


def check_resume(saved: dict, cfg, fixed: tuple[str, ...], ev: Emitter,
                 warn: tuple[str, ...] = WARN_ON_RESUME) -> None:
    problem = resume_conflict(saved, cfg, fixed)
    if problem is not None:
        raise problem
    now, saved = dataclasses.asdict(cfg), _with_defaults(saved, cfg)
    for k in warn:
        if k in now and saved.get(k) != now.get(k):
            ev.log(f"'{k}' changed on resume: {saved.get(k)!r} -> {now.get(k)!r}; "
                   "the run is no longer an exact continuation", level="warning")


def _with_defaults(saved: dict, cfg) -> dict:
    """A setting added after the run was saved has its default there."""
    return {**{f.name: _default(f) for f in dataclasses.fields(cfg)
               if (f.default, f.default_factory) != (dataclasses.MISSING, dataclasses.MISSING)}, **saved}


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


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
    uniform_loss: Optional[float] = None   # ln V for a language model: the loss of uniform output


@dataclass
class Progress:
    """Where a run stands: what each checkpoint's state.json records and resume restores."""
    step: int = 0
    tokens_seen: int = 0
    best_val: Optional[float] = None
    last_val: Optional[float] = None
    val_step: Optional[int] = None          # the step last_val was measured at


def train(cfg: TrainConfig, run_dir: Path, model: torch.nn.Module, stage: Stage, *, device: torch.device,
          dtype: torch.dtype, sink=None, control=None, init_metrics: Optional[dict] = None) -> str:
    """Train `model` (already on `device`) to cfg.max_steps, resuming from run_dir/checkpoints.

    Under torchrun every rank calls this; rank 0 alone evaluates, samples and saves.
    """
    world = distributed.current()
    ev = Emitter(sink if world.is_main else None)
    control = control or NeverStop()
    run_dir = Path(run_dir)
    model.grad_checkpointing = cfg.grad_checkpointing
    opt = make_optimizer(model, cfg, device)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    # Measured before the RNG is seeded and restored: the measuring matmul draws random numbers.
    flops, flops_source = peak_flops(device, dtype)
    # What draws from the global RNG while training (LoRA's dropout) draws the same in every run
    # with this seed; a resume then restores the state saved with the checkpoint.
    torch.manual_seed(cfg.seed)
    ckpt_root = run_dir / "checkpoints"
    if world.is_main:
        for p in ckpt.clean_partial(ckpt_root):
            ev.log(f"removed {p.name}, left by a save that was interrupted")
    distributed.barrier()

    run = Progress()
    watch = CollapseWatch(stage.uniform_loss, what="train/loss")
    saved = resume_run(ckpt_root, model, opt, data_gen=data_gen, device=device,
                       check=lambda s: check_resume(s["config"], cfg, trained_fixed(stage.fixed_on_resume), ev))
    if saved is not None:
        val = saved.state.get("val_loss")
        run = Progress(saved.step, saved.field("tokens_seen", int), saved.state.get("best_val_loss"), val,
                       saved.step if val is not None else None)
        watch.load(saved.state.get("collapse"))
        if stage.restore:
            try:
                stage.restore(saved.state)
            except (KeyError, TypeError) as e:
                raise ckpt.CheckpointError(f"{saved.path / 'state.json'}: the {stage.name} stage's "
                                           f"state is missing or wrong ({type(e).__name__}: {e})") from None
        ev.log(f"resumed from {saved.path.name}")
    if run.step >= cfg.max_steps:
        ev.log(f"already at step {run.step} of max_steps {cfg.max_steps}: nothing to do")
        return "completed"

    # DDP before compile, as torch recommends: the compiled graph then sees the sync hooks.
    train_model = distributed.wrap(model, device)
    if cfg.compile and device.type != "cuda":
        # torch.compile's CPU and MPS back ends are slower to start than they gain on these runs,
        # and fail where no compiler is installed (Windows without MSVC): CUDA only.
        ev.log(f"compile is used on CUDA only; training uncompiled on {device.type}", level="warning")
    train_model = torch.compile(train_model) if cfg.compile and device.type == "cuda" else train_model
    if warning := precision_warning(cfg.dtype, device, dtype):
        ev.log(warning, level="warning")
    if world.enabled:
        ev.log(f"DDP over {world.size} processes: {cfg.batch_size} x {cfg.grad_accum} x {world.size} "
               f"= {cfg.batch_size * cfg.grad_accum * world.size} samples per step")
    ev.log(f"MFU is measured against {flops / 1e9:.1f} GFLOP/s per process ({flops_source})")
    if init_metrics:
        ev.metrics(run.step, init_metrics)

    def save(reason: str) -> None:
        # A checkpoint between evaluations has no val loss of its own: the last one measured other
        # weights, and as a tie it would make these, never evaluated, the best.
        val = run.last_val if run.val_step == run.step else None
        state = {"stage": stage.name, "tokens_seen": run.tokens_seen, "val_loss": val,
                 "best_val_loss": run.best_val, "lr": lr_at(max(run.step - 1, 0), cfg), "reason": reason,
                 "world_size": world.size, "collapse": watch.state(),
                 "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model.config),
                 **(stage.state() if stage.state else {})}
        path, removed = save_run_checkpoint(ckpt_root, run.step, model, opt, data_gen=data_gen, device=device,
                                            state=state, keep_last=cfg.keep_last, extra_files=stage.extra_files)
        ev.emit("checkpoint", step=run.step, path=str(path.relative_to(run_dir)),
                best=val is not None and val == run.best_val, removed=[p.name for p in removed])

    model.train()
    meter = _Meter(ev, stage, flops * world.size, cfg.max_steps)
    while run.step < cfg.max_steps:
        # Every rank must stop at the same step, or the others wait in a collective for ever.
        if distributed.any_rank(control.should_stop()):
            if world.is_main:
                save("stop")
            return "stopped"
        t0 = time.perf_counter()
        lr = lr_at(run.step, cfg)
        loss_value, grad_norm, step_tokens = _train_step(cfg, run.step + 1, train_model, model, opt, stage,
                                                         data_gen, lr, device, dtype)
        run.step += 1
        run.tokens_seen += step_tokens
        if run.step > cfg.warmup_steps:
            watch.check(run.step, grad_norm, loss_value, cfg.lr)
        meter.add(step_tokens, time.perf_counter() - t0)
        log_now = run.step % cfg.log_every == 0 or run.step == cfg.max_steps
        if log_now and not world.is_main and stage.train_metrics:
            stage.train_metrics()   # drained, not reported: rank 0 reports its own share
        if log_now and world.is_main:
            meter.report(run.step, {"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm,
                                    "train/tokens": run.tokens_seen})
        if not world.is_main:
            continue
        if run.step % cfg.eval_every == 0 or run.step == cfg.max_steps:
            _evaluate(model, stage, run, ev, device, dtype)
        if stage.sample and cfg.sample_every and (run.step % cfg.sample_every == 0 or run.step == cfg.max_steps):
            stage.sample(model, run.step)
            model.train()
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.max_steps:
            save("final" if run.step == cfg.max_steps else "periodic")
    if world.enabled:
        diverged = distributed.max_divergence(model)
        ev.metrics(run.step, {"ddp/max_param_divergence": diverged})
        if diverged > 0:
            ev.log(f"the ranks' parameters differ by up to {diverged:.3g} at the end", level="warning")
    return "completed"


def _train_step(cfg: TrainConfig, step: int, train_model, model, opt, stage: Stage, data_gen, lr: float,
                device, dtype) -> tuple[float, float, int]:
    """One optimizer step over this rank's share of the micro-batches: (loss, grad norm, tokens),
    the loss and tokens summed over every rank. `step` is the 1-based step being taken."""
    world = distributed.current()
    for g in opt.param_groups:
        g["lr"] = lr
    skip = stage.skip_batch or stage.next_batch
    micro_batches = cfg.grad_accum * world.size
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
    loss_value = loss_sum / micro_batches
    if not math.isfinite(loss_value):
        raise StageError(f"non-finite loss ({loss_value}) at step {step}; stopped without "
                         f"saving it. Lower lr (now {lr:.3g}) or check the data, then resume "
                         "from the last checkpoint.")
    grad_norm = clip_grads(model.parameters(), cfg.grad_clip)
    if not math.isfinite(grad_norm):
        raise StageError(f"non-finite gradient norm at step {step}; stopped before the update. "
                         f"Lower lr (now {lr:.3g}) or grad_clip, then resume from the last checkpoint.")
    optimizer_step(opt, step)
    opt.zero_grad(set_to_none=True)
    return loss_value, grad_norm, int(step_tokens)


def _evaluate(model, stage: Stage, run: Progress, ev: Emitter, device, dtype) -> None:
    model.eval()
    with torch.no_grad(), autocast(device, dtype):
        values = stage.evaluate(model)
    model.train()
    run.last_val, run.val_step = float(values["val/loss"]), run.step
    run.best_val = run.last_val if run.best_val is None else min(run.best_val, run.last_val)
    ev.metrics(run.step, {**values, "val/best_loss": run.best_val})


class _Meter:
    """Throughput and ETA between log steps, and the metrics event that reports them."""

    def __init__(self, ev: Emitter, stage: Stage, flops: float, total: int):
        self.ev, self.stage, self.flops, self.total = ev, stage, flops, total
        self.t_start = self.t_last = time.perf_counter()
        self.steps, self.busy, self.tokens = 0, 0.0, 0

    def add(self, tokens: int, seconds: float) -> None:
        self.steps += 1
        self.busy += seconds
        self.tokens += tokens

    def report(self, step: int, values: dict) -> None:
        now = time.perf_counter()
        tok_s = self.tokens / max(self.busy, 1e-9)
        values = {**values, "perf/tokens_per_s": round(tok_s, 1), "perf/peak_rss_mb": round(peak_rss_mb(), 1)}
        if self.stage.flops_per_token:
            values["perf/mfu"] = round(tok_s * self.stage.flops_per_token / self.flops, 4)
        if self.stage.train_metrics:
            values.update(self.stage.train_metrics())
        self.ev.metrics(step, values)
        # Wall time per step (evaluation and saving included) for the ETA; tokens/s counts
        # training time only, so it is comparable across eval settings.
        step_time = (now - self.t_last) / self.steps
        self.ev.progress(step, self.total, round(tok_s, 1), now - self.t_start, (self.total - step) * step_time)
        self.t_last, self.steps, self.busy, self.tokens = now, 0, 0.0, 0


def clip_grads(params, max_norm: float) -> float:
    """Clip to `max_norm` (0: no clipping) and return the norm before clipping."""
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))


def optimizer_step(opt: torch.optim.Optimizer, step: int) -> None:
    """`opt.step()`, with the overflow of a huge learning rate named as such."""
    if _step_size_overflows(opt):
        lr = max(g["lr"] for g in opt.param_groups)
        raise StageError(f"the optimizer step overflowed at step {step}: the learning rate there, {lr:.3g}, "
                         "is far too high; lower lr and start a new run")
    opt.step()


def _step_size_overflows(opt: torch.optim.Optimizer) -> bool:
    """Adam's step size lr / (1 - beta1^t) does not fit a float32 (lr around 1e38). Checked
    before the step: torch's for-loop kernel raises a bare RuntimeError on it, but the fused
    kernels write inf into every weight without a word."""
    for g in opt.param_groups:
        state = (opt.state.get(p, {}) for p in g["params"])
        t = next((float(s["step"]) for s in state if "step" in s), 0.0) + 1
        if g["lr"] / (1 - g["betas"][0] ** t) > torch.finfo(torch.float32).max:
            return True
    return False


# A collapsed run keeps "training" with nothing left to learn from. These thresholds sit far from
# anything a learning run produces: a gradient norm of exactly 0 (a real one is noisy, never 0),
# and outputs within a thousandth of a nat of uniform (a freshly initialised model sits a few
# thousandths away, a trained one far away), for COLLAPSE_STEPS steps in a row.
COLLAPSE_STEPS = 10
UNIFORM_TOL = 1e-3


class CollapseWatch:
    """Stops a run whose gradients vanished or whose predictions sit at the uniform distribution.

    `uniform` is the value `entropy` takes when the model predicts every token alike: ln V for
    a language model's loss or entropy; None where that means nothing (a reward model).
    """

    def __init__(self, uniform: Optional[float], what: str, steps: int = COLLAPSE_STEPS):
        self.uniform, self.what, self.steps = uniform, what, steps
        self.zero_grad = self.at_uniform = 0

    def check(self, step: int, grad_norm: float, entropy: Optional[float], lr: float) -> None:
        self.zero_grad = self.zero_grad + 1 if grad_norm == 0 else 0
        flat = self.uniform is not None and entropy is not None and abs(entropy - self.uniform) < UNIFORM_TOL
        self.at_uniform = self.at_uniform + 1 if flat else 0
        advice = (f"The run has collapsed (lr {lr:.3g} is likely too high, or the data gives nothing "
                  "to learn): lower lr and start a new run; its checkpoints from here on are collapsed too.")
        if self.zero_grad >= self.steps:
            raise StageError(f"the gradient norm has been 0 for {self.steps} steps in a row (to step {step}): "
                             f"the model can no longer learn. {advice}")
        if self.at_uniform >= self.steps:
            raise StageError(f"{self.what} has sat at ln V = {self.uniform:.4f} for {self.steps} steps in a row "
                             f"(to step {step}): the model predicts every token alike. {advice}")

    def state(self) -> dict:
        return {"zero_grad": self.zero_grad, "at_uniform": self.at_uniform}

    def load(self, state: Optional[dict]) -> None:
        """The counts a checkpoint saved (a resumed run stops where the whole one would); a
        checkpoint from before they were saved has none, and they start from 0."""
        if isinstance(state, dict):
            self.zero_grad, self.at_uniform = int(state.get("zero_grad", 0)), int(state.get("at_uniform", 0))


def rng_state(data_gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict[str, torch.Tensor], data_gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    data_gen.set_state(rng["data"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def save_run_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, *,
                        data_gen: torch.Generator, device: torch.device, state: dict, keep_last: int,
                        extra_files: Optional[dict[str, Path]] = None,
                        modules: Optional[dict[str, torch.nn.Module]] = None,
                        optimizers: Optional[dict[str, torch.optim.Optimizer]] = None) -> tuple[Path, list[Path]]:
    """Save the model, its optimizer, the RNG states and `state`, then prune to `keep_last`:
    (the checkpoint's folder, the folders pruned). A stage with more to keep (PPO's value model
    and EMA) names it: module NAME is saved as NAME.safetensors, optimizer NAME as
    NAME.safetensors + NAME.json, and `resume_run` reads them back under the same names.
    A model with LoRA adapters is saved merged, its adapters beside it (engine.lora)."""
    check_folder()      # moved away under the run between two of Control's looks
    files = dict(extra_files or {})
    scratch = Path(ckpt_root) / f".tmp-extra-{os.getpid()}"   # a killed save's is cleaned at start
    try:
        if modules or optimizers or lora.has_adapters(model):
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            files.update(_write_extras(scratch, modules or {}, optimizers or {}))
            if lora.has_adapters(model):
                files.update(lora.write_adapter(scratch, model))
        weights, meta = lora.checkpoint_weights(model)
        path = ckpt.save_checkpoint(ckpt_root, step, model=weights, model_metadata=meta, optimizer=opt.state_dict(),
                                    state=state, rng=rng_state(data_gen, device), extra_files=files)
    except ValueError as e:
        raise StageError(str(e)) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path, ckpt.prune(ckpt_root, keep_last)


def _write_extras(folder: Path, modules: dict, optimizers: dict) -> dict[str, Path]:
    files = {}
    for name, module in modules.items():
        tensors, meta = lora.checkpoint_weights(module)
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata=meta)
        files[f"{name}.safetensors"] = folder / f"{name}.safetensors"
        if lora.has_adapters(module):
            files.update(lora.write_adapter(folder, module, prefix=f"{name}_"))
    for name, o in optimizers.items():
        tensors, meta = ckpt.optimizer_to_files(o.state_dict())
        save_file(tensors, str(folder / f"{name}.safetensors"))
        (folder / f"{name}.json").write_text(json.dumps(meta))
        files.update({f"{name}.safetensors": folder / f"{name}.safetensors", f"{name}.json": folder / f"{name}.json"})
    return files


def resume_run(ckpt_root: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, *, data_gen: torch.Generator,
               device: torch.device, check: Callable[[dict], None],
               modules: Optional[dict[str, torch.nn.Module]] = None,
               optimizers: Optional[dict[str, torch.optim.Optimizer]] = None) -> Optional[ckpt.Checkpoint]:
    """Load the newest checkpoint into the model, the optimizer, the RNGs and the named extras
    (see `save_run_checkpoint`); None when there is none. `check(state)` runs first and raises to
    refuse the resume (a setting that must not change)."""
    latest = ckpt.latest_checkpoint(ckpt_root)
    if latest is None:
        return None
    # Every file is checked before anything is trained. A broken newest checkpoint refuses the
    # resume (naming the file) rather than falling back to the one before, which would quietly
    # redo steps: the user decides, by deleting it.
    saved = ckpt.load_checkpoint(latest)
    saved.field("config", dict)
    check(saved.state)
    _load_module(model, saved.model, latest / "model.safetensors", lora.adapter_path(latest))
    saved.model = {}    # in the model now; a second copy of every weight for the whole run otherwise
    if saved.optimizer is None:
        raise ckpt.CheckpointError(f"{latest / 'optimizer.json'}: missing")
    ckpt.restore_optimizer(opt, saved.optimizer, latest / "optimizer.safetensors")
    for name, module in (modules or {}).items():
        path = latest / f"{name}.safetensors"
        _load_module(module, None if lora.has_adapters(module) else ckpt.load_tensors(path), path,
                     lora.adapter_path(latest, f"{name}_"))
    for name, o in (optimizers or {}).items():
        meta_path = latest / f"{name}.json"
        state = ckpt.optimizer_from_files(ckpt.load_tensors(latest / f"{name}.safetensors"),
                                          ckpt.read_json(meta_path), meta_path)
        ckpt.restore_optimizer(o, state, latest / f"{name}.safetensors")
    try:
        restore_rng(saved.rng, data_gen, device)
    except (KeyError, RuntimeError, TypeError) as e:
        raise ckpt.CheckpointError(f"{latest / 'rng.safetensors'}: not the random state of a run "
                                   f"({type(e).__name__}: {e})") from None
    return saved


def _load_module(module: torch.nn.Module, tensors: Optional[dict], path: Path, adapter: Path) -> None:
    # The metadata is what every other loader builds the model from: it must describe this run's.
    saved_cfg = read_config(path)
    if saved_cfg != module.config:
        diff = [f"{k}={v!r}" for k, v in dataclasses.asdict(saved_cfg).items() if getattr(module.config, k) != v]
        raise ckpt.CheckpointError(f"{path}: the model config in its metadata ({', '.join(diff)}) is not "
                                   "this run's model")
    if lora.has_adapters(module):
        # The stage built the frozen base from its init checkpoint again; only what trained comes
        # back. (The merged file's sums would not give the base back bit for bit.)
        lora.load_adapters(module, adapter)
        return
    weights = with_tied_head(module.config, tensors)
    check_weights(module, weights, path, needs="the model of this run")
    module.load_state_dict(weights)


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

