"""GRPO with verifiable rewards: G answers per prompt, each judged against its own group.

    python -m engine.grpo --run-dir DIR

Policy: starts from `policy` (an SFT or PPO checkpoint); the reference is that checkpoint,
frozen. No value model and no reward model needed: the reward is a weighted sum of the functions
in engine/grpo_rewards.py (the demo's task checker, a reward model, length and format rules,
your own Python function), each switched on by a non-zero weight.

Each step: sample `group_size` answers to each of `prompts_per_step` prompts (batched, each
answer with a seed of its own); score them with every reward function; an answer's advantage is
its reward minus its group's mean, divided by the group's std unless `scale_rewards` is off;
score every answer token with the policy and the reference (fp32 log-probs, the sampling
temperature dividing the logits of both); then `grpo_epochs` passes of the clipped surrogate,
plus β·k3 toward the reference when kl_coef > 0, averaged over all answer tokens of a minibatch.
As in PPO, the first minibatch is scored in the very order and shapes it is trained in, its
policy pass kept with its graph for the first update (which then runs no forward of its own), so
its ratio is exactly 1, and the KL before the first update is exactly 0.

`eval_tasks` (held-out tasks, never trained on) gives the greedy task accuracy at the start,
every `eval_every` steps and at the end. With lora_rank > 0 the policy trains LoRA adapters on
a frozen base and the reference is the policy with its adapters off (engine.lora). Checkpoints
hold the policy as model.safetensors, so chat, sampling and evaluation load a GRPO checkpoint
like any other.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from engine import checkpoint as ckpt
from engine.artifacts import RunInputs
from engine.chat import task_metrics
from engine.config import ConfigError, require, resolve_path
from engine.device import autocast, check_train_dtype, clock, describe, precision_warning, setup
from engine.generate import generate_batch
from engine.grpo_core import group_advantages, grpo_losses, kl_k3, mean_std, uniform_groups
from engine.grpo_rewards import (Answers, FormatReward, LengthReward, RewardModelReward, TaskReward, UserReward,
                                 check_user_file, load_user_function, parse_user_spec, score_all)
from engine.lora import LORA_FIELDS, LoRASettings, add_adapters, describe as describe_lora, reference_for, uses_lora
from engine.model import ModelConfig
from engine.ppo import check_guards, encode_prompt
from engine.ppo_core import (AnswerStates, Rollout, as_scored, build_rollout, chunks, logprobs_entropy_of, logprobs_of,
                             masked_mean)
from engine.reward import load_reward_model, peek_reward_model
from engine.runio import Emitter, NeverStop, Sink, StageError, reported_at, stage_main, write_summary
from engine.sample import read_prompts
from engine.sft_data import EpochSampler, read_tasks
from engine.trackers import TrackerSettings
from engine.trainer import (COLLAPSE_STEPS, CollapseWatch, check_resume, check_resume_preflight, clip_grads,
                            optimizer_step, policy_optimizer, resume_run, run_summary, save_run_checkpoint)


@dataclass
class GRPOConfig(LoRASettings, TrackerSettings):
    policy: str                         # SFT (or PPO) checkpoint or run folder; also the frozen reference
    prompts: list[str]                  # .txt one per line, or .jsonl with "prompt" (the checker scores task prompts)
    reward_model: Optional[str] = None  # reward-model checkpoint or run folder, used when rm_weight is not 0
    tokenizer: Optional[str] = None     # tokenizer.json or tokenizer run; null: the policy checkpoint's own
    eval_tasks: Optional[str] = None    # held-out tasks (JSONL), never trained on: greedy accuracy now and then
    eval_task_limit: int = 100          # the first N held-out tasks (0: all)
    eval_every: int = 25                # held-out task accuracy every N steps
    eval_tokens: int = 32               # answer length limit when checking the held-out tasks
    probe_prompts: list[str] = field(default_factory=list)  # empty: the first 4 prompts
    task_weight: float = 1.0            # weight of the task checker: 1 for a correct answer to a task prompt, else 0
    rm_weight: float = 0.0              # weight of the reward model's normalised, clipped score
    length_weight: float = 0.0          # weight of the length rule: -max(0, tokens - length_target) / max_new_tokens
    length_target: int = 0              # answer tokens the length rule allows before it penalises
    format_weight: float = 0.0          # weight of the format rule: 1 if the answer ended and matches format_regex
    format_regex: str = ""              # Python regex the whole stripped answer must match ("": any answer that ended)
    user_reward: Optional[str] = None   # "file.py:func", func(prompt, answer) -> float: your code, run in this process
    user_weight: float = 1.0            # weight of user_reward
    steps: int = 100                    # GRPO iterations (sample groups, update)
    prompts_per_step: int = 8           # prompts per iteration
    group_size: int = 8                 # G: answers sampled per prompt, compared with each other
    minibatch_size: int = 32            # answers per gradient step
    grpo_epochs: int = 1                # passes over each iteration's answers
    scale_rewards: bool = True          # divide advantages by the group's reward std (false: Dr. GRPO, mean only)
    skip_uniform_groups: bool = True    # leave groups whose answers all scored alike (zero advantage) out of the update
    max_new_tokens: int = 24            # answer length limit in tokens
    temperature: float = 1.0            # sampling temperature (it divides the logits when scoring too)
    kl_coef: float = 0.0                # β of the k3 KL-to-reference term in the loss (0: off; KL is reported anyway)
    cliprange: float = 0.2              # ratio clip epsilon
    reward_clip: float = 5.0            # the reward model's normalised scores are clipped to ±reward_clip
    lr: float = 1e-5                    # learning rate of the policy
    grad_clip: float = 1.0              # gradient norm clip (0: off)
    kl_limit: float = 50.0              # guard: stop when objective/kl exceeds this
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
        self.validate_lora_without_dropout("GRPO")
        self.validate_trackers()
        require(bool(self.policy.strip()), "policy", "a checkpoint or run folder is required")
        require(len(self.prompts) > 0, "prompts", "at least one prompt file is required")
        for name in ("steps", "prompts_per_step", "minibatch_size", "grpo_epochs", "max_new_tokens", "eval_every",
                     "eval_tokens", "probe_every", "probe_tokens", "checkpoint_every", "log_every"):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        require(self.group_size >= 2, "group_size", "must be at least 2: an answer is judged against its group")
        require(self.minibatch_size <= self.prompts_per_step * self.group_size, "minibatch_size",
                "must not exceed prompts_per_step x group_size (the answers of one step)")
        require(self.eval_task_limit >= 0, "eval_task_limit", "must be zero (all) or positive")
        require(self.eval_tasks is None or bool(self.eval_tasks.strip()), "eval_tasks", "empty path")
        require(self.rm_weight == 0 or bool(self.reward_model), "reward_model",
                f"rm_weight is {self.rm_weight}: a reward model is needed (or set rm_weight to 0)")
        if self.user_reward is not None:
            check_user_file(self.user_reward)
        require(self.length_target >= 0, "length_target", "must be zero or positive")
        try:
            re.compile(self.format_regex)
        except re.error as e:
            raise ConfigError("format_regex", f"not a valid regular expression: {e}") from None
        active = [self.task_weight, self.rm_weight, self.length_weight, self.format_weight,
                  self.user_weight if self.user_reward else 0.0]
        require(any(w != 0 for w in active), "task_weight",
                "every reward function has weight 0 (or user_reward is not set): nothing to learn from")
        require(self.temperature > 0, "temperature", "must be positive")
        require(self.kl_coef >= 0, "kl_coef", "must be zero or positive")
        require(0 < self.cliprange < 1, "cliprange", "must be in (0, 1)")
        require(self.reward_clip > 0, "reward_clip", "must be positive")
        require(self.lr > 0, "lr", "must be positive")
        require(self.grad_clip >= 0, "grad_clip", "must be zero or positive")
        require(self.kl_limit > 0, "kl_limit", "must be positive")
        require(self.min_entropy >= 0, "min_entropy", "must be zero or positive")
        require(self.keep_last > 0, "keep_last", "must be a positive integer")
        check_train_dtype(self.dtype)


FIXED_ON_RESUME = ("policy", "tokenizer", "prompts", "prompts_per_step", "group_size", "minibatch_size", "grpo_epochs",
                   "seed", *LORA_FIELDS)
# Resuming with these changed is allowed, but the run is then no longer an exact continuation.
WARN_ON_RESUME = ("lr", "grad_clip", "cliprange", "kl_coef", "scale_rewards", "skip_uniform_groups",
                  "temperature", "max_new_tokens",
                  "task_weight", "rm_weight", "length_weight", "format_weight", "user_weight", "user_reward",
                  "reward_model", "format_regex", "length_target")


@dataclass
class Scored:
    """One step's answers, rewarded and scored: what the update trains on."""
    rows: torch.Tensor         # the answers the update trains on
    order: torch.Tensor        # the first epoch's minibatch order of those, which scoring used too
    logp: torch.Tensor         # [N, T] policy log-probs at sampling time (the "old" ones)
    ref_logp: torch.Tensor     # [N, T] reference log-probs
    entropy: torch.Tensor      # [N, T] of the policy's sampling distribution
    scores: dict               # reward function name -> [N] unweighted scores
    rewards: torch.Tensor      # [N] weighted total
    advantages: torch.Tensor   # [N] group-relative
    # The first minibatch's policy logits at its answer states, with their graph: the first
    # update's forward pass. Taken (and dropped) by that update.
    first_pass: Optional[torch.Tensor] = None


