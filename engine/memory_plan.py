"""The peak memory a stage's run will need, estimated from its settings before Start.

    p = plan("causal-lm", model_cfg, batch_size=16, seq_len=256, dtype="float32", device="cpu")
    p.describe(free_memory("cpu"))   # "≈ 2.3 GB peak (backward): weights 0.5, optimizer 1.0, ..."
    p.fits(free), p.suggestions(free)

A run's memory peaks at one moment, not as the sum of everything it ever holds: during the
backward pass every saved activation is alive but almost no gradient yet (autograd frees a
layer's saved tensors as it writes that layer's gradients), while at the optimizer step every
gradient is alive and no activation. So a plan is a list of phases (backward, optimizer step,
generation, scoring; and the end of the backward for a tied head), each the bytes alive together
at that moment; the plan's fields are the breakdown of the largest one, and they add up to `total`.

What each model and step keeps, tensor by tensor, is engine/memory_tensors.py's (checked against
torch's saved-tensor hooks and allocator events by tests/test_memory_plan.py).

Beyond the tensors: a fixed process overhead, and on Linux CPU what glibc's heap keeps (see
GLIBC_HEAP_SLACK). On CUDA the plan is the tensor bytes plus a context; the caching allocator's
own fragmentation is not modelled. Sizes are bytes; describe() shows decimal GB (1e9).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from engine.device import fused_adamw
from engine.memory_tensors import (DEFAULT_LORA_TARGETS, LINEARS, adapter_count, forward_scratch, kv_cache_bytes,
                                   generation_workspace, largest_param, param_count, train_activations)

# What a run holds in memory, by its shape: a language model trained on its tokens (pretraining,
# SFT), a scalar model on K answers (the reward model), a policy on answer pairs against a
# reference (DPO), PPO's four models, GRPO's groups, generation alone (sampling, chat). Which
# stage has which shape is the stage catalogue's fact (workbench/stages.py, `memory`).
SHAPES = ("causal-lm", "ranking", "preference", "actor-critic", "group-rl", "generation")
TRAINING = SHAPES[:-1]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_HINT_RANK = 16           # the rank a suggestion proposes
GB = 1e9

# A fresh stage process before its first tensor: the interpreter, torch and its thread pools,
# our imports, and for training torch.optim's (it pulls in much of torch._dynamo). Measured by
# bench/memory_plan.py (docs/PERFORMANCE.md). On CUDA what counts is the device side: the CUDA
# context and cuBLAS workspaces, which the driver stops reporting as free once the run starts;
# that figure is the usual size of a context, not measured here.
RUNTIME_OVERHEAD = {"cpu": 320 * 2**20, "mps": 320 * 2**20, "cuda": 512 * 2**20}
INFERENCE_OVERHEAD = {"cpu": 240 * 2**20, "mps": 240 * 2**20, "cuda": 512 * 2**20}
# engine.lora builds adapters with peft, whose import brings transformers along (host memory).
PEFT_IMPORT = 160 * 2**20

# glibc's malloc raises its mmap threshold to the largest block freed so far (up to 32 MiB), so
# after the first step activations, gradients and optimizer state all come from the heap, which
# keeps the holes they leave as they take turns instead of returning them: a CPU run's RSS
# settles above its live tensors by an amount of the order of its activations. The share is
# fitted to bench/memory_plan.py's runs, not derived. A fixed threshold (MALLOC_MMAP_THRESHOLD_
# in the environment the stage inherits) turns the effect off, and the plan drops the term.
GLIBC_HEAP_SLACK = 0.7

# PPO scores a minibatch with policy and reference logits, both log-softmaxes, the policy's
# probabilities and two temporaries of the KL term alive at once (engine.ppo_core.
# reference_figures_of); GRPO runs policy then reference, so fewer at once. Each is [M, vocab]
# fp32, M the minibatch's answer states (`at=`).
SCORING_LOGIT_COPIES = {"actor-critic": 7, "group-rl": 4}


@dataclass(frozen=True)
class Suggestion:
    text: str
    changes: Optional[dict]           # keyword overrides for plan(); None: nothing makes it fit
    plan: Optional["Plan"]            # the plan with them


@dataclass(frozen=True)
class Plan:
    """Bytes alive at the run's peak, by kind; `phases` has every phase's breakdown."""
    stage: str
    device: str
    weights: int
    gradients: int
    optimizer: int          # alive in every phase of a training run
    activations: int
    workspace: int          # working tensors outside autograd: AdamW's step, prefill logits, scoring
    kv_cache: int
    other_models: int       # PPO's reference, value and reward models, DPO's and GRPO's reference
    allocator: int          # what the C allocator keeps beyond live tensors (glibc, CPU)
    overhead: int
    total: int
    phase: str
    phases: dict = field(repr=False)
    detail: dict = field(repr=False)      # the activation model's terms, for tests and tooltips
    inputs: dict = field(repr=False)      # plan()'s arguments, so suggestions can re-plan

    def fits(self, free_bytes: int) -> bool:
        return self.total <= free_bytes

    def describe(self, free_bytes: Optional[int] = None) -> str:
        parts = [(n.replace("_", " "), getattr(self, n)) for n in PARTS]
        shown = ", ".join(f"{name} {v / GB:.2f}" for name, v in parts if v >= 0.005 * GB)
        line = f"≈ {self.total / GB:.1f} GB peak ({self.phase}): {shown}"
        if free_bytes is not None:
            line += f" of {free_bytes / GB:.1f} GB free"
            if not self.fits(free_bytes):
                line += " - does not fit"
        return line

    def options(self, free_bytes: int) -> list[Suggestion]:
        return [] if self.fits(free_bytes) else _suggest(self, free_bytes)

    def suggestions(self, free_bytes: int) -> list[str]:
        """Concrete changes that make the run fit, the one that saves most first ([] if it fits)."""
        return [s.text for s in self.options(free_bytes)]


PARTS = ("weights", "gradients", "optimizer", "activations", "workspace", "kv_cache", "other_models",
         "allocator", "overhead")


# --- the stages -------------------------------------------------------------------------------

def _rl_settings(stage: str, given: Optional[dict]) -> dict:
    """The RL / generation settings, the stage config's defaults for those not given."""
    given = dict(given or {})
    if stage == "actor-critic":
        from engine.ppo import PPOConfig as C
        keys = ("rollout_batch_size", "minibatch_size", "max_new_tokens", "ema_decay")
    elif stage == "group-rl":
        from engine.grpo import GRPOConfig as C
        keys = ("prompts_per_step", "group_size", "minibatch_size", "max_new_tokens", "kl_coef", "rm_weight")
    else:
        C, keys = None, ("max_new_tokens",)
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise ValueError(f"ppo settings for stage {stage!r} take {', '.join(keys)}; unknown: {', '.join(unknown)}")
    defaults = {f.name: f.default for f in dataclasses.fields(C)} if C else {"max_new_tokens": 0}
    out = {k: given.get(k, defaults.get(k)) for k in keys}
    for k in ("rollout_batch_size", "minibatch_size", "prompts_per_step", "group_size"):
        if k in out and (not isinstance(out[k], int) or out[k] < 1):
            raise ValueError(f"{k} must be a positive integer, got {out[k]!r}")
    if not isinstance(out["max_new_tokens"], int) or out["max_new_tokens"] < 0:
        raise ValueError(f"max_new_tokens must be zero or a positive integer, got {out['max_new_tokens']!r}")
    return out


