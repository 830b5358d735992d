"""PPO against a frozen reward model (InstructGPT's third step), with optional PPO-ptx.

    python -m engine.ppo --run-dir DIR

Policy: starts from the SFT checkpoint `policy`. Reference: that SFT model, frozen. Reward: the
RM checkpoint `reward_model`, frozen, its scores normalised with the statistics the reward stage
saved (reward_norm.json) and clipped. Value model: starts from the RM (or `value_model`).

Each step: sample one answer to each of `rollout_batch_size` prompts; score every answer token
with the policy, the reference and the value model (fp32 log-probs, the sampling temperature
dividing the logits of both); per-token reward -β(log π - log π_ref) with the RM score added at
the last answer token; GAE; then `ppo_epochs` passes of clipped policy and value updates over
minibatches. The first minibatch is scored at rollout time in the very order and shapes it is
trained in, its policy and value passes with their graphs kept: the first update trains on those
very passes instead of running them again (the weights have not moved since), so its ratio is
exactly 1, and the KL before the first update is exactly 0.

β is kl_coef, or, with target_kl, adapted toward that KL per answer each step (ppo_core's
KLController), read as objective/kl_exact: each answer's KL summed over the whole next-token
distributions of the states it visits, not only over the tokens drawn (objective/kl). kl_budget ends a run early but well: once the mean KL of the last KL_WINDOW steps
passes it, the step is saved and the run completes; kl_limit is the guard that fails a run.

With lora_rank > 0 the policy and the value model train LoRA adapters on frozen bases
(engine.lora), and the reference is the policy with its adapters switched off: the SFT weights
are held once.

Checkpoints hold the policy as model.safetensors (so chat and sampling load a PPO checkpoint
like any other), the value model, both optimizers, the KL controller and its window of recent
KLs, and the RNG states; under LoRA each model's adapters too (engine.lora).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from engine import checkpoint as ckpt
from engine.artifacts import RunInputs
from engine.config import require, resolve_path
from engine.corpus import config_corpus_files
from engine.data import TokenData, encode_corpus, shards_ready
from engine.device import autocast, check_train_dtype, clock, describe, precision_warning, setup
from engine.generate import generate_batch
from engine.lora import (LORA_FIELDS, LoRASettings, Reference, add_adapters, describe as describe_lora,
                         frozen_copy, reference_for, uses_lora)
from engine.model import ScalarModel
from engine.ragged import scores_at_ends
from engine.ppo_core import (BETA_RANGE, AnswerStates, KLController, Rollout, as_scored, build_rollout, chunks, gae,
                             logprobs_of, masked_mean, masked_whiten, per_token_rewards, ppo_losses,
                             reference_figures_of)
from engine.reward import load_reward_model, peek_reward_model
from engine.runio import Emitter, NeverStop, Sink, StageError, reported_at, stage_main, write_summary
from engine.sample import read_prompts
from engine.sft_data import EpochSampler
from engine.tokenizer import Tokenizer, tokenizer_files
from engine.trackers import TrackerSettings
from engine.trainer import (CollapseWatch, check_resume, check_resume_preflight, clip_grads, optimizer_step,
                            policy_optimizer, resume_run, run_summary, save_run_checkpoint)

@dataclass
class PPOConfig(LoRASettings, TrackerSettings):
    policy: str                         # SFT checkpoint or run folder (also the frozen reference)
    reward_model: str                   # reward-model checkpoint or run folder
    prompts: list[str]                  # .txt one per line, or .jsonl with "prompt"
    value_model: Optional[str] = None   # None: start the value model from the reward model
    probe_prompts: list[str] = field(default_factory=list)  # empty: the first 4 prompts
    ptx_data: list[str] = field(default_factory=list)       # pretraining text, for PPO-ptx
    ptx_coef: float = 0.0               # γ: weight of the pretraining loss (0 = plain PPO)
    ptx_batch_size: int = 4             # pretraining sequences per PPO-ptx minibatch
    steps: int = 50                     # PPO iterations (rollout + update)
    rollout_batch_size: int = 16        # prompts per PPO iteration (one answer each)
    minibatch_size: int = 8             # rollouts per PPO update
    ppo_epochs: int = 2                 # passes over each rollout batch
    max_new_tokens: int = 24            # answer length limit in tokens
    temperature: float = 1.0            # sampling temperature (it divides the logits when scoring too)
    kl_coef: float = 0.05               # β, the start value when adaptive
    target_kl: Optional[float] = None   # set: adapt β toward this KL (nats per answer, summed over its tokens); a step's KL is estimated from its answers, so more of them (rollout_batch_size) hold single steps closer
    kl_horizon: Optional[int] = None    # adaptive β: rollouts to move β e-fold at full error (null: 10 steps' worth)
    kl_budget: Optional[float] = None   # set: end the run (saved, completed) once the mean KL of 10 steps passes this
    cliprange: float = 0.2              # PPO ratio clip epsilon
    cliprange_value: float = 0.2        # value-function clip
    vf_coef: float = 0.1                # weight of the value loss
    gamma: float = 1.0                  # discount
    lam: float = 0.95                   # GAE lambda
    whiten_advantages: bool = True      # normalise advantages over each rollout batch's answer tokens
    reward_clip: float = 5.0            # normalised scores are clipped to ±reward_clip
    missing_end_penalty: float = 1.0    # subtracted from the score of an answer with no end token
    lr: float = 1e-5                    # learning rate of the policy
    value_lr: float = 1e-5              # learning rate of the value model
    grad_clip: float = 1.0              # gradient norm clip of each model (0: off)
    ema_decay: float = 0.0              # > 0: keep an EMA of the policy, saved as ema.safetensors
    kl_limit: float = 50.0              # guard: fail the run when objective/kl exceeds this
    min_entropy: float = 0.01           # guard: stop when objective/entropy falls below this
    probe_every: int = 10               # greedy answers to the probe prompts every N steps
    probe_tokens: int = 32              # answer length of the probe samples
    checkpoint_every: int = 50          # save a checkpoint every N steps (and always at the end or on stop)
    keep_last: int = 2                  # newest checkpoints kept
    log_every: int = 1                  # metrics every N steps
    seed: int = 0                       # random seed: the same seed and settings give the same run
    device: str = "auto"                # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"                 # auto (bf16 on CUDA, else fp32) | float32 | bfloat16
    grad_checkpointing: bool = False    # recompute each layer's activations in the backward pass: less memory, about a third more compute

    def validate(self) -> None:
        self.validate_lora_without_dropout("PPO")
        self.validate_trackers()
        for name in ("policy", "reward_model"):
            require(bool(getattr(self, name).strip()), name, "a checkpoint or run folder is required")
        require(len(self.prompts) > 0, "prompts", "at least one prompt file is required")
        for name in ("steps", "rollout_batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens",
                     "probe_every", "probe_tokens", "checkpoint_every", "log_every", "ptx_batch_size"):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        require(self.minibatch_size <= self.rollout_batch_size, "minibatch_size",
                "must not exceed rollout_batch_size")
        require(self.temperature > 0, "temperature", "must be positive")
        require(self.kl_coef >= 0, "kl_coef", "must be zero or positive")
        require(self.target_kl is None or self.target_kl > 0, "target_kl", "must be positive (or null for a fixed β)")
        lo, hi = BETA_RANGE
        require(self.target_kl is None or lo <= self.kl_coef <= hi, "kl_coef",
                f"must be in [{lo:g}, {hi:g}] when target_kl adapts it (the range β is kept in)")
        require(self.kl_horizon is None or self.kl_horizon > 0, "kl_horizon", "must be a positive integer (or null)")
        require(0 < self.cliprange < 1, "cliprange", "must be in (0, 1)")
        require(self.cliprange_value > 0, "cliprange_value", "must be positive")
        require(self.vf_coef >= 0, "vf_coef", "must be zero or positive")
        require(0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
        require(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        require(self.reward_clip > 0, "reward_clip", "must be positive")
        require(self.missing_end_penalty >= 0, "missing_end_penalty", "must be zero or positive (it is subtracted)")
        require(self.lr > 0 and self.value_lr > 0, "lr", "learning rates must be positive")
        require(self.grad_clip >= 0, "grad_clip", "must be zero or positive")
        require(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        require(self.ptx_coef >= 0, "ptx_coef", "must be zero or positive")
        require(self.ptx_coef == 0 or self.ptx_data, "ptx_data", "PPO-ptx (ptx_coef > 0) needs pretraining text")
        require(self.kl_limit > 0, "kl_limit", "must be positive")
        require(self.kl_budget is None or 0 < self.kl_budget < self.kl_limit, "kl_budget",
                f"must be positive and below kl_limit ({self.kl_limit:g}, the guard that fails the run), or null")
        require(self.min_entropy >= 0, "min_entropy", "must be zero or positive")
        check_train_dtype(self.dtype)


# ema_decay: the EMA is one of the run's saved models from its first step, or none is.
FIXED_ON_RESUME = ("policy", "reward_model", "value_model", "prompts", "rollout_batch_size",
                   "minibatch_size", "ppo_epochs", "seed", "ptx_data", "ema_decay", *LORA_FIELDS)
# Resuming with these changed is allowed, but the run is then no longer an exact continuation.
WARN_ON_RESUME = ("lr", "value_lr", "grad_clip", "cliprange", "cliprange_value", "vf_coef", "ptx_coef",
                  "kl_coef", "target_kl", "kl_horizon", "temperature", "max_new_tokens")
KL_WINDOW = 10      # steps in the mean KL that kl_budget is held to (objective/kl_mean)


def encode_prompt(tok, text: str, limit: int, max_new_tokens: int) -> list[int]:
    """A prompt as the policy reads it, its middle cut when it leaves no room for the answer."""
    ids, _ = tok.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    room = limit - max_new_tokens
    return ids if len(ids) <= room else [ids[0]] + ids[-(room - 1):]


def check_guards(metrics: dict[str, float], cfg, step: int) -> None:
    """The guards PPO and GRPO share (cfg: lr, kl_limit, min_entropy), before a step is saved."""
    for name, v in metrics.items():
        if not math.isfinite(v):
            raise StageError(f"non-finite {name} ({v}) at step {step}: stopped before saving it. "
                             f"Lower lr (now {cfg.lr:.3g}) and start again from the last checkpoint.")
    if metrics["objective/kl"] > cfg.kl_limit:
        raise StageError(f"objective/kl = {metrics['objective/kl']:.3f} at step {step} exceeds kl_limit "
                         f"{cfg.kl_limit}: the policy is drifting from the reference (raise kl_coef or lower lr)")
    if metrics["objective/entropy"] < cfg.min_entropy:
        raise StageError(f"objective/entropy = {metrics['objective/entropy']:.4f} at step {step} is below "
                         f"min_entropy {cfg.min_entropy}: the policy has collapsed")


@dataclass
class Models:
    """The policy and the three frozen or separately trained models PPO scores it with."""
    policy: torch.nn.Module
    ref: torch.nn.Module | Reference    # the policy with its adapters off, under LoRA
    rm: ScalarModel
    value: ScalarModel
    norm: dict                 # the RM's score statistics over SFT answers (mean, std)
    tok: Tokenizer
    policy_ckpt: Path
    tokenizer_path: Path
    rm_ckpt: Path


def preflight(cfg: PPOConfig, run_dir: Path) -> None:
    """What would end a run of `cfg` at once, found without loading a model (see engine.sft)."""
    inputs = RunInputs(run_dir, cfg)
    policy = inputs.peek("policy", resolve_path(run_dir, cfg.policy), prefer="latest", kind="lm")
    peek_reward_model(inputs, resolve_path(run_dir, cfg.reward_model))
    if cfg.value_model:
        inputs.peek("value_model", resolve_path(run_dir, cfg.value_model), required=uses_lora(cfg), kind="scalar")
    policy.config.check_room("max_new_tokens", cfg.max_new_tokens)
    check_resume_preflight(run_dir, cfg, FIXED_ON_RESUME)


def load_models(cfg: PPOConfig, run_dir: Path, device: torch.device, inputs: RunInputs) -> Models:
    """Every model PPO needs, each checked before any work: a wrong one is a ConfigError naming it."""
    # The policy is also the reference, so it is required on a resume, as is the reward model.
    pol = inputs.load("policy", resolve_path(run_dir, cfg.policy), device=device, prefer="latest", kind="lm")
    rm, norm, rm_ckpt = load_reward_model(inputs, resolve_path(run_dir, cfg.reward_model),
                                          pol.tokenizer.fingerprint(), device)
    # Under LoRA a resume rebuilds the value model's frozen base from its source.
    value_src = resolve_path(run_dir, cfg.value_model) if cfg.value_model else rm_ckpt
    value = inputs.load("value_model", value_src, device=device, required=uses_lora(cfg), kind="scalar").model
    policy = pol.model
    if uses_lora(cfg):
        add_adapters(policy, cfg, cfg.seed)
        add_adapters(value, cfg, cfg.seed + 1)      # its own draw: the two start unrelated
    for model in (policy, value):
        model.grad_checkpointing = cfg.grad_checkpointing
    ref = reference_for(policy, pol.checkpoint, device)
    return Models(policy=policy.train(), ref=ref, rm=rm, value=value.train(), norm=norm, tok=pol.tokenizer,
                  policy_ckpt=pol.checkpoint, tokenizer_path=pol.tokenizer_path, rm_ckpt=rm_ckpt)


@dataclass
class Scored:
    """A rollout scored by all four models: what the PPO epochs train on."""
    order: torch.Tensor        # the first epoch's minibatch order, which scoring used too
    logp: torch.Tensor         # [B, T] policy log-probs at rollout time (the PPO "old" ones)
    entropy: torch.Tensor      # [B, T] of the policy's sampling distribution
    values: torch.Tensor       # [B, T] value model, at rollout time
    raw: torch.Tensor          # [B] RM score before normalisation
    scores: torch.Tensor       # [B] normalised, clipped, minus the missing-end penalty
    kl: torch.Tensor           # [B, T] log π - log π_ref on the actions
    kl_exact: torch.Tensor     # [B] each answer's KL summed over its states' whole distributions
    advantages: torch.Tensor
    returns: torch.Tensor
    beta: float
    # The first minibatch's policy logits (at its answer states) and value outputs, with their
    # graphs: the first update's forward passes. Taken (and dropped) by that update.
    first_passes: Optional[tuple[torch.Tensor, torch.Tensor]] = None


class PPO:
    """One PPO run: the models, both optimizers, the EMA, the KL controller and the prompt
    stream, with one method per phase of an iteration (rollout, score, update, report)."""

    def __init__(self, cfg: PPOConfig, run_dir: Path, device: torch.device, dtype: torch.dtype, ev: Emitter):
        self.cfg, self.run_dir, self.device, self.dtype, self.ev = cfg, run_dir, device, dtype, ev
        self.inputs = RunInputs(run_dir, cfg, ev.log)
        self.m = load_models(cfg, run_dir, device, self.inputs)
        self.prompts = read_prompts([resolve_path(run_dir, p) for p in cfg.prompts])
        self.probes = cfg.probe_prompts or self.prompts[:4]
        self.limit = self.m.policy.config.max_seq_len
        self.m.policy.config.check_room("max_new_tokens", cfg.max_new_tokens)
        self.ptx: Optional[TokenData] = None
        self.opt_pol = policy_optimizer(self.m.policy, cfg.lr, device)
        self.opt_val = policy_optimizer(self.m.value, cfg.value_lr, device)
        self.ema = frozen_copy(self.m.policy) if cfg.ema_decay > 0 else None
        self.kl_ctl = KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon or 10 * cfg.rollout_batch_size)
        self.kl_recent: list[float] = []     # the last KL_WINDOW steps' objective/kl_exact
        self.sampler = EpochSampler(len(self.prompts), cfg.seed)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.watch = CollapseWatch(math.log(self.m.policy.config.vocab_size), what="objective/entropy")
        self.ckpt_root = run_dir / "checkpoints"
        self.step = 0

    def encode_prompt(self, text: str) -> list[int]:
        return encode_prompt(self.m.tok, text, self.limit, self.cfg.max_new_tokens)

    def prepare_ptx(self, control) -> bool:
        """Encode the PPO-ptx corpus (once; reused on resume). False: stopped while encoding."""
        if self.cfg.ptx_coef > 0:
            files = config_corpus_files(self.run_dir, self.cfg.ptx_data, "ptx_data")
            if not shards_ready(self.run_dir / "ptx", self.m.tok, files):
                if encode_corpus(self.m.tok, files, self.run_dir / "ptx", control=control) is None:
                    return False
            self.ptx = TokenData(self.run_dir / "ptx")
        return True

    # --- checkpoints: the trainer's helpers, with PPO's extra models ------------------------
    def _extras(self) -> tuple[dict, dict]:
        modules = {"value": self.m.value, **({"ema": self.ema} if self.ema is not None else {})}
        return modules, {"value_optimizer": self.opt_val}

    def resume(self) -> None:
        for p in ckpt.clean_partial(self.ckpt_root):
            self.ev.log(f"removed {p.name}, left by a save that was interrupted")
        modules, optimizers = self._extras()
        saved = resume_run(self.ckpt_root, self.m.policy, self.opt_pol, data_gen=self.data_gen, device=self.device,
                           check=lambda s: check_resume(s["config"], self.cfg, FIXED_ON_RESUME, self.ev,
                                                        warn=WARN_ON_RESUME),
                           modules=modules, optimizers=optimizers)
        if saved is not None:
            self.kl_ctl.load(saved.state["kl_controller"])
            self.kl_recent = [float(k) for k in saved.state.get("kl_recent", [])]
            self.sampler.load(saved.state["sampler"])
            self.watch.load(saved.state.get("collapse"))
            self.step = saved.step
            self.ev.log(f"resumed from {saved.path.name}")
            before = saved.state["config"].get("kl_coef", self.cfg.kl_coef)
            if before != self.cfg.kl_coef:
                # A β changed by hand on resume is the one wanted from now on, not the saved one
                # (an adaptive β starts from it again).
                self.kl_ctl.reset(self.cfg.kl_coef)
                self.ev.log(f"β is kl_coef {self.cfg.kl_coef:g} from here on (it was {before:g} when saved)")

    def save(self, reason: str) -> None:
        state = {"stage": "ppo", "reason": reason, "config": dataclasses.asdict(self.cfg),
                 "kl_controller": self.kl_ctl.state(), "kl_recent": self.kl_recent, "sampler": self.sampler.state(),
                 "collapse": self.watch.state(),
                 "tokenizer_fingerprint": self.m.tok.fingerprint(), **self.inputs.state(),
                 "model_config": dataclasses.asdict(self.m.policy.config)}
        modules, optimizers = self._extras()
        # No validation loss in PPO: pruning keeps the newest.
        path, removed = save_run_checkpoint(self.ckpt_root, self.step, self.m.policy, self.opt_pol,
                                            data_gen=self.data_gen, device=self.device, state=state,
                                            keep_last=self.cfg.keep_last,
                                            extra_files=tokenizer_files(self.m.tokenizer_path),
                                            modules=modules, optimizers=optimizers)
        self.ev.emit("checkpoint", step=self.step, path=str(path.relative_to(self.run_dir)), best=False,
                     removed=[p.name for p in removed])

    # --- one iteration ----------------------------------------------------------------------
    def rollout(self) -> Rollout:
        """One sampled answer to each of rollout_batch_size prompts, each with a seed of its own."""
        cfg, tok = self.cfg, self.m.tok
        prompt_ids = [self.encode_prompt(self.prompts[i]) for i in self.sampler.take(cfg.rollout_batch_size)]
        seeds = torch.randint(0, 2 ** 62, (len(prompt_ids),), generator=self.data_gen).tolist()
        answers = generate_batch(self.m.policy, prompt_ids, cfg.max_new_tokens, temperature=cfg.temperature,
                                 seed=seeds, stop_ids=tok.turn_end_ids, pad_id=tok.pad_id)
        self.m.policy.train()
        return build_rollout(prompt_ids, answers, tok.turn_end_ids, tok.pad_id)

    @torch.no_grad()
    def score(self, ro: Rollout) -> Scored:
        """Log-probs, entropy, values and RM scores of a rollout, then rewards and GAE.

        Scored in the order and shapes of the first PPO epoch, so its first minibatch sees
        bit-identical inputs: ratio 1 exactly, and KL 0 exactly against an identical reference.
        """
        cfg, m, device = self.cfg, self.m, self.device
        ids, mask, lengths = ro.ids.to(device), ro.mask.to(device), ro.lengths.to(device)
        order = torch.randperm(ids.size(0), generator=self.data_gen)
        logp, ref_logp, entropy, values = (torch.zeros(ids.shape, device=device) for _ in range(4))
        raw, kl_exact = torch.zeros(ids.size(0), device=device), torch.zeros(ids.size(0), device=device)
        last = (mask * torch.arange(ids.size(1), device=device)).argmax(1)
        scored = as_scored(ids, last, ro.finished, m.tok.end_id)
        first = None
        with autocast(device, self.dtype):
            for n, c in enumerate(chunks(order, cfg.minibatch_size)):
                st = AnswerStates.of(ids[c], mask[c])
                with torch.set_grad_enabled(n == 0):    # the first update's own passes
                    pol_logits = m.policy(ids[c], at=st.at, lengths=lengths[c])
                    val = m.value(ids[c], at=st.at, lengths=lengths[c])      # [M]: at the states too
                if n == 0:
                    first = (pol_logits, val)
                figures = reference_figures_of(pol_logits.detach(), m.ref(ids[c], at=st.at, lengths=lengths[c]), st.targets,
                                               cfg.temperature)
                logp[c], entropy[c], ref_logp[c], kl_state = (st.spread(f) for f in figures)
                kl_exact[c] = kl_state.sum(1)
                values[c] = st.spread(val.detach())
                raw[c] = scores_at_ends(m.rm, scored[c], last[c])
        scores = ((raw - m.norm["mean"]) / m.norm["std"]).clamp(-cfg.reward_clip, cfg.reward_clip)
        scores = scores - cfg.missing_end_penalty * (~ro.finished.to(device)).float()
        beta = self.kl_ctl.value
        rewards, kl = per_token_rewards(logp, ref_logp, mask, scores, beta)
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, mask)
        return Scored(order, logp, entropy, values, raw, scores, kl, kl_exact, adv, returns, beta, first)

    def update(self, ro: Rollout, sc: Scored) -> dict[str, list[float]]:
        """ppo_epochs passes of clipped policy and value updates over minibatches; their statistics."""
        cfg, m, device = self.cfg, self.m, self.device
        ids, mask, lengths = ro.ids.to(device), ro.mask.to(device), ro.lengths.to(device)
        stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "clipfrac", "approxkl", "ratio", "vclip",
                                                         "ptx", "grad_norm")}
        for epoch in range(cfg.ppo_epochs):
            order = sc.order if epoch == 0 else torch.randperm(ids.size(0), generator=self.data_gen)
            for c in chunks(order, cfg.minibatch_size):
                with autocast(device, self.dtype):
                    st = AnswerStates.of(ids[c], mask[c])
                    passes, sc.first_passes = sc.first_passes, None
                    pol_logits, val = passes or (m.policy(ids[c], at=st.at, lengths=lengths[c]),
                                                 m.value(ids[c], at=st.at, lengths=lengths[c]))
                    new_logp = st.spread(logprobs_of(pol_logits, st.targets, cfg.temperature))
                    new_values = st.spread(val)
                    L = ppo_losses(new_logp, sc.logp[c], sc.advantages[c], new_values, sc.values[c],
                                   sc.returns[c], mask[c], cfg.cliprange, cfg.cliprange_value)
                    loss = L.total_policy + cfg.vf_coef * L.value + self._ptx_loss(stats)
                loss.backward()
                stats["grad_norm"].append(clip_grads(m.policy.parameters(), cfg.grad_clip))
                clip_grads(m.value.parameters(), cfg.grad_clip)
                for opt in (self.opt_pol, self.opt_val):
                    optimizer_step(opt, self.step + 1)
                    opt.zero_grad(set_to_none=True)
                for k, v in (("pg", L.total_policy), ("vf", L.value), ("clipfrac", L.clipfrac),
                             ("approxkl", L.approxkl), ("ratio", L.ratio), ("vclip", L.value_clipfrac)):
                    stats[k].append(float(v.detach()))
        if self.ema is not None:
            with torch.no_grad():
                for pe, pp in zip(self.ema.parameters(), m.policy.parameters()):
                    if pe is not pp:        # a frozen base the EMA shares under LoRA
                        pe.lerp_(pp, 1 - cfg.ema_decay)
        return stats

    def _ptx_loss(self, stats: dict) -> torch.Tensor | float:
        """PPO-ptx: γ times the pretraining loss on a batch of the ptx corpus (0 without one)."""
        if self.ptx is None:
            return 0.0
        x, y = self.ptx.get_batch("train", self.cfg.ptx_batch_size, min(self.limit, 128), self.data_gen)
        loss = self.m.policy(x.to(self.device), y.to(self.device), loss_only=True)
        stats["ptx"].append(float(loss.detach()))
        return self.cfg.ptx_coef * loss

    def report(self, ro: Rollout, sc: Scored, stats: dict, times: dict[str, float]) -> dict[str, float]:
        """The iteration's metrics (DESIGN's checklist item 9 and more)."""
        mask = ro.mask.to(self.device)
        kl_seq = sc.kl.sum(1)
        mean = lambda k: sum(stats[k]) / max(1, len(stats[k]))  # noqa: E731
        q = torch.quantile(sc.scores.float().cpu(), torch.tensor([0.1, 0.5, 0.9]))
        busy = times["generation"] + times["scoring"] + times["training"]
        metrics = {
            "objective/kl": float(kl_seq.mean()), "objective/kl_exact": float(sc.kl_exact.mean()),
            "objective/kl_coef": sc.beta,
            "objective/entropy": float(masked_mean(sc.entropy, mask)),
            "objective/score": float(sc.scores.mean()), "objective/score_raw": float(sc.raw.mean()),
            "objective/rlhf_reward": float((sc.scores - sc.beta * kl_seq).mean()),
            "policy/clipfrac": mean("clipfrac"), "policy/approxkl": mean("approxkl"),
            "policy/grad_norm": mean("grad_norm"),
            "loss/policy": mean("pg"), "loss/value": mean("vf"), "value/clipfrac": mean("vclip"),
            "val/ratio": mean("ratio"), "val/ratio_first": stats["ratio"][0],
            "rollout/length": float(mask.sum(1).mean()), "rollout/eos_fraction": float(ro.finished.float().mean()),
            "score/std": float(sc.scores.std()), "score/min": float(sc.scores.min()),
            "score/max": float(sc.scores.max()),
            "score/p10": float(q[0]), "score/p50": float(q[1]), "score/p90": float(q[2]),
            # Rollout, then the policy/reference/value/RM passes and GAE, then the PPO epochs;
            # step_s adds this bookkeeping. The share says where a faster PPO must come from.
            **{f"time/{k}_s": round(v, 3) for k, v in times.items()},
            "time/generation_share": round(times["generation"] / max(busy, 1e-9), 4),
        }
        if stats["ptx"]:
            metrics["loss/ptx"] = mean("ptx")
        return metrics

    def check(self, metrics: dict[str, float]) -> None:
        """The guards: a non-finite figure, KL beyond kl_limit, entropy below min_entropy, and a
        collapse (gradients gone, or entropy at ln V) stop the run, before it is saved."""
        cfg, step = self.cfg, self.step
        check_guards(metrics, cfg, step)
        self.watch.check(step, metrics["policy/grad_norm"], metrics["objective/entropy"], cfg.lr)

    def iteration(self) -> dict[str, float]:
        """Rollout, score, update; the step is counted and its metrics checked."""
        t0 = clock(self.device)
        ro = self.rollout()
        t1 = clock(self.device)
        sc = self.score(ro)
        t2 = clock(self.device)
        stats = self.update(ro, sc)
        t3 = clock(self.device)
        self.step += 1
        # The controller and the budget read the exact KL (objective/kl_exact): the same figure
        # as objective/kl in expectation, with the noise of the drawn tokens taken out.
        kl = float(sc.kl_exact.mean())
        self.kl_ctl.update(kl, ro.ids.size(0))
        self.kl_recent = (self.kl_recent + [kl])[-KL_WINDOW:]
        metrics = self.report(ro, sc, stats, {"generation": t1 - t0, "scoring": t2 - t1, "training": t3 - t2,
                                              "step": time.perf_counter() - t0})
        # One batch's KL is noisy (a few answers far from the reference move it a lot): the
        # budget is held to the mean of the last KL_WINDOW steps, drawn beside it.
        metrics["objective/kl_mean"] = sum(self.kl_recent) / len(self.kl_recent)
        self.check(metrics)
        return metrics

    def over_budget(self, metrics: dict[str, float]) -> bool:
        """Has the mean KL passed kl_budget? Then the run ends here, saved, as completed."""
        return self.cfg.kl_budget is not None and metrics["objective/kl_mean"] > self.cfg.kl_budget

    @torch.no_grad()
    def probe(self) -> None:
        """Greedy answers to the probe prompts, with their scores, as sample events."""
        m, tok, device = self.m, self.m.tok, self.device
        ids = [self.encode_prompt(p) for p in self.probes]
        outs = generate_batch(m.policy, ids, self.cfg.probe_tokens, temperature=0.0, stop_ids=tok.turn_end_ids,
                              pad_id=tok.pad_id)
        ro = build_rollout(ids, outs, tok.turn_end_ids, tok.pad_id)
        last = ro.lengths - 1
        scored = as_scored(ro.ids, last, ro.finished, tok.end_id)
        scores = (scores_at_ends(m.rm, scored.to(device), last.to(device)) - m.norm["mean"]) / m.norm["std"]
        for p, a, s, fin in zip(self.probes, outs, scores.tolist(), ro.finished.tolist()):
            self.ev.emit("sample", step=self.step, prompt=p, text=tok.decode(a, skip_special=True),
                         score=round(s, 4), finished=fin)
        m.policy.train()


def run(cfg: PPOConfig, run_dir: Path, sink: Optional[Sink] = None, control=None) -> str:
    ev = Emitter(sink)
    control = control or NeverStop()
    run_dir = Path(run_dir)
    device, dtype = setup(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    ppo = PPO(cfg, run_dir, device, dtype, ev)
    if warning := precision_warning(cfg.dtype, device, dtype):
        ev.log(warning, level="warning")
    if not ppo.prepare_ptx(control):
        return "stopped"
    ppo.resume()
    m = ppo.m
    if uses_lora(cfg):
        ev.log(f"policy: {describe_lora(m.policy)}; value model: {describe_lora(m.value)}; "
               "the reference is the policy with its adapters off")
    ev.log(f"device {describe(device, dtype)}; policy {m.policy_ckpt} ({m.policy.num_params():,} params), "
           f"reward model {m.rm_ckpt} (mean {m.norm['mean']:.3f}, std {m.norm['std']:.3f}); "
           f"{len(ppo.prompts)} prompts, {cfg.steps} steps of {cfg.rollout_batch_size} rollouts")
    if ppo.step == 0:
        ppo.probe()
    # Resumed at its last step (killed after its final checkpoint, or run again): the summary
    # keeps the figures that step reported.
    t_start, start_step, spent = time.perf_counter(), ppo.step, False
    metrics = reported_at(run_dir, ppo.step) if ppo.step >= cfg.steps else {}
    while ppo.step < cfg.steps:
        if control.should_stop():
            ppo.save("stop")
            return "stopped"
        metrics = ppo.iteration()
        step, spent = ppo.step, ppo.over_budget(metrics)
        last = step == cfg.steps or spent
        if step % cfg.log_every == 0 or last:
            ev.metrics(step, metrics)
            elapsed = time.perf_counter() - t_start
            ev.progress(step, cfg.steps, None, elapsed, elapsed / (step - start_step) * (cfg.steps - step))
        if step % cfg.probe_every == 0 or last:
            ppo.probe()
        if step % cfg.checkpoint_every == 0 or last:
            ppo.save("kl_budget" if spent else "final" if last else "periodic")
        if spent:
            ev.log(f"stopped at the KL budget: the mean KL of the last {len(ppo.kl_recent)} steps, "
                   f"{metrics['objective/kl_mean']:.3f} nats, passed kl_budget {cfg.kl_budget:g} at step {step} "
                   f"of {cfg.steps}; step {step} is saved and is the run's result")
            break
    summary = {k: v for k, v in run_summary(run_dir, cfg).items() if v is not None}
    if spent:
        summary["kl_budget_step"] = ppo.step
    write_summary(run_dir, {"stage": "ppo", **summary, **{k: v for k, v in metrics.items() if not k.startswith("time/")}})
    return "completed"


def main(argv: list[str] | None = None) -> int:
    return stage_main("ppo", PPOConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
