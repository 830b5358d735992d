"""Token shards on disk and random-window batches for language-model training.

`encode_corpus` streams the corpus through the tokenizer into two flat arrays,
`train.bin` and `val.bin` (uint16 when the vocabulary fits, else uint32), with a <|bos|>
at the start of every document, then writes `meta.json` last: a folder with a meta.json
is complete. `TokenData` memory-maps the arrays, so a corpus larger than RAM trains fine,
and draws windows with a caller-owned torch.Generator, so saving the generator's state in
a checkpoint reproduces the exact batches on resume.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from engine.corpus import CorpusError, NonEmptyGuard, iter_chunks, list_corpus_files, split_draw
from engine.fsutil import atomic_write_text, fsync_dir
from engine.runio import StageError
from engine.tokenizer import Tokenizer

SPLITS = ("train", "val")
META_VERSION = 1
# Text per encode_batch call. The library encodes each text of a batch on one thread, so a
# batch of 4 chunks (the old fixed 256k chars) left all but 4 cores of a bigger machine idle:
# two 64k-char chunks per core keep every core busy, and memory stays a few MB.
BATCH_CHARS = max(1 << 18, 2 * (os.cpu_count() or 1) << 16)
# The unit of the train/val split. At 64k chars a 2.7M-char corpus had 42 chunks, so a 5%
# validation split was 2 of them and its loss followed whatever those two held; at 4k it is
# ~33 of ~650, spread over every file. Encoding speed is the same: chunks are batched by
# BATCH_CHARS either way, and cuts fall before whitespace, where the pre-tokenizer splits.
SPLIT_CHARS = 4096


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _file_records(files: Iterable[Path]) -> list[dict]:
    out = []
    for f in files:
        st = Path(f).stat()
        out.append({"path": str(Path(f).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def encode_corpus(tok: Tokenizer, files: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                  val_fraction: float = 0.05, seed: int = 0, chunk_chars: int = SPLIT_CHARS,
                  control=None, log: Callable[[str], None] | None = None) -> dict | None:
    """Encode `files` into `out_dir`/{train,val}.bin + meta.json; return the meta dict.

    The unit of the train/val split is a chunk, decided by a hash of (seed, chunk index),
    so the split is the same on every run. Both splits end up non-empty: if no chunk drew
    val (or none drew train), the last chunk goes to the empty side; a corpus of a single
    chunk is split at the token level. Returns None, publishing nothing, if `control`
    asks to stop.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = list_corpus_files(files)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # whatever was here is about to be replaced: it must not look complete meanwhile
    (out_dir / "meta.json").unlink(missing_ok=True)
    records = _file_records(files)  # before reading, so an edit during encoding is noticed
    dtype = _dtype_for(tok.vocab_size)
    tmp = {s: out_dir / f".{s}.bin.tmp-{os.getpid()}" for s in SPLITS}
    counts = {s: 0 for s in SPLITS}
    n_docs = n_chunks = n_chars = 0
    pending: list = []  # [split, ids] of the latest chunk, held back to fix up an empty split
    t0 = last_log = time.monotonic()
    for stale in out_dir.glob(".*.bin.tmp-*"):  # left by an encoder that was killed
        stale.unlink(missing_ok=True)
    published = False
    handles = {}
    try:
        for s in SPLITS:
            handles[s] = open(tmp[s], "wb")

        def write(split: str, ids: list[int]) -> None:
            if ids:
                np.asarray(ids, dtype=dtype).tofile(handles[split])
                counts[split] += len(ids)

        def flush(batch: list) -> None:
            nonlocal n_docs
            for (i, c), ids in zip(batch, tok.encode_batch([c.text for _, c in batch])):
                if c.new_doc:
                    ids = [tok.bos_id] + ids
                    n_docs += 1
                if pending:
                    write(*pending)
                split = "val" if split_draw(seed, i) < val_fraction else "train"
                pending[:] = [split, ids]

        batch, batch_chars = [], 0
        for i, c in enumerate(NonEmptyGuard(iter_chunks(files, chunk_chars), files)):
            batch.append((i, c))
            batch_chars += len(c.text)
            n_chunks += 1
            n_chars += len(c.text)
            if control is not None and control.should_stop():
                return None
            if batch_chars >= BATCH_CHARS:
                flush(batch)
                batch, batch_chars = [], 0
                now = time.monotonic()
                if log is not None and now - last_log >= 5.0:
                    last_log = now
                    log(f"encoded {n_chars / 1e6:.1f}M chars into "
                        f"{(counts['train'] + counts['val']) / 1e6:.2f}M tokens")
        if batch:
            flush(batch)
        _place_last(pending, counts, val_fraction, write, files)

        for s in SPLITS:
            handles[s].flush()
            os.fsync(handles[s].fileno())
            handles[s].close()
            os.replace(tmp[s], out_dir / f"{s}.bin")
        fsync_dir(out_dir)
        meta = {
            "version": META_VERSION,
            "dtype": dtype.name,
            "n_tokens": dict(counts),
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "tokenizer_fingerprint": tok.fingerprint(),
            "files": records,
            "val_fraction": val_fraction,
            "seed": seed,
            "chunk_chars": chunk_chars,
            "n_docs": n_docs,
            "n_chunks": n_chunks,
            "n_chars": n_chars,
            "encode_seconds": round(time.monotonic() - t0, 2),
        }
        atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
        published = True
        return meta
    finally:
        for s in SPLITS:
            if s in handles:
                handles[s].close()
            if not published:
                tmp[s].unlink(missing_ok=True)


