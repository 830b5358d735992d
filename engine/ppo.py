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
trained in, so its ratio is exactly 1, and the KL before the first update is exactly 0.

Checkpoints hold the policy as model.safetensors (so chat and sampling load a PPO checkpoint
like any other), the value model, both optimizers, the KL controller and the RNG states.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from engine import checkpoint as ckpt
from engine.artifacts import load_artifact
from engine.config import ConfigError, require, resolve_path
from engine.corpus import list_corpus_files
from engine.data import TokenData, encode_corpus, shards_ready
from engine.device import autocast, describe, setup
from engine.generate import generate_batch
from engine.model import ScalarModel, load_model, model_from_state_dict, safetensors_state
from engine.ppo_core import (KLController, gae, logprobs_and_entropy, masked_mean, masked_whiten,
                             per_token_rewards, ppo_losses, shift_values, token_logprobs)
from engine.reward import NORM_FILE
from engine.runio import Emitter, NeverStop, Sink, StageError, stage_main, write_summary
from engine.sample import read_prompts
from engine.sft_data import EpochSampler
from engine.tokenizer import render_chat


@dataclass
class PPOConfig:
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
    target_kl: Optional[float] = None   # set: adapt β toward this KL (nats per answer)
    kl_horizon: int = 10000             # horizon of the adaptive KL controller, in rollouts
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

    def validate(self) -> None:
        for name in ("policy", "reward_model"):
            require(bool(getattr(self, name).strip()), name, "a checkpoint or run folder is required")
        require(len(self.prompts) > 0, "prompts", "at least one prompt file is required")
        for name in ("steps", "rollout_batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens",
                     "kl_horizon", "probe_every", "probe_tokens", "checkpoint_every", "log_every", "ptx_batch_size"):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        require(self.minibatch_size <= self.rollout_batch_size, "minibatch_size",
                "must not exceed rollout_batch_size")
        require(self.temperature > 0, "temperature", "must be positive")
        require(self.kl_coef >= 0, "kl_coef", "must be zero or positive")
        require(self.target_kl is None or self.target_kl > 0, "target_kl", "must be positive (or null for a fixed β)")
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
        require(self.min_entropy >= 0, "min_entropy", "must be zero or positive")
        require(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", "auto, float32, bfloat16 or float16")


FIXED_ON_RESUME = ("policy", "reward_model", "value_model", "prompts", "rollout_batch_size",
                   "minibatch_size", "ppo_epochs", "seed", "ptx_data")


@dataclass
class Rollout:
    ids: torch.Tensor          # [B, T] prompt | answer | pad
    mask: torch.Tensor         # [B, T] 1 on answer tokens (the actions)
    finished: torch.Tensor     # [B] the answer ended with the end token
    answers: list[list[int]]


def build_rollout(prompts: list[list[int]], answers: list[list[int]], end_id: int, pad_id: int) -> Rollout:
    T = max(len(p) + len(a) for p, a in zip(prompts, answers))
    B = len(prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T))
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, len(p):len(p) + len(a)] = 1
    finished = torch.tensor([bool(a) and a[-1] == end_id for a in answers])
    return Rollout(ids, mask, finished, answers)


def chunks(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [order[i:i + size] for i in range(0, order.numel(), size)]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _optimizer(model, lr, device):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                             weight_decay=0.0, fused=device.type == "cuda")


