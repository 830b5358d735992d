"""What a stage's settings form shows, read from the stage's config dataclass itself.

A form is generated, not written by hand: each field's widget kind comes from its type hint,
its tooltip from the comment on its line in the engine's source (the same text a developer
reads), its group from the tables below. So a setting added to an engine config appears in the
app with its explanation, and the form can never disagree with what the stage accepts.
Validation is the stage's own: `check()` builds the dataclass and calls its `validate()`, and
the ConfigError names the field the form marks.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from engine.config import ConfigError, from_dict, to_dict
from workbench.stages import spec as stage_spec

CHOICES = {
    "device": ["auto", "cpu", "cuda", "mps"],
    "dtype": ["auto", "float32", "bfloat16", "float16"],
}
# Form labels that say more than the field's name.
LABELS = {"nproc": "processes (GPUs)"}
# Tooltips for fields whose source line has no comment.
HELP = {
    "batch_size": "examples per optimizer step (times grad_accum)",
    "grad_accum": "micro-batches accumulated before each optimizer step",
    "max_steps": "optimizer steps to train for; raise it and resume to train longer",
    "lr": "peak learning rate (after warmup)",
    "warmup_steps": "steps of linear warmup from 0 to lr",
    "weight_decay": "AdamW weight decay",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "eval_every": "validation every N steps",
    "log_every": "training metrics every N steps",
    "checkpoint_every": "save a checkpoint every N steps (and always at the end or on stop)",
    "seed": "random seed: the same seed and settings give the same run",
    "compile": "torch.compile the model (CUDA; slower start, faster steps)",
    "vocab_size": "tokens in the vocabulary, special tokens included",
    "min_frequency": "a merge must occur at least this often",
    "val_fraction": "share of the data held out for validation",
    "sample_prompts": "prompts sampled at each sample step, one per line",
    "sample_tokens": "tokens generated per sample",
    "sample_temperature": "temperature of the samples (0: greedy)",
    "chunk_chars": "characters read at a time while training",
    "examples": "texts whose tokenization is shown after training, one per line",
    "cliprange": "PPO ratio clip epsilon",
    "cliprange_value": "value-function clip",
    "vf_coef": "weight of the value loss",
    "gamma": "discount",
    "lam": "GAE lambda",
    "whiten_advantages": "normalise advantages per minibatch",
    "kl_horizon": "horizon of the adaptive KL controller",
    "rollout_batch_size": "prompts per PPO iteration",
    "minibatch_size": "rollouts per PPO update",
    "ppo_epochs": "passes over each rollout batch",
    "max_new_tokens": "answer length limit in tokens",
    "temperature": "sampling temperature",
    "top_k": "sample from the k most likely tokens (0: off)",
    "top_p": "nucleus sampling threshold (1: off)",
    "repetition_penalty": "above 1 discourages repeats (1: off)",
    "value_lr": "learning rate of the value model",
    "keep_last": "newest checkpoints kept, besides the best",
    "probe_tokens": "answer length of the probe samples",
}


@dataclass
class FieldSpec:
    name: str
    kind: str          # int | float | bool | str | choice | artifact | file | files | lines | json
    default: Any
    optional: bool     # None is a valid value (shown as an empty box)
    required: bool     # no default: the form must get a value
    help: str
    basic: bool
    choices: list[str] | None = None
    artifact: str | None = None      # tokenizer | checkpoint | reward, for artifact fields
    data: str | None = None          # pretrain | sft | prompts | tasks, for file fields


def config_class(stage: str) -> type:
    return stage_spec(stage).config_class()


@lru_cache(maxsize=None)
def _comments(cls: type) -> dict[str, str]:
    """`name: type = default  # comment` -> {name: comment}, over the class and its bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def field_specs(stage: str) -> list[FieldSpec]:
    stage_ = stage_spec(stage)
    cls = stage_.config_class()
    hints = typing.get_type_hints(cls)
    comments = _comments(cls)
    basic = stage_.basic
    specs = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if optional else hint
        origin = typing.get_origin(base)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        spec = FieldSpec(name=f.name, kind="str", default=default, optional=optional,
                         required=f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                         help=comments.get(f.name) or HELP.get(f.name, ""),
                         basic=f.name in basic)
        parent, data = stage_.parent(f.name), stage_.data_field(f.name)
        if parent is not None:
            # An optional artifact (a separate tokenizer) defaults to the checkpoint's own.
            spec.kind, spec.artifact, spec.basic = "artifact", parent.kind, not optional
        elif data is not None:
            spec.kind = "files" if origin is list else "file"
            spec.data = data.kind
            spec.basic = data.preview
        elif base is bool:
            spec.kind = "bool"
        elif base is int:
            spec.kind = "int"
        elif base is float:
            spec.kind = "float"
        elif f.name in CHOICES:
            spec.kind, spec.choices = "choice", CHOICES[f.name]
        elif f.name == "preset":
            from engine.model import PRESETS
            spec.kind, spec.choices = "choice", list(PRESETS)
        elif origin is list:
            spec.kind = "lines"
        elif origin is dict:
            spec.kind = "json"
        specs.append(spec)
    # Inputs first, in the dataclass's order; then the basic settings; then the rest.
    order = {"artifact": 0, "files": 0, "file": 0}
    return sorted(specs, key=lambda s: (order.get(s.kind, 1), not s.basic))


def check(stage: str, values: dict) -> tuple[Any, ConfigError | None]:
    """Build and validate the stage's config from form values: (config, None) or (None, error)."""
    cls = config_class(stage)
    try:
        cfg = from_dict(cls, values)
        validate = getattr(cfg, "validate", None)
        if validate is not None:
            validate()
    except ConfigError as e:
        return None, e
    return cfg, None


def defaults(stage: str) -> dict:
    """The form's starting values: every field with a default; required ones absent."""
    return {s.name: s.default for s in field_specs(stage) if not s.required}


def as_values(config) -> dict:
    return to_dict(config)
