"""Load what a run produced: a model with the tokenizer it was trained with.

Every checkpoint folder carries its tokenizer.json, so a checkpoint stands on its own. A
different tokenizer may be named explicitly; it must then agree with the model (same vocabulary
size, same special tokens, and the same fingerprint as recorded at training time), because a
model read through the wrong tokenizer trains and samples garbage without any error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from engine.checkpoint import CheckpointError, latest_checkpoint, read_json, read_state, resolve_checkpoint
from engine.config import ConfigError
from engine.model import ModelConfig, Transformer
from engine.weights import load_model, read_header
from engine.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, Tokenizer, load_tokenizer, tokenizer_files


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    checkpoint: Path          # the checkpoint folder
    state: dict               # its state.json ({} for a bare model folder)
    tokenizer_path: Path

    @property
    def tokenizer_files(self) -> dict[str, Path]:
        """What a checkpoint made from this artifact copies to stand on its own."""
        return tokenizer_files(self.tokenizer_path)


def check_compatible(model: Transformer, tok: Tokenizer, state: dict, field: str, tok_path: Path,
                     ck: Path) -> None:
    """Refuse a tokenizer that was not the checkpoint's, naming both files."""
    vocab = model.config.vocab_size
    if isinstance(tok, Tokenizer):
        if tok.vocab_size != vocab:
            raise ConfigError(field, f"{tok_path} has {tok.vocab_size} tokens but the model in {ck} "
                                     f"has {vocab}: they were not trained together")
        for i, name in enumerate(SPECIAL_TOKENS):
            if tok.id_to_token(i) != name:
                raise ConfigError(field, f"{tok_path}: special token {i} is {tok.id_to_token(i)!r}, "
                                         f"expected {name!r}")
    elif tok.vocab_size > vocab:
        # An imported model's embedding often has spare rows past its tokenizer (Qwen's 151936
        # for 151665 tokens); fewer rows than tokens is a mismatch.
        raise ConfigError(field, f"{tok_path} has {tok.vocab_size} tokens but the model in {ck} "
                                 f"has only {vocab} embedding rows: they do not belong together")
    want = state.get("tokenizer_fingerprint")
    if want and want != tok.fingerprint():
        raise ConfigError(field, f"{tok_path} differs from the tokenizer the model in {ck} was trained "
                                 f"with (fingerprint {tok.fingerprint()[:12]} vs {want[:12]})")


KINDS = {"lm": "a language model", "scalar": "a reward (scalar) model"}


def load_artifact(path: str | os.PathLike, *, tokenizer: Optional[str | os.PathLike] = None,
                  device: str | torch.device = "cpu", prefer: str = "best",
                  field: str = "checkpoint", kind: Optional[str] = None) -> Loaded:
    """Model + tokenizer from a checkpoint folder or a run folder (its best, else newest).

    A missing or broken checkpoint is a ConfigError on `field`, naming the file and what is
    wrong, so every stage that starts from one refuses before any work; so is a model of
    another `kind` than asked for ("lm", "scalar": a reward model given where a policy goes).
    """
    ck = _checkpoint(path, prefer, field)
    try:
        state_file = ck / "state.json"
        state = read_json(state_file) if state_file.exists() else {}
        if not isinstance(state, dict):
            raise CheckpointError(f"{state_file}: expected a JSON object, got {type(state).__name__}")
        model = load_model(ck / "model.safetensors", device=device)
    except (FileNotFoundError, CheckpointError) as e:
        raise ConfigError(field, str(e)) from None
    _check_kind(ck, model.kind, kind, field)
    tok_path = Path(tokenizer) if tokenizer else ck / TOKENIZER_FILE
    if tok_path.is_dir():
        tok_path = tok_path / TOKENIZER_FILE
    tok_field = "tokenizer" if tokenizer else field
    try:
        tok = load_tokenizer(tok_path)
    except (OSError, ValueError) as e:
        raise ConfigError(tok_field, f"cannot load a tokenizer from {tok_path}: {e}") from None
    check_compatible(model, tok, state, tok_field, tok_path, ck)
    return Loaded(model, tok, ck, state, tok_path)


class Peeked(NamedTuple):
    checkpoint: Path
    config: ModelConfig


def peek_artifact(path: str | os.PathLike, *, prefer: str = "best", field: str = "checkpoint",
                  kind: Optional[str] = None) -> Peeked:
    """The checkpoint load_artifact would load and its ModelConfig, read from the file's header
    without loading a weight, after the same checks with the same messages (no checkpoint, a
    broken one, a model of another kind): what the app's form asks before it makes a
    run folder."""
    ck = _checkpoint(path, prefer, field)
    try:
        cfg, got = read_header(ck / "model.safetensors")
    except (FileNotFoundError, CheckpointError) as e:
        raise ConfigError(field, str(e)) from None
    _check_kind(ck, got, kind, field)
    return Peeked(ck, cfg)


