"""The import stage: a Hugging Face model folder becomes a run that every later stage starts from.

    python -m engine.hf_import --run-dir DIR     # reads DIR/config.json: {"source": ...}

`source` is a local folder (config.json, model.safetensors or its shards, tokenizer.json,
tokenizer_config.json, generation_config.json) or a model's name in the local Hugging Face
cache; nothing is downloaded. The run holds one checkpoint, `checkpoints/step-000000`, laid out
like any other (our safetensors with the config in its metadata, the tokenizer beside it), so
SFT, the reward model, PPO, DPO, GRPO, sampling and chat load it with `load_artifact` as they
load a pretraining run. Everything is checked before any weight is written.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from engine.checkpoint import CheckpointError, save_checkpoint
from engine.config import ConfigError, require, resolve_path
from engine.hf_model import family_of, read_hf_config, read_hf_weights
from engine.model import ModelConfig
from engine.runio import Emitter, StageError, stage_main
from engine.tokenizer import TokenizerError, tokenizer_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEMPLATES = ("auto", "workbench")


class SourceError(StageError):
    """The model folder is missing a file or holds one that is broken: its message names the
    file. Found before any work, so the import is refused (exit code 2), like a bad setting."""
    exit_code = 2


@dataclass
class ImportConfig:
    source: str                     # a Hugging Face model folder, or a model's name (org/name) in the local Hugging Face cache; nothing is downloaded
    dtype: str = "float32"          # how the weights are stored: bfloat16 or float16 keep half the size on disk (training still holds them in float32)
    chat_template: str = "auto"     # auto: the model's own, or the workbench's when it has none; workbench: always the workbench's (adds its special tokens)

    def validate(self) -> None:
        require(self.source.strip() != "", "source", "give a model folder or a cached model's name")
        require(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        require(self.chat_template in TEMPLATES, "chat_template",
                f"must be one of {', '.join(TEMPLATES)}, got {self.chat_template!r}")


def hub_cache() -> Path:
    """Where huggingface_hub keeps downloaded models, by its own environment variables."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_snapshot(name: str) -> Optional[Path]:
    """The snapshot folder of `org/name` in the local cache (the revision `main` points at)."""
    if name.count("/") != 1:
        return None
    repo = hub_cache() / ("models--" + name.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if snap.is_dir():
            return snap
    snaps = sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
    return snaps[-1] if len(snaps) == 1 else None


def cached_models() -> list[str]:
    """org/name of every model in the local cache with a snapshot to import."""
    root = hub_cache()
    if not root.is_dir():
        return []
    names = [p.name.removeprefix("models--").replace("--", "/", 1) for p in sorted(root.glob("models--*--*"))]
    return [n for n in names if cached_snapshot(n) is not None]


def find_source(run_dir: Path, source: str) -> Path:
    path = resolve_path(run_dir, source)
    if path.is_dir():
        return path
    snap = cached_snapshot(source)
    if snap is not None:
        return snap
    raise ConfigError("source", f"{source}: no such folder, and no model of that name in the local "
                                f"Hugging Face cache ({hub_cache()}); nothing is downloaded")


def load_source_tokenizer(folder: Path, template: str):
    """(tokenizer, how many tokens it added) for the folder; ours when it has no chat template."""
    from engine.hf_tokenizer import HFTokenizer

    tok = HFTokenizer.from_folder(folder)
    if template == "workbench" or not tok.chat_template:
        return HFTokenizer.for_base_model(folder)
    return tok, 0


def grow_embeddings(sd: dict, cfg: ModelConfig, vocab: int) -> tuple[dict, ModelConfig]:
    """Room for tokens the tokenizer added: each new row is the mean of the existing rows.

    The mean keeps a new token's logit near the average one instead of a random vector's
    (Hewitt, "Initializing new word embeddings for pretrained language models", 2021), so the
    model's distribution over its old tokens barely moves until fine-tuning teaches the new ones.
    """
    if vocab <= cfg.vocab_size:
        return sd, cfg
    sd = dict(sd)
    names = ["model.embed_tokens.weight"] + ([] if cfg.tie_embeddings else ["lm_head.weight"])
    for name in names:
        w = sd[name]
        sd[name] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(vocab - w.shape[0], -1)])
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd, dataclasses.replace(cfg, vocab_size=vocab)


def run(cfg: ImportConfig, run_dir: Path, sink=None, control=None) -> str:
    ev = Emitter(sink)
    run_dir = Path(run_dir)
    folder = find_source(run_dir, cfg.source)
    ev.log(f"importing {folder}")
    try:
        model_cfg = read_hf_config(folder)
        tok, added = load_source_tokenizer(folder, cfg.chat_template)
    except (CheckpointError, TokenizerError) as e:
        raise SourceError(str(e)) from None
    family = family_of(model_cfg)
    sd = read_hf_weights(folder, model_cfg, DTYPES[cfg.dtype])
    sd, model_cfg = grow_embeddings(sd, model_cfg, tok.vocab_size)
    if added:
        ev.log(f"no chat template: the workbench's was added with {added} special token(s); "
               f"new embedding rows start at the mean of the others", level="warning")
    tok_dir = run_dir / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    tok.save(tok_dir)
    tensors = {k: v for k, v in sd.items() if not (model_cfg.tie_embeddings and k == "lm_head.weight")}
    meta = {"format": "pt", "config": json.dumps(dataclasses.asdict(model_cfg)), "kind": "lm"}
    n_params = sum(v.numel() for v in tensors.values())
    state = {"stage": "hf_import", "source": str(folder), "family": family, "dtype": cfg.dtype,
             "tokenizer_fingerprint": tok.fingerprint(), "added_tokens": added}
    ck = save_checkpoint(run_dir / "checkpoints", 0, model=tensors, state=state, model_metadata=meta,
                         extra_files=tokenizer_files(tok_dir))
    ev.emit("checkpoint", step=0, path=str(ck), best=True)
    ev.metrics(0, {"import/params_m": n_params / 1e6, "import/vocab_size": model_cfg.vocab_size,
                   "import/layers": model_cfg.n_layer})
    ev.log(f"imported a {family} model: {n_params / 1e6:.1f}M parameters, {model_cfg.n_layer} layers, "
           f"{tok.vocab_size} tokens, {cfg.dtype}; chat template: "
           f"{'the workbench' if added else 'its own'}")
    return "completed"


def main(argv: list[str] | None = None) -> int:
    return stage_main("hf_import", ImportConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
