"""Annotation packs: one batch ranked by a class, one file per annotator, merged back.

`export_packs` writes NAME.wbpack for each annotator: a workbench database of its own (the same
schema as the project's, so AnnotationSession and the ranking view work on it unchanged) that
holds only the items this annotator ranks, their answers, the shuffled order each is shown in,
the annotator's session and the project's guidelines. Nothing else of the project travels: no
runs, no other batches, no answer metadata (checkpoint paths, seeds), no one else's rankings.

Items are dealt so that each is ranked by exactly `overlap` annotators: each item goes to the
least loaded annotators, ties broken by a seeded shuffle, so loads differ by at most one item
and who shares items with whom varies (pairwise agreement needs every pair to overlap).

A pack is written whole or not at all (built as FILE.part, then renamed), and ranking in it
commits each ranking the moment it is submitted, as the project store does (WAL, FULL sync):
a kill loses at most the ranking being typed.

`merge_packs` copies packs' rankings into the project batch they were made from, in one
transaction, after checking every pack: a pack made from a batch this project does not have, or
from another batch of the same name (different creation time or items), is refused by name
before anything is written. Every merged ranking remembers the pack ranking it copies
(`ranking_sources`), which makes merging idempotent and lets a pack's later changes follow:
a ranking undone in the pack is withdrawn from the project, one re-ranked there replaces the
merged one. A conflict is an item the same annotator already ranked differently in the project
by other means (the app, another pack): the project's ranking is kept and the conflict reported.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from workbench import guidelines
from workbench.annotation import REPEAT_GAP
from workbench.store import Batch, Item, Store, StoreError

PACK_SUFFIX = ".wbpack"
PACK_FORMAT = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"


class PackError(ValueError):
    """A pack that cannot be used, as one line naming the file."""


@dataclass
class PackInfo:
    """What a pack says about itself: its batch's settings["pack"]."""
    id: str
    annotator: str
    batch: str                  # the project batch's name
    batch_created_at: float     # with the name, tells a batch from another of the same name
    project: str                # the project folder's name, for people reading the file list
    created_at: float
    overlap: int
    annotators: list[str]
    guidelines: str
    guidelines_seen: str | None = None     # sha256 of the guidelines text the annotator read
    format: int = PACK_FORMAT

    @property
    def source(self) -> str:
        return f"pack:{self.id}"


@dataclass
class Pack:
    """An open pack: its store (close it), what it says, and its one batch."""
    path: Path
    store: Store
    info: PackInfo
    batch_id: int

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Pack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- making packs ---------------------------------------------------------------------------

def assign(n_items: int, annotators: Sequence[str], overlap: int, seed: int = 0) -> list[list[str]]:
    """For each item, the `overlap` annotators who rank it (see the module docstring)."""
    rng = random.Random(f"workbench-packs/{seed}")
    load = {a: 0 for a in annotators}
    out = []
    for _ in range(n_items):
        order = list(annotators)
        rng.shuffle(order)
        chosen = sorted(order, key=load.__getitem__)[:overlap]   # stable: the shuffle breaks ties
        for a in chosen:
            load[a] += 1
        out.append(chosen)
    return out


def pack_filename(batch: str, annotator: str) -> str:
    def safe(s: str) -> str:
        return re.sub(r"[^\w.-]+", "_", s).strip("._") or "x"
    return f"{safe(batch)}-{safe(annotator)}{PACK_SUFFIX}"


def find_batch(store: Store, ref: str | int) -> Batch:
    """A batch by id (as every other command's --batch, and `workbench batches`, give it) or else
    by name; KeyError naming the batches there are."""
    batches = store.batches()
    ref = str(ref)
    found = next((b for b in batches if b.id == int(ref)), None) if ref.isdigit() else None
    if found is None:
        found = next((b for b in batches if b.name == ref), None)
    if found is None:
        names = ", ".join(f"{b.id} {b.name!r}" for b in batches) or "none yet"
        raise KeyError(f"no batch {ref!r} in this project (batches: {names})")
    return found


