"""Export a checkpoint for the tools people already use: a Hugging Face folder, or GGUF.

    python -m engine.export RUN_OR_CHECKPOINT --format hf|gguf --out PATH [--gguf-type f16|q8_0|f32]
                            [--dtype float32|bfloat16|float16]

A language model becomes a folder that `AutoModelForCausalLM` and `AutoTokenizer` load with no
custom code (config.json of its family, model.safetensors, tokenizer.json, tokenizer_config.json
with the chat template, generation_config.json), or one GGUF file for llama.cpp and the tools
built on it. A reward model becomes `<Family>ForSequenceClassification` weights with one label
(`score.weight`), the layout InstructGPT-style reward models are shared in.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from engine.artifacts import Loaded, load_artifact
from engine.config import ConfigError
from engine.fsutil import atomic_write_text, disk_full_message, is_disk_full
from engine.hf_model import FAMILIES, family_of, save_hf_weights
from engine.model import ScalarModel
from engine.runio import StageError
from engine.tokenizer import SPECIAL_TOKENS, Tokenizer

FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f16", "q8_0", "f32")
# A Hugging Face folder's weight types: float32 keeps every bit the stages trained; the halves
# are what models are shared in (half the size) and what transformers loads with dtype="auto".
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def token_ids(tok, pad_id: int | None = None) -> dict:
    """config.json's ids: end of turn as eos, since that is where an exported chat model stops."""
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.end_id,
            "pad_token_id": tok.pad_id if pad_id is None else pad_id}


def score_pad_id(tok) -> int:
    """The pad id for an exported reward model. transformers scores a sequence at its last token
    that is not padding, where ours reads r(x, y) at the end-of-turn token; an imported model
    whose pad is that token (Llama 3 has none and pads with it; SmolLM2 names it) would be
    scored one token early. Another special token that never ends an answer pads instead."""
    ends = set(tok.turn_end_ids)
    if tok.pad_id not in ends:
        return tok.pad_id
    spare = sorted(i for i in tok.special_ids if i not in ends and i != tok.bos_id)
    if not spare:
        raise ExportError("this reward model's tokenizer pads with its end-of-turn token and has "
                          "no other special token to pad with: transformers would read its score "
                          "one token before the end, so it cannot be exported as hf")
    return spare[0]


def _write_workbench_tokenizer(tok: Tokenizer, out: Path) -> None:
    """Our tokenizer as transformers reads one: the JSON as is, plus a config naming the special
    tokens and carrying render_chat as a Jinja chat template."""
    tok.save(out / "tokenizer.json")
    pad, bos, end = (SPECIAL_TOKENS[i] for i in (tok.pad_id, tok.bos_id, tok.end_id))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": end,
              "pad_token": pad, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "chat_template": tok.chat_template}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def export_hf(art: Loaded, out: Path, dtype: str = "float32") -> Path:
    """The folder `out` (created; its model files replaced) holding the checkpoint for
    transformers, its weights in `dtype` (config.json says which, for dtype="auto")."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = art.model, art.tokenizer
    scalar = isinstance(model, ScalarModel)
    if isinstance(tok, Tokenizer):
        _write_workbench_tokenizer(tok, out)
    else:
        tok.save(out)
    ids = token_ids(tok, score_pad_id(tok) if scalar else None)
    save_hf_weights(model.to(HF_DTYPES[dtype]), out, ids)
    _set_dtype(out / "config.json", dtype)
    if scalar:
        _as_sequence_classifier(out / "config.json", family_of(model.config))
        if ids["pad_token_id"] != tok.pad_id:     # the tokenizer pads with the same token
            _set_pad_token(out / "tokenizer_config.json", tok.id_to_token(ids["pad_token_id"]))
    else:
        gen = {k: v for k, v in {**ids, "eos_token_id": list(dict.fromkeys([tok.end_id, *tok.stop_ids]))}.items()
               if v is not None}
        atomic_write_text(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    return out


def _as_sequence_classifier(config_path: Path, family: str) -> None:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    arch = FAMILIES[family].replace("ForCausalLM", "ForSequenceClassification")
    config.update(architectures=[arch], num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")


def _set_dtype(config_path: Path, dtype: str) -> None:
    """Both names transformers has read the weights' type under (4.x torch_dtype, 5.x dtype)."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(torch_dtype=dtype, dtype=dtype)
    atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")


