"""Export a language model to GGUF, the file llama.cpp (and Ollama, LM Studio) loads.

What goes in the file follows llama.cpp's own `convert_hf_to_gguf.py` for the three families
`engine.hf_model.family_of` names: the GGUF architecture ("llama", "qwen2", "qwen3"), its
hyperparameter keys, its tensor names (gguf's `TensorNameMap`, which the converter uses too),
the q/k row permutation of the llama architecture, which tensors stay F32, and a "gpt2"
(byte-level BPE) tokenizer. Written with the `gguf` package (gguf-py, from the llama.cpp tree),
tensor by tensor so that only one converted tensor is in memory at a time, to a temporary
name that is renamed into place at the end: a killed export leaves no half file behind.

    write_gguf("model.gguf", model, tokenizer_json, bos_id=1, eos_id=2, pad_id=0,
               chat_template=None, ftype="q8_0")
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from engine.fsutil import DiskFull, fault_point, fsync_dir, fsync_path, is_disk_full
from engine.hf_model import family_of
from engine.model import ModelConfig, rope_inv_freq

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
# ftype -> (general.file_type, the type of the 2-D weight matrices)
FTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, QT.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, QT.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
}

# The pre-tokenizer regexes of Llama 3 and Qwen2/Qwen3 as their tokenizer.json spell them
# (llama.cpp's llama-vocab.cpp quotes both in comments above its hand-written equivalents).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
KNOWN_PRES = "'gpt-2' (GPT-2 / our tokenizers), 'llama-bpe' (Llama 3), 'qwen2', 'smollm', 'default'"


# ---------------------------------------------------------------------------------------------
# What the architecture needs


def check_exportable(model) -> str:
    """The GGUF architecture name for `model`; ValueError naming what llama.cpp would not run."""
    if getattr(model, "kind", "lm") != "lm":
        raise ValueError(f"only language models export to GGUF, not a {model.kind!r} model "
                         "(a reward or value model has no token head)")
    cfg: ModelConfig = model.config
    arch = family_of(cfg)
    rope = rope_kind(cfg)
    if arch == "qwen3" and cfg.qkv_bias:
        raise ValueError("q/k norms together with q/k/v biases: llama.cpp's qwen3 graph has no biases")
    if arch == "qwen2" and cfg.head_dim * cfg.n_head != cfg.d_model:
        # llama.cpp's qwen2 loader sizes attn_q as {n_embd, n_embd}.
        raise ValueError(f"qwen2 with head_dim * n_head ({cfg.head_dim * cfg.n_head}) != d_model "
                         f"({cfg.d_model}): llama.cpp's qwen2 architecture cannot load it")
    if rope == "llama3" and arch != "llama":
        # Only the llama graph reads the rope_freqs tensor that carries llama3 scaling.
        raise ValueError(f"llama3 rope scaling on a {arch} model: llama.cpp applies it to llama only")
    return arch


def rope_kind(cfg: ModelConfig) -> str:
    rs = cfg.rope_scaling or {}
    return rs.get("rope_type", rs.get("type", "default"))


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """The `rope_freqs` tensor: llama.cpp divides each rotary frequency by its factor, so the
    factors are the unscaled frequencies over ours (the converter's generate_extra_tensors
    computes the same numbers from the config with its own loop)."""
    plain = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None).double()
    scaled = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).double()
    return (plain / scaled).float().numpy()


def llama_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's q/k rows -> llama.cpp's, per head: [first half; second half] -> interleaved pairs.

    HF's rotate_half rotates dim i with dim i + head_dim/2; ggml's "normal" rope, which the llama
    architecture uses, rotates adjacent dims (2i, 2i+1). Interleaving the halves makes the two
    compute the same scores. This is `LlamaModel.permute` of convert_hf_to_gguf.py (for k it is
    called with n_kv_head); qwen2/qwen3 use ggml's "neox" rope, HF's layout, and need nothing.
    """
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `llama_permute` (reading a llama GGUF back into HF's layout)."""
    return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# ---------------------------------------------------------------------------------------------
# Tensors


@dataclass
class PlannedTensor:
    name: str                          # GGUF name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]             # numpy (row-major) shape; GGUF stores it reversed
    qtype: QT
    make: Callable[[], np.ndarray]     # float32 values, laid out as llama.cpp wants


def tensor_type(name: str, shape: tuple[int, ...], wanted: QT) -> QT:
    """As the converter's prepare_tensors: 1-D tensors, norms and biases stay F32 (most of
    ggml's ops on them take F32 only), the rest take the file's type; a row length Q8_0's
    32-wide blocks do not divide falls back to F16 (the converter's QuantError fallback)."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return QT.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else QT.F16


def _as_numpy(key: str, t: torch.Tensor, permute_heads: int) -> np.ndarray:
    a = t.detach().to("cpu", torch.float32).numpy()
    if not np.isfinite(a).all():
        raise ValueError(f"tensor {key!r} holds NaN or infinite values; it cannot be exported")
    return np.ascontiguousarray(llama_permute(a, permute_heads) if permute_heads else a)


def _permute_heads(arch: str, key: str, cfg: ModelConfig) -> int:
    """How many heads to permute `key`'s rows over (0: none). Biases too, as the converter does."""
    if arch != "llama":
        return 0
    if key.endswith(("q_proj.weight", "q_proj.bias")):
        return cfg.n_head
    if key.endswith(("k_proj.weight", "k_proj.bias")):
        return cfg.n_kv_head
    return 0


def plan_tensors(model, arch: str, wanted: QT) -> list[PlannedTensor]:
    cfg: ModelConfig = model.config
    names = gguf.get_tensor_name_map(ARCHS[arch], cfg.n_layer)
    plan = []
    if rope_kind(cfg) == "llama3":
        factors = llama3_rope_factors(cfg)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(PlannedTensor(name, factors.shape, QT.F32, lambda: factors))
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue  # as in HF files: llama.cpp uses token_embd when `output` is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"tensor {key!r} has no name in GGUF's {arch} architecture")
        shape = tuple(t.shape)
        plan.append(PlannedTensor(name, shape, tensor_type(name, shape, wanted),
                                  partial(_as_numpy, key, t, _permute_heads(arch, key, cfg))))
    return plan


def _encode(p: PlannedTensor) -> np.ndarray:
    data = gguf.quants.quantize(p.make(), p.qtype)
    if p.qtype == QT.F16 and not np.isfinite(data).all():
        raise ValueError(f"tensor {p.name!r} has values beyond float16's range; export with ftype='f32'")
    return data


def _nbytes(p: PlannedTensor) -> int:
    block, size = gguf.GGML_QUANT_SIZES[p.qtype]
    return math.prod(p.shape) // block * size


# ---------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: Optional[str]   # the llama.cpp pre-tokenizer the tokenizer.json's structure matches


def _pre_steps(tj: dict) -> list[dict]:
    pt = tj.get("pre_tokenizer") or {}
    return list(pt.get("pretokenizers") or []) if pt.get("type") == "Sequence" else ([pt] if pt else [])


def detect_pre(tj: dict) -> Optional[str]:
    """tokenizer.ggml.pre for the pre-tokenizer llama.cpp reimplements that `tj`'s is.

    The converter instead hashes the ids of a test string, which only recognises released
    tokenizers; ours are trained here, so the structure is what can be matched.
    """
    steps = _pre_steps(tj)
    kinds = [s.get("type") for s in steps]
    if not kinds or kinds[-1] != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return None
    regex = steps[-1].get("use_regex", True)
    if kinds == ["ByteLevel"] and regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and regex and steps[0].get("individual_digits"):
        return "smollm"
    split = steps[0]
    if (kinds == ["Split", "ByteLevel"] and not regex and split.get("behavior") == "Isolated"
            and not split.get("invert")):
        return SPLIT_PRES.get((split.get("pattern") or {}).get("Regex"))
    return None


def _check_byte_level_bpe(tj: dict) -> None:
    model = tj.get("model") or {}
    kind = model.get("type", "BPE" if "merges" in model else None)
    if kind != "BPE":
        raise ValueError(f"tokenizer model {kind!r} is not supported: GGUF export handles "
                         "byte-level BPE tokenizers only (ours, Llama 3, Qwen, SmolLM)")
    byte_level = any(s.get("type") == "ByteLevel" for s in _pre_steps(tj)) \
        or (tj.get("decoder") or {}).get("type") == "ByteLevel"
    if not byte_level or model.get("byte_fallback"):
        raise ValueError("a BPE tokenizer that is not byte-level (SentencePiece-style, e.g. "
                         "Llama 2 or Mistral) is not supported: only byte-level BPE exports")


def _looks_special(text: str) -> bool:
    # The converter's does_token_look_special, the part that applies to byte-level vocabularies.
    return text.startswith("<|") and text.endswith("|>")


def _merges(model: dict) -> list[str]:
    """"a b" strings; the newer [a, b] pair format is joined as gguf's SpecialVocab joins it,
    with a space inside a part written as U+0120 (llama.cpp splits merges at the space)."""
    merges = model.get("merges") or []
    if all(isinstance(m, str) for m in merges):
        return list(merges)
    return [" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair) for pair in merges]


def gguf_vocab(tokenizer_json: str, n_vocab: int) -> GGUFVocab:
    """Tokens, their types and the merges, as the converter's get_vocab_base lays them out:
    one entry per model row, ids the tokenizer lacks as "[PADn]" (UNUSED), added tokens CONTROL
    when special (or spelled <|...|>) and USER_DEFINED otherwise, the rest NORMAL."""
    try:
        tj = json.loads(tokenizer_json)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer_json is not valid JSON: {e}") from None
    if not isinstance(tj, dict):
        raise ValueError("tokenizer_json is not a tokenizer.json object")
    _check_byte_level_bpe(tj)
    by_id = {i: (tok, gguf.TokenType.NORMAL) for tok, i in (tj["model"].get("vocab") or {}).items()}
    for added in tj.get("added_tokens") or []:
        text = added["content"]   # byte-level added tokens are raw text already, as llama.cpp wants
        special = added.get("special") or _looks_special(text)
        by_id[added["id"]] = (text, gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    if by_id and max(by_id) >= n_vocab:
        raise ValueError(f"the tokenizer has token id {max(by_id)} but the model only "
                         f"{n_vocab} embedding rows")
    entries = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(n_vocab)]
    return GGUFVocab([t for t, _ in entries], [int(k) for _, k in entries],
                     _merges(tj["model"]), detect_pre(tj))


# ---------------------------------------------------------------------------------------------
# The file


def _add_hparams(w: gguf.GGUFWriter, cfg: ModelConfig, ftype: gguf.LlamaFileType, name: str) -> None:
    # TextModel.set_gguf_parameters + LlamaModel's vocab_size and rope.dimension_count.
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)      # llama.cpp assumes d_model / n_head without them
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if rope_kind(cfg) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling["factor"])
    # llama3 scaling travels as the rope_freqs tensor, with no key (as in the converter).
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(w: gguf.GGUFWriter, vocab: GGUFVocab, pre: str, ids: dict[str, Optional[int]],
                   add_bos: bool, chat_template: Optional[str]) -> None:
    w.add_tokenizer_model("gpt2")       # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    adders = {"bos_id": w.add_bos_token_id, "eos_id": w.add_eos_token_id, "pad_id": w.add_pad_token_id}
    for what, i in ids.items():
        if i is None:
            continue   # no key: llama.cpp then has no such token (its BPE default bos is id 11)
        if not 0 <= i < len(vocab.tokens):
            raise ValueError(f"{what} {i} is outside the vocabulary (0..{len(vocab.tokens) - 1})")
        adders[what](i)
    w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)


