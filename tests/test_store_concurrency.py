"""Two processes on one project store: a simulated annotator writing chunk after chunk while a
person opens the store, lists the batches and ranks; a write lock held past the timeout; a
full disk. Nothing may fail, nothing acknowledged may be lost, and what cannot be done is one
line, never a traceback."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench import annotate_cli
from workbench.annotation import AnnotationSession
from workbench.review import batch_progress
from workbench.store import DB_NAME, DiskFull, Store, StoreBusy

ROOT = Path(__file__).resolve().parents[1]

# Ranks the batch again and again under a new simulated name each round, so it keeps writing
# for as long as the test needs, until the STOP file appears; prints how many it ranked.
SIMULATOR = """
import sys
from itertools import count
from pathlib import Path
from workbench.simulated import rank_batch
from workbench.store import Store
project, batch = Path(sys.argv[1]), int(sys.argv[2])
stop = project / "STOP"
n = 0
with Store.for_project(project) as store:
    for round in count():
        n += rank_batch(store, batch, f"sim-{round}", cancelled=stop.exists)
        if stop.exists():
            break
print(n)
"""


def make_batch(store: Store, n: int, name: str) -> int:
    return store.create_batch(name, [
        {"prompt": f"What is {i} + {i}?", "answers": [{"text": str(2 * i + d)} for d in range(4)]}
        for i in range(n)], k=4)


def wait_for(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def simulated_count(project: Path) -> int:
    with Store.for_project(project) as s:
        return len(s.rankings(include_human=False))


def test_a_person_ranks_while_a_simulated_annotator_writes(tmp_path, capsys):
    (tmp_path / "workbench.toml").write_text("")
    with Store.for_project(tmp_path) as s:
        sim_batch = make_batch(s, 300, "simulated")
        human_batch = make_batch(s, 40, "human")
    sim = subprocess.Popen([sys.executable, "-c", SIMULATOR, str(tmp_path), str(sim_batch)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sim.poll() is not None or simulated_count(tmp_path) > 0,
                 "the simulated annotator's first commit")
        assert sim.poll() is None, sim.communicate()
        before = simulated_count(tmp_path)
        acknowledged = []
        batches = argparse.Namespace(command="batches", project=tmp_path)
        for i in range(40):
            # Each ranking as a person makes it: a fresh open, the batch list, the next item.
            with Store.for_project(tmp_path) as store:
                assert [b.batch.id for b in batch_progress(store)] == [sim_batch, human_batch]
                session = AnnotationSession(store, human_batch, "alice", kind="human")
                assert session.current() is not None
                acknowledged.append(session.submit("1 2=3 4" if i % 2 else "4 3 2 1"))
            if i % 10 == 0:   # and the read-only command, as another terminal would run it
                assert annotate_cli._guarded(annotate_cli.cmd_batches)(batches) == 0
        # The writer was busy the whole time (it only stops on STOP), and it got on with it.
        assert sim.poll() is None
        wait_for(lambda: simulated_count(tmp_path) > before, "the simulated annotator to go on")
    finally:
        (tmp_path / "STOP").touch()
        out, err = sim.communicate(timeout=120)
    assert sim.returncode == 0, err
    assert "Traceback" not in capsys.readouterr().err
    with Store.for_project(tmp_path) as store:
        human = store.rankings(include_simulated=False)
        assert sorted(r.id for r in human) == sorted(acknowledged)
        assert len(store.rankings(include_human=False)) == int(out)


def test_a_write_lock_held_past_the_timeout_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "workbench.toml").write_text("")
    with Store.for_project(tmp_path) as s:
        batch = make_batch(s, 3, "b")
    holder = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        # Opening and reading need no write lock.
        with Store(tmp_path / DB_NAME, timeout_s=0.2) as store:
            assert [b.id for b in store.batches()] == [batch]
            with pytest.raises(StoreBusy, match=r"workbench\.db is busy: another process kept "
                                                r"it locked for 0\.2 s"):
                AnnotationSession(store, batch, "alice")
        monkeypatch.setattr(Store, "for_project",
                            classmethod(lambda cls, d: cls(Path(d) / DB_NAME, timeout_s=0.2)))
        args = argparse.Namespace(command="rank", project=tmp_path, batch=batch, annotator="bob",
                                  simulated=False, seed=None, repeats=None)
        assert annotate_cli._guarded(annotate_cli.cmd_rank)(args) == 2
    finally:
        holder.rollback()
        holder.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "workbench rank: " in err and "is busy" in err, err


# --- a full disk -------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: only root may mount one, so the test is skipped for anyone else."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(folder: Path, limit: int | None = None) -> Path:
    """A file that takes the disk's free space (or `limit` bytes of it)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while limit is None or os.fstat(fd).st_size < limit:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_keeps_every_acknowledged_ranking_and_says_so(small_disk):
    full = re.escape("disk full: ") + r"\d+\.\d" + re.escape(f" MB free in {small_disk} (")
    with Store.for_project(small_disk) as store:
        batch = make_batch(store, 1000, "b")
    filler = fill(small_disk, limit=1 << 20)
    with Store.for_project(small_disk) as store:
        session = AnnotationSession(store, batch, "alice")
        acknowledged = []
        with pytest.raises(DiskFull) as e:
            while True:     # long notes fill the disk within a few dozen rankings
                acknowledged.append(session.submit("1 2 3 4", note="n" * 4000))
        assert len(acknowledged) > 1
        assert re.match(full, str(e.value)) and "\n" not in str(e.value), str(e.value)
    filler.unlink()
    with Store.for_project(small_disk) as store:
        assert [r.id for r in store.rankings()] == acknowledged


def test_opening_the_store_on_a_full_disk_is_one_line(small_disk, capsys):
    (small_disk / "workbench.toml").write_text("")
    with Store.for_project(small_disk) as store:
        make_batch(store, 100, "b")
    # Closed, the database's -shm file is gone, and opening must make it again.
    assert not (small_disk / f"{DB_NAME}-shm").exists()
    filler = fill(small_disk)
    with pytest.raises(DiskFull, match=f"^disk full: 0.0 MB free in {re.escape(str(small_disk))} "):
        Store.for_project(small_disk)
    args = argparse.Namespace(command="batches", project=small_disk)
    assert annotate_cli._guarded(annotate_cli.cmd_batches)(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"workbench batches: disk full: 0.0 MB free in {small_disk} ")
    assert err.count("\n") == 1
    filler.unlink()
    with Store.for_project(small_disk) as store:
        assert len(store.batches()) == 1
