"""What a stage's settings form shows, read from the stage's config dataclass itself.

A form is generated, not written by hand: each field's widget kind comes from its type hint,
its tooltip from the comment on its line in the engine's source (engine.config.field_help: the
same text a developer reads and `python -m engine.<stage> --help` prints), its group from the
stage catalogue. So a setting added to an engine config appears in the
app with its explanation, and the form can never disagree with what the stage accepts.
Validation is the stage's own: `check()` builds the dataclass and calls its `validate()`, and
the ConfigError names the field the form marks.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from engine.config import ConfigError, field_help
from engine.device import TRAIN_DTYPES
from engine.dpo_loss import FORMS, LOSSES
from workbench.runfolder import build
from workbench.stages import spec as stage_spec

CHOICES = {
    "device": ["auto", "cpu", "cuda", "mps"],
    "dtype": list(TRAIN_DTYPES),
    "loss": list(LOSSES),           # DPO's
    "form": list(FORMS),
}
# Form labels that say more than the field's name.
LABELS = {"nproc": "processes (GPUs)",
          "log_to": "also log to (one a line)"}


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


def field_specs(stage: str) -> list[FieldSpec]:
    stage_ = stage_spec(stage)
    cls = stage_.config_class()
    hints = typing.get_type_hints(cls)
    comments = field_help(cls)
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
                         help=comments.get(f.name, ""),
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
    try:
        return build(stage, values), None
    except ConfigError as e:
        return None, e