def _clock(device: torch.device) -> float:
    # CUDA and MPS run asynchronously: without a sync, a phase's kernels would be billed to
    # whichever later phase first waits for a result.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def run(cfg: PPOConfig, run_dir: Path, sink: Optional[Sink] = None, control=None) -> str:
    ev = Emitter(sink)
    control = control or NeverStop()
    run_dir = Path(run_dir)
    device, dtype = setup(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)

    pol = load_artifact(resolve_path(run_dir, cfg.policy), device=device, field="policy", prefer="latest")
    tok, policy = pol.tokenizer, pol.model
    if policy.kind != "lm":
        raise ConfigError("policy", f"{pol.checkpoint} holds a {policy.kind} model, not a language model")
    ref = freeze(load_model(pol.checkpoint / "model.safetensors", device=device))
    rm_art = load_artifact(resolve_path(run_dir, cfg.reward_model), device=device, field="reward_model")
    if not isinstance(rm_art.model, ScalarModel):
        raise ConfigError("reward_model", f"{rm_art.checkpoint} is not a reward model (no scalar head)")
    if rm_art.tokenizer.fingerprint() != tok.fingerprint():
        raise ConfigError("reward_model", "the reward model was trained with another tokenizer than the policy")
    norm_path = rm_art.checkpoint / NORM_FILE
    if not norm_path.exists():
        raise ConfigError("reward_model", f"{norm_path} is missing: run the reward stage to its end "
                                          "(it saves the normalisation statistics)")
    norm = json.loads(norm_path.read_text())
    rm = freeze(rm_art.model)
    value_src = resolve_path(run_dir, cfg.value_model) if cfg.value_model else rm_art.checkpoint
    value = load_artifact(value_src, device=device, field="value_model").model
    if not isinstance(value, ScalarModel):
        raise ConfigError("value_model", f"{value_src} is not a scalar-head model")
    value.train()
    policy.train()

    prompts = read_prompts([resolve_path(run_dir, p) for p in cfg.prompts])
    probes = cfg.probe_prompts or prompts[:4]
    limit = policy.config.max_seq_len
    if cfg.max_new_tokens >= limit - 4:
        raise ConfigError("max_new_tokens", f"must leave room for the prompt in the context ({limit} tokens)")

    def encode_prompt(text: str) -> list[int]:
        ids, _ = render_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)
        room = limit - cfg.max_new_tokens
        return ids if len(ids) <= room else [ids[0]] + ids[-(room - 1):]

    ptx = None
    if cfg.ptx_coef > 0:
        files = list_corpus_files([resolve_path(run_dir, p) for p in cfg.ptx_data])
        if not shards_ready(run_dir / "ptx", tok, files):
            if encode_corpus(tok, files, run_dir / "ptx", control=control) is None:
                return "stopped"
        ptx = TokenData(run_dir / "ptx")

    opt_pol = _optimizer(policy, cfg.lr, device)
    opt_val = _optimizer(value, cfg.value_lr, device)
    ema = copy.deepcopy(policy).requires_grad_(False) if cfg.ema_decay > 0 else None
    kl_ctl = KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    sampler = EpochSampler(len(prompts), cfg.seed)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    ckpt_root = run_dir / "checkpoints"
    ckpt.clean_partial(ckpt_root)
    step = 0
    latest = ckpt.latest_checkpoint(ckpt_root)
    if latest is not None:
        saved = ckpt.load_checkpoint(latest)
        old = saved.state["config"]
        changed = [k for k in FIXED_ON_RESUME if old.get(k) != dataclasses.asdict(cfg).get(k)]
        if changed:
            raise ConfigError(changed[0], f"cannot change on resume ({old.get(changed[0])!r} -> "
                                          f"{getattr(cfg, changed[0])!r}); start a new run instead")
        policy.load_state_dict(model_from_state_dict(policy.config, saved.model).state_dict())
        opt_pol.load_state_dict(saved.optimizer)
        value.load_state_dict(load_file(str(latest / "value.safetensors")))
        opt_val.load_state_dict(ckpt.optimizer_from_files(
            load_file(str(latest / "value_optimizer.safetensors")),
            json.loads((latest / "value_optimizer.json").read_text())))
        if ema is not None:
            ema.load_state_dict(model_from_state_dict(policy.config, load_file(str(latest / "ema.safetensors"))).state_dict())
        torch.set_rng_state(saved.rng["torch"])
        data_gen.set_state(saved.rng["data"])
        kl_ctl.load(saved.state["kl_controller"])
        sampler.load(saved.state["sampler"])
        step = saved.step
        ev.log(f"resumed from {latest.name}")

    ev.log(f"device {describe(device)}, {dtype}; policy {pol.checkpoint} ({policy.num_params():,} params), "
           f"reward model {rm_art.checkpoint} (mean {norm['mean']:.3f}, std {norm['std']:.3f}); "
           f"{len(prompts)} prompts, {cfg.steps} steps of {cfg.rollout_batch_size} rollouts")

    def save(reason: str) -> None:
        scratch = run_dir / ".ppo-scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        v_tensors, v_meta = safetensors_state(value)
        save_file(v_tensors, str(scratch / "value.safetensors"), metadata=v_meta)
        o_tensors, o_meta = ckpt.optimizer_to_files(opt_val.state_dict())
        save_file(o_tensors, str(scratch / "value_optimizer.safetensors"))
        (scratch / "value_optimizer.json").write_text(json.dumps(o_meta))
        extra = {"tokenizer.json": pol.tokenizer_path, "value.safetensors": scratch / "value.safetensors",
                 "value_optimizer.safetensors": scratch / "value_optimizer.safetensors",
                 "value_optimizer.json": scratch / "value_optimizer.json"}
        if ema is not None:
            e_tensors, e_meta = safetensors_state(ema)
            save_file(e_tensors, str(scratch / "ema.safetensors"), metadata=e_meta)
            extra["ema.safetensors"] = scratch / "ema.safetensors"
        weights, meta = safetensors_state(policy)
        state = {"stage": "ppo", "reason": reason, "config": dataclasses.asdict(cfg),
                 "kl_controller": kl_ctl.state(), "sampler": sampler.state(),
                 "tokenizer_fingerprint": tok.fingerprint(), "model_config": dataclasses.asdict(policy.config)}
        try:
            path = ckpt.save_checkpoint(ckpt_root, step, model=weights, model_metadata=meta,
                                        optimizer=opt_pol.state_dict(), state=state,
                                        rng={"torch": torch.get_rng_state(), "data": data_gen.get_state()},
                                        extra_files=extra)
        except ValueError as e:
            raise StageError(str(e)) from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        ckpt.prune(ckpt_root, cfg.keep_last)  # no val loss in PPO: the newest are kept
        ev.emit("checkpoint", step=step, path=str(path.relative_to(run_dir)), best=False)

    @torch.no_grad()
    def probe() -> None:
        ids = [encode_prompt(p) for p in probes]
        outs = generate_batch(policy, ids, cfg.probe_tokens, temperature=0.0, stop_ids=(tok.end_id,), pad_id=tok.pad_id)
        ro = build_rollout(ids, outs, tok.end_id, tok.pad_id)
        last = ro.ids.new_tensor([len(p) + len(a) - 1 for p, a in zip(ids, outs)])
        scores = (rm(ro.ids.to(device))[torch.arange(len(ids)), last.to(device)] - norm["mean"]) / norm["std"]
        for p, a, s, fin in zip(probes, outs, scores.tolist(), ro.finished.tolist()):
            ev.emit("sample", step=step, prompt=p, text=tok.decode(a, skip_special=True), score=round(s, 4),
                    finished=fin)
        policy.train()

    if step == 0:
        probe()
    t_start, start_step, metrics = time.perf_counter(), step, {}
    while step < cfg.steps:
        if control.should_stop():
            save("stop")
            return "stopped"
        t0 = _clock(device)
        idx = sampler.take(cfg.rollout_batch_size)
        prompt_ids = [encode_prompt(prompts[i]) for i in idx]
        seeds = torch.randint(0, 2 ** 62, (len(idx),), generator=data_gen).tolist()
        answers = generate_batch(policy, prompt_ids, cfg.max_new_tokens, temperature=cfg.temperature,
                                 seed=seeds, stop_ids=(tok.end_id,), pad_id=tok.pad_id)
        policy.train()
        ro = build_rollout(prompt_ids, answers, tok.end_id, tok.pad_id)
        ids, mask = ro.ids.to(device), ro.mask.to(device)
        B = ids.size(0)
        t_gen = _clock(device) - t0

        # Score in the order and shapes of the first PPO epoch, so its first minibatch sees
        # bit-identical inputs: ratio 1 exactly, and KL 0 exactly against an identical reference.
        perm0 = torch.randperm(B, generator=data_gen)
        old_logp, ref_logp, entropy, old_values = (torch.zeros(ids.shape, device=device) for _ in range(4))
        raw = torch.zeros(B, device=device)
        last = (mask * torch.arange(ids.size(1), device=device)).argmax(1)
        with torch.no_grad(), autocast(device, dtype):
            for c in chunks(perm0, cfg.minibatch_size):
                logits = policy(ids[c])
                old_logp[c], entropy[c] = logprobs_and_entropy(logits, ids[c], cfg.temperature)
                ref_logp[c] = token_logprobs(ref(ids[c]), ids[c], cfg.temperature)
                old_values[c] = shift_values(value(ids[c]))
                raw[c] = rm(ids[c])[torch.arange(len(c), device=device), last[c]].float()
        scores = ((raw - norm["mean"]) / norm["std"]).clamp(-cfg.reward_clip, cfg.reward_clip)
        scores = scores - cfg.missing_end_penalty * (~ro.finished.to(device)).float()
        beta = kl_ctl.value
        rewards, kl = per_token_rewards(old_logp, ref_logp, mask, scores, beta)
        adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, mask)
        t_score = _clock(device) - t0 - t_gen

        stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "clipfrac", "approxkl", "ratio", "vclip", "ptx")}
        first_ratio = None
        for epoch in range(cfg.ppo_epochs):
            order = perm0 if epoch == 0 else torch.randperm(B, generator=data_gen)
            for c in chunks(order, cfg.minibatch_size):
                with autocast(device, dtype):
                    new_logp = token_logprobs(policy(ids[c]), ids[c], cfg.temperature)
                    new_values = shift_values(value(ids[c]))
                    L = ppo_losses(new_logp, old_logp[c], adv[c], new_values, old_values[c], returns[c],
                                   mask[c], cfg.cliprange, cfg.cliprange_value)
                    loss = L.total_policy + cfg.vf_coef * L.value
                    if ptx is not None:
                        x, y = ptx.get_batch("train", cfg.ptx_batch_size, min(limit, 128), data_gen)
                        ptx_loss = policy(x.to(device), y.to(device))[1]
                        loss = loss + cfg.ptx_coef * ptx_loss
                        stats["ptx"].append(float(ptx_loss.detach()))
                if first_ratio is None:
                    first_ratio = float(L.ratio)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                    torch.nn.utils.clip_grad_norm_(value.parameters(), cfg.grad_clip)
                opt_pol.step()
                opt_val.step()
                opt_pol.zero_grad(set_to_none=True)
                opt_val.zero_grad(set_to_none=True)
                for k, v in (("pg", L.total_policy), ("vf", L.value), ("clipfrac", L.clipfrac),
                             ("approxkl", L.approxkl), ("ratio", L.ratio), ("vclip", L.value_clipfrac)):
                    stats[k].append(float(v.detach()))
        if ema is not None:
            with torch.no_grad():
                for pe, pp in zip(ema.parameters(), policy.parameters()):
                    pe.lerp_(pp, 1 - cfg.ema_decay)
        t_train = _clock(device) - t0 - t_gen - t_score
        step += 1
        kl_seq = kl.sum(1)
        kl_ctl.update(float(kl_seq.mean()), B)
        mean = lambda k: sum(stats[k]) / max(1, len(stats[k]))
        q = torch.quantile(scores.float().cpu(), torch.tensor([0.1, 0.5, 0.9]))
        metrics = {
            "objective/kl": float(kl_seq.mean()), "objective/kl_coef": beta,
            "objective/entropy": float(masked_mean(entropy, mask)),
            "objective/score": float(scores.mean()), "objective/score_raw": float(raw.mean()),
            "objective/rlhf_reward": float((scores - beta * kl_seq).mean()),
            "policy/clipfrac": mean("clipfrac"), "policy/approxkl": mean("approxkl"),
            "loss/policy": mean("pg"), "loss/value": mean("vf"), "value/clipfrac": mean("vclip"),
            "val/ratio": mean("ratio"), "val/ratio_first": first_ratio,
            "rollout/length": float(mask.sum(1).mean()), "rollout/eos_fraction": float(ro.finished.float().mean()),
            "score/std": float(scores.std()), "score/min": float(scores.min()), "score/max": float(scores.max()),
            "score/p10": float(q[0]), "score/p50": float(q[1]), "score/p90": float(q[2]),
            # Rollout, then the policy/reference/value/RM passes and GAE, then the PPO epochs;
            # step_s adds this bookkeeping. The share says where a faster PPO must come from.
            "time/generation_s": round(t_gen, 3), "time/scoring_s": round(t_score, 3),
            "time/training_s": round(t_train, 3), "time/step_s": round(time.perf_counter() - t0, 3),
            "time/generation_share": round(t_gen / max(t_gen + t_score + t_train, 1e-9), 4),
        }
        if stats["ptx"]:
            metrics["loss/ptx"] = mean("ptx")
        for name, v in metrics.items():
            if not math.isfinite(v):
                raise StageError(f"non-finite {name} ({v}) at step {step}: stopped before saving it")
        if metrics["objective/kl"] > cfg.kl_limit:
            raise StageError(f"objective/kl = {metrics['objective/kl']:.3f} at step {step} exceeds kl_limit "
                             f"{cfg.kl_limit}: the policy is drifting from the reference (raise kl_coef or lower lr)")
        if metrics["objective/entropy"] < cfg.min_entropy:
            raise StageError(f"objective/entropy = {metrics['objective/entropy']:.4f} at step {step} is below "
                             f"min_entropy {cfg.min_entropy}: the policy has collapsed")
        if step % cfg.log_every == 0 or step == cfg.steps:
            ev.metrics(step, metrics)
            elapsed = time.perf_counter() - t_start
            ev.progress(step, cfg.steps, None, elapsed, elapsed / (step - start_step) * (cfg.steps - step))
        if step % cfg.probe_every == 0 or step == cfg.steps:
            probe()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save("final" if step == cfg.steps else "periodic")

    summary = {"stage": "ppo", "step": step, "checkpoint": str(ckpt.latest_checkpoint(ckpt_root).relative_to(run_dir)),
               **{k: v for k, v in metrics.items() if not k.startswith("time/")}}
    write_summary(run_dir, summary)
    return "completed"


def main(argv: list[str] | None = None) -> int:
    return stage_main("ppo", PPOConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
