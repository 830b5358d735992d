"""A simulated annotator: ranks answers by a programmable preference, clearly labelled.

A preference is a sequence of key functions, each mapping a Candidate (prompt, answer text,
answer metadata, and the demo task the prompt asks, if it is one) to a value where smaller is
better. Answers are ordered by the tuple of their keys; answers whose keys are all equal are
tied. So a preference reads as a list of criteria, the first one deciding and each later one
breaking the earlier ones' ties.

The demo preference: a correct answer (engine.tasks.check) before a wrong one; among equally
correct answers one that ended with the end token before one that ran out of tokens; then the
shorter (in characters). Finishing goes before brevity because, as a tie-break after brevity,
it would almost never decide anything: two answers rarely have the same length.

The annotator's kind is "simulated" (the store refuses a human of the same name), so every
ranking it writes is marked simulated and an export never passes it off as human. It ranks
through the same AnnotationSession a person uses, so the demo pipeline exercises that path.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from engine.tasks import Task, check, parse_task
from workbench.annotation import AnnotationSession
from workbench.store import Store

DEFAULT_NAME = "simulated:correct-then-short"
CHUNK = 256         # rankings per transaction at most
CHUNK_S = 0.05      # ... and seconds of holding the write lock
GAP_S = 0.005       # the lock is left free this long between transactions


@dataclass
class Candidate:
    prompt: str
    text: str
    meta: dict
    task: Task | None    # the demo task the prompt asks, None if it is not one


Key = Callable[[Candidate], Any]


def correct_first(c: Candidate) -> int:
    """0 for a correct answer. For a prompt that is not a demo task every answer gets 1, so
    this key ties them all and the next key decides."""
    return 0 if c.task is not None and check(c.task, c.text) else 1


def finished_first(c: Candidate) -> int:
    """0 for an answer that ended with the end token (metadata `finished`, True if unknown)."""
    return 0 if c.meta.get("finished", True) else 1


def shorter_first(c: Candidate) -> int:
    return len(c.text.strip())


DEMO_PREFERENCE: tuple[Key, ...] = (correct_first, finished_first, shorter_first)
DEMO_PREFERENCE_TEXT = ("a correct answer first (on the demo's checkable tasks), then one that "
                        "ended, then the shorter")


def rank_answers(prompt: str, answers: Sequence[tuple[str, dict]],
                 preference: Sequence[Key] = DEMO_PREFERENCE) -> list[list[int]]:
    """Groups of answer indexes, best first; answers equal under every key share a group."""
    if not preference:
        raise ValueError("a preference needs at least one key function")
    task = parse_task(prompt)
    keys = [tuple(key(Candidate(prompt, text, meta, task)) for key in preference)
            for text, meta in answers]
    groups: list[list[int]] = []
    previous = None
    for i in sorted(range(len(answers)), key=lambda i: keys[i]):
        if groups and keys[i] == previous:
            groups[-1].append(i)
        else:
            groups.append([i])
        previous = keys[i]
    return groups


def rank_batch(store: Store, batch_id: int, annotator_name: str = DEFAULT_NAME,
               preference: Sequence[Key] = DEMO_PREFERENCE, *, seed: int = 0,
               flag_incorrect: bool = True, cancelled: Callable[[], bool] | None = None,
               progress: Callable[[int, int], None] | None = None) -> int:
    """Rank every item of the batch left unranked by this annotator; returns how many were
    ranked. With `flag_incorrect`, answers that fail a demo task's check get the flag
    fails_instruction, as a person would mark them. `cancelled` is polled between chunks
    (what is ranked stays); `progress(done, total)` is called after each."""
    session = AnnotationSession(store, batch_id, annotator_name, seed=seed, kind="simulated")
    n = 0
    # Small chunks, each cut short by time and followed by a gap, so anyone else waiting to
    # write (a person ranking in the app, an import) gets the lock within a chunk's time; not
    # fsynced, since a simulated ranking can be made again and a thousand fsyncs cost seconds.
    with store.without_fsync():
        while cancelled is None or not cancelled():
            t0 = time.monotonic()
            with store.transaction():
                for _ in range(CHUNK):
                    item = session.current()
                    if item is None:
                        break
                    groups = rank_answers(item.prompt, [(a.text, a.meta) for a in item.answers],
                                          preference)
                    task = parse_task(item.prompt) if flag_incorrect else None
                    flags = {a.number: ["fails_instruction"] for a in item.answers
                             if task is not None and not check(task, a.text)}
                    # Display numbers are 1-based positions in the shown order, as `answers` is.
                    session.submit([[i + 1 for i in g] for g in groups], flags=flags, duration_s=0.0)
                    n += 1
                    if time.monotonic() - t0 > CHUNK_S:
                        break
            if progress is not None:
                p = session.progress()
                progress(p.done, p.total)
            if item is None:
                break
            time.sleep(GAP_S)
    return n