def _held_models(stage: str, cfg, a: dict) -> tuple[int, int, int]:
    """(weights of the trained model, weights of every other model, gradients) in bytes."""
    w, rank, targets = a["weight_bytes"], a["lora_rank"], a["lora_targets"]
    size = {"lm": param_count(cfg, "lm"), "scalar": param_count(cfg, "scalar")}
    adapters = adapter_count(cfg, rank, targets) if rank else 0
    models = [("scalar" if stage == "ranking" else "lm", True)]    # (kind, trained) of every model held
    if stage in ("preference", "actor-critic", "group-rl") and not rank:
        models.append(("lm", False))                              # the frozen reference (LoRA: adapters off)
    if stage == "actor-critic":
        models += [("scalar", True), ("scalar", False)]          # value model, reward model
    if stage == "group-rl" and a["rl"]["rm_weight"]:
        models.append(("scalar", False))
    # GRPO holds its reference whatever kl_coef: it reports the KL anyway.
    # With LoRA a trained model trains its adapters and any new head; the base stays frozen.
    trained = lambda k: adapters + (cfg.d_model if k == "scalar" else 0) if rank else size[k]  # noqa: E731
    weights = (size[models[0][0]] + adapters) * w
    others = sum((size[k] + adapters * t) * w for k, t in models[1:])
    if stage == "actor-critic" and a["rl"]["ema_decay"]:
        others += (adapters if rank else size["lm"]) * w          # under LoRA the EMA shares the base
    return weights, others, sum(trained(k) * w for k, t in models if t)