def _place_last(pending: list, counts: dict, val_fraction: float, write, files) -> None:
    """Write the held-back last chunk where it keeps both splits non-empty."""
    split, ids = pending
    other = "train" if split == "val" else "val"
    if counts[other] > 0:
        write(split, ids)
    elif counts[split] > 0:
        write(other, ids)  # the other side is empty: give it this chunk
    else:
        # the whole corpus is this one chunk: split its tokens, the tail validates
        n = len(ids)
        if n < 2:
            raise CorpusError(f"corpus too small: {n} token(s) in {', '.join(map(str, files))}")
        k = min(n - 1, max(1, round(n * val_fraction)))
        write("train", ids[:n - k])
        write("val", ids[n - k:])


def _read_meta(out_dir: Path) -> dict | None:
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("version") == META_VERSION else None


def shards_ready(out_dir: str | os.PathLike, tok: Tokenizer, files: Iterable[str | os.PathLike],
                 *, val_fraction: float | None = None, seed: int | None = None,
                 chunk_chars: int | None = None) -> bool:
    """True if `out_dir` holds a complete encoding of exactly these files with this tokenizer.

    Sources are compared by resolved path, size and mtime, so an edited file forces a
    re-encode. The split settings are compared only when given.
    """
    out_dir = Path(out_dir)
    meta = _read_meta(out_dir)
    if meta is None or meta.get("tokenizer_fingerprint") != tok.fingerprint():
        return False
    try:
        if meta.get("files") != _file_records(list_corpus_files(files)):
            return False
        itemsize = np.dtype(meta["dtype"]).itemsize
        for s in SPLITS:
            if (out_dir / f"{s}.bin").stat().st_size != meta["n_tokens"][s] * itemsize:
                return False
    except (OSError, CorpusError, KeyError, TypeError):
        return False
    for name, want in (("val_fraction", val_fraction), ("seed", seed), ("chunk_chars", chunk_chars)):
        if want is not None and meta.get(name) != want:
            return False
    return True


class TokenData:
    """The encoded splits, memory-mapped read-only."""

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        meta = _read_meta(self.dir)
        if meta is None:
            raise StageError(f"{self.dir}: no readable meta.json; the corpus is not encoded "
                             f"(or encoding did not finish)")
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"])
        self.vocab_size = int(meta["vocab_size"])
        self._arrays: dict[str, np.ndarray] = {}
        for s in SPLITS:
            path = self.dir / f"{s}.bin"
            n = int(meta["n_tokens"][s])
            size = path.stat().st_size if path.exists() else -1
            if size != n * self.dtype.itemsize:
                raise StageError(f"{path}: expected {n} tokens ({n * self.dtype.itemsize} bytes), "
                                 f"found {size} bytes; re-encode the corpus")
            # np.memmap refuses an empty file; an empty split is still a valid (useless) one
            self._arrays[s] = (np.memmap(path, dtype=self.dtype, mode="r") if n
                               else np.zeros(0, dtype=self.dtype))

    def n_tokens(self, split: str) -> int:
        return len(self.array(split))

    def array(self, split: str) -> np.ndarray:
        if split not in self._arrays:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return self._arrays[split]

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator,
                  device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """B random windows of T+1 tokens: x = tokens[:-1], y = tokens[1:], both int64 [B, T]."""
        arr = self.array(split)
        n = len(arr)
        if n < seq_len + 1:
            raise StageError(f"the {split} split has {n} tokens, fewer than seq_len + 1 = "
                             f"{seq_len + 1}: use a shorter seq_len or more text")
        starts = torch.randint(n - seq_len, (batch_size,), generator=generator).tolist()
        buf = np.stack([arr[i:i + seq_len + 1] for i in starts]).astype(np.int64)
        t = torch.from_numpy(buf)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        if device is not None and torch.device(device).type != "cpu":
            x = x.pin_memory().to(device, non_blocking=True)
            y = y.pin_memory().to(device, non_blocking=True)
        return x, y


def _bincount(arr: np.ndarray, vocab_size: int, block: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for s in range(0, len(arr), block):
        counts += np.bincount(arr[s:s + block], minlength=vocab_size)[:vocab_size]
    return counts


def unigram_baseline(data: TokenData, block: int = 1 << 22) -> float:
    """Val cross-entropy (nats/token) under the train split's add-one unigram model.

    A model that has learned nothing about context scores this; pretraining must beat it.
    """
    V = data.vocab_size
    train = _bincount(data.array("train"), V, block)
    val = _bincount(data.array("val"), V, block)
    n_val = int(val.sum())
    if n_val == 0:
        return math.nan
    logp = np.log(train + 1.0) - math.log(float(train.sum()) + V)
    return float(-(val * logp).sum() / n_val)