def _check_annotators(annotators: Sequence[str], overlap: int) -> list[str]:
    names = [a.strip() for a in annotators if a.strip()]
    if not names:
        raise ValueError("name at least one annotator (--annotators a,b,c)")
    if len(set(names)) != len(names):
        raise ValueError(f"annotator names repeat: {', '.join(names)}")
    files = [pack_filename("", a) for a in names]
    if len(set(files)) != len(files):
        raise ValueError("two annotator names give the same file name; make them differ in letters "
                         "or digits")
    if not 1 <= overlap <= len(names):
        raise ValueError(f"overlap must be from 1 to the number of annotators ({len(names)}), "
                         f"got {overlap}")
    return names


def export_packs(store: Store, project_dir: str | Path, batch: str | int,
                 annotators: Sequence[str], overlap: int, out_dir: str | Path, *,
                 repeat_fraction: float = 0.0, seed: int = 0) -> list[Path]:
    """Write one pack per annotator into out_dir; returns their paths, in annotator order.
    Refuses to write over an existing pack (it may hold rankings not merged yet)."""
    target = find_batch(store, batch)
    names = _check_annotators(annotators, overlap)
    if not 0.0 <= repeat_fraction <= 1.0:
        raise ValueError(f"the hidden repeat fraction must be from 0 to 1, got {repeat_fraction}")
    out_dir = Path(out_dir)
    paths = {a: out_dir / pack_filename(target.name, a) for a in names}
    taken = [p for p in paths.values() if p.exists()]
    if taken:
        raise PackError(f"{taken[0]} exists and may hold rankings not merged yet; move it away or "
                        "write the packs into another folder")
    items = store.items(target.id)
    if not items:
        raise PackError(f"batch {target.name!r} has no items to rank")
    dealt = assign(len(items), names, overlap, seed)
    text = guidelines.read_guidelines(project_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    # Every pack is built as its .part first and only then are they renamed: an export killed
    # half way leaves no finished pack that a second export would refuse to write over.
    parts = {a: paths[a].with_name(paths[a].name + ".part") for a in names}
    try:
        for a in names:
            info = PackInfo(uuid.uuid4().hex, a, target.name, target.created_at,
                            Path(project_dir).resolve().name, now, overlap, names, text)
            mine = [it for it, who in zip(items, dealt) if a in who]
            _write_pack(paths[a], parts[a], info, target, mine, repeat_fraction, seed)
        for a in names:
            try:
                os.replace(parts[a], paths[a])    # closed by _fill_pack: its WAL folded in, removed
            except OSError as e:
                raise PackError(f"{paths[a]}: cannot write the annotation pack ({e.strerror or e})") from None
    finally:
        for part in parts.values():
            for leftover in _sqlite_files(part):
                leftover.unlink(missing_ok=True)
    return list(paths.values())


def _pack_item(item: Item) -> dict:
    return {"prompt": item.prompt, "messages": item.messages,
            "answers": [{"text": a.text, "meta": {"source_answer": a.id}} for a in item.answers],
            "meta": {"source_item": item.id, "position": item.position}}


def _sqlite_files(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"),
            path.with_name(path.name + "-journal")]


def _write_pack(path: Path, tmp: Path, info: PackInfo, batch: Batch, items: list[Item],
                repeat_fraction: float, seed: int) -> None:
    """The pack `path` built whole as `tmp` (an earlier export's leftover there replaced)."""
    for leftover in _sqlite_files(tmp):
        leftover.unlink(missing_ok=True)
    try:
        _fill_pack(tmp, info, batch, items, repeat_fraction, seed)
    except (sqlite3.Error, OSError) as e:     # not the project's database: name the pack
        raise PackError(f"{path}: cannot write the annotation pack "
                        f"({getattr(e, 'strerror', None) or e})") from None


def _fill_pack(tmp: Path, info: PackInfo, batch: Batch, items: list[Item],
               repeat_fraction: float, seed: int) -> None:
    with Store(tmp) as pack:
        bid = pack.create_batch(info.batch, [_pack_item(it) for it in items], kind=batch.kind,
                                source_key=info.source, settings={"pack": asdict(info)},
                                k=batch.k)
        who = pack.annotator(info.annotator, "human")
        # "assigned": merged into the project's session, it makes the annotator's progress
        # (workbench.agreement) count the items dealt to them, not the whole batch.
        sid, _ = pack.session(bid, who.id, {"seed": seed, "repeat_fraction": repeat_fraction,
                                            "repeat_gap": REPEAT_GAP, "assigned": len(items)})
        rng = random.Random(f"workbench-pack-order/{info.id}")
        with pack.transaction():
            for item_id in pack.item_ids(bid):
                ids = pack.answer_ids(item_id)
                rng.shuffle(ids)
                pack.record_shown_order(sid, item_id, False, ids)


# --- opening a pack -------------------------------------------------------------------------

def open_pack(path: str | Path) -> Pack:
    """Open a pack for ranking or merging; PackError (one line naming the file) if it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_SQLITE_MAGIC))
    except OSError as e:
        raise PackError(f"{path}: cannot read the annotation pack ({e.strerror or e})") from None
    if magic != _SQLITE_MAGIC or not _has_batches(path):
        raise PackError(f"{path}: not an annotation pack (not a workbench database)")
    try:
        store = Store(path)
    except sqlite3.DatabaseError as e:
        raise PackError(f"{path}: the annotation pack is damaged ({e})") from None
    try:
        return Pack(path, store, *_read_info(store, path))
    except (sqlite3.DatabaseError, PackError, StoreError) as e:
        store.close()
        if isinstance(e, sqlite3.DatabaseError):
            raise PackError(f"{path}: the annotation pack is damaged ({e})") from None
        raise


def _has_batches(path: Path) -> bool:
    """Whether an SQLite file has our batches table, read-only: opening someone's other
    database as a Store would add our tables to it."""
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                            "name = 'batches'").fetchone() is not None
    except sqlite3.DatabaseError:
        return False
    finally:
        conn.close()


def _read_info(store: Store, path: Path) -> tuple[PackInfo, int]:
    batches = store.batches()
    data = batches[0].settings.get("pack") if len(batches) == 1 else None
    if not isinstance(data, dict):
        raise PackError(f"{path}: not an annotation pack (a workbench database without a pack "
                        "description; open a project folder instead)")
    if not isinstance(data.get("format"), int) or data["format"] > PACK_FORMAT:
        raise PackError(f"{path}: made by a newer workbench (pack format {data.get('format')!r}); "
                        "update the workbench to open it")
    try:
        return PackInfo(**data), batches[0].id
    except TypeError as e:
        raise PackError(f"{path}: the pack description is damaged ({e})") from None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class PackGuidelines:
    """The guidelines a pack carries, as the ranking view asks for them (read-only: they are
    the teacher's; a pack records that its annotator has read them)."""
    editable = False

    def __init__(self, pack: Pack):
        self.pack = pack

    def read(self) -> str:
        return self.pack.info.guidelines or guidelines.DEFAULT_GUIDELINES

    def write(self, text: str) -> None:
        raise PackError("a pack's guidelines come from the project it was made from; "
                        "edit them there")

    def needs_showing(self, annotator: str, batch_id: int) -> bool:
        return self.pack.info.guidelines_seen != _digest(self.read())

    def mark_seen(self, annotator: str, batch_id: int) -> None:
        self.pack.info.guidelines_seen = _digest(self.read())
        self.pack.store.set_batch_settings(self.pack.batch_id, {"pack": asdict(self.pack.info)})