def _phases(stage, cfg, a: dict) -> tuple[dict, dict]:
    """{phase: {part: bytes}} and the activation terms of the training phase."""
    e, ac, w = a["compute_bytes"], a["autocast"], a["weight_bytes"]
    rank, targets, ckpt, rl, seq = a["lora_rank"], a["lora_targets"], a["grad_checkpointing"], a["rl"], a["seq_len"]
    base = {"overhead": a["overhead"]}
    if stage == "generation":
        prompt = max(1, seq - rl["max_new_tokens"]) if rl["max_new_tokens"] else seq
        return {"generation": {**base, "weights": param_count(cfg) * w,
                               "kv_cache": kv_cache_bytes(cfg, a["batch_size"], seq, w),
                               "workspace": generation_workspace(cfg, a["batch_size"], prompt, seq, w)}}, {}
    kind = "scalar" if stage == "ranking" else "lm"
    logits_at = None          # causal-lm: the fused loss
    if stage in ("actor-critic", "group-rl"):
        rows = rl["rollout_batch_size"] if stage == "actor-critic" else rl["prompts_per_step"] * rl["group_size"]
        batch = min(rl["minibatch_size"], rows)
        logits_at = min(rl["max_new_tokens"], seq)        # the answer states: one per answer token
    else:
        batch = a["batch_size"] * (a["answers"] if stage in ("ranking", "preference") else 1)
    if stage == "preference":
        # DPO's logits are at the answer tokens too, but the plan has no figure for their share of
        # seq_len: every position, the safe side.
        logits_at = seq
    act = train_activations(cfg, batch, seq, e, ac, kind, rank, targets, ckpt, logits_at, w)
    if stage == "actor-critic":      # the value model's forward and backward run with the policy's
        act_v = train_activations(cfg, batch, seq, e, ac, "scalar", rank, targets, ckpt, logits_at)
        act = {k: act[k] + act_v[k] for k in act}
    weights, others, grads = _held_models(stage, cfg, a)
    held = {**base, "weights": weights, "other_models": others, "optimizer": 2 * grads,
            "allocator": int(a["slack"] * act["peak"])}
    # The head's weight gradient comes first in the backward: an untied lm_head's is its .grad at
    # once; a tied one's waits in autograd's buffer for the embedding's, at the end. With
    # grad_accum > 1 every gradient of the micro-batches before is alive too.
    head_grad = cfg.vocab_size * cfg.d_model * w if kind == "lm" and not rank else 0
    live_grads = head_grad + (grads if a["grad_accum"] > 1 else 0)
    # AdamW's for-loop kernel (MPS) allocates sqrt(v) and its quotient for one parameter at a
    # time; the fused kernel (CUDA, CPU) allocates nothing.
    step_tmp = 0 if fused_adamw(a["device_type"]) else 2 * largest_param(cfg, kind, rank, targets) * w
    phases = {"backward": {**held, "activations": act["peak"], "gradients": live_grads},
              "optimizer step": {**held, "gradients": grads, "workspace": step_tmp}}
    if head_grad and cfg.tie_embeddings:
        # The embedding's gradient comes last, when every other one is written: autograd sums it
        # into the tied head's waiting one (then into an accumulated .grad), so for a moment the
        # tied weight has one gradient more than the optimizer step sees.
        phases["end of backward"] = {**held, "gradients": grads + head_grad * (1 + (a["grad_accum"] > 1))}
    if stage in ("actor-critic", "group-rl"):
        prompt = max(1, seq - rl["max_new_tokens"])
        phases["generation"] = {**held, "kv_cache": kv_cache_bytes(cfg, rows, seq, w),
                                "workspace": generation_workspace(cfg, rows, prompt, seq, w)}
        phases["scoring"] = {**held, "workspace": SCORING_LOGIT_COPIES[stage] * 4 * batch * logits_at * cfg.vocab_size
                             + forward_scratch(cfg, batch * seq, e)}
        # The first minibatch's passes, kept for its update (engine.ppo, engine.grpo).
        phases["scoring"]["activations"] = act["saved"]
    return phases, act


