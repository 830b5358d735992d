"""The memory plan of a stage's settings, before Start: which model, batch and lengths the form's
values mean, and what the device has free. engine.memory_plan does the arithmetic; the stage
catalogue says which shape of run each stage is (`StageSpec.memory`).
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

from engine.config import ConfigError
from engine.memory_plan import Plan, free_memory, plan
from workbench import stages

# Prompts of PPO, GRPO and sampling are cut to fit the model, with no setting of their own: the
# plan assumes prompts of up to this many tokens rather than the model's whole context.
PROMPT_ROOM = 256
# The settings of a generating run the plan reads, by its shape.
RL_SETTINGS = {"actor-critic": ("rollout_batch_size", "minibatch_size", "max_new_tokens", "ema_decay"),
               "group-rl": ("prompts_per_step", "group_size", "minibatch_size", "max_new_tokens", "kl_coef",
                            "rm_weight"),
               "generation": ("max_new_tokens",)}


@lru_cache(maxsize=32)
def _model_config(path: str, _mtime: float):
    from engine.checkpoint import resolve_checkpoint
    from engine.weights import read_config
    return read_config(resolve_checkpoint(path) / "model.safetensors")


def model_config(stage: str, values: dict):
    """The ModelConfig a run with these values trains or samples; None when it cannot be told yet."""
    spec = stages.spec(stage)
    try:
        if stage == "pretrain":
            from engine.pretrain import pretrain_model_config
            from engine.tokenizer import load_tokenizer
            vocab = load_tokenizer(values["tokenizer"]).vocab_size
            return pretrain_model_config(values["preset"], values.get("model") or {},
                                         int(values.get("seq_len") or 0), vocab)
        parent = next(p for p in spec.parents if p.kind == "checkpoint")
        path = values.get(parent.field)
        if not isinstance(path, str) or not path:
            return None
        return _model_config(path, os.path.getmtime(path))
    except (OSError, ValueError, KeyError, TypeError, StopIteration, ConfigError):
        return None        # a missing or broken input, a bad setting: the form says so itself


def _device(value: str) -> str:
    if value != "auto":
        return value
    import torch     # is_available asks the driver without creating a context in the app
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def free_bytes(device: str) -> Optional[int]:
    """What the device has free now; None for a GPU the app cannot ask without holding memory."""
    return free_memory(device, ask_torch=False)


def plan_for(stage: str, values: dict) -> Optional[tuple[Plan, Optional[int]]]:
    """(plan, free bytes) for a stage's form values, or None if it has no plan or lacks inputs."""
    spec = stages.spec(stage)
    cfg = model_config(stage, values) if spec.memory else None
    if cfg is None:
        return None
    device = _device(str(values.get("device", "auto")))
    rl = {k: values[k] for k in RL_SETTINGS.get(spec.memory, ()) if k in values}
    generates = spec.memory in RL_SETTINGS
    seq = values.get("seq_len") or cfg.max_seq_len
    if generates:
        seq = min(cfg.max_seq_len, PROMPT_ROOM + int(rl.get("max_new_tokens", 0)))
        if "max_new_tokens" in rl:      # generation stops at the context's end whatever it asks
            rl["max_new_tokens"] = max(1, min(int(rl["max_new_tokens"]), seq - 1))
    try:
        p = plan(spec.memory, cfg, batch_size=int(values.get("batch_size") or 1), seq_len=min(int(seq), cfg.max_seq_len),
                 dtype=str(values.get("dtype", "auto")), device=device, lora_rank=int(values.get("lora_rank") or 0),
                 lora_targets=values.get("lora_targets") or ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"),
                 grad_checkpointing=bool(values.get("grad_checkpointing")), grad_accum=int(values.get("grad_accum") or 1),
                 ppo=rl if generates else None, can_lora="lora_rank" in values)
    except (ValueError, TypeError):
        return None
    return p, free_bytes(device)


def memory_note(stage: str, values: dict) -> Optional[str]:
    """One line for the form: the plan, and the change that would make it fit when it does not."""
    found = plan_for(stage, values)
    if found is None:
        return None
    p, free = found
    line = f"Memory: {p.describe(free)} (sequences of {p.inputs['seq_len']} tokens)."
    if free is not None and not p.fits(free):
        tips = p.suggestions(free)
        line = "⚠ " + line + (f" To fit: {tips[0]}." if tips else "")
    return line
