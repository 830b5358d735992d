"""How consistently items are ranked: pairwise agreement, Krippendorff's alpha, and every
agreement figure of a batch or the project (`figures`).

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

Answers of one text are one answer (engine.transcripts.fold_copies): a small model often samples
one answer several times, every ranking ties the copies, and their pairs would count as
agreement between two people who agree on nothing else.

What counts as "ranked twice": two annotators' first rankings of an item (`between=
"annotators"`), or one annotator's first ranking and its hidden repeat (`between="repeats"`,
each annotator's items a unit set of its own).

`figures` gives everything the Agreement tab and `workbench agreement` show, for some batches
or the whole project, from one read of the first rankings (r_x(p) below is the +1/0/-1 that
annotator x's ranking gives answer pair p of an item, [.] is 1 when true, else 0):
  * progress per annotator: items ranked (done) of the items assigned to them (every item of
    a batch they have a session on, unless its settings say "assigned": N) and of all items;
  * every annotator pair x, y on the items both ranked: pairwise agreement
    sum [r_x(p) = r_y(p)] / (number of answer pairs), strict agreement (the same over the
    pairs where r_x(p) != 0 and r_y(p) != 0), and alpha of the two;
  * each annotator x against the rest, on the items x shares with someone:
    sum over those items, every other ranker y and answer pair p of [r_x(p) = r_y(p)], over
    the number of such terms; and alpha without x (everyone else's rankings: well above the
    overall alpha, x is the one out of step);
  * per item ranked by two or more: its agreement and Kendall's W (workbench.agreement_items),
    most disagreed first (lowest agreement, then lowest W); the mean W is the plain mean of
    W over those items (where W is defined);
  * the human-human ceiling: strict agreement over every item, annotator pair and answer pair:
    sum [r_x(p) = r_y(p)] / (number of terms), counting only terms with r_x(p), r_y(p) != 0.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Callable, Hashable, Iterable, Sequence

from engine.transcripts import fold_copies
# pair_relations lives with the other one-item measures; callers import it from here too.
from workbench.agreement_items import Tally, kendall_w, pair_relations, tally, tally_two
from workbench.store import Batch, Ranking, Store

METRICS: dict[str, Callable[[float, float], float]] = {
    "nominal": lambda c, k: 0.0 if c == k else 1.0,
    "interval": lambda c, k: float(c - k) ** 2,
}


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


def _folded(store: Store, batch_id: int, rankings: list[Ranking]) -> list[Ranking]:
    """The rankings with each item's copies of one answer folded into one (fold_copies)."""
    if not rankings:
        return rankings
    # Each ranking with its own item's texts: fold_copies goes through all it is given, and a
    # batch's (20,000 items) for each of its rankings took minutes.
    texts = {it.id: {a.id: a.text for a in it.answers}
             for it in store.items(batch_id, sorted({r.item_id for r in rankings}))}
    folded = [replace(r, ordering=fold_copies(r.ordering, texts[r.item_id])) for r in rankings]
    # An item whose answers are all one text is one answer: nothing to agree or disagree on.
    return [r for r in folded if sum(map(len, r.ordering)) >= 2]


def agreement(store: Store, *, between: str = "annotators", batch_ids: Iterable[int] | None = None,
              annotators: Iterable[str] | None = None, include_simulated: bool = True) -> Agreement:
    """Agreement over the project's (or the given batches') items that were ranked twice."""
    if between not in ("annotators", "repeats"):
        raise ValueError(f"between must be 'annotators' or 'repeats', got {between!r}")
    names = set(annotators) if annotators is not None else None
    ids = sorted(batch_ids) if batch_ids is not None else [b.id for b in store.batches()]

    def unit(r: Ranking) -> Hashable | None:
        if names is not None and r.annotator not in names:
            return None
        if between == "repeats":
            return r.annotator, r.item_id
        return None if r.is_repeat else r.item_id

    by_unit: dict[Hashable, list[Ranking]] = defaultdict(list)
    for batch_id in ids:
        here: dict[Hashable, list[Ranking]] = defaultdict(list)
        for r in store.rankings(batch_id=batch_id, include_simulated=include_simulated):
            if (key := unit(r)) is not None:
                here[key].append(r)
        # Only what is ranked twice is read and folded: a class's batch is mostly ranked once.
        for r in _folded(store, batch_id, [r for rs in here.values() if len(rs) >= 2 for r in rs]):
            by_unit[unit(r)].append(r)
    groups = [rs for rs in by_unit.values() if len(rs) >= 2]
    agree, total, units = compare(groups)
    return Agreement(between, len(groups), total, agree / total if total else None,
                     krippendorff_alpha(units, "nominal"), krippendorff_alpha(units, "interval"))


# --- every figure of some batches (or the project) at once -----------------------------------

@dataclass
class AnnotatorFigures:
    """One annotator: progress, and agreement with everyone else on the items they share."""
    name: str
    simulated: bool
    done: int                   # items ranked (active first rankings)
    assigned: int               # items given to them to rank
    total: int                  # items in the batches looked at
    items: int = 0              # their items that someone else ranked too
    tally: Tally = field(default_factory=Tally)   # their ranking against each other one
    alpha_without: float | None = None            # nominal alpha of everyone else


@dataclass
class PairFigures:
    """Two annotators on the items both ranked."""
    names: tuple[str, str]
    items: int
    tally: Tally
    alpha: float | None
    alpha_interval: float | None


@dataclass
class ItemFigures:
    """One item ranked by two or more annotators."""
    batch_id: int
    item_id: int
    position: int               # in its batch, from 0
    prompt: str
    rankers: list[str]
    tally: Tally
    w: float | None             # Kendall's W

    @property
    def agreement(self) -> float | None:
        return self.tally.agreement