def _allocator_slack(device_type: str) -> float:
    if device_type != "cpu" or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return 0.0
    return GLIBC_HEAP_SLACK


# --- the plan ---------------------------------------------------------------------------------

def _device_type(device: str) -> str:
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'cpu', 'cuda' or 'mps', got {device!r}")
    if device == "auto":
        from engine.device import resolve_device
        return resolve_device("auto").type
    kind = device.split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps") or (kind != "cuda" and ":" in device):
        raise ValueError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N, mps)")
    return kind


def _check(stage, cfg, batch_size, seq_len, dtype, weight_dtype, lora_rank, lora_targets, grad_accum, answers,
           can_lora):
    if stage not in SHAPES:
        raise ValueError(f"unknown run shape {stage!r} (known: {', '.join(SHAPES)})")
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("grad_accum", grad_accum), ("answers", answers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len ({cfg.max_seq_len})")
    if answers < 2 and stage in ("ranking", "preference"):
        raise ValueError(f"answers must be at least 2 for {stage} (a chosen and a rejected one), got {answers}")
    for name, v in (("dtype", dtype), ("weight_dtype", weight_dtype)):
        if v not in DTYPE_BYTES and not (name == "dtype" and v == "auto"):
            raise ValueError(f"unknown {name} {v!r} ({', '.join(DTYPE_BYTES)})")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank must be 0 (off) or a positive integer, got {lora_rank!r}")
    if lora_rank and (not can_lora or stage not in TRAINING):
        raise ValueError(f"LoRA applies to fine-tuning, not to this {stage} run")
    bad = [t for t in lora_targets if t not in LINEARS]
    if bad or (lora_rank and not lora_targets):
        raise ValueError(f"lora_targets must name some of {', '.join(LINEARS)}; got {list(lora_targets)!r}")


def plan(stage: str, model_cfg, *, batch_size: int, seq_len: int, dtype: str = "float32", device: str = "cpu",
         lora_rank: int = 0, lora_targets=DEFAULT_LORA_TARGETS, grad_checkpointing: bool = False,
         grad_accum: int = 1, ppo: Optional[dict] = None, answers: int = 2,
         weight_dtype: str = "float32", can_lora: bool = True) -> Plan:
    """Estimate the peak memory of running `stage` with these settings on `device`.

    seq_len is tokens per sequence, prompt and answer together (for ppo/grpo/sample/chat the
    prompt is seq_len - max_new_tokens). batch_size is the micro-batch: examples for pretrain and
    sft, rankings for reward and dpo (each brings `answers` sequences), rows generated together
    for sample and chat; ppo and grpo read their batch sizes from `ppo` (rollout_batch_size,
    minibatch_size, max_new_tokens, ema_decay; grpo: prompts_per_step, group_size,
    minibatch_size, max_new_tokens, kl_coef, rm_weight; sample/chat: max_new_tokens), with
    the stage configs' defaults. `dtype` is the stage's autocast dtype (CUDA only); weight_dtype
    is how the checkpoint stores its weights. can_lora: the stage has LoRA settings (pretraining
    has none, so LoRA is neither planned nor suggested there). ValueError names any bad setting.
    """
    lora_targets = tuple(lora_targets)
    _check(stage, model_cfg, batch_size, seq_len, dtype, weight_dtype, lora_rank, lora_targets, grad_accum, answers,
           can_lora)
    try:
        model_cfg.validate()
    except ValueError as e:
        raise ValueError(f"invalid model config: {e}") from None
    kind = _device_type(device)
    if dtype == "auto":
        dtype = "bfloat16" if kind == "cuda" else "float32"
    rl = _rl_settings(stage, ppo) if stage in ("actor-critic", "group-rl", "generation") else {}
    if rl and rl["max_new_tokens"] >= seq_len:
        raise ValueError(f"max_new_tokens ({rl['max_new_tokens']}) must leave room for the prompt in "
                         f"seq_len ({seq_len})")
    w = DTYPE_BYTES[weight_dtype]
    autocast = kind == "cuda" and dtype != "float32"
    inputs = dict(stage=stage, model_cfg=model_cfg, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                  device=device, lora_rank=lora_rank, lora_targets=lora_targets,
                  grad_checkpointing=grad_checkpointing, grad_accum=grad_accum, ppo=ppo, answers=answers,
                  weight_dtype=weight_dtype, can_lora=can_lora)
    # Activations are bf16/fp16 under CUDA autocast, or when the weights themselves are half.
    a = dict(inputs, compute_bytes=2 if autocast or w == 2 else 4, autocast=autocast,
             weight_bytes=w, rl=rl, device_type=kind, slack=_allocator_slack(kind),
             overhead=(RUNTIME_OVERHEAD if stage in TRAINING else INFERENCE_OVERHEAD)[kind]
             + (PEFT_IMPORT if lora_rank and kind != "cuda" else 0))
    phases, act = _phases(stage, model_cfg, a)
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    peak = max(totals, key=totals.get)
    parts = {n: int(phases[peak].get(n, 0)) for n in PARTS}
    return Plan(stage=stage, device=device, **parts, total=int(totals[peak]), phase=peak,
                phases={n: dict(p) for n, p in phases.items()}, detail=act, inputs=inputs)


def free_memory(device: str = "cpu", ask_torch: bool = True) -> Optional[int]:
    """Bytes a new run on `device` can use now. On CUDA without NVML, torch is asked only when
    `ask_torch` (the app passes False: the asking process would hold a CUDA context); else None."""
    kind = _device_type(device)
    if kind == "cuda":
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        free = _nvml_free(index)
        if free is None and ask_torch:
            free = int(torch.cuda.mem_get_info(index)[0])
        return free
    import psutil
    available = int(psutil.virtual_memory().available)
    # Unified memory on MPS: Metal caps what one process may allocate below the machine's RAM.
    cap = getattr(getattr(torch, "mps", None), "recommended_max_memory", None) if kind == "mps" else None
    try:
        return min(available, int(cap())) if cap else available
    except RuntimeError:
        return available


def _nvml_free(index: int) -> Optional[int]:
    """Free bytes of CUDA device `index` from NVML, if it is installed: asking torch would create a
    CUDA context in the asking process (the app), which then holds its memory for good."""
    try:
        import pynvml
    except ImportError:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        if visible is not None:   # NVML numbers every GPU; torch only the visible ones
            index = int(visible.split(",")[index])
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).free)
        finally:
            pynvml.nvmlShutdown()
    except (ValueError, IndexError, pynvml.NVMLError):
        return None


