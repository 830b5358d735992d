"""How consistently items are ranked: pairwise agreement and Krippendorff's alpha.

Rankings are compared through the answer pairs they imply. For an item with answers a < b
(by answer id, a fixed orientation), a ranking says one of three things about the pair:
+1 (a above b), 0 (tied), -1 (b above a). An item with K answers gives C(K, 2) pairs.

Pairwise agreement: the share of (answer pair, two rankings) comparisons where both rankings
say the same of the three. A tie agrees only with a tie: "a > b" against "a = b" counts as a
disagreement, the same as "a > b" against "b > a". With more than two rankings of an item,
every two of them are compared.

Krippendorff's alpha (Krippendorff, "Computing Krippendorff's Alpha-Reliability", 2011):
the units are the answer pairs of the items, the coders are the rankings, and the value a
coder gives a unit is +1, 0 or -1 as above. alpha = 1 - D_o / D_e, observed over expected
disagreement, from the coincidence matrix of values within units. The reported `alpha` uses the
nominal metric (every two different values disagree by 1), which makes it the chance-corrected
form of pairwise agreement above; `alpha_interval` uses the interval metric on {-1, 0, +1},
by which a reversed preference disagrees four times as much as a tie against a preference.
alpha is 1 for perfect agreement, about 0 for agreement at chance level, and None when it is
undefined (no unit with two values, or every value the same, so no disagreement is expected).

What counts as "ranked twice": two annotators' first rankings of an item (`between=
"annotators"`), or one annotator's first ranking and its hidden repeat (`between="repeats"`,
each annotator's items a unit set of its own).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Hashable, Iterable, Sequence

from workbench.store import Ranking, Store

METRICS: dict[str, Callable[[float, float], float]] = {
    "nominal": lambda c, k: 0.0 if c == k else 1.0,
    "interval": lambda c, k: float(c - k) ** 2,
}


def pair_relations(ordering: Sequence[Sequence[int]]) -> dict[tuple[int, int], int]:
    """{(a, b): +1 | 0 | -1} for every answer pair a < b of a ranking (groups, best first)."""
    rank = {a: gi for gi, group in enumerate(ordering) for a in group}
    return {(a, b): (rank[b] > rank[a]) - (rank[b] < rank[a])
            for a, b in combinations(sorted(rank), 2)}


def krippendorff_alpha(units: Iterable[Sequence], metric: str = "nominal") -> float | None:
    """Alpha for units given as lists of the values their coders gave (None = not coded)."""
    delta = METRICS[metric]
    coincidence: dict[tuple, float] = defaultdict(float)
    for unit in units:
        values = [v for v in unit if v is not None]
        m = len(values)
        if m < 2:
            continue  # a value no one else coded cannot agree or disagree with anything
        for i, j in combinations(range(m), 2):
            coincidence[(values[i], values[j])] += 1.0 / (m - 1)
            coincidence[(values[j], values[i])] += 1.0 / (m - 1)
    totals: dict = defaultdict(float)
    for (c, _), o in coincidence.items():
        totals[c] += o
    n = sum(totals.values())
    if n <= 1:
        return None
    observed = sum(o * delta(c, k) for (c, k), o in coincidence.items()) / n
    expected = sum(totals[c] * totals[k] * delta(c, k)
                   for c in totals for k in totals) / (n * (n - 1))
    if expected == 0:
        return None
    return 1.0 - observed / expected


@dataclass
class Agreement:
    between: str               # "annotators" or "repeats"
    items: int                 # items ranked at least twice
    comparisons: int           # (answer pair, two rankings) comparisons
    agreement: float | None    # share of comparisons that agree
    alpha: float | None        # Krippendorff's alpha, nominal
    alpha_interval: float | None


def compare(groups: Sequence[Sequence[Ranking]]) -> tuple[int, int, list[list[int]]]:
    """For groups of rankings of the same item: (agreeing comparisons, comparisons, alpha units)."""
    agree = total = 0
    units: list[list[int]] = []
    for rankings in groups:
        relations = [pair_relations(r.ordering) for r in rankings]
        for pair in relations[0]:
            values = [rel[pair] for rel in relations]
            units.append(values)
            for x, y in combinations(values, 2):
                agree += x == y
                total += 1
    return agree, total, units


def agreement(store: Store, *, between: str = "annotators", batch_ids: Iterable[int] | None = None,
              annotators: Iterable[str] | None = None, include_simulated: bool = True) -> Agreement:
    """Agreement over the project's (or the given batches') items that were ranked twice."""
    if between not in ("annotators", "repeats"):
        raise ValueError(f"between must be 'annotators' or 'repeats', got {between!r}")
    names = set(annotators) if annotators is not None else None
    ids = sorted(batch_ids) if batch_ids is not None else [b.id for b in store.batches()]
    by_unit: dict[Hashable, list[Ranking]] = defaultdict(list)
    for batch_id in ids:
        for r in store.rankings(batch_id=batch_id, include_simulated=include_simulated):
            if names is not None and r.annotator not in names:
                continue
            if between == "annotators" and not r.is_repeat:
                by_unit[r.item_id].append(r)
            elif between == "repeats":
                by_unit[(r.annotator, r.item_id)].append(r)
    groups = [rs for rs in by_unit.values() if len(rs) >= 2]
    agree, total, units = compare(groups)
    return Agreement(between, len(groups), total, agree / total if total else None,
                     krippendorff_alpha(units, "nominal"), krippendorff_alpha(units, "interval"))