class GRPO:
    """One GRPO run: the policy, its reference, the reward functions and the prompt stream, with
    one method per phase of an iteration (rollout, score, update, report)."""

    def __init__(self, cfg: GRPOConfig, run_dir: Path, device: torch.device, dtype: torch.dtype, ev: Emitter):
        self.cfg, self.run_dir, self.device, self.dtype, self.ev = cfg, run_dir, device, dtype, ev
        tok_arg = str(resolve_path(run_dir, cfg.tokenizer)) if cfg.tokenizer else None
        self.inputs = RunInputs(run_dir, cfg, ev.log)       # the policy is also the reference: required
        art = self.inputs.load("policy", resolve_path(run_dir, cfg.policy), tokenizer=tok_arg, device=device,
                               prefer="latest", kind="lm")
        if uses_lora(cfg):
            add_adapters(art.model, cfg, cfg.seed)
            ev.log(f"policy: {describe_lora(art.model)}; the reference is the policy with its adapters off")
        art.model.grad_checkpointing = cfg.grad_checkpointing
        self.policy, self.tok, self.art = art.model.train(), art.tokenizer, art
        self.ref = reference_for(self.policy, art.checkpoint, device)
        self.limit = self.policy.config.max_seq_len
        check_lengths(cfg, self.policy.config)
        self.prompts = read_prompts([resolve_path(run_dir, p) for p in cfg.prompts])
        self.tasks = read_tasks(resolve_path(run_dir, cfg.eval_tasks), cfg.eval_task_limit) if cfg.eval_tasks else []
        self.probes = cfg.probe_prompts or self.prompts[:4]
        self.fns = self._reward_functions()
        self.opt = policy_optimizer(self.policy, cfg.lr, device)
        self.sampler = EpochSampler(len(self.prompts), cfg.seed)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.watch = CollapseWatch(math.log(self.policy.config.vocab_size), what="objective/entropy")
        self.ckpt_root = run_dir / "checkpoints"
        self.step = 0
        self.flat = 0                      # steps in a row whose groups all scored alike
        self.first_eval: Optional[float] = None
        self.last_eval: Optional[float] = None

    def _reward_functions(self) -> list:
        """The functions with a non-zero weight, each checked before any work."""
        cfg, fns = self.cfg, []
        if cfg.task_weight:
            self.checker = TaskReward(cfg.task_weight)
            n = int(self.checker.judged(self.prompts).sum())
            if n == 0:
                raise ConfigError("prompts", f"none of the {len(self.prompts)} prompts is a task the checker can "
                                             "score (engine/tasks.py): give task prompts, or set task_weight to 0")
            if n < len(self.prompts):
                self.ev.log(f"{len(self.prompts) - n} of {len(self.prompts)} prompts are not tasks the checker "
                            "can score: their task reward is always 0", level="warning")
            fns.append(self.checker)
        if cfg.rm_weight:
            rm, norm, where = load_reward_model(self.inputs, resolve_path(self.run_dir, cfg.reward_model),
                                                self.tok.fingerprint(), self.device)
            self.ev.log(f"reward model {where} (mean {norm['mean']:.3f}, std {norm['std']:.3f})")
            fns.append(RewardModelReward(cfg.rm_weight, rm, norm, cfg.reward_clip, cfg.minibatch_size,
                                         self.device, self.dtype))
        elif cfg.reward_model:
            self.ev.log("reward_model is set but rm_weight is 0: the reward model is not used")
        if cfg.length_weight:
            fns.append(LengthReward(cfg.length_weight, cfg.length_target, cfg.max_new_tokens))
        if cfg.format_weight:
            fns.append(FormatReward(cfg.format_weight, cfg.format_regex))
        if cfg.user_reward and cfg.user_weight:
            path = resolve_path(self.run_dir, parse_user_spec(cfg.user_reward)[0])
            fns.append(UserReward(cfg.user_weight, cfg.user_reward, load_user_function(cfg.user_reward, path), path))
        return fns

    def encode_prompt(self, text: str) -> list[int]:
        return encode_prompt(self.tok, text, self.limit, self.cfg.max_new_tokens)

    # --- checkpoints ----------------------------------------------------------------------------
    def _user_fingerprint(self) -> Optional[str]:
        return next((fn.fingerprint() for fn in self.fns if isinstance(fn, UserReward)), None)

    def resume(self) -> None:
        for p in ckpt.clean_partial(self.ckpt_root):
            self.ev.log(f"removed {p.name}, left by a save that was interrupted")
        saved = resume_run(self.ckpt_root, self.policy, self.opt, data_gen=self.data_gen, device=self.device,
                           check=lambda s: check_resume(s["config"], self.cfg, FIXED_ON_RESUME, self.ev,
                                                        warn=WARN_ON_RESUME))
        if saved is None:
            return
        self.sampler.load(saved.state["sampler"])
        self.watch.load(saved.state.get("collapse"))
        self.flat = int(saved.state.get("flat", 0))
        self.step = saved.step
        self.first_eval, self.last_eval = saved.state.get("first_eval"), saved.state.get("last_eval")
        if saved.state.get("user_reward_sha256") != self._user_fingerprint():
            self.ev.log("the user_reward file changed since this run started: the run is no longer an exact "
                        "continuation", level="warning")
        self.ev.log(f"resumed from {saved.path.name}")

    def save(self, reason: str) -> None:
        state = {"stage": "grpo", "reason": reason, "config": dataclasses.asdict(self.cfg),
                 "sampler": self.sampler.state(), "tokenizer_fingerprint": self.tok.fingerprint(),
                 "model_config": dataclasses.asdict(self.policy.config), "first_eval": self.first_eval,
                 "last_eval": self.last_eval, "user_reward_sha256": self._user_fingerprint(), **self.inputs.state(),
                 "collapse": self.watch.state(), "flat": self.flat}
        path, removed = save_run_checkpoint(self.ckpt_root, self.step, self.policy, self.opt, data_gen=self.data_gen,
                                            device=self.device, state=state, keep_last=self.cfg.keep_last,
                                            extra_files=self.art.tokenizer_files)
        self.ev.emit("checkpoint", step=self.step, path=str(path.relative_to(self.run_dir)), best=False,
                     removed=[p.name for p in removed])

    # --- one iteration --------------------------------------------------------------------------
    def answers(self, prompts: list[str], outs: list[list[int]], ro: Rollout) -> Answers:
        texts = [self.tok.decode(a[:-1] if done else a, skip_special=True)
                 for a, done in zip(outs, ro.finished.tolist())]
        last = (ro.mask * torch.arange(ro.ids.size(1))).argmax(1)
        return Answers(prompts, texts, ro.finished.tolist(), [len(a) for a in outs],
                       as_scored(ro.ids, last, ro.finished, self.tok.end_id), ro.mask)

    def rollout(self) -> tuple[Rollout, Answers]:
        """group_size answers to each of prompts_per_step prompts, rows grouped by prompt."""
        cfg, tok = self.cfg, self.tok
        texts = [self.prompts[i] for i in self.sampler.take(cfg.prompts_per_step) for _ in range(cfg.group_size)]
        ids = [self.encode_prompt(t) for t in texts]
        seeds = torch.randint(0, 2 ** 62, (len(ids),), generator=self.data_gen).tolist()
        outs = generate_batch(self.policy, ids, cfg.max_new_tokens, temperature=cfg.temperature, seed=seeds,
                              stop_ids=tok.turn_end_ids, pad_id=tok.pad_id)
        self.policy.train()
        ro = build_rollout(ids, outs, tok.turn_end_ids, tok.pad_id)
        return ro, self.answers(texts, outs, ro)

    @torch.no_grad()
    def score(self, ro: Rollout, a: Answers) -> Scored:
        """Rewards and advantages, then the policy's and the reference's log-probs of every
        answer (KL and entropy are reported over all of them). The answers the update trains on
        come first, in the order and shapes of the first epoch's minibatches, so its first
        minibatch sees bit-identical inputs: ratio exactly 1."""
        cfg, device = self.cfg, self.device
        scores, rewards = score_all(self.fns, a)
        adv = group_advantages(rewards, cfg.group_size, cfg.scale_rewards).to(device)
        ids = ro.ids.to(device)
        train = torch.ones(ids.size(0), dtype=torch.bool)
        if cfg.skip_uniform_groups:
            # DAPO's filter: zero advantage, so no gradient from the surrogate; training on them
            # would only cost time and dilute the token average.
            train = ~uniform_groups(rewards, cfg.group_size).repeat_interleave(cfg.group_size)
        rows = train.nonzero().squeeze(1)
        order = rows[torch.randperm(rows.numel(), generator=self.data_gen)]
        logp, ref_logp, entropy = (torch.zeros(ids.shape, device=device) for _ in range(3))
        mask, lengths = ro.mask.to(device), ro.lengths.to(device)
        first = None
        with autocast(device, self.dtype):
            for n, c in enumerate(chunks(order, cfg.minibatch_size)
                                  + chunks((~train).nonzero().squeeze(1), cfg.minibatch_size)):
                st = AnswerStates.of(ids[c], mask[c])
                keep = n == 0 and order.numel() > 0          # the first update's own pass
                with torch.set_grad_enabled(keep):
                    logits = self.policy(ids[c], at=st.at, lengths=lengths[c])
                if keep:
                    first = logits
                lp, ent = logprobs_entropy_of(logits.detach(), st.targets, cfg.temperature)
                logp[c], entropy[c] = st.spread(lp), st.spread(ent)
                ref_logp[c] = st.spread(logprobs_of(self.ref(ids[c], at=st.at, lengths=lengths[c]), st.targets, cfg.temperature))
        return Scored(rows, order, logp, ref_logp, entropy, scores, rewards, adv, first)

    def update(self, ro: Rollout, sc: Scored) -> dict[str, list[float]]:
        """grpo_epochs passes of clipped updates over minibatches; their statistics."""
        cfg, device = self.cfg, self.device
        ids, mask, lengths = ro.ids.to(device), ro.mask.to(device), ro.lengths.to(device)
        stats: dict[str, list[float]] = {k: [] for k in ("pg", "kl", "clipfrac", "approxkl", "ratio", "grad_norm")}
        for epoch in range(cfg.grpo_epochs):
            order = sc.order if epoch == 0 else sc.rows[torch.randperm(sc.rows.numel(), generator=self.data_gen)]
            for c in chunks(order, cfg.minibatch_size):
                with autocast(device, self.dtype):
                    st = AnswerStates.of(ids[c], mask[c])
                    logits, sc.first_pass = sc.first_pass, None
                    if logits is None:
                        logits = self.policy(ids[c], at=st.at, lengths=lengths[c])
                    new_logp = st.spread(logprobs_of(logits, st.targets, cfg.temperature))
                    L = grpo_losses(new_logp, sc.logp[c], sc.ref_logp[c], sc.advantages[c], mask[c],
                                    cfg.cliprange, cfg.kl_coef)
                L.loss.backward()
                stats["grad_norm"].append(clip_grads(self.policy.parameters(), cfg.grad_clip))
                optimizer_step(self.opt, self.step + 1)
                self.opt.zero_grad(set_to_none=True)
                for k, v in (("pg", L.policy), ("kl", L.kl), ("clipfrac", L.clipfrac), ("approxkl", L.approxkl),
                             ("ratio", L.ratio)):
                    stats[k].append(float(v.detach()))
        return stats

    def report(self, ro: Rollout, a: Answers, sc: Scored, stats: dict, times: dict[str, float]) -> dict[str, float]:
        """The iteration's metrics: reward per function, task accuracy, uniform groups, KL..."""
        cfg, mask = self.cfg, ro.mask.to(self.device)
        mean = lambda k: sum(stats[k]) / max(1, len(stats[k]))  # noqa: E731
        kl = (sc.logp - sc.ref_logp) * mask
        trained = bool(stats["ratio"])      # False: every group scored alike, and skip_uniform_groups is on
        total_mean, total_std = mean_std(sc.rewards)
        metrics = {"reward/total": total_mean, "reward/total_std": total_std}
        for fn in self.fns:
            metrics[fn.key], metrics[fn.key + "_std"] = mean_std(sc.scores[fn.name])
        if "task" in sc.scores:
            # Accuracy over the answers to task prompts only: the others score 0 whatever they say.
            judged = self.checker.judged(a.prompts)
            metrics["task/accuracy"] = float(sc.scores["task"][judged].mean()) if judged.any() else 0.0
            metrics["task/judged_fraction"] = float(judged.float().mean())
        busy = times["generation"] + times["scoring"] + times["training"]
        metrics.update({
            "groups/uniform_fraction": float(uniform_groups(sc.rewards, cfg.group_size).float().mean()),
            "objective/kl": float(kl.sum(1).mean()),
            "objective/kl_k3": float(masked_mean(kl_k3(sc.logp, sc.ref_logp, mask), mask)),
            "objective/entropy": float(masked_mean(sc.entropy, mask)),
            "policy/clipfrac": mean("clipfrac"), "policy/approxkl": mean("approxkl"),
            "policy/grad_norm": mean("grad_norm"), "policy/trained_fraction": sc.rows.numel() / ro.ids.size(0),
            "loss/policy": mean("pg"), "loss/kl": mean("kl"),
            # With no update the policy is its old self: the ratio is 1 by definition.
            "val/ratio": mean("ratio") if trained else 1.0, "val/ratio_first": stats["ratio"][0] if trained else 1.0,
            "rollout/length": float(mask.sum(1).mean()), "rollout/eos_fraction": float(ro.finished.float().mean()),
            **{f"time/{k}_s": round(v, 3) for k, v in times.items()},
            "time/generation_share": round(times["generation"] / max(busy, 1e-9), 4),
        })
        return metrics

    def check(self, metrics: dict[str, float]) -> None:
        """The guards, before the step is saved: a non-finite figure, KL beyond kl_limit, entropy
        below min_entropy, and a collapse (gradients gone, or entropy at ln V) stop the run."""
        cfg, step = self.cfg, self.step
        check_guards(metrics, cfg, step)
        # A step with no update says nothing about the gradients (NaN is never 0 to the watch);
        # a run of them, every group alike for COLLAPSE_STEPS steps, is a run that cannot learn.
        self.flat = self.flat + 1 if metrics["groups/uniform_fraction"] == 1 else 0
        if self.flat >= COLLAPSE_STEPS:
            raise StageError(f"every group's answers have scored alike for {self.flat} steps in a row "
                             f"(to step {step}): nothing to learn from. The prompts are too hard or too easy for the "
                             "policy, or the reward cannot tell its answers apart: check the reward functions and "
                             "their weights.")
        trained = metrics["policy/trained_fraction"] > 0
        self.watch.check(step, metrics["policy/grad_norm"] if trained else math.nan, metrics["objective/entropy"],
                         cfg.lr)

    def iteration(self) -> dict[str, float]:
        """Sample, reward and score, update; the step is counted and its metrics checked."""
        t0 = clock(self.device)
        ro, a = self.rollout()
        t1 = clock(self.device)
        sc = self.score(ro, a)
        t2 = clock(self.device)
        stats = self.update(ro, sc)
        t3 = clock(self.device)
        self.step += 1
        metrics = self.report(ro, a, sc, stats, {"generation": t1 - t0, "scoring": t2 - t1, "training": t3 - t2,
                                              "step": time.perf_counter() - t0})
        self.check(metrics)
        return metrics

    # --- what a person watches ------------------------------------------------------------------
    @torch.no_grad()
    def probe(self) -> None:
        """Greedy answers to the probe prompts, with their total reward, as sample events."""
        tok = self.tok
        ids = [self.encode_prompt(p) for p in self.probes]
        outs = generate_batch(self.policy, ids, self.cfg.probe_tokens, temperature=0.0, stop_ids=tok.turn_end_ids,
                              pad_id=tok.pad_id)
        self.policy.train()
        ro = build_rollout(ids, outs, tok.turn_end_ids, tok.pad_id)
        a = self.answers(list(self.probes), outs, ro)
        _, total = score_all(self.fns, a)
        for p, text, r, fin in zip(self.probes, a.texts, total.tolist(), a.finished):
            self.ev.emit("sample", step=self.step, prompt=p, text=text, score=round(r, 4), finished=fin)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on the held-out tasks ({} without eval_tasks)."""
        if not self.tasks:
            return {}
        values = task_metrics(self.policy, self.tok, self.tasks, self.cfg.eval_tokens)
        self.policy.train()
        acc = values["eval/task_accuracy"]
        self.first_eval = acc if self.first_eval is None else self.first_eval
        self.last_eval = acc
        self.ev.log(f"held-out task accuracy {acc:.1%} on {len(self.tasks)} tasks at step {self.step}")
        return values


def check_lengths(cfg: GRPOConfig, policy: ModelConfig) -> None:
    for name in ("max_new_tokens", "eval_tokens", "probe_tokens"):
        policy.check_room(name, getattr(cfg, name))


def preflight(cfg: GRPOConfig, run_dir: Path) -> None:
    """What would end a run of `cfg` at once, found without loading a model (see engine.sft)."""
    inputs = RunInputs(run_dir, cfg)
    policy = inputs.peek("policy", resolve_path(run_dir, cfg.policy), prefer="latest", kind="lm")
    if cfg.rm_weight:
        peek_reward_model(inputs, resolve_path(run_dir, cfg.reward_model))
    check_lengths(cfg, policy.config)
    check_resume_preflight(run_dir, cfg, FIXED_ON_RESUME)


def run(cfg: GRPOConfig, run_dir: Path, sink: Optional[Sink] = None, control=None) -> str:
    ev = Emitter(sink)
    control = control or NeverStop()
    run_dir = Path(run_dir)
    device, dtype = setup(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    g = GRPO(cfg, run_dir, device, dtype, ev)
    if warning := precision_warning(cfg.dtype, device, dtype):
        ev.log(warning, level="warning")
    g.resume()
    ev.log(f"device {describe(device, dtype)}; policy {g.art.checkpoint} ({g.policy.num_params():,} params); "
           f"rewards {' + '.join(f'{fn.weight:g}·{fn.name}' for fn in g.fns)}; {len(g.prompts)} prompts, "
           f"{cfg.steps} steps of {cfg.prompts_per_step} prompts x {cfg.group_size} answers")
    if g.step == 0:
        first = g.evaluate()
        if first:
            ev.metrics(0, first)
        g.probe()
    # Resumed at its last step (killed after its final checkpoint, or run again): the summary
    # keeps the figures that step reported.
    t_start, start_step = time.perf_counter(), g.step
    metrics = reported_at(run_dir, g.step) if g.step >= cfg.steps else {}
    while g.step < cfg.steps:
        if control.should_stop():
            g.save("stop")
            return "stopped"
        metrics = g.iteration()
        step = g.step
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics.update(g.evaluate())
        if step % cfg.log_every == 0 or step == cfg.steps or "eval/task_accuracy" in metrics:
            ev.metrics(step, metrics)
            elapsed = time.perf_counter() - t_start
            ev.progress(step, cfg.steps, None, elapsed, elapsed / (step - start_step) * (cfg.steps - step))
        if step % cfg.probe_every == 0 or step == cfg.steps:
            g.probe()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            g.save("final" if step == cfg.steps else "periodic")
    summary = {k: v for k, v in run_summary(run_dir, cfg).items() if v is not None}
    if g.tasks:
        summary.update(task_accuracy_before=g.first_eval, task_accuracy_after=g.last_eval, eval_tasks=len(g.tasks))
    write_summary(run_dir, {"stage": "grpo", **summary, **{k: v for k, v in metrics.items()
                                                           if not k.startswith(("time/", "eval/acc/"))}})
    return "completed"


def main(argv: list[str] | None = None) -> int:
    return stage_main("grpo", GRPOConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
