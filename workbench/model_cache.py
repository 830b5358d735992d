"""Loaded models for chat and compare, kept for reuse and let go of on purpose.

Loading a checkpoint takes seconds and its weights may fill most of a GPU, so the views share
a small least-recently-used cache keyed by checkpoint folder. The default capacity is two:
compare mode holds two models at once; a third evicts the one used longest ago. Evicting drops
the cache's reference, runs the garbage collector and, on CUDA, returns the freed blocks to the
driver, so a user switching checkpoints does not slowly fill the GPU. A view that still holds
an evicted model keeps it alive until it lets go; the views drop theirs when they switch.

Generation runs on worker threads, so every method takes one lock. Loading happens under it
too: two panes asking for the same checkpoint at once load it once.

Running out of GPU memory (torch.cuda.OutOfMemoryError, or MPS's RuntimeError) while loading
or generating becomes `OutOfMemory`, whose text tells the user what to do, and the cache frees
what it can first; `guard()` wraps generation for that.
"""
from __future__ import annotations

import gc
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from engine.artifacts import Loaded, load_artifact
from engine.checkpoint import resolve_checkpoint
from engine.config import ConfigError
from engine.device import resolve_device


class ModelCacheError(RuntimeError):
    """A checkpoint that cannot be used; the text is meant for the user as it is."""


class OutOfMemory(ModelCacheError):
    pass


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    # MPS (and CUDA builds older than the dedicated class) say it only in the text.
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _name(path: Path) -> str:
    """run/checkpoints/step-000010 -> run/step-000010: what a user recognises."""
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.name}"
    return path.name


class ModelCache:
    """Up to `capacity` loaded checkpoints (model + tokenizer), least recently used evicted first."""

    def __init__(self, capacity: int = 2, *, device: str = "auto",
                 loader: Callable[..., Loaded] = load_artifact):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.device = resolve_device(device)
        self._loader = loader
        self._lock = threading.RLock()
        self._models: OrderedDict[Path, Loaded] = OrderedDict()

    @staticmethod
    def key(path: str | os.PathLike) -> Path:
        """The checkpoint folder a path means (a run folder means its best, else newest one).
        A run that saves a newer checkpoint is therefore a new entry, not a stale hit."""
        try:
            return resolve_checkpoint(path).resolve()
        except FileNotFoundError as e:
            raise ModelCacheError(str(e)) from None

    def get(self, path: str | os.PathLike) -> Loaded:
        """The loaded checkpoint, from the cache or from disk (evicting to make room)."""
        with self._lock:
            key = self.key(path)
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            # Make room before loading, not after: the old weights must be gone from the GPU
            # before the new ones arrive, or a switch needs memory for both.
            while len(self._models) >= self.capacity:
                self._drop(next(iter(self._models)))
            self._free()
            try:
                loaded = self._loader(key, device=self.device)
            except ConfigError as e:
                raise ModelCacheError(f"{_name(key)}: {e.message}") from None
            except Exception as e:
                if is_out_of_memory(e):
                    self._free()
                    raise OutOfMemory(self._oom_text(f"loading {_name(key)}")) from None
                raise
            # Sampling must never run with dropout, and generate() restores the mode it found:
            # with two threads on one model, a model left in train mode could flip under one.
            loaded.model.eval()
            self._models[key] = loaded
            return loaded

    def evict(self, path: str | os.PathLike) -> bool:
        with self._lock:
            key = Path(path).resolve()
            if key not in self._models:
                try:
                    key = self.key(path)
                except ModelCacheError:
                    return False
            if key not in self._models:
                return False
            self._drop(key)
            self._free()
            return True

    def clear(self) -> None:
        with self._lock:
            for key in list(self._models):
                self._drop(key)
            self._free()

    def keys(self) -> list[Path]:
        """Cached checkpoint folders, least recently used first."""
        with self._lock:
            return list(self._models)

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, path) -> bool:
        try:
            return self.key(path) in self.keys()
        except ModelCacheError:
            return False

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn running out of memory inside the block into OutOfMemory, after freeing what the
        failed step left behind (its activations and KV cache are garbage by then)."""
        try:
            yield
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            # The traceback holds the failed frames and their tensors: drop it before freeing.
            e.__traceback__ = None
            del e
            with self._lock:
                self._free()
            raise OutOfMemory(self._oom_text(what)) from None

    def _drop(self, key: Path) -> None:
        self._models.pop(key, None)

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _oom_text(self, what: str) -> str:
        where = "GPU" if self.device.type in ("cuda", "mps") else "computer"
        return (f"The {where} ran out of memory while {what}. Close other models (compare holds "
                f"two), lower 'max new tokens', or pick a smaller checkpoint.")
