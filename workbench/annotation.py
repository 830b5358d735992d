"""A ranking session without a screen: what to show next, submit, skip, undo, resume, progress.

The app's ranking view and the CLI both drive an `AnnotationSession`; everything it knows is
in the store, so a new object (in a new process, days later) continues where the last one
stopped, showing every item in the answer order it was first shown in.

Display numbers. The answers of an item are shown shuffled and numbered 1..K; the shuffle is
recorded (`shown_orders`) the first time the item is shown, and `submit` takes the ordering in
those display numbers. Shuffling matters because sampled answers come in seed order, and a
person who sees "answer 1" first every time ranks it differently; each annotator gets an order
of their own (the shuffle's seed holds their name), so two people's liking for what they saw
first does not read as agreement.

Queue. Items come in batch order. `skip` sends the current item to the back; `undo` withdraws
the session's last ranking and puts its item at the front, with the withdrawn input offered as
`Current.previous` for editing. Both are stored (`shown_orders.queue_key`), so a resumed
session sees the same queue.

Hidden repeats. With `repeat_fraction` f > 0, round(f * N) items (drawn from the seed) come
back once more after at least `repeat_gap` other items have been ranked since their first
ranking (or at the end, when no first-time item is left), shuffled anew and stored with
is_repeat = 1. They measure an annotator's consistency (workbench.agreement). The count an
annotator sees (`Progress.rankings_done` of `rankings_total`) includes them: it ends when the
session does, and it moves on every ranking, so it never gives a repeat away.
"""
from __future__ import annotations

import bisect
import random
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from workbench.store import (MAX_K, MIN_K, Annotator, RankingError, Store, check_ordering)

REPEAT_GAP = 5   # first-time rankings between an item and its hidden repeat, when there are enough


@dataclass
class ShownAnswer:
    number: int        # the display number, 1..K
    answer_id: int
    text: str
    meta: dict


@dataclass
class Previous:
    """A withdrawn ranking of the current item, in display numbers, for editing after undo."""
    ordering: list[list[int]]
    flags: dict[int, list[str]]
    scores: dict[int, int]
    note: str


@dataclass
class Current:
    item_id: int
    position: int
    prompt: str
    messages: list | None
    answers: list[ShownAnswer]
    is_repeat: bool
    previous: Previous | None = None

    @property
    def k(self) -> int:
        return len(self.answers)


@dataclass
class Progress:
    done: int                  # items ranked at least once (a repeat does not count again)
    total: int
    skipped: int               # items waiting at the back after a skip
    repeats_done: int
    repeats_total: int
    mean_seconds: float | None  # per submitted ranking, repeats included
    remaining: int = field(default=0)   # rankings still to make, hidden repeats included

    @property
    def finished(self) -> bool:
        return self.remaining == 0

    @property
    def rankings_done(self) -> int:
        """Rankings made, hidden repeats included: the count to show the annotator."""
        return self.done + self.repeats_done

    @property
    def rankings_total(self) -> int:
        return self.total + self.repeats_total

    @property
    def ranked(self) -> str:
        """'2 / 3300 ranked (with 300 repeats)': the count the app's bar and the terminal ranker
        show. Hidden repeats are in it (it is full when they are done too), unlike the batch
        list's items ranked, so it says how many there are."""
        text = f"{self.rankings_done} / {self.rankings_total} ranked"
        if self.repeats_total:
            text += f" (with {self.repeats_total} repeat{'s' if self.repeats_total != 1 else ''})"
        return text


def parse_ordering(text: str) -> list[list[int]]:
    """An ordering typed on a keyboard: display numbers best first, '=' joins a tie.

    "3 1=2 4", "3>1=2>4", "3,1=2,4" and "31=24" all mean 3 best, 1 and 2 tied, 4 worst
    (K is at most 9, so every digit is one answer)."""
    groups: list[list[int]] = []
    tie = False
    for ch in text:
        if ch.isdigit():
            if tie:
                groups[-1].append(int(ch))
            else:
                groups.append([int(ch)])
            tie = False
        elif ch == "=":
            if not groups or tie:
                raise RankingError(f"'=' must stand between two answers: {text!r}")
            tie = True
        elif ch not in " \t,>":
            raise RankingError(f"unexpected {ch!r} in {text!r}: type answer numbers best first, "
                               f"'=' for a tie (e.g. 3 1=2 4)")
    if tie:
        raise RankingError(f"{text!r} ends with '=': a tie needs an answer on each side")
    if not groups:
        raise RankingError("the ordering is empty: type the answer numbers, best first")
    return groups