def _checkpoint(path: str | os.PathLike, prefer: str, field: str) -> Path:
    try:
        return resolve_checkpoint(path, prefer=prefer)
    except (FileNotFoundError, CheckpointError) as e:
        raise ConfigError(field, str(e)) from None


def _check_kind(ck: Path, got: str, kind: Optional[str], field: str) -> None:
    if kind is not None and got != kind:
        raise ConfigError(field, f"{ck} holds {KINDS.get(got, got)}, not {KINDS[kind]}")


# --- the inputs of a training run ----------------------------------------------------------------

SOURCES = "sources"     # state.json: {config field: the checkpoint folder it resolved to at the start}


def started_from(run_dir: str | os.PathLike, config) -> dict[str, str]:
    """The checkpoint each model input of a run resolved to when the run started, as its newest
    checkpoint recorded them, for the inputs `config` still names as the run did: {} before
    the first save (SFT's init_checkpoint and DPO's reference_checkpoint, from before sources
    were recorded, stand for "init"). An input named differently now (a setting a stage lets
    change on resume) is read from where it now points."""
    latest = latest_checkpoint(Path(run_dir) / "checkpoints")
    try:
        state = read_state(latest) if latest is not None else {}
    except CheckpointError:
        return {}          # the resume itself names what is wrong with it
    legacy = state.get("init_checkpoint") or state.get("reference_checkpoint")
    recorded = {**({"init": legacy} if legacy else {}), **(state.get(SOURCES) or {})}
    was = state.get("config") or {}
    return {k: v for k, v in recorded.items() if k in was and was[k] == getattr(config, k, None)}


class RunInputs:
    """The checkpoints a training run reads its models from, fixed for the run's whole life.

    A run folder named as an input resolves to its best or newest checkpoint, and that moves
    on when the run it names is trained further. A resumed run must go on against the models it
    started with (the reference its KL is measured to, the reward model, the base its LoRA
    adapters were trained on), so on a resume each input is read from the checkpoint the run
    recorded when it started, whatever its folder holds now. And whatever dtype the file holds
    (an import may keep bf16 to halve its size), a model a run trains or scores with is float32
    in memory: the run's dtype picks the precision of the arithmetic (autocast), not that of the
    weights and their optimizer state, where most small updates of bf16 would round away.
    """

    def __init__(self, run_dir: str | os.PathLike, config, log=None):
        self.started = started_from(run_dir, config)
        self.used: dict[str, str] = {}
        # log(message, level=...): the stage's Emitter.log; none for a preflight, which says nothing
        self.log = log or (lambda *a, **k: None)

    def path(self, field: str, named: str | os.PathLike, *, prefer: str = "best", required: bool = True) -> Path:
        """Where `field` is read from: the recorded checkpoint on a resume, else `named`.
        required: the input's weights matter after a resume (a reference, a reward model, a
        LoRA base), so a recorded checkpoint that is gone ends the resume; when they do not
        (a fully trained model's init), `named` serves instead."""
        was = self.started.get(field)
        if was is None:
            return Path(named)
        if not (Path(was) / "model.safetensors").exists():
            if not required:
                return Path(named)
            raise ConfigError(field, f"this run started from {was}, which no longer exists (pruned or deleted): "
                                     "a resumed run goes on from the checkpoints it started with; start a new run")
        try:
            now = resolve_checkpoint(named, prefer=prefer).resolve()
        except (FileNotFoundError, CheckpointError):
            now = None
        if now != Path(was):
            self.log(f"{field}: resuming with {was}, the checkpoint this run started from "
                     f"({named} now resolves to {now or 'nothing'})")
        return Path(was)

    def load(self, field: str, named: str | os.PathLike, *, prefer: str = "best", required: bool = True,
             **kw) -> Loaded:
        """load_artifact of the input, its weights float32, recorded for the run's checkpoints."""
        art = load_artifact(self.path(field, named, prefer=prefer, required=required), prefer=prefer,
                            field=field, **kw)
        art.model = self.float32(field, art.model)
        self.used[field] = str(art.checkpoint.resolve())
        return art

    def peek(self, field: str, named: str | os.PathLike, *, prefer: str = "best", required: bool = True,
             kind: Optional[str] = None) -> Peeked:
        """peek_artifact of the input `load` would read: a stage's preflight."""
        return peek_artifact(self.path(field, named, prefer=prefer, required=required), prefer=prefer,
                             field=field, kind=kind)

    def float32(self, field: str, model: torch.nn.Module) -> torch.nn.Module:
        stored = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        if stored == torch.float32:
            return model
        self.log(f"{field} is stored in {str(stored).removeprefix('torch.')}: this run holds its weights "
                 "in float32 (its own checkpoints are float32)")
        return model.float()

    def state(self) -> dict:
        """What each of the run's checkpoints records (under SOURCES) for its resumes."""
        return {SOURCES: dict(self.used)}