def _set_pad_token(config_path: Path, pad: str) -> None:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["pad_token"] = pad
    atomic_write_text(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def export_gguf(art: Loaded, out: Path, gguf_type: str = "f16") -> Path:
    """One GGUF file at `out`, with the tokenizer and chat template in its metadata."""
    from engine.gguf_export import write_gguf

    if isinstance(art.model, ScalarModel):
        raise ExportError("a reward model has no GGUF form that llama.cpp runs: export it as hf")
    tok = art.tokenizer
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(out, art.model, tok.to_str(), bos_id=tok.bos_id, eos_id=tok.end_id, pad_id=tok.pad_id,
               add_bos=tok.adds_bos,
               chat_template=tok.chat_template, ftype=gguf_type, name=art.checkpoint.parent.parent.name)
    return out


def check_out(fmt: str, out: Path) -> None:
    """Refuse an output that would overwrite what an earlier export did not write: a run, a
    checkpoint, a project or any other folder with files in it (hf), a file of another kind (gguf).
    ValueError says which."""
    out = Path(out)
    if fmt == "gguf":
        if out.is_dir():
            raise ValueError(f"{out} is a folder; a GGUF export is one file (give a path ending in .gguf)")
        if out.exists() and not _starts_with(out, b"GGUF"):
            raise ValueError(f"{out} exists and is not a GGUF file: it would be replaced; give a new path")
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; a Hugging Face export is a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_model_folder(out):
        raise ValueError(f"{out} holds files that are not a model folder an export wrote (a run, a "
                         "checkpoint, a project?): they would be replaced or mixed in; give a new or empty folder")


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _is_model_folder(folder: Path) -> bool:
    """A Hugging Face model folder laid out as an export writes it (its config.json names a
    model_type, its weights are one model.safetensors), and nothing of ours. A downloaded model
    in shards or .bin files is not: an export's files would be mixed in among its own."""
    if any((folder / name).exists() for name in ("workbench.toml", "events.jsonl", "state.json", "checkpoints")):
        return False
    if ((folder / "model.safetensors.index.json").exists() or any(folder.glob("*.bin"))
            or any(folder.glob("model-*-of-*.safetensors"))):
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked; the message names the run or the format."""


def export(source: Path, fmt: str, out: Path, gguf_type: str = "f16", dtype: str = "float32") -> Path:
    """`gguf_type` is the GGUF file's weight type, `dtype` the Hugging Face folder's."""
    if fmt not in FORMATS:
        raise ExportError(f"the format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"the GGUF type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    if dtype not in HF_DTYPES:
        raise ExportError(f"the weight type must be one of {', '.join(HF_DTYPES)}, got {dtype!r}")
    if fmt == "gguf" and dtype != "float32":
        raise ExportError("--dtype is the Hugging Face folder's weight type; a GGUF file's is --gguf-type")
    check_out(fmt, out)
    try:
        art = load_artifact(source, field="checkpoint", prefer="latest")
    except ConfigError as e:        # it names the config field of a stage; here it is the RUN given
        raise ExportError(e.message if str(source) in e.message else f"{source}: {e.message}") from None
    art.model.float()
    if fmt == "gguf":
        return export_gguf(art, out, gguf_type)     # one file, renamed into place when whole
    made = not Path(out).exists()
    try:
        return export_hf(art, out, dtype)
    except BaseException:
        if made:        # a full disk, a kill: no folder that looks like a model without its weights
            shutil.rmtree(out, ignore_errors=True)
        raise


def add_arguments(p: argparse.ArgumentParser, nargs: str | None = None) -> None:
    """`nargs="+"`: `workbench export` also takes several runs (`export tensorboard RUN...`)."""
    p.add_argument("source", type=Path, metavar="RUN", nargs=nargs,
                   help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf: a folder for transformers (default); gguf: one file for llama.cpp")
    p.add_argument("--out", type=Path, required=True, metavar="PATH",
                   help="the folder (hf) or the .gguf file (gguf) to write: new, empty, or an earlier export")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16",
                   help="GGUF weight type: f16 (default), q8_0 (8-bit, about half the size) or f32")
    p.add_argument("--dtype", choices=tuple(HF_DTYPES), default="float32",
                   help="the Hugging Face folder's weight type: float32 (default, every bit trained), "
                        "bfloat16 or float16 (half the size, as models are usually shared)")


def run_from_args(args) -> int:
    try:
        out = export(args.source, args.format, args.out, args.gguf_type, args.dtype)
    except (ConfigError, StageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.out}: {disk_full_message(args.out) if is_disk_full(e) else e}",
              file=sys.stderr)
        return 1
    print(f"exported {args.source} to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