def answer_copies(texts: Sequence[str]) -> dict[int, list[int]]:
    """For each display number 1..K, every number whose answer has the same text, itself
    included, in order. A small model often samples one answer several times (six of eight
    answers "6"); they are one answer to a person, ranked as a tie."""
    by_text: dict[str, list[int]] = {}
    for n, text in enumerate(texts, 1):
        by_text.setdefault(text, []).append(n)
    return {n: by_text[text] for n, text in enumerate(texts, 1)}


def tie_copies(groups: list[list[int]], copies: Mapping[int, list[int]]) -> list[list[int]]:
    """`groups` with each answer's copies that it leaves out tied with the first of them that it
    places: "1 3" ranks all eight of 6,6,5,6,6,6,6,5. Copies placed apart are refused: the
    reward model would learn one text better than itself."""
    placed = {m for g in groups for m in g}
    out = []
    for g in groups:
        group = list(g)
        for m in g:
            for c in copies.get(m, [m]):
                if c not in placed:
                    group.append(c)
                    placed.add(c)
        out.append(group)
    where = {m: i for i, g in enumerate(out) for m in g}
    for m in where:
        apart = [c for c in copies.get(m, [m]) if c in where and where[c] != where[m]]
        if apart:
            raise RankingError(f"answers {m} and {apart[0]} are the same answer: rank them together "
                               f"(tie them with '=', or give one and its copies follow)")
    return out


class SessionSettingsError(ValueError):
    """A session resumed with another `setting` (seed, repeat_fraction, repeat_gap) than it was
    started with; the fields let a front end say it in its own terms (workbench rank's flags)."""

    def __init__(self, annotator: str, batch, setting: str, started: Any, asked: Any):
        self.annotator, self.batch, self.setting = annotator, batch, setting
        self.started, self.asked = started, asked
        super().__init__(f"{annotator}'s session on batch {batch.name!r} was started with "
                         f"{setting}={started!r}; resume it with the same value or None, "
                         f"not {asked!r}")


class MovedOn(RankingError):
    """The item a view shows is no longer the session's current one: another window or
    terminal ranking under the same name ranked or skipped it meanwhile."""

    def __init__(self, annotator: str):
        super().__init__(f"another window or terminal ranking as {annotator!r} ranked or skipped "
                         "this item meanwhile, so your input for it was not stored; the view "
                         "shows what is next")


