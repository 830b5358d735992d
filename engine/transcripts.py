"""The "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript form of public preference sets.

A record is {"chosen": transcript, "rejected": transcript}: the conversation the two share up
to their last "\\n\\nAssistant:" is the prompt (several turns allowed), the two final assistant
turns are the answers. The reward stage (engine.reward_data) and `workbench preferences import`
both read it through `split_transcripts`. Also here: answers of one text are one answer
(`same_answer`, `fold_copies`), for training and for measuring agreement alike. No torch here:
the import command and the app's agreement tab load this module.
"""
from __future__ import annotations

import re
from typing import Mapping

ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def split_transcript(text: str) -> list[tuple[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [('user', 'a'), ('assistant', 'b')]."""
    parts = _TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    return [("user" if who == "Human" else "assistant", body.strip())
            for who, body in zip(parts[1::2], parts[2::2])]


def same_answer(chosen: str, rejected: str) -> str | None:
    """What is wrong with a pair whose two answers are one text (it trains nothing, and would
    count as a coin toss in held-out accuracy), or None."""
    if chosen == rejected:
        return "'chosen' and 'rejected' are the same answer, so the pair holds no preference"
    return None


def fold_copies(ordering: list[list[int]], text_of: Mapping[int, str]) -> list[list[int]]:
    """The ordering (groups, best first) with the answers of one text as one answer: the lowest
    id of that text, where its best-placed copy lies. A small model often samples one answer
    several times; its copies tied give a pair twice, and copies placed apart give a pair of one
    text against itself, which teaches nothing and reads as a coin toss in held-out accuracy."""
    canon: dict[str, int] = {}
    for aid in sorted(text_of):
        canon.setdefault(text_of[aid], aid)
    seen: set[int] = set()
    out = []
    for g in ordering:
        group = []
        for a in g:
            c = canon.get(text_of.get(a), a)
            if c not in seen:
                seen.add(c)
                group.append(c)
        if group:
            out.append(group)
    return out


def split_transcripts(chosen: str, rejected: str) -> tuple[list[dict], list[str]]:
    """(the shared conversation as messages, ending with the user's turn; [chosen answer,
    rejected answer]) of a transcript pair. ValueError says what is wrong."""
    cut_c, cut_r = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    missing = [key for key, cut in (("chosen", cut_c), ("rejected", cut_r)) if cut < 0]
    if missing:
        raise ValueError("; ".join(f"field '{key}' has no '\\n\\nAssistant:' turn" for key in missing))
    if chosen[:cut_c] != rejected[:cut_r]:
        raise ValueError("'chosen' and 'rejected' differ before their last '\\n\\nAssistant:' "
                         "(they must share the conversation up to the final answer)")
    try:
        turns = split_transcript(chosen[:cut_c])
    except ValueError as e:
        raise ValueError(f"field 'chosen': {e}") from None
    if not turns or turns[-1][0] != "user":
        raise ValueError("the conversation before the final answer must end with a 'Human:' turn")
    answers = [chosen[cut_c + len(ASSISTANT):].strip(), rejected[cut_r + len(ASSISTANT):].strip()]
    same = same_answer(*answers)
    if same:
        raise ValueError(same)
    return [{"role": role, "content": body} for role, body in turns], answers
