"""Byte-level BPE trained on the user's corpus, and the one chat template every stage uses.

The tokenizer is Hugging Face `tokenizers` with a GPT-2 style byte-level alphabet, so every
Unicode string round-trips. The six special tokens sit at ids 0..5; text passed to `encode`
can never produce them, even if it spells "<|end|>", so data cannot forge a turn boundary.

    python -m engine.tokenizer --run-dir DIR   # reads DIR/config.json, writes DIR/tokenizer.json
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.config import require
from engine.corpus import (NonEmptyGuard, config_corpus_files, corpus_bytes, empty_corpus_error,
                           iter_chunks, list_corpus_files, split_draw)
from engine.fsutil import atomic_write_text
from engine.runio import Emitter, NeverStop, StageError, stage_main

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
ROLES = ("system", "user", "assistant")
TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
# Beside an imported model's tokenizer.json: its settings and chat template, and what ends a reply.
HF_FILES = (HF_CONFIG, "chat_template.jinja", "special_tokens_map.json", "generation_config.json")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # bytes + specials + at least one merge
MAX_VOCAB = 1 << 20


class TokenizerError(StageError, ValueError):
    """A tokenizer file that is missing, unreadable, or not one of ours.

    Also a ValueError, so a stage can report it as a bad setting (the config field that
    named the file) rather than a failure half-way through.
    """


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable stand-in character -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TextCodec:
    """Text in and out of ids, shared by our tokenizer and an imported one (engine.hf_tokenizer):
    `_text` encodes user text (its special tokens never parsed), `_tk` decodes."""
    _tk: tokenizers.Tokenizer
    _text: tokenizers.Tokenizer

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._text.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # the fast variant skips offsets, which only token_spans needs (absent before 0.20)
        enc = getattr(self._text, "encode_batch_fast", self._text.encode_batch)
        return [e.ids for e in enc(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)


def read_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    """The `tokenizers` library's tokenizer from a tokenizer.json; TokenizerError names the file."""
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    try:
        return tokenizers.Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as e:  # the library raises a bare Exception on bad JSON
        raise TokenizerError(f"{path}: cannot read tokenizer: {str(e).splitlines()[0]}") from None


class Tokenizer(TextCodec):
    """A thin wrapper: the special-token ids, safe encoding, spans, fingerprint, chat template."""

    def __init__(self, tk: tokenizers.Tokenizer, source: str = "<memory>"):
        for i, s in enumerate(SPECIAL_TOKENS):
            if tk.token_to_id(s) != i:
                raise TokenizerError(f"{source}: not a workbench tokenizer: {s} should have id {i}, "
                                     f"has {tk.token_to_id(s)}")
        # Not stored in tokenizer.json, so it is set on every load: user text stays text.
        tk.encode_special_tokens = True
        self._tk = self._text = tk
        self._fingerprint: str | None = None
        self.pad_id, self.bos_id, self.end_id, self.system_id, self.user_id, self.assistant_id = \
            range(len(SPECIAL_TOKENS))
        self.role_ids = {"system": self.system_id, "user": self.user_id,
                         "assistant": self.assistant_id}
        self.special_ids = frozenset(range(len(SPECIAL_TOKENS)))
        self.scaffold_ids = self.special_ids   # the template writes nothing but special tokens
        # Any special token ends a reply: a model that writes <|user|> has begun the next turn.
        self.stop_ids = tuple(range(len(SPECIAL_TOKENS)))
        # A reply that ends properly ends with <|end|>: what PPO and GRPO count as finished.
        self.turn_end_ids = (self.end_id,)
        self.adds_bos = True        # pretraining puts <|bos|> before each document

    @property
    def chat_template(self) -> str:
        """render_chat as Jinja, for an exported tokenizer_config.json."""
        from engine.hf_tokenizer import WORKBENCH_TEMPLATE
        return WORKBENCH_TEMPLATE

    # --- files ---------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """`path` is a tokenizer.json or a folder (a run folder, a checkpoint) holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        return cls(read_tokenizer_json(path), str(path))

    @classmethod
    def from_str(cls, text: str) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_str(text))

    def to_str(self) -> str:
        return self._tk.to_str(pretty=True)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        atomic_write_text(path, self.to_str())
        return path

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: equal for equal tokenizers, whatever the file layout."""
        if self._fingerprint is None:
            canon = json.dumps(json.loads(self._tk.to_str()), sort_keys=True,
                               separators=(",", ":"), ensure_ascii=False)
            self._fingerprint = hashlib.sha256(canon.encode("utf-8")).hexdigest()
        return self._fingerprint

    # --- encoding ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, i: int) -> str:
        tok = self._tk.id_to_token(int(i))
        if tok is None:
            raise IndexError(f"token id {i} outside the vocabulary (size {self.vocab_size})")
        return tok

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes a token stands for (special tokens: their spelling)."""
        tok = self.id_to_token(i)
        if int(i) < len(SPECIAL_TOKENS):
            return tok.encode("utf-8")
        table = _byte_decoder()
        return bytes(table[c] for c in tok)

    def token_spans(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, id) per token, as character offsets into `text`, for a coloured view.

        Spans tile the text without overlap. A character whose UTF-8 bytes are split across
        tokens belongs to the token holding its first byte; the later pieces get an empty
        span (start == end) rather than overlapping ones, which a view cannot draw.
        """
        ids = self.encode(text)
        # byte offset at which each character starts; a byte boundary b maps to the number
        # of characters starting before it
        starts, b = [], 0
        for ch in text:
            starts.append(b)
            b += len(ch.encode("utf-8"))
        out, pos = [], 0
        for i in ids:
            end = pos + len(self.token_bytes(i))
            out.append((bisect.bisect_left(starts, pos), bisect.bisect_left(starts, end), i))
            pos = end
        if pos != b:  # would mean the model encodes bytes we do not know about
            raise TokenizerError(f"token bytes ({pos}) do not add up to the text's ({b})")
        return out

    def render_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        return render_chat(self, messages, add_generation_prompt)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer in `path` (a tokenizer.json, or a folder holding one): ours, or an imported
    model's (engine.hf_tokenizer), told apart by the tokenizer_config.json that only the latter
    has beside it. Both offer the same methods and ids to every stage."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if (folder / HF_CONFIG).is_file():
        from engine.hf_tokenizer import HFTokenizer
        return HFTokenizer.from_folder(folder)
    return Tokenizer.from_file(path)


def tokenizer_files(path: str | os.PathLike) -> dict[str, Path]:
    """The files that make up the tokenizer at `path`, by name: what a checkpoint copies."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    names = (TOKENIZER_FILE,) + HF_FILES
    return {n: folder / n for n in names if (folder / n).is_file()}


