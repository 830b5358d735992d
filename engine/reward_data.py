"""Preference data for the reward model: K-way rankings, chosen/rejected pairs, transcripts.

One record per prompt, as JSONL (or JSONL.gz, engine.jsonl), in any of these forms:

    {"prompt": "...", "answers": ["a", "b", "c"], "ranking": [[2], [0, 1]]}
    {"prompt": "...", "chosen": "a", "rejected": "b"}
    {"chosen": "\n\nHuman: ...\n\nAssistant: a", "rejected": "\n\nHuman: ...\n\nAssistant: b"}

`ranking` lists groups of answer indexes from best to worst; answers in one group are tied.
Answers of one text are one answer, kept where its best-placed copy lies: copies would give
pairs of one text against itself, or the same pair twice. A prompt may also be a list of
{role, content} messages (a multi-turn context). The last form is
how public preference sets ship: the conversation the two share up to their last
"\n\nAssistant:" is the prompt (several turns allowed), the two final turns are the answers;
engine/transcripts.py is the one reading of it, which `workbench preferences import` uses too.
Every problem in every file is collected into one error, FILE:LINE: field, before any
training starts.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Union

import torch

from engine.jsonl import read_jsonl
from engine.runio import InputProblems
from engine.sft_data import fit
from engine.tokenizer import ROLES, Tokenizer
from engine.transcripts import fold_copies, same_answer, split_transcripts

Prompt = Union[str, list]


class PreferenceDataError(InputProblems):
    def __init__(self, problems: list[str]):
        super().__init__(problems, "preference data", "; nothing was trained")


@dataclass
class Ranking:
    prompt: Prompt
    answers: list[str]
    groups: list[list[int]]     # best first; one group = tied answers
    where: str                  # FILE:LINE, for messages

    def pairs(self) -> list[tuple[int, int]]:
        return ranking_pairs(self.groups)


def ranking_pairs(groups: list[list[int]]) -> list[tuple[int, int]]:
    """Every (winner, loser) pair a ranking implies; answers tied in one group give no pair."""
    out = []
    for i, better in enumerate(groups):
        for worse in groups[i + 1:]:
            out.extend((w, l) for w in better for l in worse)
    return out


def _check_prompt(value: Any, where: str, problems: list[str]) -> bool:
    if isinstance(value, str):
        if not value.strip():
            problems.append(f"{where}: field 'prompt': empty")
            return False
        return True
    if isinstance(value, list) and value:
        for i, m in enumerate(value):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                problems.append(f"{where}: field 'prompt[{i}]': expected {{role, content}} with role "
                                f"in {', '.join(ROLES)}")
                return False
        return True
    problems.append(f"{where}: field 'prompt' / 'messages': expected a string or a list of messages")
    return False


def _from_transcripts(rec: dict, where: str, problems: list[str]) -> Ranking | None:
    texts = [rec.get(key) for key in ("chosen", "rejected")]
    bad = [key for key, v in zip(("chosen", "rejected"), texts) if not isinstance(v, str)]
    if bad:
        problems += [f"{where}: field '{key}': expected a string" for key in bad]
        return None
    try:
        messages, answers = split_transcripts(*texts)
    except ValueError as e:
        problems.append(f"{where}: {e}")
        return None
    prompt = messages[0]["content"] if len(messages) == 1 else messages
    return Ranking(prompt, answers, [[0], [1]], where)


def parse_record(rec: Any, where: str, problems: list[str]) -> Ranking | None:
    if not isinstance(rec, dict):
        problems.append(f"{where}: expected a JSON object, got {type(rec).__name__}")
        return None
    if "prompt" not in rec and "messages" not in rec:
        if "chosen" in rec and "rejected" in rec:
            return _from_transcripts(rec, where, problems)
        problems.append(f"{where}: field 'prompt': missing (or give 'chosen' and 'rejected' as "
                        "\\n\\nHuman: ... \\n\\nAssistant: ... transcripts)")
        return None
    # A multi-turn context comes as `messages` (the store's exports add it beside the prompt text).
    key = "messages" if "messages" in rec else "prompt"
    if not _check_prompt(rec[key], where, problems):
        return None
    prompt = rec[key]
    if "chosen" in rec or "rejected" in rec:
        texts = []
        for key in ("chosen", "rejected"):
            v = rec.get(key)
            if not isinstance(v, str):
                problems.append(f"{where}: field '{key}': " + ("missing" if v is None else "expected a string"))
                return None
            texts.append(v)
        same = same_answer(*texts)
        if same:
            problems.append(f"{where}: {same}")
            return None
        return Ranking(prompt, texts, [[0], [1]], where)
    answers, groups = rec.get("answers"), rec.get("ranking")
    # An empty answer is allowed: a model that stops at once gave one, and it can be ranked.
    if not isinstance(answers, list) or not 2 <= len(answers) <= 9 or not all(isinstance(a, str) for a in answers):
        problems.append(f"{where}: field 'answers': expected 2 to 9 strings (or give 'chosen' and 'rejected')")
        return None
    if (not isinstance(groups, list) or not groups
            or not all(isinstance(g, list) and g and all(isinstance(i, int) and not isinstance(i, bool) for i in g) for g in groups)):
        problems.append(f"{where}: field 'ranking': expected a list of groups of answer indexes, best first")
        return None
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(len(answers))):
        problems.append(f"{where}: field 'ranking': must name each answer index 0..{len(answers) - 1} "
                        f"exactly once, got {groups}")
        return None
    if len(groups) < 2:
        problems.append(f"{where}: field 'ranking': all answers tied, so it holds no preference")
        return None
    return _one_answer_per_text(Ranking(prompt, answers, groups, where), problems)


def _one_answer_per_text(r: Ranking, problems: list[str]) -> Ranking | None:
    """`r` with each answer text once, where its best-placed copy lies (fold_copies)."""
    if len(set(r.answers)) == len(r.answers):
        return r
    folded = fold_copies(r.groups, dict(enumerate(r.answers)))
    if len(folded) < 2:
        problems.append(f"{r.where}: field 'ranking': with copies of one answer text counted "
                        "once, every answer is tied, so it holds no preference")
        return None
    keep = sorted(i for g in folded for i in g)
    new = {old: n for n, old in enumerate(keep)}
    return Ranking(r.prompt, [r.answers[i] for i in keep], [[new[i] for i in g] for g in folded],
                   r.where)


def read_rankings(paths: Iterable[str | os.PathLike]) -> list[Ranking]:
    out: list[Ranking] = []
    problems: list[str] = []
    for path in map(Path, paths):
        for n, rec in read_jsonl(path, problems):
            r = parse_record(rec, f"{path}:{n}", problems)
            if r is not None:
                out.append(r)
    if problems:
        raise PreferenceDataError(problems)
    if not out:
        raise PreferenceDataError([f"{', '.join(map(str, paths))}: no rankings found"])
    return out


def prompt_key(prompt: Prompt) -> str:
    """One key per conversation however a file writes it (the held-out split is by prompt): a
    lone user message is its text, and a message keeps only its role and content."""
    if isinstance(prompt, str):
        return prompt
    messages = [{"role": m.get("role"), "content": m.get("content")} for m in prompt]
    if len(messages) == 1 and messages[0]["role"] == "user":
        return str(messages[0]["content"])
    return json.dumps(messages, sort_keys=True)


def split_by_prompt(items: list[Ranking], val_fraction: float, seed: int) -> tuple[list[Ranking], list[Ranking]]:
    """Hold out whole prompts, so validation measures answers to prompts never trained on."""
    keys = sorted({prompt_key(r.prompt) for r in items})
    random.Random(f"workbench-rm/{seed}/split").shuffle(keys)
    n_val = max(1, round(len(keys) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(keys):
        raise PreferenceDataError([f"{len(keys)} distinct prompt(s) cannot be split into train and "
                                   f"validation (val_fraction {val_fraction}): add data or give val_data"])
    val = set(keys[:n_val])
    return ([r for r in items if prompt_key(r.prompt) not in val],
            [r for r in items if prompt_key(r.prompt) in val])


def encode_answer(tok: Tokenizer, prompt: Prompt, answer: str, max_len: int) -> tuple[list[int], bool]:
    """The conversation's ids, ending at the token that closes the answer (where r is read)."""
    context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    ids, mask = tok.render_chat(context + [{"role": "assistant", "content": answer}])
    # An imported model's template may write more after the turn's end token (ChatML's newline):
    # the score is read at the end token itself, where a rollout's answer ends.
    last = max((i for i, m in enumerate(mask) if m), default=len(ids) - 1)
    ids, mask = ids[:last + 1], mask[:last + 1]
    ids, _mask, cut = fit(ids, mask, max_len, tok.scaffold_ids, tok.stop_ids)
    if cut and ids[-1] != tok.end_id:
        ids[-1] = tok.end_id  # the answer's tail was cut: the score is still read at an end token
    return ids, cut