@dataclass
class Figures:
    overall: Agreement          # between annotators, over every item ranked twice or more
    tally: Tally                # the same comparisons, strict ones counted apart
    annotators: list[AnnotatorFigures]
    pairs: list[PairFigures]    # annotator pairs with an item in common
    items: list[ItemFigures]    # most disagreed first

    @property
    def ceiling(self) -> float | None:
        """The human-human ceiling for a reward model's held-out pairwise accuracy."""
        return self.tally.strict

    @property
    def ceiling_name(self) -> str:
        """What the ceiling is: with a simulated annotator among those compared it is no longer
        people's own (the README's Agreement section: "named so")."""
        if any(a.simulated for a in self.annotators):
            return "annotator-annotator ceiling (simulated annotators included)"
        return "human-human ceiling"

    @property
    def kendall_w(self) -> float | None:
        """Mean Kendall's W over the items ranked by two or more (where it is defined)."""
        ws = [it.w for it in self.items if it.w is not None]
        return sum(ws) / len(ws) if ws else None


Relations = dict[str, dict]     # annotator -> pair_relations of their ranking of one item


def _units(items: Iterable[Relations], without: str | None = None) -> list[list[int]]:
    """Alpha units: one per answer pair of each item, the values of its rankers but one."""
    units = []
    for rel in items:
        rows = [r for name, r in rel.items() if name != without]
        if len(rows) >= 2:
            units += [[r[pair] for r in rows] for pair in rows[0]]
    return units


def _annotators(store: Store, ids: list[int], include_simulated: bool) -> list[AnnotatorFigures]:
    """Progress of everyone with a session on the batches, in the order they first came."""
    batches = [store.batch(i) for i in ids]
    total = sum(b.n_items for b in batches)
    rows: dict[str, AnnotatorFigures] = {}
    for b in batches:
        for _, name, kind, done in store.ranked_counts(b.id):
            if kind == "simulated" and not include_simulated:
                continue
            row = rows.setdefault(name, AnnotatorFigures(name, kind == "simulated", 0, 0, total))
            row.done += done
            row.assigned += assigned_items(store, b, name)
    return list(rows.values())


def assigned_items(store: Store, batch: Batch, name: str) -> int:
    """Items of the batch given to `name`: a session queues the whole batch, unless its
    settings say "assigned": N (a share of the batch handed out, as annotation packs do)."""
    n = (store.session_settings(batch.id, name) or {}).get("assigned")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else batch.n_items


def _pair(a: str, b: str, items: list[Relations]) -> PairFigures | None:
    both = [{a: rel[a], b: rel[b]} for rel in items if a in rel and b in rel]
    if not both:
        return None
    t = Tally()
    for rel in both:
        t += tally_two(rel[a], rel[b])
    units = _units(both)
    return PairFigures((a, b), len(both), t, krippendorff_alpha(units),
                       krippendorff_alpha(units, "interval"))


def _versus_rest(row: AnnotatorFigures, items: list[Relations]) -> None:
    mine = [rel for rel in items if row.name in rel]
    row.items = len(mine)
    for rel in mine:
        for name, other in rel.items():
            if name != row.name:
                row.tally += tally_two(rel[row.name], other)
    row.alpha_without = krippendorff_alpha(_units(items, without=row.name))


def _item_figures(store: Store, shared: dict[int, tuple[int, list[Ranking]]]
                  ) -> list[ItemFigures]:
    out = []
    by_batch: dict[int, list[int]] = defaultdict(list)
    for item_id, (batch_id, _) in shared.items():
        by_batch[batch_id].append(item_id)
    for batch_id, item_ids in by_batch.items():
        for item in store.items(batch_id, item_ids):
            rankings = shared[item.id][1]
            out.append(ItemFigures(batch_id, item.id, item.position, item.prompt,
                                   [r.annotator for r in rankings],
                                   tally([pair_relations(r.ordering) for r in rankings]),
                                   kendall_w([r.ordering for r in rankings])))
    # Lowest agreement first; among equals the lower W (None, all tied, last), then batch order.
    out.sort(key=lambda it: (it.agreement, 2.0 if it.w is None else it.w, it.batch_id,
                             it.position))
    return out


def figures(store: Store, *, batch_ids: Iterable[int] | None = None,
            include_simulated: bool = True) -> Figures:
    """Every agreement figure over the given batches (default: the whole project), from the
    annotators' first rankings."""
    ids = sorted(batch_ids) if batch_ids is not None else [b.id for b in store.batches()]
    shared: dict[int, tuple[int, list[Ranking]]] = {}
    for batch_id in ids:
        by_item: dict[int, list[Ranking]] = defaultdict(list)
        for r in store.rankings(batch_id=batch_id, include_simulated=include_simulated,
                                include_repeats=False):
            by_item[r.item_id].append(r)
        twice = [r for rs in by_item.values() if len(rs) >= 2 for r in rs]
        for r in _folded(store, batch_id, twice):
            shared.setdefault(r.item_id, (batch_id, []))[1].append(r)
    shared = {i: v for i, v in shared.items() if len(v[1]) >= 2}
    items = [{r.annotator: pair_relations(r.ordering) for r in rs} for _, rs in shared.values()]
    rows = _annotators(store, ids, include_simulated)
    for row in rows:
        _versus_rest(row, items)
    pairs = [p for a, b in combinations([r.name for r in rows], 2)
             if (p := _pair(a, b, items)) is not None]
    total = Tally()
    for rel in items:
        total += tally(list(rel.values()))
    units = _units(items)
    overall = Agreement("annotators", len(items), total.total, total.agreement,
                        krippendorff_alpha(units), krippendorff_alpha(units, "interval"))
    return Figures(overall, total, rows, pairs, _item_figures(store, shared))
