"""Merging annotation packs back into the project they were made from (workbench/packs.py
says what a pack is and what merging promises)."""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from workbench.packs import Pack, PackError, open_pack
from workbench.store import InputError, Ranking, Store, StoreError


@dataclass
class PackMerge:
    """What merging one pack did."""
    path: Path
    annotator: str
    batch: str
    added: int = 0          # rankings new to the project
    updated: int = 0        # re-ranked in the pack since the last merge: the project follows
    withdrawn: int = 0      # undone in the pack since the last merge (and not re-ranked)
    already: int = 0        # in the project from an earlier merge
    conflicts: list[str] = field(default_factory=list)
    untouched: bool = False  # nothing ranked in the pack yet (its annotator is listed, 0 of N)

    def line(self) -> str:
        if self.untouched:
            return (f"{self.path.name}: {self.annotator} on {self.batch!r}: nothing ranked in it "
                    "yet, nothing merged")
        parts = [f"{self.added} added", f"{self.already} already merged"]
        parts += [f"{n} {what}" for n, what in ((self.updated, "updated"),
                                                (self.withdrawn, "withdrawn")) if n]
        if self.conflicts:
            parts.append(f"{len(self.conflicts)} conflict(s)")
        return f"{self.path.name}: {self.annotator} on {self.batch!r}: {', '.join(parts)}"


@dataclass
class _Target:
    batch_id: int
    items: dict[int, tuple[int, int, dict[int, int]]]   # pack item -> (item, position, answer map)


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def match_pack(store: Store, pack: Pack) -> _Target:
    """Where the pack's items are in this project; PackError if it was made from another batch."""
    info = pack.info
    target = next((b for b in store.batches() if b.name == info.batch), None)
    if target is None:
        names = ", ".join(repr(b.name) for b in store.batches()) or "none"
        raise PackError(f"{pack.path}: made from batch {info.batch!r} of project {info.project!r}, "
                        f"which this project does not have (its batches: {names})")
    if abs(target.created_at - info.batch_created_at) > 1e-3:
        raise PackError(f"{pack.path}: made from another batch named {info.batch!r} (created "
                        f"{_when(info.batch_created_at)} in project {info.project!r}); this "
                        f"project's was created {_when(target.created_at)}")
    ours = {it.id: it for it in store.items(target.id)}
    items = {}
    for it in pack.store.items(pack.batch_id):
        src = ours.get(it.meta.get("source_item"))
        if (src is None or (src.prompt, src.messages) != (it.prompt, it.messages)
                or [a.text for a in src.answers] != [a.text for a in it.answers]):
            raise PackError(f"{pack.path}: made from another batch named {info.batch!r}: its item "
                            f"{it.meta.get('position', -1) + 1} is not this project's")
        items[it.id] = (src.id, src.position, {a.id: s.id for a, s in zip(it.answers, src.answers)})
    for a in store.annotators():
        if a.name == info.annotator and a.simulated:
            raise PackError(f"{pack.path}: its annotator {info.annotator!r} is a simulated "
                            "annotator in this project; one name cannot be both")
    return _Target(target.id, items)


def merge_packs(store: Store, paths: Iterable[str | Path]) -> list[PackMerge]:
    """Merge packs into the project's store: every pack is checked first (InputError listing each
    bad one, nothing merged), then all are merged in one transaction."""
    packs: list[Pack] = []
    problems: list[str] = []
    try:
        targets = []
        for path in paths:
            try:
                pack = open_pack(path)
            except (PackError, StoreError) as e:
                problems.append(str(e))
                continue
            packs.append(pack)
            try:
                targets.append(match_pack(store, pack))
            except PackError as e:
                problems.append(str(e))
        if problems:
            raise InputError(problems, "annotation packs (nothing merged)")
        with store.transaction():
            return [_merge_one(store, pack, target) for pack, target in zip(packs, targets)]
    finally:
        for pack in packs:
            pack.close()


def _same(a: list[list[int]], b: list[list[int]]) -> bool:
    return [sorted(g) for g in a] == [sorted(g) for g in b]


def _merge_one(store: Store, pack: Pack, target: _Target) -> PackMerge:
    info, res = pack.info, PackMerge(pack.path, pack.info.annotator, pack.info.batch)
    rankings = pack.store.rankings(batch_id=pack.batch_id, include_withdrawn=True)
    # A pack handed back unranked still makes its annotator's session: the batch then lists
    # them with 0 of N, so whoever merges sees who has not ranked yet.
    res.untouched = not rankings
    who = store.annotator(info.annotator, "human")
    # Marked as merged: the person at this machine is not whoever's pack came in last.
    settings = {**(pack.store.session_settings(pack.batch_id, info.annotator) or {}),
                "merged_from": info.source}
    session, _ = store.session(target.batch_id, who.id, settings)
    pack_session, _ = pack.store.session(pack.batch_id, pack.store.annotator(info.annotator).id)
    followed: set[tuple[int, bool]] = set()     # entries whose merged ranking the pack undid now
    for r in rankings:
        item_id, position, answers = target.items[r.item_id]
        merged = store.merged_from(info.source, r.id)
        if merged is not None:
            if r.withdrawn_at is not None and merged[1]:
                store.withdraw_ranking(merged[0])
                followed.add((item_id, r.is_repeat))
                res.withdrawn += 1
            else:
                res.already += 1
            continue
        if r.withdrawn_at is not None:
            continue            # undone in the pack before it was ever merged
        outcome = _add(store, pack, pack_session, session, r, item_id, position, answers)
        if isinstance(outcome, str):
            res.conflicts.append(outcome)
        elif outcome and (item_id, r.is_repeat) in followed:    # re-ranked in the pack
            res.withdrawn -= 1
            res.updated += 1
        elif outcome:
            res.added += 1
        else:
            res.already += 1
    return res


def _add(store: Store, pack: Pack, pack_session: int, session: int, r: Ranking, item_id: int,
         position: int, answers: dict[int, int]) -> bool | str:
    """Copy one active pack ranking: True if added, False if the project holds the same ranking
    already (linked now), or the conflict line if it holds another."""
    ordering = [[answers[a] for a in g] for g in r.ordering]
    current = store.active_ranking(session, item_id, r.is_repeat)
    if current is not None:
        theirs = next(x for x in store.rankings(session_id=session, item_id=item_id)
                      if x.id == current)
        if not _same(theirs.ordering, ordering):
            return (f"{pack.path}: item {position + 1}{' (hidden repeat)' if r.is_repeat else ''}: "
                    f"{pack.info.annotator} ranked it differently in the project already; kept the "
                    "project's ranking")
        store.link_ranking(current, pack.info.source, r.id)
        return False
    shown = pack.store.shown_order(pack_session, r.item_id, r.is_repeat)
    if shown is not None:
        store.record_shown_order(session, item_id, r.is_repeat, [answers[a] for a in shown])
    rid = store.add_ranking(session, item_id, ordering, is_repeat=r.is_repeat,
                            flags={answers[a]: f for a, f in r.flags.items()},
                            scores={answers[a]: s for a, s in r.scores.items()},
                            note=r.note, duration_s=r.duration_s)
    store.link_ranking(rid, pack.info.source, r.id)
    return True