class AnnotationSession:
    """One annotator ranking one batch. `annotator` is a name (created as `kind`, default
    human, if new) or an Annotator. `seed` and `repeat_fraction` are fixed when the session is
    first created; passing None on resume uses the stored ones, passing others is an error."""

    def __init__(self, store: Store, batch_id: int, annotator: str | Annotator, *,
                 seed: int | None = None, repeat_fraction: float | None = None,
                 repeat_gap: int | None = None, kind: str | None = None):
        self.store = store
        self.batch = store.batch(batch_id)
        self.annotator = (annotator if isinstance(annotator, Annotator)
                          else store.annotator(annotator, kind))
        if repeat_fraction is not None and not 0.0 <= repeat_fraction <= 1.0:
            raise ValueError(f"repeat_fraction must be from 0 to 1, got {repeat_fraction}")
        asked = {"seed": seed, "repeat_fraction": repeat_fraction, "repeat_gap": repeat_gap}
        defaults = {"seed": 0, "repeat_fraction": 0.0, "repeat_gap": REPEAT_GAP}
        self.id, stored = store.session(batch_id, self.annotator.id,
                                        {k: defaults[k] if v is None else v for k, v in asked.items()})
        self.settings = {**defaults, **stored}
        for k, v in asked.items():
            if v is not None and self.settings[k] != v:
                raise SessionSettingsError(self.annotator.name, self.batch, k, self.settings[k], v)
        self._item_ids = store.item_ids(batch_id)
        self._position = {i: p for p, i in enumerate(self._item_ids)}
        n = len(self._item_ids)
        n_repeat = min(n, int(self.settings["repeat_fraction"] * n + 0.5))
        rng = random.Random(f"workbench-repeats/{self.settings['seed']}/{batch_id}")
        self._repeats = sorted(rng.sample(self._item_ids, n_repeat), key=self._position.get)
        self._shown_since: dict[tuple[int, int], float] = {}
        self._cursor = 0
        # Undo takes back the newest of the rankings this object stored, or of those the session
        # held when it was made (an earlier sitting's), never one that another window or
        # terminal ranking under the same name made meanwhile.
        self._mine: list[int] = []
        last = store.last_ranking(self.id)
        self._before = last[0] if last else 0

    # --- the queue ---------------------------------------------------------------------------

    def _head(self) -> tuple[int, int, int] | None:
        """(queue_key, position, item) of the first original item to show, None if all are ranked.

        Items in batch order are searched from a cursor, not from the start: an item the
        cursor has passed was ranked then, and can only come back through undo, which moves
        it (queue_key < 0) so first_moved finds it. One full search before saying "none" keeps
        this right even if a ranking was withdrawn some other way."""
        row = self.store.next_unranked(self.id, self.batch.id, self._cursor)
        if row is None and self._cursor > 0:
            row = self.store.next_unranked(self.id, self.batch.id, 0)
        self._cursor = row[0] if row else len(self._item_ids)
        moved = self.store.first_moved(self.id)
        plain = (0, row[0], row[1]) if row else None
        return min((x for x in (moved, plain) if x is not None), default=None)

    def _candidates(self) -> list[tuple[int, int, int, int, int]]:
        """What may be shown now, as sort keys (queue_key, originals after repeats, position,
        item, is_repeat): skipped entries last, an undone one first, and a due repeat before
        the next new item so it lands where it fell due."""
        with self.store.snapshot():
            head = self._head()
            out = [(head[0], 1, head[1], head[2], 0)] if head else []
            if not self._repeats:
                return out
            originals, repeated, keys = self.store.session_rankings(self.id)
        order = sorted(originals.values())
        for i in self._repeats:
            if i in originals and i not in repeated:
                since = len(order) - bisect.bisect_right(order, originals[i])
                if since >= self.settings["repeat_gap"] or head is None:
                    out.append((keys.get(i) or 0, 0, self._position[i], i, 1))
        return out

    def _entry(self) -> tuple[int, int] | None:
        candidates = self._candidates()
        if not candidates:
            return None
        _, _, _, item_id, rep = min(candidates)
        return item_id, rep

    def _shown_order(self, item_id: int, rep: int) -> list[int]:
        """The recorded display order of an entry, recording a fresh shuffle the first time."""
        order = self.store.shown_order(self.id, item_id, bool(rep))
        if order is not None:
            return order
        ids = self.store.answer_ids(item_id)
        # Each annotator's own order: one order for everyone would turn a shared liking for the
        # first answer shown into agreement.
        key = f"workbench-shuffle/{self.settings['seed']}/{self.annotator.name}/{item_id}/{rep}"
        random.Random(key).shuffle(ids)
        return self.store.record_shown_order(self.id, item_id, bool(rep), ids)

    def _move(self, item_id: int, rep: int, to_back: bool) -> None:
        self._shown_order(item_id, rep)
        self.store.move_in_queue(self.id, item_id, bool(rep), to_back)

    # --- what a view calls -------------------------------------------------------------------

    def current(self) -> Current | None:
        """The item to show, or None when the session is done."""
        entry = self._entry()
        if entry is None:
            return None
        item_id, rep = entry
        order = self._shown_order(item_id, rep)
        item = self.store.item(item_id)
        by_id = {a.id: a for a in item.answers}
        self._shown_since.setdefault(entry, time.monotonic())
        number = {aid: n for n, aid in enumerate(order, 1)}
        previous = None
        withdrawn = [r for r in self.store.rankings(session_id=self.id, item_id=item_id,
                                                    include_withdrawn=True)
                     if r.withdrawn_at is not None and r.is_repeat == bool(rep)]
        if withdrawn:
            last = withdrawn[-1]
            previous = Previous([[number[a] for a in g] for g in last.ordering],
                                {number[a]: f for a, f in last.flags.items()},
                                {number[a]: s for a, s in last.scores.items()}, last.note)
        return Current(item_id, item.position, item.prompt, item.messages,
                       [ShownAnswer(n, aid, by_id[aid].text, by_id[aid].meta)
                        for n, aid in enumerate(order, 1)], bool(rep), previous)

    def _entry_shown(self, shown: Current | None, doing: str) -> tuple[int, int]:
        """The current entry, which must be the one the caller shows (MovedOn if not)."""
        entry = self._entry()
        if entry is None and shown is None:
            raise RankingError(f"nothing {doing}: the session is done")
        if shown is not None and entry != (shown.item_id, int(shown.is_repeat)):
            raise MovedOn(self.annotator.name)
        return entry

    def submit(self, ordering: Any, flags: Mapping[int, Any] | None = None,
               scores: Mapping[int, int] | None = None, note: str = "",
               duration_s: float | None = None, shown: Current | None = None) -> int:
        """Rank the current item; `ordering` is in display numbers, best first, as groups
        ([[3], [1, 2], [4]]; a bare number is a group of one) or a string for parse_ordering.
        Flags and scores are keyed by display number. Stored at once; returns the ranking id.
        `duration_s` defaults to the time since the item was first shown by this object.
        `shown`: the item on the caller's screen; if the session has moved on from it (another
        process ranking under the same name), MovedOn and nothing is stored."""
        item_id, rep = entry = self._entry_shown(shown, "left to rank")
        order = self._shown_order(item_id, rep)
        k = len(order)
        if not MIN_K <= k <= MAX_K:
            raise RankingError(f"this item has {k} answers; a ranking needs {MIN_K} to {MAX_K}")
        numbers = list(range(1, k + 1))
        groups = parse_ordering(ordering) if isinstance(ordering, str) else ordering
        if isinstance(groups, (list, tuple)):
            groups = [list(g) if isinstance(g, (list, tuple)) else [g] for g in groups]
            flat = [m for g in groups for m in g]
            if all(type(m) is int for m in flat) and len(set(flat)) == len(flat):   # else check_ordering says why
                texts = {a.id: a.text for a in self.store.item(item_id).answers}
                groups = tie_copies(groups, answer_copies([texts[aid] for aid in order]))
        groups = check_ordering(groups, numbers)
        to_id = dict(zip(numbers, order))

        def by_id(mapping: Mapping | None, what: str) -> dict:
            out = {}
            for n, v in (mapping or {}).items():
                if n not in to_id:
                    raise RankingError(f"{what} for answer {n}, which does not exist (answers are 1-{k})")
                out[to_id[n]] = v
            return out

        if duration_s is None and entry in self._shown_since:
            duration_s = round(time.monotonic() - self._shown_since[entry], 3)
        rid = self.store.add_ranking(self.id, item_id, [[to_id[n] for n in g] for g in groups],
                                     is_repeat=bool(rep), flags=by_id(flags, "a flag"),
                                     scores=by_id(scores, "a score"), note=note,
                                     duration_s=duration_s)
        self._shown_since.pop(entry, None)
        self._mine.append(rid)
        return rid

    def skip(self, shown: Current | None = None) -> None:
        """Send the current item to the back of the queue (it is not lost); `shown` as for submit."""
        self._move(*self._entry_shown(shown, "to skip"), to_back=True)

    def undo(self) -> int | None:
        """Withdraw the newest ranking this object stored or the session held when the object was
        made; its item becomes current again, with the withdrawn input in `current().previous`.
        Returns the ranking id, None if none is left."""
        with self.store.transaction():
            last = self.store.last_ranking(self.id, among=self._mine, up_to=self._before)
            if last is None:
                return None
            rid, item_id, rep = last
            rep = int(rep)
            self.store.withdraw_ranking(rid)
            if rid in self._mine:
                self._mine.remove(rid)
            self._move(item_id, rep, to_back=False)
        self._shown_since.pop((item_id, rep), None)
        return rid

    def progress(self) -> Progress:
        done, repeats_done, skipped, mean = self.store.session_progress(self.id)
        total = len(self._item_ids)
        return Progress(done, total, skipped, repeats_done, len(self._repeats), mean,
                        remaining=(total - done) + (len(self._repeats) - repeats_done))