def check_messages(messages: Any) -> list[dict[str, str]]:
    """A conversation's {role, content} messages as plain copies, or ValueError naming the first
    message that is not one; every template (ours, an imported model's) checks with this."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{role, content}}, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i}: expected an object with 'role' and 'content', "
                             f"got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i}: field 'role' must be one of {', '.join(ROLES)}, "
                             f"got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: field 'content' must be a string, "
                             f"got {type(m.get('content')).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render_chat(tok: Tokenizer, messages: Sequence[Mapping[str, Any]],
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """The chat template: (ids, mask) for a conversation.

    <|bos|> then, per message, <|ROLE|> content <|end|>. The mask is 1 on what the model
    is trained to say: the assistant's content and the <|end|> that closes its turn (so it
    learns to stop). Everything else is context. With add_generation_prompt, a final
    <|assistant|> asks the model to answer next.
    """
    messages = check_messages(messages)
    bodies = tok.encode_batch([m["content"] for m in messages]) if messages else []
    ids, mask = [tok.bos_id], [0]
    for m, body in zip(messages, bodies):
        target = 1 if m["role"] == "assistant" else 0
        ids.append(tok.role_ids[m["role"]])
        mask.append(0)
        ids.extend(body)
        mask.extend([target] * len(body))
        ids.append(tok.end_id)
        mask.append(target)
    if add_generation_prompt:
        ids.append(tok.assistant_id)
        mask.append(0)
    return ids, mask


# --- training ----------------------------------------------------------------------------
def _new_hf_tokenizer() -> tokenizers.Tokenizer:
    tk = tokenizers.Tokenizer(models.BPE())
    # no normalizer: the model must see exactly the user's bytes, or decode(encode(x)) != x
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    return tk


def train_from_texts(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train on any iterable of strings; it is consumed once, in the library's own batches.

    Exceptions raised by the iterable (a corpus error, a stop request) propagate out.
    """
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be between {MIN_VOCAB} and {MAX_VOCAB}, got {vocab_size}")
    tk = _new_hf_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    return Tokenizer(tk)


def train_tokenizer(files: Iterable[str | os.PathLike], vocab_size: int, min_frequency: int = 2,
                    chunk_chars: int = 65536) -> Tokenizer:
    """Stream `files` (files or folders) into a new BPE; refuse a corpus with no text."""
    files = list_corpus_files(files)
    guard = NonEmptyGuard(iter_chunks(files, chunk_chars), files)
    return train_from_texts((c.text for c in guard), vocab_size, min_frequency)


# --- the stage ---------------------------------------------------------------------------
DEFAULT_EXAMPLES = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "Zürich, 東京, naïve café 🙂",
]
HOLDOUT_CAP_CHARS = 2_000_000  # enough to measure chars/token well; beyond it, text trains
FALLBACK_CHARS = 256_000


