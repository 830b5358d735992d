"""SFT data: JSONL records in three formats -> chat-template token sequences -> padded batches.

Accepted records, one JSON object per line, the format detected per record:

    {"prompt": "...", "response": "..."}
    {"instruction": "...", "input": "...", "output": "..."}     (Alpaca; input optional)
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

Every record is checked before any training starts; all problems are collected into one
`SFTDataError` whose lines read `FILE:LINE: field 'x': what is wrong`, so the user fixes the
file in one pass instead of one error per run.

Each record becomes a conversation rendered by `engine.tokenizer.render_chat`, the one chat
template, which also gives the loss mask (assistant content and its closing <|end|>).

Batching: dynamic right-padding, not packing. A batch is padded to its longest sample with
<|pad|> inputs and -100 targets. With causal attention a real token never attends to a later
position, so right pads cannot change the real tokens' outputs and no attention mask is
needed; RoPE positions start at 0 in every row, exactly as at inference. Packing several
conversations into one row would waste less compute, but to be exact it needs a per-document
attention mask and position reset; SFT samples are short and similar in length, so the padding
saved is small and the exactness is worth more.
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from engine.jsonl import read_jsonl
from engine.runio import InputProblems, StageError
from engine.tasks import Task
from engine.tokenizer import ROLES, Tokenizer

MAX_EXAMPLES = 5       # line numbers quoted in a truncation report
FORMATS = {"messages": ("messages",), "alpaca": ("instruction", "input", "output"),
           "prompt": ("prompt", "response")}


class SFTDataError(InputProblems):
    """Unusable SFT or evaluation data; `problems` holds one `FILE:LINE: ...` line each."""

    def __init__(self, problems: list[str], what: str = "SFT data"):
        super().__init__(problems, what, "; nothing was trained", indent="")


@dataclass
class Record:
    file: Path
    line: int
    messages: list[dict]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


# --- reading and checking -------------------------------------------------------------------

def _text(rec: dict, key: str, where: str, problems: list[str], *, name: str = "",
          optional: bool = False, allow_empty: bool = False) -> Optional[str]:
    """The string rec[key], or None after recording what is wrong with it as field `name`."""
    name = name or key
    value = rec.get(key)
    if value is None:
        if not optional:
            problems.append(f"{where}: field '{name}': " + ("missing" if key not in rec
                                                             else "is null, expected a string"))
        return None
    if not isinstance(value, str):
        problems.append(f"{where}: field '{name}': expected a string, got {type(value).__name__}")
        return None
    if not allow_empty and not value.strip():
        problems.append(f"{where}: field '{name}': is empty")
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON can spell a lone surrogate; the tokenizer cannot
        problems.append(f"{where}: field '{name}': unpaired surrogate at character {e.start}")
        return None
    return value


def _messages(rec: dict, where: str, problems: list[str]) -> Optional[list[dict]]:
    msgs = rec["messages"]
    if not isinstance(msgs, list):
        problems.append(f"{where}: field 'messages': expected a list, got {type(msgs).__name__}")
        return None
    if not msgs:
        problems.append(f"{where}: field 'messages': is empty")
        return None
    out, before = [], len(problems)
    for i, m in enumerate(msgs):
        name = f"messages[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{where}: field '{name}': expected an object with 'role' and "
                            f"'content', got {type(m).__name__}")
            continue
        role = m.get("role")
        if "role" not in m:
            problems.append(f"{where}: field '{name}.role': missing")
        elif role not in ROLES:
            problems.append(f"{where}: field '{name}.role': unknown role {role!r} "
                            f"(known: {', '.join(ROLES)})")
        # An empty system or user turn is odd but harmless context; the check below makes sure
        # some answer says something.
        content = _text(m, "content", where, problems, name=f"{name}.content", allow_empty=True)
        out.append({"role": role, "content": content})
    if len(problems) > before:
        return None
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        problems.append(f"{where}: field 'messages': no assistant turn with non-empty content "
                        "(nothing to train on)")
        return None
    return out


def parse_record(rec: Any, where: str, problems: list[str]) -> Optional[list[dict]]:
    """The conversation a record stands for, or None after recording its problems."""
    if not isinstance(rec, dict):
        problems.append(f"{where}: expected a JSON object (one per line), got {type(rec).__name__}")
        return None
    found = [name for name, keys in FORMATS.items() if any(k in rec for k in keys)]
    if not found:
        problems.append(f"{where}: matches no SFT format (fields: {', '.join(sorted(rec)) or 'none'}); "
                        "expected {prompt, response}, {instruction, input?, output} or {messages}")
        return None
    if len(found) > 1:
        problems.append(f"{where}: mixes the fields of two formats ({' and '.join(found)}): "
                        "use one per record")
        return None
    before = len(problems)
    if found[0] == "messages":
        return _messages(rec, where, problems)
    if found[0] == "alpaca":
        instruction = _text(rec, "instruction", where, problems)
        extra = _text(rec, "input", where, problems, optional=True, allow_empty=True)
        output = _text(rec, "output", where, problems)
        if len(problems) > before:
            return None
        # Alpaca's own template separates instruction and input with a blank line; the same
        # join keeps the two parts distinguishable to the model.
        user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    prompt = _text(rec, "prompt", where, problems)
    response = _text(rec, "response", where, problems)
    if len(problems) > before:
        return None
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def read_records(paths: Iterable[str | os.PathLike]) -> list[Record]:
    """Every record of every file, or one SFTDataError listing every problem found."""
    records: list[Record] = []
    problems: list[str] = []
    for path in map(Path, paths):
        n_records, n_problems = len(records), len(problems)
        for lineno, rec in read_jsonl(path, problems):
            msgs = parse_record(rec, f"{path}:{lineno}", problems)
            if msgs is not None:
                records.append(Record(path, lineno, msgs))
        if len(records) == n_records and len(problems) == n_problems:
            problems.append(f"{path}: no records (the file is empty)")
    if problems:
        raise SFTDataError(problems)
    return records


def read_tasks(path: str | os.PathLike, limit: int = 0) -> list[Task]:
    """Held-out tasks (engine.tasks.Task as JSON, one per line); the first `limit` (0 = all)."""
    path, tasks, problems = Path(path), [], []
    for lineno, rec in read_jsonl(path, problems):
        try:
            tasks.append(Task.from_dict(rec))
        except ValueError as e:
            problems.append(f"{path}:{lineno}: {e}")
    if not tasks and not problems:
        problems.append(f"{path}: no tasks (the file is empty)")
    if problems:
        raise SFTDataError(problems, what="evaluation tasks")
    return tasks[:limit] if limit else tasks


def data_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the files' bytes: a resumed run must train on the data it started with."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


# --- rendering and truncation ---------------------------------------------------------------

# What `fit` cut, worst last: only turns after the last answer (they carry no target), part of
# the prompt, every word of the prompt, part of the answer (and then the prompt too).
CUT_NOTHING, CUT_AFTER, CUT_PROMPT, CUT_WHOLE_PROMPT, CUT_ANSWER = (
    "", "after the answer", "prompt", "whole prompt", "answer")
DAMAGED = (CUT_WHOLE_PROMPT, CUT_ANSWER)   # samples that teach an answer to no question, or half one


def fit(ids: list[int], mask: list[int], max_len: int, scaffold: frozenset[int] = frozenset(),
        ends: Iterable[int] = ()) -> tuple[list[int], list[int], str]:
    """Cut a rendered conversation to `max_len` tokens; returns (ids, mask, what was cut), the
    last one of the CUT_ values ("" when nothing was: it is falsy).

    What goes, in order: turns after the last answer (they carry no target); then prompt
    tokens from the middle of the prompt (earlier turns count as prompt), so its start (the
    instruction, a system prompt) and its end (the question right before the answer) both stay,
    with the first token and the header that opens the last answer; and only when that answer
    alone does not fit, the answer's tail. `scaffold` holds the template's own tokens (special
    tokens, role names, the newlines it writes): the answer's header is the run of them before
    it, back to the end of the previous turn (a token of `ends`), and a prompt that keeps only
    them has lost every word. Without them the header is the one token before the answer.
    """
    if len(ids) <= max_len:
        return ids, mask, CUT_NOTHING
    targets = [i for i, m in enumerate(mask) if m]
    if not targets:  # nothing to save: plain left truncation after bos
        keep = [0] + list(range(len(ids) - max_len + 1, len(ids)))
        return [ids[i] for i in keep], [mask[i] for i in keep], CUT_PROMPT
    start = targets[-1]
    while start > 1 and mask[start - 1]:
        start -= 1
    role = _answer_header(ids, start, scaffold, frozenset(ends))
    middle = list(range(1, start - len(role)))
    answer = list(range(start, targets[-1] + 1))
    room = max_len - 1 - len(role) - len(answer)  # prompt tokens that still fit
    if room >= len(middle):
        keep, what = [0] + middle + role + answer, CUT_AFTER
    elif room >= 0:
        head = (room + 1) // 2
        kept = middle[:head] + middle[len(middle) - (room - head):]
        keep = [0] + kept + role + answer
        what = CUT_PROMPT if any(ids[i] not in scaffold for i in kept) else CUT_WHOLE_PROMPT
    else:
        keep, what = ([0] + role + answer)[:max_len], CUT_ANSWER
    return [ids[i] for i in keep], _context_only_if_cut(mask, keep, start), what


MAX_HEADER = 16     # a template's answer header is a few tokens; more means the run is content


def _answer_header(ids: list[int], start: int, scaffold: frozenset[int],
                   ends: frozenset[int]) -> list[int]:
    """Positions of the tokens that open the answer at `start`: ours is <|assistant|> alone,
    ChatML's "<|im_start|>assistant\n", Llama 3's "<|start_header_id|>assistant<|end_header_id|>\n\n"."""
    if start < 2:
        return []
    first = start - 1
    while (first > 1 and start - first < MAX_HEADER and ids[first - 1] in scaffold
           and ids[first - 1] not in ends):
        first -= 1
    return list(range(first, start))


def _context_only_if_cut(mask: list[int], keep: list[int], last_answer: int) -> list[int]:
    """The mask of the kept tokens, where an earlier answer that lost any token, or the role
    token before it, becomes context: trained, it would follow words it never followed."""
    kept = set(keep)
    new = {i: mask[i] for i in keep}
    i = 0
    while i < last_answer:
        if not mask[i]:
            i += 1
            continue
        j = i
        while j < last_answer and mask[j]:
            j += 1
        if not all(k in kept for k in range(i - 1, j)):
            for k in range(i, j):
                if k in new:
                    new[k] = 0
        i = j
    return [new[i] for i in keep]


def targets_for(ids: list[int], mask: list[int]) -> list[int]:
    """Shifted targets for inputs ids[:-1]: target t is ids[t+1] where that token is trained."""
    return [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)]


@dataclass
class Example:
    ids: list[int]
    mask: list[int]
    where: str
    truncated: bool = False

    @property
    def n_targets(self) -> int:
        return sum(self.mask[1:])


@dataclass
class RenderReport:
    total: int
    truncated: list[str]       # FILE:LINE of samples cut to the context
    prompt_lost: list[str]     # ... that lost every word of the prompt
    answer_cut: list[str]      # ... that lost part of the answer (and the whole prompt)
    empty: list[str]           # ... left with no answer token (dropped)
    too_long: str = "drop"     # what became of prompt_lost and answer_cut: drop | keep

    @property
    def damaged(self) -> list[str]:
        return self.prompt_lost + self.answer_cut

    @property
    def dropped(self) -> int:
        return len(self.empty) + (len(self.damaged) if self.too_long == "drop" else 0)

    def message(self, max_len: int, split: str) -> Optional[str]:
        parts = []
        if self.truncated:
            n_middle = len(self.truncated) - len(self.damaged)
            parts.append(f"{len(self.truncated)} of {self.total} {split} samples are longer than "
                         f"the context ({max_len} tokens): {n_middle} lost the middle of the "
                         f"prompt or turns after the answer, {len(self.prompt_lost)} all of the "
                         f"prompt, {len(self.answer_cut)} part of the answer "
                         f"(e.g. {', '.join(self.truncated[:MAX_EXAMPLES])})")
        if self.damaged:
            fate = ("are left out" if self.too_long == "drop" else
                    "are trained on anyway (too_long = keep)")
            parts.append(f"the {len(self.damaged)} that lost all of the prompt or part of the "
                         f"answer {fate} (e.g. {', '.join(self.damaged[:MAX_EXAMPLES])})")
        if self.empty:
            parts.append(f"{len(self.empty)} {split} samples have no answer token left and are "
                         f"skipped (e.g. {', '.join(self.empty[:MAX_EXAMPLES])})")
        return "; ".join(parts) or None


TOO_LONG = ("drop", "refuse", "keep")


def render(records: list[Record], tok: Tokenizer, max_len: int,
           too_long: str = "drop") -> tuple[list[Example], RenderReport]:
    """Render and fit every record; samples with no target are reported and left out. A sample
    the context cuts into its answer or its whole prompt is left out (`too_long` "drop"),
    refused with the rest of them as one SFTDataError ("refuse"), or kept ("keep")."""
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long must be one of {', '.join(TOO_LONG)}, got {too_long!r}")
    kept, truncated, prompt_lost, answer_cut, empty = [], [], [], [], []
    for r in records:
        ids, mask = tok.render_chat(r.messages)
        ids, mask, cut = fit(ids, mask, max_len, tok.scaffold_ids, tok.stop_ids)
        ex = Example(ids, mask, r.where, bool(cut))
        if cut:
            truncated.append(r.where)
        if cut in DAMAGED:
            (prompt_lost if cut == CUT_WHOLE_PROMPT else answer_cut).append(r.where)
            if too_long != "keep":
                continue
        # A sample with no target would add a NaN (0/0) loss to any batch made only of such.
        if ex.n_targets == 0:
            empty.append(r.where)
            continue
        kept.append(ex)
    report = RenderReport(len(records), truncated, prompt_lost, answer_cut, empty,
                          "keep" if too_long == "keep" else "drop")
    if too_long == "refuse" and report.damaged:
        why = f"to the context ({max_len} tokens; too_long = refuse, drop leaves it out)"
        raise SFTDataError([f"{w}: loses all of its prompt {why}" for w in prompt_lost]
                           + [f"{w}: loses part of its answer {why}" for w in answer_cut])
    return kept, report


def split_records(records: list[Record], val_fraction: float,
                  seed: int) -> tuple[list[Record], list[Record]]:
    """(train, val) by record, the same for the same seed; val gets at least one record."""
    order = list(range(len(records)))
    random.Random(f"workbench-sft/{seed}/split").shuffle(order)
    n_val = max(1, round(len(records) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(records):
        raise SFTDataError([f"{len(records)} record(s) cannot be split into train and validation "
                            f"(val_fraction {val_fraction}): add data or give val_data"])
    val = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in val],
            [r for i, r in enumerate(records) if i in val])


# --- batches ----------------------------------------------------------------------------------

def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(inputs [B, T], targets [B, T], real tokens, each row's length [B]): right-padded to the
    longest sample; the model runs the real tokens alone given the lengths (engine.ragged)."""
    lengths = [len(e.ids) - 1 for e in examples]
    T = max(lengths)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (e, n) in enumerate(zip(examples, lengths)):
        x[i, :n] = torch.tensor(e.ids[:-1])
        y[i, :n] = torch.tensor(targets_for(e.ids, e.mask))
    return x, y, sum(lengths), torch.tensor(lengths)


class EpochSampler:
    """Endless passes over n samples; each epoch's order is a permutation fixed by (seed, epoch).

    The position (epoch, index) is the whole state, plain JSON, so a resumed run draws exactly
    the batches the uninterrupted run would have drawn.
    """

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("an epoch sampler needs at least one sample")
        self.n, self.seed = n, seed
        self.epoch, self.index = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> list[int]:
        digest = hashlib.blake2b(f"sft-epoch/{self.seed}/{epoch}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "n": self.n}

    def load(self, state: dict) -> None:
        if state.get("n") != self.n:
            raise StageError(f"the checkpoint was trained on {state.get('n')} samples, the data "
                             f"now gives {self.n}: resume with the same data or start a new run")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._perm(self.epoch)
