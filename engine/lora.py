"""LoRA: fine-tune a model by training small low-rank adapters beside its frozen weights.

Each targeted projection W (an nn.Linear) computes W x + (alpha / r) · B A x, with A [r, in]
random and B [out, r] zero, so the adapted model starts exactly where its base is. Only A and B
train (and a reward or value model's scalar head), so the optimizer keeps moments for a small
fraction of the weights, and the base exists once: the reference of PPO, GRPO and DPO is the
policy itself with its adapters switched off (`Reference`).

peft builds the adapters. `inject_adapter_in_model` swaps the named nn.Linear modules of our own
Transformer for peft's LoRA layers in place and returns the same object, so every stage keeps
calling the model it built, with its own forward and config. (`get_peft_model` would wrap it in
a PeftModel, which expects a transformers model's API around it.)

A LoRA run's checkpoint holds
    model.safetensors     the MERGED weights W + (alpha / r) · B A, in the usual format: chat,
                          export, sampling and every later stage load it as any other checkpoint
    adapter_model.safetensors  the adapters alone (plus the scalar head of a reward or value
                          model), under peft's names: `PeftModel.from_pretrained(base, CHECKPOINT)`
                          loads them (older checkpoints named it adapter.safetensors; still read)
    adapter_config.json   their settings, as peft's LoraConfig writes them
and PPO's value model and EMA have `value_adapter.*` and `ema_adapter.*` beside theirs. Resume
builds the base from the run's init checkpoint again and loads the adapters back, so a run
continues bit for bit; the merged weights are for others and are never read back.
"""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from engine import checkpoint as ckpt
from engine.config import ConfigError, require
from engine.model import Transformer, freeze
from engine.weights import load_model, model_from_state_dict, safetensors_state

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What a run is made of: changing one on resume would continue another run under the old name.
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
ADAPTER_FILE = "adapter_model.safetensors"   # peft's own name: PeftModel.from_pretrained reads the folder
LEGACY_ADAPTER_FILE = "adapter.safetensors"  # what checkpoints were written with before
ADAPTER_CONFIG = "adapter_config.json"
_NAME = "default"               # peft's name for the one adapter a layer holds
_PEFT_PREFIX = "base_model.model."   # how peft's saved adapters name the model's modules


@dataclass(kw_only=True)
class LoRASettings:
    """LoRA fine-tuning, small adapters trained on the frozen model; the settings (a mixin of the
    configs) every fine-tuning stage shares."""
    lora_rank: int = 0                  # LoRA: rank of the adapters trained on the frozen model (0: full fine-tuning)
    lora_alpha: float = 16.0            # LoRA: the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0           # LoRA: dropout on the adapters' input while training
    lora_targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))  # LoRA: projections with adapters

    def validate_lora(self) -> None:
        require(self.lora_rank >= 0, "lora_rank", "must be 0 (full fine-tuning) or a positive rank")
        require(self.lora_alpha > 0, "lora_alpha", "must be a positive number")
        require(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        require(len(self.lora_targets) > 0, "lora_targets", f"name at least one of {', '.join(ALL_TARGETS)}")
        unknown = [t for t in self.lora_targets if t not in ALL_TARGETS]
        require(not unknown, "lora_targets", f"unknown projection(s) {', '.join(map(repr, unknown))}; "
                                             f"the model has {', '.join(ALL_TARGETS)}")
        require(len(set(self.lora_targets)) == len(self.lora_targets), "lora_targets", "a projection is named twice")

    def validate_lora_without_dropout(self, stage: str) -> None:
        """For PPO and GRPO: their first minibatch's ratio is exactly 1 only if the update reads
        the policy exactly as scoring did, and dropout would draw other masks."""
        self.validate_lora()
        require(self.lora_dropout == 0, "lora_dropout", f"must be 0 in {stage}: dropout stays off in every "
                                                        "model, so the rollout's log-probs are the update's")


def uses_lora(cfg) -> bool:
    return getattr(cfg, "lora_rank", 0) > 0


def has_adapters(model: nn.Module) -> bool:
    return isinstance(getattr(model, "lora_settings", None), dict)


def _is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _trains(model: nn.Module, name: str) -> bool:
    """Does this tensor train under LoRA? The adapters, and a scalar head: the reward model's is
    new (it must learn), the value model's must move off the reward model's scores."""
    return _is_adapter(name) or (model.kind == "scalar" and name.startswith("score."))


def add_adapters(model: Transformer, cfg: LoRASettings, seed: int) -> Transformer:
    """Give `model` adapters on cfg.lora_targets (in place) and freeze everything else. The
    adapters' random half is drawn from `seed` alone, so a run's start does not depend on what
    else used the global RNG before it."""
    from peft import LoraConfig, inject_adapter_in_model   # here: importing peft takes seconds

    widths = [min(m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in cfg.lora_targets]
    if cfg.lora_rank > min(widths):
        raise ConfigError("lora_rank", f"{cfg.lora_rank} is more than the narrowest targeted projection's "
                                       f"width ({min(widths)}): the adapters could not be low-rank")
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_targets), bias="none")
    with torch.random.fork_rng(devices=[]):     # peft draws A on the CPU, then moves it
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(_trains(model, name))
    model.lora_settings = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                           "targets": list(cfg.lora_targets)}
    return model


