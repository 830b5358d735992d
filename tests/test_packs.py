"""Annotation packs: a batch dealt to a class, ranked in the real view on each pack (one killed
mid-ranking), merged back twice, agreement computed by hand, a reward model trained on it.

Checks of what a merge stored read the project's store through a connection of their own.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest

from workbench.agreement import agreement, figures as all_figures
from workbench.annotation import AnnotationSession
from workbench.pack_merge import merge_packs
from workbench.packs import PackError, assign, export_packs, open_pack
from workbench.preferences import write_rm_dataset
from workbench.store import InputError, Store

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "rank_pack.py"
NAMES = ["ana", "ben", "chloe"]
N_ITEMS, K = 6, 3
WORDS = "apple river stone cloud green music paper light".split()


def make_project(folder: Path, name: str = "class batch", n: int = N_ITEMS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "workbench.toml").write_text("")
    with Store.for_project(folder) as store:
        store.create_batch(name, [
            {"prompt": f"Name a {WORDS[i % 8]} thing ({i}).",
             "answers": [{"text": f"{WORDS[(i + j) % 8]} answer {j} {'good' if j == 0 else 'bad'}",
                          "meta": {"checkpoint": "/secret/run/ckpt", "seed": j}}
                         for j in range(K)]}
            for i in range(n)], k=K)
    return folder


def plan_for(name: str) -> dict[str, list[list[int]]]:
    """ana and ben rank every item 0 > 1 > 2; chloe ranks every item the other way round."""
    order = [[2], [1], [0]] if name == "chloe" else [[0], [1], [2]]
    return {str(i): order for i in range(N_ITEMS)}


def rank_in_view(pack: Path, tmp: Path, stop_after: int | None = None) -> list[int]:
    """Rank a pack through the real view in a process of its own; with stop_after, kill it with
    SIGKILL while it is typing the next ranking. Returns the positions it acknowledged."""
    plan = tmp / f"{pack.stem}.plan.json"
    plan.write_text(json.dumps(plan_for(pack.stem.rsplit("-", 1)[1])))
    cmd = [sys.executable, str(SCRIPT), str(pack), str(plan)]
    if stop_after is not None:
        cmd.append(str(stop_after))
    acked = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT) as proc:
        for line in proc.stdout:
            if line.startswith("ACK"):
                acked.append(int(line.split()[1]))
            elif line.startswith("TYPING"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=120)
        err = proc.stderr.read()
    assert proc.returncode == (-signal.SIGKILL if stop_after is not None else 0), err
    return acked


def positions_in_project(project: Path) -> Counter:
    """(annotator, position) -> how many active rankings the project holds."""
    with Store.for_project(project) as store:
        pos = {it.id: it.position for b in store.batches() for it in store.items(b.id)}
        return Counter((r.annotator, pos[r.item_id]) for r in store.rankings())


def test_dealing_gives_each_item_overlap_people_and_balances_the_load():
    for n, names, overlap in [(6, NAMES, 2), (25, list("abcdefg"), 3), (5, ["x", "y"], 2)]:
        dealt = assign(n, names, overlap, seed=1)
        assert all(len(set(who)) == overlap for who in dealt)
        load = Counter(a for who in dealt for a in who)
        assert max(load.values()) - min(load.values()) <= 1
    pairs = Counter(p for who in assign(30, list("abcd"), 2) for p in combinations(sorted(who), 2))
    assert len(pairs) == 6        # every two annotators share items, so every pair has agreement


def test_a_pack_holds_only_its_items_their_orders_and_the_guidelines(tmp_path):
    project = make_project(tmp_path / "p")
    (project / "guidelines.md").write_text("# Our class rules\nPrefer the good answer.\n")
    with Store.for_project(project) as store:
        paths = export_packs(store, project, "class batch", NAMES, 2, tmp_path / "out")
        with pytest.raises(PackError, match="exists and may hold rankings"):
            export_packs(store, project, "class batch", NAMES, 2, tmp_path / "out")
    assert [p.name for p in paths] == [f"class_batch-{n}.wbpack" for n in NAMES]
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    for path in paths:
        with open_pack(path) as pack:
            store = pack.store
            assert [b.name for b in store.batches()] == ["class batch"]
            assert [a.name for a in store.annotators()] == [pack.info.annotator]
            items = store.items(pack.batch_id)
            assert len(items) == 4 and store.rankings() == [] and store.run_rows() == []
            assert all(set(a.meta) == {"source_answer"} for it in items for a in it.answers)
            session, _ = store.session(pack.batch_id, store.annotator(pack.info.annotator).id)
            orders = [store.shown_order(session, it.id, False) for it in items]
            assert all(sorted(o) == it.answer_ids for o, it in zip(orders, items))
            assert any(o != it.answer_ids for o, it in zip(orders, items))   # shuffled
            assert "Prefer the good answer." in pack.info.guidelines


def test_a_class_ranks_in_packs_one_killed_and_merges_twice(tmp_path, tiny_lm_ckpt):
    project = make_project(tmp_path / "p")
    with Store.for_project(project) as store:
        paths = export_packs(store, project, "class batch", NAMES, 2, tmp_path / "packs")
    acked = {"ana": rank_in_view(paths[0], tmp_path), "ben": rank_in_view(paths[1], tmp_path),
             "chloe": rank_in_view(paths[2], tmp_path, stop_after=2)}
    assert [len(acked[n]) for n in NAMES] == [4, 4, 2]
    with open_pack(paths[2]) as pack:     # the kill lost nothing acknowledged, kept nothing typed
        pos = {it.id: it.meta["position"] for it in pack.store.items(pack.batch_id)}
        assert sorted(pos[r.item_id] for r in pack.store.rankings()) == sorted(acked["chloe"])
    for _ in range(2):
        with Store.for_project(project) as store:
            results = merge_packs(store, paths)
    assert [(r.added, r.already, r.conflicts) for r in results] == [(0, 4, []), (0, 4, []),
                                                                   (0, 2, [])]
    want = Counter((n, p) for n in NAMES for p in acked[n])
    assert positions_in_project(project) == want          # every acknowledged one, exactly once

    acked["chloe"] += rank_in_view(paths[2], tmp_path)    # she resumes where the kill left her
    with Store.for_project(project) as store:
        results = merge_packs(store, paths)
        assert [(r.added, r.already) for r in results] == [(0, 4), (0, 4), (2, 2)]
        figures = agreement(store)
        more = all_figures(store)
    assert positions_in_project(project) == Counter((n, p) for n in NAMES for p in acked[n])
    # By hand. Each item is ranked by two of the three; with loads of 4 each, every pair shares
    # 2 items. ana and ben agree on all 3 answer pairs of their 2 items (6 comparisons agree);
    # chloe reverses every pair of her 4 items (12 disagree): agreement 6 / 18.
    # Alpha (nominal): 18 units of two values; 6 units (+1, +1), 12 units (+1, -1). Coincidences
    # o(+,+) = 12, o(+,-) = o(-,+) = 12, so n(+) = 24, n(-) = 12, n = 36.
    # D_o = 24 / 36; D_e = 2 * 24 * 12 / (36 * 35); alpha = 1 - D_o / D_e = 1 - 840/576 = -11/24.
    assert figures.items == 6 and figures.comparisons == 18
    assert figures.agreement == pytest.approx(6 / 18)
    assert figures.alpha == pytest.approx(-11 / 24)
    # Kendall's W of two rankings: 1 when equal; reversed, every answer's rank sum is 4 = the
    # mean m(K+1)/2, so S = 0 and W = 0. Mean over the 6 items: 2/6. Every pair is strict, so
    # the human-human ceiling is the agreement, 6/18.
    assert more.kendall_w == pytest.approx(1 / 3) and more.ceiling == pytest.approx(1 / 3)
    pairs = {p.names: p.tally.agreement for p in more.pairs}
    assert pairs == {("ana", "ben"): 1.0, ("ana", "chloe"): 0.0, ("ben", "chloe"): 0.0}
    rows = {a.name: (a.done, a.assigned, a.total, a.tally.agreement) for a in more.annotators}
    assert rows == {"ana": (4, 4, 6, 0.5), "ben": (4, 4, 6, 0.5), "chloe": (4, 4, 6, 0.0)}
    assert [it.agreement for it in more.items] == [0.0] * 4 + [1.0] * 2     # most disagreed first

    from engine.reward import RewardConfig, run
    from engine.config import from_dict
    with Store.for_project(project) as store:
        n = write_rm_dataset(store, tmp_path / "rm.jsonl", include_simulated=False)
    assert n == 12
    cfg = from_dict(RewardConfig, dict(init=str(tiny_lm_ckpt), data=[str(tmp_path / "rm.jsonl")],
                                       batch_size=4, lr=3e-3, epochs=0, max_steps=6, warmup_steps=1,
                                       eval_every=3, checkpoint_every=6, log_every=1, device="cpu",
                                       val_fraction=0.2))
    events = []
    assert run(cfg, tmp_path / "rm", events.append) == "completed"
    assert any("train rankings" in e.get("message", "") for e in events if e["type"] == "log")


def _rank_all(path: Path, order=((0,), (1,), (2,))) -> None:
    with open_pack(path) as pack:
        s = AnnotationSession(pack.store, pack.batch_id, pack.info.annotator)
        while (cur := s.current()) is not None:
            by_idx = {a.id: a.idx for a in pack.store.item(cur.item_id).answers}
            number = {by_idx[a.answer_id]: a.number for a in cur.answers}
            s.submit([[number[i] for i in g] for g in order])


def test_a_merge_follows_undo_and_reranking_in_the_pack_and_reports_conflicts(tmp_path):
    project = make_project(tmp_path / "p", n=3)
    with Store.for_project(project) as store:
        (path,) = export_packs(store, project, "class batch", ["ana"], 1, tmp_path / "packs")
        _rank_all(path)
        assert merge_packs(store, [path])[0].added == 3
        with open_pack(path) as pack:          # ana takes her last two rankings back
            s = AnnotationSession(pack.store, pack.batch_id, "ana")
            s.undo()
            s.undo()
            s.submit([[3], [2], [1]])          # and ranks the second one again, differently
        res = merge_packs(store, [path])[0]
        assert (res.added, res.updated, res.withdrawn, res.already) == (0, 1, 1, 1)
        active = store.rankings(include_simulated=False)
        assert len(active) == 2 and len(store.rankings(include_withdrawn=True)) == 4
        # ana also ranks the open item in the project itself, differently from the pack
        session = AnnotationSession(store, store.batches()[0].id, "ana")
        open_item = next(it for it in store.items(1) if it.id not in {r.item_id for r in active})
        session.store.add_ranking(session.id, open_item.id, [[a] for a in open_item.answer_ids[::-1]])
        _rank_all(path)
        res = merge_packs(store, [path])[0]
        assert res.added == 0 and len(res.conflicts) == 1 and "kept the project's" in res.conflicts[0]
        assert "item " in res.conflicts[0] and path.name in res.conflicts[0]


def test_packs_of_another_batch_or_not_packs_are_refused_by_name(tmp_path):
    a = make_project(tmp_path / "a")
    b = make_project(tmp_path / "b")                 # the same batch name, made separately
    c = make_project(tmp_path / "c", name="other batch")
    with Store.for_project(a) as store:
        paths = export_packs(store, a, 1, NAMES[:2], 2, tmp_path / "packs")
    _rank_all(paths[0])
    junk = tmp_path / "notes.wbpack"
    junk.write_text("not a database\n")
    for project, match in [(b, "made from another batch named 'class batch'"),
                           (c, "made from batch 'class batch' of project 'a', which this project "
                               "does not have")]:
        with Store.for_project(project) as store:
            with pytest.raises(InputError) as e:
                merge_packs(store, [paths[0], junk])
            assert store.rankings() == []            # nothing merged
        assert match in str(e.value) and f"{junk}: not an annotation pack" in str(e.value)


def test_cli_exports_merges_and_refuses_with_one_line(tmp_path):
    project = make_project(tmp_path / "p")

    def wb(*args):
        return subprocess.run([sys.executable, "-m", "workbench.cli", *map(str, args)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)

    out = wb("pack", "export", "--project", project, "--batch", "class batch",
             "--annotators", "ana,ben,chloe", "--overlap", "2")
    assert out.returncode == 0, out.stderr
    assert "class_batch-ana.wbpack  (ana: 4 items)" in out.stdout
    packs = sorted((project / "packs").glob("*.wbpack"))
    _rank_all(packs[0])
    for expect in ("ana on 'class batch': 4 added", "ana on 'class batch': 0 added, 4 already"):
        out = wb("pack", "merge", "--project", project, *packs)
        assert out.returncode == 0 and expect in out.stdout, out.stderr
    bad = wb("pack", "export", "--project", project, "--batch", "9", "--annotators", "a",
             "--overlap", "2")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no batch '9'" in bad.stderr
    bad = wb("pack", "open", project / "workbench.db")
    assert bad.returncode == 2 and "not an annotation pack" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_batch_is_found_by_its_id_before_a_name_that_looks_like_one(tmp_path):
    from workbench.packs import find_batch
    project = make_project(tmp_path / "p")                       # batch 1 'class batch'
    with Store.for_project(project) as store:
        named_one = store.create_batch("1", [{"prompt": "q", "answers": [{"text": "a"}, {"text": "b"}]}])
        assert find_batch(store, 1).name == "class batch" and find_batch(store, "1").id == 1
        assert find_batch(store, "class batch").id == 1
        assert find_batch(store, str(named_one)).name == "1"       # its own id still finds it
        for blank in ("", "   "):
            with pytest.raises(ValueError, match="not blank"):
                store.create_batch(blank, [{"prompt": "q", "answers": [{"text": "a"}, {"text": "b"}]}])


def test_a_pack_handed_back_unranked_says_so_and_lists_its_annotator(tmp_path):
    project = make_project(tmp_path / "p", n=3)
    with Store.for_project(project) as store:
        ana, bo = export_packs(store, project, "class batch", ["ana", "bo"], 1, tmp_path / "packs")
        AnnotationSession(store, store.batches()[0].id, "teacher")
        _rank_all(bo)
        res_ana, res_bo = merge_packs(store, [ana, bo])
        # Whoever is at this machine is still the one the Rank page and Compare go on with.
        assert store.recent_session("human") == ("teacher", store.batches()[0].id)
        assert res_ana.untouched and res_ana.line().endswith("nothing ranked in it yet, nothing merged")
        assert not res_bo.untouched and res_bo.added > 0 and "added" in res_bo.line()
        assert {a.name for a in store.annotators()} >= {"ana", "bo"}     # ana: 0 of N


def test_an_out_folder_that_cannot_be_written_is_named_before_any_work(tmp_path, monkeypatch,
                                                                        capsys):
    """Not blamed on the project's database: one line naming --out and why, exit 2."""
    import os
    import shutil
    from tests.test_annotate_cli import wb
    project = make_project(tmp_path / "p")
    (tmp_path / "afile").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:       # root writes through permissions; an immutable folder stops it
        if not shutil.which("chattr") or os.system(f"chattr +i {locked} 2>/dev/null"):
            pytest.skip("needs chattr +i as root")
    else:
        locked.chmod(0o500)
    try:
        for out, why in ((tmp_path / "afile" / "sub", f"{tmp_path}/afile is a file, not a folder"),
                         (locked, f"cannot write into {locked} ("),
                         (locked / "new", f"cannot write into {locked} (")):
            rc, _, err = wb(monkeypatch, capsys, "pack", "export", "--project", project, "--batch",
                            1, "--annotators", "a,b", "--out", out)
            assert rc == 2 and err.startswith(f"workbench pack export: --out {out}: {why}"), err
            assert err.count("\n") == 1 and "workbench.db" not in err
    finally:
        os.system(f"chattr -i {locked} 2>/dev/null") if os.geteuid() == 0 else locked.chmod(0o700)


def test_an_export_killed_half_way_leaves_no_finished_pack_and_runs_again(tmp_path):
    project = make_project(tmp_path / "p", n=3)
    out = tmp_path / "packs"
    # SIGKILL while the second pack is being built, as a kill from outside would land.
    script = (
        "import os, signal, sys\n"
        "from workbench import packs\n"
        "from workbench.store import Store\n"
        "real, built = packs._fill_pack, []\n"
        "def fill(*a, **k):\n"
        "    if built:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    built.append(real(*a, **k))\n"
        "packs._fill_pack = fill\n"
        "with Store.for_project(sys.argv[1]) as store:\n"
        "    packs.export_packs(store, sys.argv[1], 'class batch', ['ana', 'bea'], 1, sys.argv[2])\n")
    proc = subprocess.run([sys.executable, "-c", script, str(project), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not list(out.glob("*.wbpack")) and list(out.glob("*.wbpack.part"))
    with Store.for_project(project) as store:
        paths = export_packs(store, project, "class batch", ["ana", "bea"], 1, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)     # no .part left
    with open_pack(paths[1]) as pack:
        assert pack.info.annotator == "bea"