def _write_atomically(path: Path, w: gguf.GGUFWriter, plan: list[PlannedTensor]) -> None:
    """Header, metadata, tensor table, then each tensor converted as it is written, into a
    temporary file that replaces `path` only once complete and on disk."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in plan:
            w.write_tensor_data(_encode(p))
            fault_point("gguf_tensor")
        w.close()
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        w.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and is_disk_full(e):
            raise DiskFull(path.parent) from None
        raise
    fsync_dir(path.parent)


def write_gguf(out_path, model, tokenizer_json: str, *, bos_id: Optional[int], eos_id: int,
               pad_id: Optional[int], chat_template: Optional[str], ftype: str = "f16",
               name: str = "workbench model", pre: Optional[str] = None,
               add_bos: Optional[bool] = None) -> None:
    """Write `model` (a Transformer) and its tokenizer as one GGUF file at `out_path`.

    ftype: "f32", "f16" or "q8_0" for the weight matrices (norms and biases stay F32).
    pre: llama.cpp's pre-tokenizer name; None detects it from the tokenizer.json (ValueError if
    it matches none llama.cpp knows). Not "default": llama.cpp's default splits punctuation
    and digit runs unlike GPT-2's regex, so it would tokenize our text differently.
    add_bos: whether llama.cpp prepends BOS; None: when bos_id is given (our models are trained
    with a leading <|bos|>).
    """
    if ftype not in FTYPES:
        raise ValueError(f"ftype {ftype!r} is not supported (supported: {', '.join(FTYPES)})")
    arch = check_exportable(model)
    cfg: ModelConfig = model.config
    vocab = gguf_vocab(tokenizer_json, cfg.vocab_size)
    pre = pre or vocab.pre
    if pre is None:
        raise ValueError("the tokenizer's pre-tokenizer matches none llama.cpp implements; "
                         f"pass pre= explicitly ({KNOWN_PRES})")
    file_type, wanted = FTYPES[ftype]
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[ARCHS[arch]])
    _add_hparams(w, cfg, file_type, name)
    _add_tokenizer(w, vocab, pre, {"bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id},
                   bos_id is not None if add_bos is None else add_bos, chat_template)
    plan = plan_tensors(model, arch, wanted)
    for p in plan:
        # With raw_dtype given and a non-byte dtype, the writer takes the shape as it is.
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p), raw_dtype=p.qtype)
    _write_atomically(Path(out_path), w, plan)


# ---------------------------------------------------------------------------------------------
# Reading back (tests, checks)


def read_gguf_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32 in numpy (row-major, PyTorch) order, dequantized.
    Values are as stored: a llama file's q/k rows are in llama.cpp's order (`llama_unpermute`)."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = np.array(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
    return out


def read_gguf_fields(path) -> dict[str, object]:
    """The metadata of a GGUF file: key -> int, float, bool, str, or a list of them."""
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
