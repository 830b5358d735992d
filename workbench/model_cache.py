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

`run_reply` is one chat reply as a worker thread runs it: it lends a ChatSession the cached
model for the length of the reply only, so an idle conversation pins no weights in memory.
"""
from __future__ import annotations

import gc
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from engine.artifacts import Loaded, load_artifact
from engine.chat import ChatSession
from engine.checkpoint import resolve_checkpoint
from engine.config import ConfigError
from engine.device import resolve_device
from engine.runio import StageError


class ModelCacheError(RuntimeError):
    """A checkpoint that cannot be used; the text is meant for the user as it is."""


class OutOfMemory(ModelCacheError):
    pass


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    # MPS, and the CPU allocator ("not enough memory"), say it only in the text.
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


def short_name(path: str | os.PathLike) -> str:
    """run/checkpoints/step-000010 -> run/step-000010: what a user recognises."""
    path = Path(path)
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
        # Building a model on the meta device imports torch._dynamo on first use (torch's
        # Python meta kernels). Done here, on the thread that makes the cache, rather than
        # in the middle of the first load on a worker thread, where a test run hung in it.
        import torch._dynamo  # noqa: F401

    @staticmethod
    def key(path: str | os.PathLike) -> Path:
        """The checkpoint folder a path means (a run folder means its best, else newest one).
        A run that saves a newer checkpoint is therefore a new entry, not a stale hit."""
        try:
            return resolve_checkpoint(path).resolve()
        except (FileNotFoundError, StageError) as e:   # StageError: a broken state.json, say
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
            if len(self._models) >= self.capacity:
                while len(self._models) >= self.capacity:
                    self._models.popitem(last=False)
                self._free()
            try:
                loaded = self._loader(key, device=self.device)
            except ConfigError as e:
                raise ModelCacheError(f"{short_name(key)}: {e.message}") from None
            except StageError as e:
                raise ModelCacheError(str(e)) from None
            except Exception as e:
                if is_out_of_memory(e):
                    self._free()
                    raise OutOfMemory(self._oom_text(f"loading {short_name(key)}")) from None
                raise
            # Sampling must never run with dropout, and generate() restores the mode it found:
            # with two threads on one model, a model left in train mode could flip under one.
            loaded.model.eval()
            self._models[key] = loaded
            return loaded

    def evict(self, path: str | os.PathLike) -> bool:
        """Let go of a checkpoint (a run folder means its current best); False if not cached."""
        with self._lock:
            try:
                key = self.key(path)
            except ModelCacheError:     # deleted from disk since: the folder itself is the key
                key = Path(path).resolve()
            if key not in self._models:
                return False
            del self._models[key]
            self._free()
            return True

    def clear(self) -> None:
        with self._lock:
            if self._models:
                self._models.clear()
                self._free()

    def keys(self) -> list[Path]:
        """Cached checkpoint folders, least recently used first."""
        with self._lock:
            return list(self._models)

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

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _oom_text(self, what: str) -> str:
        where = "GPU" if self.device.type in ("cuda", "mps") else "computer"
        return (f"The {where} ran out of memory while {what}. Close other models (compare holds "
                f"two), lower 'max new tokens', or pick a smaller checkpoint.")


# --- replies on worker threads ----------------------------------------------------------------

@dataclass
class Reply:
    """A finished (or stopped) reply with its numbers and the model that wrote it."""
    text: str
    stopped: bool
    n_tokens: int
    seconds: float
    dropped_turns: int
    seed: Optional[int]
    info: dict
    cut: Optional[str] = None       # ChatSession.cut: "length", "context" or None


def model_info(loaded: Loaded) -> dict:
    state = loaded.state
    return {"checkpoint": str(loaded.checkpoint), "name": short_name(loaded.checkpoint),
            "stage": state.get("stage", "unknown stage"), "step": state.get("step"),
            "params": loaded.model.num_params(), "context": loaded.model.config.max_seq_len}


def describe(info: dict) -> str:
    step = f" · step {info['step']}" if info.get("step") is not None else ""
    n = info["params"]
    size = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"
    return f"{info['name']} · {info['stage']}{step} · {size} params · context {info['context']} tokens"


def run_reply(session: ChatSession, cache: ModelCache, path: Path, action: str, text: str = "",
              *, emit, cancelled) -> Optional[Reply]:
    """One reply (action: send, regenerate, complete), text deltas to emit(); None if cancelled
    before it began. Runs on a worker thread; the session is not touched by the UI meanwhile."""
    loaded = cache.get(path)
    info = model_info(loaded)
    session.model, session.tok = loaded.model, loaded.tokenizer
    del loaded
    # Counted per streamed delta: a token that ends inside a UTF-8 character sends none of its
    # own, so non-ASCII text may count a few short; the session does not expose its token ids.
    n = 0

    def on_token(delta: str) -> None:
        nonlocal n
        n += 1
        # Stop pressed before generation began found the session idle and did nothing; the
        # worker's flag remembers it, and this passes it on at the first token.
        if cancelled():
            session.stop()
        emit(delta)

    t0 = time.perf_counter()
    try:
        if cancelled():
            return None
        with cache.guard(f"generating with {info['name']}"):
            if action == "send":
                out = session.send(text, on_token)
            elif action == "regenerate":
                out = session.regenerate(on_token)
            else:
                out = session.complete(text, on_token)
    finally:
        session.model = session.tok = None
    return Reply(out, session.stopped, n, time.perf_counter() - t0, session.dropped_turns,
                 session.last_seed, info, session.cut)