def collate_answers(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [N, T] and each sequence's last index [N]; causal attention means real
    tokens never read the padding after them, so no attention mask is needed."""
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    return x, torch.tensor([len(s) - 1 for s in seqs])


@dataclass
class Packed:
    """Rankings' answers packed behind their shared prompt, several answers to a row: a row is
    the prompt once, then answers one after another, each reading the prompt and itself only
    (`mask`) at the positions it would have alone (`positions`), so its score is the one it gets
    as a sequence of its own, up to float rounding. The prompt's forward is done once a row
    instead of once an answer: in the demo's rankings (a ~20-token prompt, 8 answers of ~4) a
    third of the tokens."""
    ids: torch.Tensor          # [R, L] right-padded
    positions: torch.Tensor    # [R, L]
    mask: torch.Tensor         # [R, 1, L, L] bool: query row, key column
    at: torch.Tensor           # [N] each answer's last token, as an index into ids.flatten(), in order
    tokens: int                # real tokens in the rows
    # Each sequence's positions 0..len-1 as indexes into ids.flatten(): its share of the prompt
    # where the prompt is, then its own tokens (DPO reads the log-probs of every answer token).
    # Bookkeeping for building a batch: it stays on the host.
    where: list[list[int]]

    def to(self, device) -> "Packed":
        return Packed(self.ids.to(device), self.positions.to(device), self.mask.to(device), self.at.to(device),
                      self.tokens, self.where)

    def rewards(self, model) -> torch.Tensor:
        """The scalar model's score of every answer [N], read where each answer ends."""
        return model(self.ids, attention_mask=self.mask, position_ids=self.positions).flatten()[self.at]


def pack_answers(groups: list[list[list[int]]], pad_id: int, max_len: int) -> Packed:
    """Pack each group's sequences (one ranking's answers, each prompt + answer, each at most
    max_len tokens) into rows of at most max_len tokens behind their longest common prefix."""
    rows: list[tuple[list[int], list[int], list[int]]] = []      # (ids, segment, position)
    places: list[tuple[int, list[int]]] = []                     # (row, each position's column)
    for seqs in groups:
        P = min(len(s) for s in seqs) - 1                        # every answer keeps a token
        P = next((i for i in range(P) if any(s[i] != seqs[0][i] for s in seqs)), P)
        row = None
        for s in seqs:
            if row is None or len(row[0]) + len(s) - P > max_len:
                row = (list(s[:P]), [0] * P, list(range(P)))     # segment 0: the prompt
                rows.append(row)
            seg = (row[1][-1] if len(row[1]) > P else 0) + 1
            places.append((len(rows) - 1, list(range(P)) + list(range(len(row[0]), len(row[0]) + len(s) - P))))
            row[0].extend(s[P:])
            row[1].extend([seg] * (len(s) - P))
            row[2].extend(range(P, len(s)))
    L = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    seg = torch.full((len(rows), L), -1, dtype=torch.long)
    pos = torch.zeros((len(rows), L), dtype=torch.long)
    for i, (a, b, c) in enumerate(rows):
        ids[i, :len(a)], seg[i, :len(b)], pos[i, :len(c)] = torch.tensor(a), torch.tensor(b), torch.tensor(c)
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    # A query reads the prompt and its own answer, before it; padding reads itself only (a row
    # with no key at all would be NaN, and NaN leaks through 0 * NaN).
    mask = (((k == q) | (k == 0)) & (k >= 0) & causal) | torch.eye(L, dtype=torch.bool)
    where = [[r * L + c for c in cols] for r, cols in places]
    at = torch.tensor([w[-1] for w in where])
    return Packed(ids, pos, mask[:, None], at, sum(len(r[0]) for r in rows), where)


def ranking_loss(rewards: torch.Tensor, pairs: list[tuple[int, int]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's loss for one prompt: -1/C(K,2) · Σ log σ(r_w - r_l) over its pairs.

    The 1/C(K,2) is applied once per prompt, so a ranking weighs the same whatever its K, and
    ties (fewer pairs) just contribute less. Returns (loss, margins r_w - r_l).
    """
    w = torch.tensor([p[0] for p in pairs])
    l = torch.tensor([p[1] for p in pairs])
    margins = rewards[w] - rewards[l]
    return -torch.nn.functional.logsigmoid(margins).sum() / math.comb(k, 2), margins
