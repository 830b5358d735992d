"""A conversation with a model: multi-turn state, streamed replies, regenerate, stop, completion.

`ChatSession` owns the message list and renders it through `render_chat` (the one template SFT
trains on), so the model sees at chat time exactly the layout it learned. It runs in-process and
synchronously: the terminal chat calls it directly; the app calls it from a worker thread and
uses `stop()` from the UI thread.
"""
from __future__ import annotations

import secrets
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from engine.config import require
from engine.generate import generate, generate_batch
from engine.model import Transformer
from engine.ppo_core import build_rollout, state_kl
from engine.tasks import Task, task_accuracy
from engine.tokenizer import Tokenizer

OnText = Optional[Callable[[str], None]]


@dataclass
class SamplingSettings:
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    seed: Optional[int] = None  # None: a fresh random draw every reply

    def validate(self) -> None:
        require(self.temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        require(self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (1 = off), got {self.top_p}")
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(self.repetition_penalty > 0, "repetition_penalty",
                f"must be > 0 (1 = off, 1.1-1.3 discourages repeats), got {self.repetition_penalty}")
        require(self.seed is None or self.seed >= 0, "seed", f"must be >= 0 or null, got {self.seed}")


class TextStream:
    """Token ids in, clean text deltas out.

    A byte-level BPE token can end in the middle of a UTF-8 character; decoding then shows
    U+FFFD until the rest arrives. So the whole answer is decoded each time and only the new
    suffix is passed on, holding back a trailing U+FFFD: the deltas concatenate to the final
    decode, and no replacement character flashes up and is taken back.
    """

    def __init__(self, tok: Tokenizer, on_text: OnText):
        self.tok, self.on_text = tok, on_text
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        self._emit(self.text().rstrip("\ufffd"))

    def text(self) -> str:
        return self.tok.decode(self.ids)

    def finish(self) -> str:
        """The final text; whatever was held back (a character the answer never completed) is
        sent now, so the deltas still add up to it."""
        final = self.text()
        self._emit(final)
        return final

    def _emit(self, text: str) -> None:
        # A decode that does not extend what was sent cannot happen with a lossy UTF-8 decoder
        # and the hold-back rule; if it ever did, sending nothing is better than a wrong delta.
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            if self.on_text is not None:
                self.on_text(delta)


class ChatSession:
    """A conversation: an optional system prompt, then alternating user and assistant turns.

    `messages` is the whole transcript. What the model sees is its newest part that fits: when
    the rendered prompt plus room for the answer exceeds max_seq_len, the oldest turns (a user
    message with its answer) are left out, the system prompt is kept; `dropped_turns` says how
    many. If the newest message alone is still too long, its start is cut (generate keeps the
    last max_seq_len - 1 tokens), so a long paste never crashes the session.

    Replies end at <|end|>, or at any other special token: a model that starts a new turn
    (<|user|>) or a new document (<|bos|>) has finished its answer.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, system_prompt: Optional[str] = None,
                 settings: Optional[SamplingSettings] = None):
        self.model, self.tok = model, tokenizer
        self.settings = settings or SamplingSettings()
        self.settings.validate()
        self.system_prompt = system_prompt or None
        self._turns: list[dict] = []  # user / assistant messages, alternating, user first
        self._draws = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._busy = False
        self.dropped_turns = 0
        self.last_prompt_ids: list[int] = []
        self.stopped = False  # whether the last reply was cut short by stop()
        # Why the last reply ended without its end token: "length" (max_new_tokens) or "context"
        # (prompt and answer filled max_seq_len); None when it ended, or was stopped.
        self.cut: Optional[str] = None
        self.last_seed: Optional[int] = None  # what the last reply drew with, to reproduce it
        self.stop_ids: Optional[tuple[int, ...]] = None   # what ends a reply; None: the tokenizer's

    # --- state ---------------------------------------------------------------------------
    @property
    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [dict(m) for m in self._turns]

    @property
    def can_regenerate(self) -> bool:
        return bool(self._turns) and self._turns[-1]["role"] == "assistant"

    def set_system(self, text: Optional[str]) -> None:
        """A new system prompt (None or "" removes it); the turns so far stay."""
        self.system_prompt = text or None

    def reset(self) -> None:
        """Forget the turns; keep the system prompt and the settings."""
        self._turns.clear()
        self.dropped_turns = 0

    def restore(self, turns: list[dict]) -> None:
        """Put back the turns of `messages` (without the system prompt) that reset forgot: the
        app's Undo of Clear."""
        self._turns = [{"role": t["role"], "content": t["content"]} for t in turns]
        self.dropped_turns = 0

    def truncate(self, n_turns: int) -> None:
        """Keep the first `n_turns` messages (user and assistant, no system): editing a message
        drops it and everything after, and the edit is sent again."""
        if n_turns < 0 or n_turns % 2:
            raise ValueError(f"truncate keeps whole exchanges: an even number of turns, not {n_turns}")
        del self._turns[n_turns:]

    def stop(self) -> None:
        """End the reply being generated (from any thread); it keeps the text so far. A call
        while no reply runs does nothing, so it cannot cut the next reply short."""
        with self._lock:
            if self._busy:
                self._stop.set()

    # --- replies -------------------------------------------------------------------------
    def send(self, user_text: str, on_token: OnText = None) -> str:
        """Add a user message, generate the answer (text deltas go to on_token), return it.
        The message and its answer join the history together, so a reply that fails leaves
        the conversation as it was."""
        if not isinstance(user_text, str):
            raise TypeError(f"user_text must be a str, got {type(user_text).__name__}")
        user = {"role": "user", "content": user_text}
        with self._generating():
            text = self._run(self._render(self._turns + [user]), on_token)
            self._turns += [user, {"role": "assistant", "content": text}]
        return text

    def regenerate(self, on_token: OnText = None) -> str:
        """Replace the last answer with a new one to the same conversation.

        The new answer is the next sample, not a repeat: every reply draws with a new seed
        (settings.seed + the number of replies so far, or a fresh random one when seed is None).
        A session with a fixed seed therefore replays the same way, and at temperature 0 the
        regenerated answer is the same greedy one.
        """
        with self._generating():
            if not self.can_regenerate:
                raise ValueError("there is no answer to regenerate yet")
            text = self._run(self._render(self._turns[:-1]), on_token)
            self._turns[-1] = {"role": "assistant", "content": text}
        return text

    def complete(self, text: str, on_token: OnText = None) -> str:
        """Plain completion for a base model: text as its tokenizer starts plain text (BOS first,
        where it puts one), no template, no history."""
        bos = [self.tok.bos_id] if self.tok.adds_bos else []
        with self._generating():
            return self._run(bos + self.tok.encode(text), on_token)

    def prompt_ids(self) -> list[int]:
        """What the model would see now, ending with the generation prompt."""
        return self._render(self._turns)

    def _render(self, turns: list[dict]) -> list[int]:
        """The conversation through the template, oldest turns left out until it fits with
        room for the answer (sets dropped_turns)."""
        limit = self.model.config.max_seq_len
        # Room for the answer, but never more than half the context: a large max_new_tokens
        # must not push the whole history out.
        room = min(self.settings.max_new_tokens, limit // 2)
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        start = 0
        while True:
            ids, _ = self.tok.render_chat(system + turns[start:], add_generation_prompt=True)
            if len(ids) + room <= limit or start + 2 >= len(turns):
                break
            start += 2  # a user message and its answer leave together
        self.dropped_turns = start // 2
        return ids

    @contextmanager
    def _generating(self):
        with self._lock:
            if self._busy:
                raise RuntimeError("a reply is already being generated in this session")
            self._busy = True
            self._stop.clear()
        try:
            yield
        finally:
            with self._lock:
                self._busy = False
                self._stop.clear()

    def _run(self, prompt: list[int], on_token: OnText) -> str:
        s = self.settings
        s.validate()
        # secrets, not torch's global RNG: chatting must not shift anyone else's random stream
        seed = s.seed + self._draws if s.seed is not None else secrets.randbits(62)
        self._draws += 1
        self.last_seed = seed
        self.last_prompt_ids = prompt
        stream = TextStream(self.tok, on_token)
        stops = set(self.tok.stop_ids if self.stop_ids is None else self.stop_ids)

        def push(t: int) -> None:
            if t not in stops:  # the closing token is not part of the answer's text
                stream.push(t)

        new = generate(self.model, prompt, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                       top_p=s.top_p, repetition_penalty=s.repetition_penalty, seed=seed,
                       stop_ids=stops, on_token=push, should_stop=self._stop.is_set)
        self.stopped = self._stop.is_set()
        ended = bool(new) and new[-1] in stops
        self.cut = (None if ended or self.stopped else "length" if len(new) >= s.max_new_tokens
                    else "context" if min(len(prompt), self.model.config.max_seq_len - 1) + len(new)
                    >= self.model.config.max_seq_len else None)
        return stream.finish()


def cut_note(cut: Optional[str], context: int) -> str:
    """Why a reply ended without its end token (ChatSession.cut), for a person; "" if it did not."""
    return {"length": "cut off at max new tokens",
            "context": f"cut off: the model's context ({context} tokens) is full"}.get(cut, "")


def reply_batch(model: Transformer, tok: Tokenizer, prompts: list[str], max_new_tokens: int, *,
                temperature: float = 0.0, seed: Optional[int] = None,
                batch_size: int = 32) -> list[tuple[str, bool]]:
    """One-turn replies to many prompts, batched: (text, ended) for each.

    What evaluation and training-time samples use; greedy by default, so replies at different
    steps or from different checkpoints compare answer for answer. A reply ends where a chat
    reply ends, at any of the tokenizer's stop tokens (a model that writes "<|user|>" has begun
    the next turn; an imported one may end with its eos rather than its end-of-turn token), so
    what is scored is what a person chatting with the model sees.
    """
    stops = set(tok.stop_ids)
    out = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo:lo + batch_size]
        ids = [tok.render_chat([{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in chunk]
        seeds = None if seed is None else [seed + lo + i for i in range(len(chunk))]
        for ans in generate_batch(model, ids, max_new_tokens, temperature=temperature,
                                  top_k=50 if temperature else 0, seed=seeds,
                                  stop_ids=stops, pad_id=tok.pad_id):
            done = bool(ans) and ans[-1] in stops
            out.append((tok.decode(ans[:-1] if done else ans, skip_special=True), done))
    return out


def task_metrics(model: Transformer, tok: Tokenizer, tasks: list[Task], max_new_tokens: int) -> dict[str, float]:
    """Greedy accuracy on held-out tasks, as the eval/ metrics SFT and GRPO report: overall,
    partial-credit score and each kind's accuracy."""
    replies = reply_batch(model, tok, [t.prompt for t in tasks], max_new_tokens)
    acc = task_accuracy(tasks, [text for text, _ in replies])
    return {"eval/task_accuracy": acc["overall"], "eval/task_score": acc["score"],
            **{f"eval/acc/{k}": v for k, v in acc["per_kind"].items()}}


@torch.no_grad()
def sampled_kl(model: Transformer, ref: Transformer, tok: Tokenizer, prompts: list, max_new_tokens: int, *,
               seed: int = 0, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(model ‖ ref) of one answer per prompt, and its length in tokens: [N] each.

    `model` answers each prompt (text, or a list of chat messages) once, sampled at temperature 1
    and seeded by position; the exact KL of the next-token distributions (ppo_core.state_kl) is
    summed over the states the answer visits. DPO's val/kl and the methods' comparison read it."""
    device = next(model.parameters()).device
    keep = model.config.max_seq_len - 1     # as generation cuts a long prompt: one forward pass fits
    kl, lengths = [], []
    for lo in range(0, len(prompts), batch_size):
        chunk = [tok.render_chat([{"role": "user", "content": p}] if isinstance(p, str) else list(p),
                             add_generation_prompt=True)[0][-keep:] for p in prompts[lo:lo + batch_size]]
        answers = generate_batch(model, chunk, max_new_tokens, temperature=1.0,
                                 seed=[seed + lo + i for i in range(len(chunk))],
                                 stop_ids=tok.turn_end_ids, pad_id=tok.pad_id)
        ro = build_rollout(chunk, answers, tok.turn_end_ids, tok.pad_id)
        ids, mask = ro.ids.to(device), ro.mask.to(device)
        kl.append((state_kl(model(ids), ref(ids)) * mask).sum(1))
        lengths.append(mask.sum(1))
    return torch.cat(kl), torch.cat(lengths)