def describe(model: nn.Module) -> str:
    s = model.lora_settings
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA rank {s['rank']}, alpha {s['alpha']:g} on {', '.join(s['targets'])}: {trained:,} of "
            f"{total:,} parameters train ({trained / total:.2%}); the rest is frozen")


# --- the reference: the adapters switched off ---------------------------------------------------

@contextmanager
def adapters_off(model: nn.Module):
    """The base model inside the block: peft's own switch on each LoRA layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


class Reference:
    """A LoRA policy's reference: the same model called with its adapters off, so the weights it
    started from are held once. Called like the frozen model it replaces (never with grad).

    Not an nn.Module on purpose: it owns no parameters, and freezing or moving "the reference"
    must not reach the policy's."""

    def __init__(self, model: Transformer):
        self.model = model

    @property
    def config(self):
        return self.model.config

    def eval(self) -> "Reference":
        return self

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), adapters_off(self.model):
            return self.model(*args, **kwargs)


def reference_for(model: nn.Module, checkpoint: Path, device) -> nn.Module | Reference:
    """The frozen reference of PPO, GRPO and DPO: with adapters, `model` with them off; else a
    second copy, loaded from the checkpoint `model` came from."""
    if has_adapters(model):
        return Reference(model)
    # In the policy's dtype (a bf16 file is trained float32: engine.artifacts.RunInputs), so that
    # the two agree exactly before the first update.
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return freeze(load_model(Path(checkpoint) / "model.safetensors", device=device).to(dtype))


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy out of autograd (PPO's EMA) that shares the frozen base's tensors with `model`:
    under LoRA they never change, so a copy of them would only take memory."""
    memo = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, memo).requires_grad_(False)


# --- saving and loading ------------------------------------------------------------------------

@torch.no_grad()
def merged(model: Transformer) -> Transformer:
    """A plain model of the same class holding W + (alpha / r) · B A for every adapted W (each
    delta from peft's own get_delta_weight); the base's tensors themselves are untouched."""
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "get_delta_weight")}
    sd = {}
    for name, t in model.state_dict().items():
        if _is_adapter(name):
            continue
        owner, sep, leaf = name.rpartition(".base_layer.")
        if sep:
            if leaf == "weight":
                t = (t.float() + layers[owner].get_delta_weight(_NAME).float()).to(t.dtype)
            name = f"{owner}.{leaf}"
        sd[name] = t
    return model_from_state_dict(model.config, sd, model.kind)


def checkpoint_weights(model: Transformer) -> tuple[dict, dict]:
    """(tensors, metadata) of model.safetensors: the merged weights under LoRA, so the file is
    an ordinary model whoever reads it."""
    return safetensors_state(merged(model) if has_adapters(model) else model)


def adapter_state(model: Transformer) -> dict[str, torch.Tensor]:
    """What trains under LoRA, on the CPU, under peft's names (`base_model.model.<module>.lora_A.weight`)."""
    return {_PEFT_PREFIX + k.replace(f".{_NAME}.", "."): v.detach().to("cpu").contiguous()
            for k, v in model.state_dict().items() if _trains(model, k)}


def adapter_config(model: Transformer) -> dict:
    """The adapters' settings in the fields of peft's adapter_config.json."""
    s, scalar = model.lora_settings, model.kind == "scalar"
    return {"peft_type": "LORA", "task_type": "SEQ_CLS" if scalar else "CAUSAL_LM", "r": s["rank"],
            "lora_alpha": s["alpha"], "lora_dropout": s["dropout"], "target_modules": s["targets"],
            "bias": "none", "fan_in_fan_out": False, "modules_to_save": ["score"] if scalar else None,
            "inference_mode": True}


def write_adapter(folder: Path, model: Transformer, prefix: str = "") -> dict[str, Path]:
    """Write PREFIXadapter_model.safetensors and PREFIXadapter_config.json into `folder`; {name: path}."""
    weights, config = folder / f"{prefix}{ADAPTER_FILE}", folder / f"{prefix}{ADAPTER_CONFIG}"
    save_file(adapter_state(model), str(weights), metadata={"format": "pt"})
    config.write_text(json.dumps(adapter_config(model), indent=2) + "\n")
    return {weights.name: weights, config.name: config}


def adapter_path(folder: Path, prefix: str = "") -> Path:
    """Where a checkpoint holds PREFIX's adapters: peft's file name, or the one used before."""
    path = folder / f"{prefix}{ADAPTER_FILE}"
    legacy = folder / f"{prefix}{LEGACY_ADAPTER_FILE}"
    return legacy if not path.exists() and legacy.exists() else path


def load_adapters(model: Transformer, path: Path) -> None:
    """Put the adapters saved in `path` back into `model` (its base untouched), or a
    CheckpointError naming the file if they are not this model's."""
    names = {_PEFT_PREFIX + k.replace(f".{_NAME}.", "."): k for k in model.state_dict() if _trains(model, k)}
    tensors = ckpt.load_tensors(path, device=next(model.parameters()).device)
    missing = sorted(set(names) - set(tensors))
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        raise ckpt.CheckpointError(f"{path}: not this run's adapters ({len(missing)} missing, e.g. "
                                   f"{missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})")
    own = model.state_dict()
    for k, v in tensors.items():
        if v.shape != own[names[k]].shape:
            raise ckpt.CheckpointError(f"{path}: '{k}' has shape {list(v.shape)}, this run's adapter "
                                       f"{list(own[names[k]].shape)}")
    model.load_state_dict({names[k]: v for k, v in tensors.items()}, strict=False)
