"""`workbench agreement` as text: the figures of workbench.agreement.figures, table by table,
each with a line saying what it measures (the Agreement tab shows the same)."""
from __future__ import annotations

import textwrap
from typing import Callable, Sequence

from workbench.agreement import Figures
from workbench.review import RewardAccuracy

SHOWN_ITEMS = 10        # most-disagreed items listed; the app lists them all
PAIRWISE = ("pairwise = share of answer pairs two rankings order the same way (a tie agrees "
            "only with a tie)")
ALPHA = ("Krippendorff's alpha: 1 = perfect, 0 = chance; n/a when every ranking agrees on a "
         "single kind of answer pair (no disagreement is expected)")


def say(text: str) -> list[str]:
    """A sentence about a table, wrapped for a terminal."""
    return textwrap.wrap(text, 100)


def fmt(x: float | None, pattern: str = "{:.3f}") -> str:
    return "n/a" if x is None else pattern.format(x)


def table(headers: Sequence[str], rows: list[list[str]], align: str = "") -> list[str]:
    """Indented columns; `align` is l or r per column (default: the first left, numbers right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(str(r[c])) for r in [list(headers)] + rows) for c in range(len(headers))]

    def line(cells) -> str:
        return "  " + "  ".join(f"{c:<{w}}" if a == "l" else f"{c:>{w}}"
                                for c, w, a in zip(cells, widths, align)).rstrip()
    return [line(headers)] + [line(r) for r in rows]


def agreement_rows(rows: list[tuple[str, int, int, float | None, float | None, float | None]]
                   ) -> list[str]:
    """The pair (or repeat) table: label, items, pairs, agreement, alpha, alpha(interval)."""
    return table(["", "items", "pairs", "agreement", "alpha", "alpha(interval)"],
                 [[label, str(items), str(n), fmt(agr), fmt(a), fmt(ai)]
                  for label, items, n, agr, a, ai in rows])


def pairs(f: Figures) -> list[str]:
    rows = [(" ~ ".join(p.names), p.items, p.tally.total, p.tally.agreement, p.alpha,
             p.alpha_interval) for p in f.pairs]
    if len(rows) != 1:   # an overall alpha can hide one annotator out of step: pairs first
        o = f.overall
        rows.append(("all", o.items, o.comparisons, o.agreement, o.alpha, o.alpha_interval))
    return say(f"agreement between annotators: {PAIRWISE}") + agreement_rows(rows) + say(ALPHA)


def annotators(f: Figures) -> list[str]:
    rows = [[a.name + (" (simulated)" if a.simulated else ""), str(a.done), str(a.assigned),
             str(a.total), str(a.items), str(a.tally.total), fmt(a.tally.agreement),
             fmt(a.alpha_without)] for a in f.annotators]
    return (say("each annotator: items ranked, of those assigned, of all; then against the rest "
                "(their ranking against every other ranking of the items they share, and alpha "
                "over everyone else: well above the overall alpha means they are out of step)")
            + table(["annotator", "ranked", "assigned", "items", "shared", "pairs", "agreement",
                     "alpha without"], rows))


def concordance(f: Figures) -> list[str]:
    n = sum(it.w is not None for it in f.items)
    return say(f"Kendall's W (concordance of the K-way rankings, ties corrected; 1 = the same "
               f"order, 0 = unrelated): mean {fmt(f.kendall_w)} over {n} item(s) ranked by two "
               f"or more")


def disagreed(f: Figures, shown: int = SHOWN_ITEMS) -> list[str]:
    rows = [[str(it.batch_id), str(it.position + 1), str(len(it.rankers)), fmt(it.agreement),
             fmt(it.w), " ".join(it.prompt.split())[:60]] for it in f.items[:shown]]
    more = len(f.items) - shown
    return (say("items people disagree on most (lowest agreement first): discuss them, re-rank "
                "them (the app's Agreement tab), or leave them out of training (the reward "
                "page's agreement threshold, workbench pipeline --min-agreement)")
            + table(["batch", "item", "rankers", "agreement", "W", "prompt"], rows, "rrrrrl")
            + ([f"  ... and {more} more"] if more > 0 else []))


def ceiling(f: Figures, rm: RewardAccuracy | None) -> list[str]:
    t = f.tally
    simulated = {a.name for a in f.annotators if a.simulated}
    out = say(f"{f.ceiling_name} for a reward model: where two annotators both preferred one "
              f"answer of a pair, they chose the same one in {fmt(t.strict, '{:.1%}')} of "
              f"{t.strict_total} comparisons")
    out += table(["", "both preferred", "same"],
                 [[" ~ ".join(n + (" (simulated)" if n in simulated else "") for n in p.names),
                   str(p.tally.strict_total), fmt(p.tally.strict, "{:.1%}")] for p in f.pairs])
    if rm is None:
        return out + say("no reward model run has finished yet: its held-out accuracy goes "
                         "beside the ceiling")
    on = f" on {rm.rankings} held-out ranking(s)" if rm.rankings is not None else ""
    line = f"reward model {rm.run}: held-out pairwise accuracy {rm.accuracy:.1%}{on}"
    if t.strict is not None:
        gap = (rm.accuracy - t.strict) * 100
        line += (f", {gap:+.1f} points from the ceiling" + (
            " (as often right as another person would be: more data from the same people helps "
            "little)" if gap >= 0 else ""))
    return out + say(line)


def annotator_report(f: Figures, rm: RewardAccuracy | None,
                     write: Callable[[str], None] = print) -> None:
    sections = [annotators(f)] if f.annotators else []
    if not f.overall.items:
        sections.append(["no item has been ranked twice by two annotators"])
    else:
        sections += [pairs(f), concordance(f), disagreed(f), ceiling(f, rm)]
    for i, lines in enumerate(sections):
        if i:
            write("")
        for line in lines:
            write(line)