# --- suggestions ------------------------------------------------------------------------------

def _fmt(n: int) -> str:
    return f"{n / GB:.2f} GB"


def _candidates(p: Plan) -> list[tuple[str, list[dict]]]:
    """(kind of change, its overrides for plan() from the mildest to the strongest)."""
    a, out = p.inputs, []
    stage = a["stage"]
    if a["can_lora"] and stage in TRAINING and not a["lora_rank"]:
        out.append(("lora", [{"lora_rank": LORA_HINT_RANK}]))
    if stage in TRAINING and not a["grad_checkpointing"]:
        out.append(("ckpt", [{"grad_checkpointing": True}]))
    if stage in TRAINING and a["dtype"] == "float32" and _device_type(a["device"]) == "cuda":
        out.append(("dtype", [{"dtype": "bfloat16"}]))
    if stage in ("actor-critic", "group-rl"):
        rl = _rl_settings(stage, a["ppo"])
        for key in ["minibatch_size"] + (["rollout_batch_size"] if stage == "actor-critic" else ["group_size"]):
            out.append((key, [{"ppo": {**(a["ppo"] or {}), key: v}} for v in _halvings(rl[key])]))
    else:
        out.append(("batch", [{"batch_size": v, "grad_accum": a["grad_accum"] * (a["batch_size"] // v)}
                              for v in _halvings(a["batch_size"])]))
    out.append(("seq_len", [{"seq_len": v} for v in _halvings(a["seq_len"], floor=16)]))
    return [(kind, options) for kind, options in out if options]


def _halvings(n: int, floor: int = 1) -> list[int]:
    out = []
    while n // 2 >= floor:
        n //= 2
        out.append(n)
    return out


def _merge(changes: dict, more: dict) -> dict:
    out = {**changes, **more}
    if "ppo" in more:
        out["ppo"] = {**(changes.get("ppo") or {}), **more["ppo"]}
    return out


def _replan(p: Plan, changes: dict) -> Optional[Plan]:
    """The plan with `changes`; None if they make the settings invalid."""
    try:
        return plan(**{**p.inputs, **changes})
    except ValueError:
        return None


def _text(kind: str, p: Plan, q: Plan, ch: dict) -> str:
    a, peak = p.inputs, f"peak {_fmt(p.total)} → {_fmt(q.total)}"
    if kind == "lora":
        return (f"LoRA rank {ch['lora_rank']} cuts the optimizer state from {_fmt(p.optimizer)} "
                f"to {_fmt(q.optimizer)} ({peak})")
    if kind == "ckpt":
        return (f"gradient checkpointing cuts activations from {_fmt(p.detail['peak'])} to "
                f"{_fmt(q.detail['peak'])} ({peak})")
    if kind == "dtype":
        return f"dtype bfloat16 instead of float32 halves most activations ({peak})"
    if kind == "batch":
        return (f"batch {ch['batch_size']} instead of {a['batch_size']}, with grad_accum {ch['grad_accum']} "
                f"to keep {a['batch_size'] * a['grad_accum']} examples per step ({peak})")
    if kind == "seq_len":
        return f"seq_len {ch['seq_len']} instead of {a['seq_len']} (longer examples are cut) ({peak})"
    old = _rl_settings(a["stage"], a["ppo"])[kind]
    return f"{kind} {ch['ppo'][kind]} instead of {old} ({peak})"


def _phrase(p: Plan, changes: dict) -> str:
    """The changed settings in words: "LoRA rank 16 + batch 4 + grad_accum 8"."""
    words = {"lora_rank": "LoRA rank {}", "grad_checkpointing": "gradient checkpointing", "dtype": "{}",
             "batch_size": "batch {}", "grad_accum": "grad_accum {}", "seq_len": "seq_len {}"}
    given = p.inputs["ppo"] or {}
    flat = {k: v for k, v in changes.items() if k != "ppo"}
    flat.update({k: v for k, v in changes.get("ppo", {}).items() if given.get(k) != v})
    return " + ".join(words.get(k, k + " {}").format(v) for k, v in flat.items())


def _suggest(p: Plan, free: int) -> list[Suggestion]:
    """The mildest change of each kind that fits alone, the one leaving most room first; if none
    does, one suggestion stacking changes, the strongest kind first."""
    fitting, strongest = [], []
    for kind, options in _candidates(p):
        plans = [(ch, _replan(p, ch)) for ch in options]
        plans = [(ch, q) for ch, q in plans if q is not None]
        fit = next(((ch, q) for ch, q in plans if q.fits(free)), None)
        if fit:
            fitting.append(Suggestion(_text(kind, p, fit[1], fit[0]), fit[0], fit[1]))
        if plans:
            strongest.append((plans[-1][1].total, options))
    if fitting:
        return sorted(fitting, key=lambda s: s.plan.total)
    return [_stacked(p, free, [options for _, options in sorted(strongest, key=lambda t: t[0])])]


def _stacked(p: Plan, free: int, kinds: list[list[dict]]) -> Suggestion:
    """Each kind's mildest option that, added to the ones before, makes the run fit; else its
    strongest, and on to the next kind."""
    changes: dict = {}
    for options in kinds:
        for ch in options:
            q = _replan(p, _merge(changes, ch))
            if q is not None and q.fits(free):
                changes = _merge(changes, ch)
                return Suggestion(f"together: {_phrase(p, changes)} ({_fmt(p.total)} → {_fmt(q.total)} of "
                                  f"{_fmt(free)} free)", changes, q)
        changes = _merge(changes, options[-1])
    q = _replan(p, changes)
    return Suggestion(f"does not fit even with {_phrase(p, changes)} ({_fmt(q.total if q else p.total)} of "
                      f"{_fmt(free)} free): use a smaller model or a device with more memory", None, None)
