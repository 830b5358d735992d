"""The ranking view's keyboard grammar, without Qt: keys in, the ordering and labels out.

The view turns a key event into a token (a character such as "3", "=", "f", or a name such as
"enter", "backspace", "escape", "undo", "help") and hands it to `RankInput.press`, which
updates the ordering being typed and the pending labels and says what the view should do.

Why this scheme: ranking is the one thing done hundreds of times, so it costs one key per
answer, and the last answer costs nothing (after K-1 answers it can only go last), so K=4
takes three digits and Enter. A tie is one key between two digits. Answers of one text (a
small model samples "6" six times in eight) are one answer to a person: typing one places its
copies beside it, tied, and they are implied last together. Labels are rarer and take
a letter, the answer's number and a value, so they never collide with ranking digits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from workbench.annotation import answer_copies

FLAG_KEYS = {"i": "fails_instruction", "m": "made_up_facts", "h": "harmful", "o": "other"}
FLAG_NAMES = {"fails_instruction": "instruction", "made_up_facts": "made-up",
              "harmful": "harmful", "other": "other"}
TIE_KEYS = ("=", " ")

# (keys, what they do) for the legend line under the cards; {k} is the item's K.
LEGEND = [("1–{k}", "rank, best first (the last one is implied)"), ("= or Space", "tie with the previous"),
          ("Enter", "submit"), ("Backspace / Esc", "take back / clear"),
          ("drag + Ctrl+Enter", "submit the cards' order"),
          ("F n i/m/h/o", "flag instruction / made-up / harmful / other"), ("G n 1–7", "score"),
          ("N", "note"), ("S", "skip"), ("Ctrl+Z", "undo"), ("F1", "guidelines"),
          ("PgUp / PgDn, ↑ / ↓", "scroll the answers"), ("Ctrl+W", "end the session")]


@dataclass
class Outcome:
    action: str | None = None     # "submit", "skip", "undo", "note", "help", or None
    message: str = ""             # a hint or an error for the status line
    error: bool = False


class RankInput:
    """The ordering and labels being entered for one item with answers numbered 1..k (and
    their texts, to tie copies of one answer)."""

    def __init__(self, k: int, texts: Sequence[str] | None = None):
        self.k = k
        self.copies = answer_copies(texts if texts is not None else [str(n) for n in range(k)])
        self.groups: list[list[int]] = []     # typed answers, best group first
        self.tie = False                      # the next answer joins the last group
        self.flags: dict[int, set[str]] = {}
        self.scores: dict[int, int] = {}
        self.prefix: str | None = None        # "f" or "g" while a label command is typed
        self.target: int | None = None        # its answer
        # After prefill (undo) or a drag the ordering is complete; typing a digit then means
        # "rank anew", not "that answer is already placed".
        self.fresh = False

    # --- state ---------------------------------------------------------------------------------

    @property
    def placed(self) -> list[int]:
        return [n for g in self.groups for n in g]

    def _left(self) -> list[list[int]]:
        """The answers not placed yet, copies of one text together."""
        placed, out = set(self.placed), {}
        for n in range(1, self.k + 1):
            if n not in placed:
                out.setdefault(self.copies[n][0], []).append(n)
        return list(out.values())

    @property
    def implied(self) -> list[int] | None:
        """The one answer left (with its copies) once the others are placed: it can only go last."""
        left = self._left()
        return left[0] if len(left) == 1 else None

    @property
    def complete(self) -> bool:
        return len(self._left()) <= 1

    def ordering(self) -> list[list[int]] | None:
        """The full ordering, the implied last answer included, or None if incomplete."""
        if not self.complete:
            return None
        groups = [list(g) for g in self.groups]
        last = self.implied
        if last is not None:
            if self.tie and groups:
                groups[-1].extend(last)
            else:
                groups.append(list(last))
        return groups

    def prefill(self, ordering: list[list[int]], flags: dict[int, list[str]],
                scores: dict[int, int]) -> None:
        """Start from an earlier ranking of this item (after undo), ready to resubmit; one made
        before copies were ranked together has them moved to the first's place."""
        self.groups = self._copies_together(ordering)
        self.tie = False
        self.flags = {n: set(f) for n, f in flags.items() if f}
        self.scores = dict(scores)
        self.fresh = True

    def set_order(self, numbers: list[int], moved: int | None = None) -> None:
        """A strict ordering from the cards' order after a drag; copies of one answer tie where
        the card just `moved` lies, the others where the first of them lies."""
        if moved is not None:
            mates = [n for n in self.copies[moved] if n != moved]
            rest = [n for n in numbers if n not in mates]
            at = rest.index(moved) + 1
            numbers = rest[:at] + mates + rest[at:]
        self.groups = self._copies_together([[n] for n in numbers])
        self.tie = False
        self.fresh = True

    def _copies_together(self, ordering: list[list[int]]) -> list[list[int]]:
        """The ordering with each answer's copies in the group of the first of them."""
        home: dict[int, list[int]] = {}
        groups: list[list[int]] = []
        for g in ordering:
            group: list[int] = []
            for n in g:
                home.setdefault(self.copies[n][0], group).append(n)
            if group:
                groups.append(group)
        return groups

    def clear(self) -> None:
        self.groups, self.tie, self.fresh = [], False, False

    def prompt(self) -> str:
        """What a pending label command waits for."""
        if self.prefix == "f":
            return (f"flag answer {self.target}: i instruction, m made-up, h harmful, o other"
                    if self.target else f"flag which answer? 1–{self.k}")
        if self.prefix == "g":
            return (f"score answer {self.target}: 1 (useless) to 7 (perfect), 0 clears"
                    if self.target else f"score which answer? 1–{self.k}")
        return ""

    # --- keys ----------------------------------------------------------------------------------

    def press(self, token: str) -> Outcome:
        if self.prefix is not None:
            return self._label(token)
        if token.isdigit() and len(token) == 1:
            return self._digit(int(token))
        if token in TIE_KEYS:
            return self._tie()
        handlers = {"enter": self._enter, "backspace": self._backspace, "escape": self._escape}
        if token in handlers:
            return handlers[token]()
        if token in ("f", "g"):
            self.prefix, self.target = token, None
            return Outcome(message=self.prompt())
        simple = {"s": "skip", "n": "note", "u": "undo", "undo": "undo", "?": "help",
                  "help": "help"}
        if token in simple:
            return Outcome(simple[token])
        return Outcome()

    def _digit(self, n: int) -> Outcome:
        if not 1 <= n <= self.k:
            return Outcome(message=f"answers are numbered 1–{self.k}", error=True)
        if self.fresh:
            self.clear()
        if n in self.placed:
            same = self.copies[n][0] if self.copies[n][0] != n else None
            return Outcome(message=(f"answer {n} is answer {same} again, ranked with it" if same else
                                    f"answer {n} is already ranked") +
                           "; Backspace takes back the last", error=True)
        if self.complete and n not in (self.implied or []):   # typing the implied last is fine
            return Outcome(message="every answer is ranked: Enter submits, Backspace takes back "
                                   "the last, Esc clears", error=True)
        unit = [m for m in self.copies[n] if m not in self.placed]
        if self.tie and self.groups:
            self.groups[-1].extend(unit)
        else:
            self.groups.append(unit)
        self.tie = False
        return Outcome()

    def _tie(self) -> Outcome:
        if not self.groups:
            return Outcome(message="a tie joins the next answer to the previous one: type an "
                                   "answer first", error=True)
        if self.fresh or len(self.placed) == self.k:
            return Outcome(message="every answer is ranked: Backspace takes back the last one",
                           error=True)
        self.tie = not self.tie
        return Outcome()

    def _backspace(self) -> Outcome:
        self.fresh = False
        if self.tie:
            self.tie = False
        elif self.groups:
            last = self.groups[-1]
            n = last.pop()
            last[:] = [m for m in last if m not in self.copies[n]]    # its copies came with it
            if not last:
                self.groups.pop()
        return Outcome()

    def _escape(self) -> Outcome:
        self.clear()
        return Outcome()

    def _enter(self) -> Outcome:
        if self.complete:
            return Outcome("submit")
        left = len(self._left()) - 1
        return Outcome(message=f"rank {left} more answer{'s' if left > 1 else ''} first (the "
                               f"last one is implied), or drag the cards and press Ctrl+Enter",
                       error=True)

    def _label(self, token: str) -> Outcome:
        if token == "escape":
            self.prefix = self.target = None
            return Outcome()
        prefix, target = self.prefix, self.target
        if target is None:
            if token.isdigit() and len(token) == 1 and 1 <= int(token) <= self.k:
                self.target = int(token)
                return Outcome(message=self.prompt())
            what = {"f": "flag", "g": "score"}.get(prefix, "label")
            self.prefix = None
            # Said in full: the letter typed next is a ranking key again, not the label.
            return Outcome(message=f"no answer {token!r}: answers are 1–{self.k}; the {what} was not set "
                                   f"({prefix.upper()} and the answer's number again to set it)", error=True)
        self.prefix = self.target = None
        if prefix == "f" and token in FLAG_KEYS:
            flags = self.flags.setdefault(target, set())
            flags.symmetric_difference_update({FLAG_KEYS[token]})
            if not flags:
                del self.flags[target]
            return Outcome()
        if prefix == "g" and token.isdigit() and len(token) == 1 and int(token) <= 7:
            if token == "0":
                self.scores.pop(target, None)
            else:
                self.scores[target] = int(token)
            return Outcome()
        want = "i, m, h or o" if prefix == "f" else "a score 1–7 or 0"
        return Outcome(message=f"expected {want}, got {token!r}; label not changed", error=True)

    def describe(self) -> str:
        """The ordering as typed: '3 > 1 = 2 > (4)', the implied answer in parentheses."""
        parts = [" = ".join(map(str, g)) for g in self.groups]
        text = " > ".join(parts)
        last = self.implied
        if last is not None:
            shown = f"({' = '.join(map(str, last))})"
            text = f"{text} {'=' if self.tie else '>'} {shown}" if text else shown
        return text
