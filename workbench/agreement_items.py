"""One item's rankings: how far its rankers agree, Kendall's W, and their Borda aggregate.

An item has K answers and was ranked by m people (first rankings: a hidden repeat measures
one person's consistency, it is not a second label). A ranking is groups of answer ids, best
first; the answers of one group are tied.

Answer-pair relations. For answers a < b (by id: a fixed orientation) a ranking says +1 (a
above b), 0 (tied) or -1 (b above a); an item gives C(K, 2) answer pairs.

Agreement of an item: agree / comparisons, where a comparison is one answer pair seen by two
of the item's rankings (every two of the m), and it agrees when both say the same of the
three; a tie agrees only with a tie. m rankings give C(m, 2) * C(K, 2) comparisons; an item
ranked once has none (agreement None). workbench.agreement adds the same counts over items.

Strict agreement: the same count over only the comparisons where both rankings prefer one
answer (+1 or -1 each): of two people who both expressed a preference, how often did they
pick the same answer? Added over items and annotator pairs it is the human-human ceiling for
a reward model, whose held-out pairwise accuracy is measured on such strict pairs against one
person's label: an RM near the ceiling agrees with a person about as often as another person
does, and its remaining "errors" are mostly pairs people themselves split on.

Kendall's W (coefficient of concordance; Kendall & Babington Smith 1939, ties as in Siegel &
Castellan 1988, section 9.4). Each ranker j gives answer i its mid-rank r_ij: 1 = best, tied
answers share the mean of the places they fill (a 2-way tie for 2nd and 3rd: 2.5 each).

    R_i = sum_j r_ij,   R_mean = m (K + 1) / 2,   S = sum_i (R_i - R_mean)^2
    T_j = sum over ranker j's tie groups of (t^3 - t), t the group's size
    W   = 12 S / (m^2 (K^3 - K) - m sum_j T_j)

W = 1 when every ranking is the same, near 0 when they are unrelated (two exactly reversed
rankings give 0); None when the denominator is 0 (every ranking ties every answer) or m < 2.

Borda count. In one ranking an answer earns one point for every answer ranked below it and
half a point for every other answer tied with it: K - its mid-rank. The aggregate ranking
orders the answers by their points summed over the item's rankings, most first, with answers
of equal points tied. (Kept as doubled, whole points, so "equal" is exact.)
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Mapping, Sequence

from engine.transcripts import fold_copies

Ordering = Sequence[Sequence[int]]
AGGREGATES = ("each", "borda")


def pair_relations(ordering: Ordering) -> dict[tuple[int, int], int]:
    """{(a, b): +1 | 0 | -1} for every answer pair a < b of a ranking (groups, best first)."""
    rank = {a: gi for gi, group in enumerate(ordering) for a in group}
    return {(a, b): (rank[b] > rank[a]) - (rank[b] < rank[a])
            for a, b in combinations(sorted(rank), 2)}


@dataclass
class Tally:
    """Comparisons of answer pairs between two rankings: all of them, and the strict ones."""
    agree: int = 0
    total: int = 0
    strict_agree: int = 0
    strict_total: int = 0

    def add(self, x: int, y: int) -> None:
        """One answer pair as two rankings see it (+1, 0 or -1 each)."""
        self.agree += x == y
        self.total += 1
        if x and y:
            self.strict_agree += x == y
            self.strict_total += 1

    def __iadd__(self, other: "Tally") -> "Tally":
        self.agree += other.agree
        self.total += other.total
        self.strict_agree += other.strict_agree
        self.strict_total += other.strict_total
        return self

    @property
    def agreement(self) -> float | None:
        return self.agree / self.total if self.total else None

    @property
    def strict(self) -> float | None:
        """The share of strict comparisons that agree: the human-human ceiling."""
        return self.strict_agree / self.strict_total if self.strict_total else None


def tally_two(x: dict, y: dict) -> Tally:
    """Two rankings of one item, as pair_relations."""
    t = Tally()
    for pair, value in x.items():
        t.add(value, y[pair])
    return t


def tally(relations: Sequence[dict]) -> Tally:
    """Every two of one item's rankings (as pair_relations) on every answer pair."""
    t = Tally()
    for x, y in combinations(relations, 2):
        t += tally_two(x, y)
    return t


def item_agreement(orderings: Sequence[Ordering]) -> float | None:
    """The item's agreement (see the module's docstring); None when ranked fewer than twice."""
    return tally([pair_relations(o) for o in orderings]).agreement


def mid_ranks(ordering: Ordering) -> dict[int, float]:
    """{answer: place, 1 = best}; tied answers share the mean of the places they fill."""
    out, place = {}, 1
    for group in ordering:
        for a in group:
            out[a] = place + (len(group) - 1) / 2
        place += len(group)
    return out


def kendall_w(orderings: Sequence[Ordering]) -> float | None:
    """Kendall's W with the tie correction over the item's rankings (the module's docstring)."""
    m = len(orderings)
    if m < 2:
        return None
    ranks = [mid_ranks(o) for o in orderings]
    answers = list(ranks[0])
    k = len(answers)
    totals = [sum(r[a] for r in ranks) for a in answers]
    mean = m * (k + 1) / 2
    s = sum((t - mean) ** 2 for t in totals)
    ties = sum(len(g) ** 3 - len(g) for o in orderings for g in o)
    denominator = m * m * (k ** 3 - k) - m * ties
    return 12 * s / denominator if denominator else None


def borda(orderings: Sequence[Ordering]) -> list[list[int]]:
    """The Borda aggregate of one item's rankings: groups of answer ids, most points first;
    answers with equal points form one group (ids sorted within it)."""
    points: dict[int, int] = {}
    for ordering in orderings:
        below = sum(len(g) for g in ordering)
        for group in ordering:
            below -= len(group)
            for a in group:   # doubled: 2 per answer below, 1 per other answer in the tie
                points[a] = points.get(a, 0) + 2 * below + len(group) - 1
    levels = sorted(set(points.values()), reverse=True)
    return [sorted(a for a, p in points.items() if p == level) for level in levels]


def check_choice(min_agreement: float | None, aggregate: str) -> None:
    """ValueError unless the training choice below makes sense."""
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"the agreement threshold is a share from 0 to 1, got {min_agreement}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")


def for_training(orderings: Sequence[Ordering], *, min_agreement: float | None = None,
                 keep_single: bool = True, aggregate: str = "each",
                 text_of: Mapping[int, str] | None = None) -> list[list[list[int]]]:
    """What one item gives a reward/DPO run: its rankings ("each") or their Borda aggregate
    ("borda"); nothing when its agreement is below `min_agreement`. An item ranked once has
    no agreement to test: `keep_single` keeps it (there is no sign people disagree on it,
    and in a class most items are ranked by one person, so dropping them drops most data).
    With the answers' texts (`text_of`), the agreement tested counts copies of one answer once,
    as the Agreement tab does (fold_copies); the rankings given keep every answer."""
    check_choice(min_agreement, aggregate)
    if min_agreement is not None:
        agreement = item_agreement([fold_copies(o, text_of) for o in orderings] if text_of else orderings)
        if agreement is None and not keep_single:
            return []
        if agreement is not None and agreement < min_agreement:
            return []
    if aggregate == "borda" and orderings:
        return [borda(orderings)]
    return [[list(g) for g in o] for o in orderings]