@dataclass
class TokenizerConfig:
    inputs: list[str] = field(default_factory=list)  # files/folders; relative to the run folder
    vocab_size: int = 4096              # tokens in the vocabulary, special tokens included
    min_frequency: int = 2              # a merge must occur at least this often
    holdout_fraction: float = 0.01      # share of chunks held out to measure chars/token
    max_train_chars: int = 0            # 0 = train on everything
    seed: int = 0                       # random seed of the held-out draw
    chunk_chars: int = 65536            # characters read at a time while training
    examples: list[str] = field(default_factory=DEFAULT_EXAMPLES.copy)  # texts shown tokenized after training

    def validate(self) -> None:
        require(len(self.inputs) > 0, "inputs", "give at least one .txt/.jsonl file or folder")
        for i, p in enumerate(self.inputs):
            require(p.strip() != "", f"inputs[{i}]", "empty path")
        require(MIN_VOCAB <= self.vocab_size <= MAX_VOCAB, "vocab_size",
                f"must be between {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens "
                f"+ 1 merge) and {MAX_VOCAB}, got {self.vocab_size}")
        require(self.min_frequency >= 1, "min_frequency", f"must be >= 1, got {self.min_frequency}")
        require(0.0 <= self.holdout_fraction <= 0.5, "holdout_fraction",
                f"must be between 0 and 0.5, got {self.holdout_fraction}")
        require(self.max_train_chars >= 0, "max_train_chars",
                f"must be >= 0 (0 = no limit), got {self.max_train_chars}")
        require(self.chunk_chars >= 1024, "chunk_chars", f"must be >= 1024, got {self.chunk_chars}")


class _Stopped(Exception):
    pass


def run(cfg: TokenizerConfig, run_dir: Path, sink=None, control=None) -> str:
    ev = Emitter(sink)
    control = control or NeverStop()
    run_dir = Path(run_dir)
    files = config_corpus_files(run_dir, cfg.inputs, "inputs")
    total = corpus_bytes(files)
    ev.log(f"training a {cfg.vocab_size}-token byte-level BPE on {len(files)} file(s), "
           f"{total / 1e6:.1f} MB")
    held: list[str] = []
    fallback: list[str] = []
    st = {"held_chars": 0, "train_chars": 0, "fallback_chars": 0, "seen_text": False}
    t0 = time.monotonic()

    def texts():
        done_bytes, last_report = 0, 0.0
        for i, c in enumerate(iter_chunks(files, cfg.chunk_chars)):
            if control.should_stop():
                raise _Stopped
            if not st["seen_text"] and not c.text.isspace():
                st["seen_text"] = True
            done_bytes += len(c.text.encode("utf-8"))
            now = time.monotonic()
            if now - last_report >= 1.0:
                last_report = now
                el = now - t0
                rate = done_bytes / el if el > 0 else 0.0
                ev.progress(min(done_bytes, total), total, None, el,
                            (total - done_bytes) / rate if rate > 0 else None, unit="bytes")
            # the first chunk always trains, so a one-chunk corpus still gets a tokenizer
            if (i > 0 and st["held_chars"] < HOLDOUT_CAP_CHARS
                    and split_draw(cfg.seed, i) < cfg.holdout_fraction):
                held.append(c.text)
                st["held_chars"] += len(c.text)
                continue
            text = c.text
            if cfg.max_train_chars:
                text = text[:cfg.max_train_chars - st["train_chars"]]
            st["train_chars"] += len(text)
            if st["fallback_chars"] < FALLBACK_CHARS:
                fallback.append(text)
                st["fallback_chars"] += len(text)
            yield text
            if cfg.max_train_chars and st["train_chars"] >= cfg.max_train_chars:
                ev.log(f"reached max_train_chars ({cfg.max_train_chars}); the rest is not read")
                break
        # raised from inside the iterator so the library never trains on nothing
        if not st["seen_text"]:
            raise empty_corpus_error(files)

    try:
        tok = train_from_texts(texts(), cfg.vocab_size, cfg.min_frequency)
    except _Stopped:
        ev.log("stopped while reading the corpus; no tokenizer saved")
        return "stopped"
    ev.progress(total, total, None, time.monotonic() - t0, 0.0, unit="bytes")
    if tok.vocab_size < cfg.vocab_size:
        ev.log(f"the corpus supports only {tok.vocab_size} tokens (asked for {cfg.vocab_size}): "
               f"no pair left occurs {cfg.min_frequency}+ times", level="warning")
    path = tok.save(run_dir / "tokenizer.json")
    ev.log(f"saved {path} ({tok.vocab_size} tokens, fingerprint {tok.fingerprint()[:12]})")

    measure = held
    if not held:
        measure = fallback
        ev.log("corpus too small to hold text out: chars/token measured on training text "
               "(optimistic)", level="warning")
    n_tokens = sum(len(ids) for ids in tok.encode_batch(measure))
    n_chars = sum(len(t) for t in measure)
    ev.metrics(0, {
        "tokenizer/vocab_size": tok.vocab_size,
        "tokenizer/chars_per_token": n_chars / n_tokens if n_tokens else 0.0,
        "tokenizer/train_chars": st["train_chars"],
        "tokenizer/heldout_chars": st["held_chars"],
    })
    for text in cfg.examples:
        spans = tok.token_spans(text)
        ev.emit("example", text=text, ids=[i for _, _, i in spans],
                tokens=[tok.id_to_token(i) for _, _, i in spans],
                pieces=[text[s:e] for s, e, _ in spans])
    return "completed"


def main(argv: list[str] | None = None) -> int:
    return stage_main("tokenizer", TokenizerConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
