"""Issue 16's counts, measured as the issue measured them "before": kills of a run while it saves
and prunes (broken runs), every broken checkpoint file through every loader's real CLI
(tracebacks, exits other than 2), and kills of the ranking CLIs (rankings lost, integrity).

    python bench/fault_counts.py                       # all three, defaults (~10 min, 2 cores)
    python bench/fault_counts.py --only kills --runs 50
    python bench/fault_counts.py --kill time           # plain kill -9 at a random moment instead

Kills: each run is a tiny pretrain (checkpoint_every=1, keep_last=2, 6 steps) SIGKILLed once,
then run again to the end. With strace (the default where installed) the kill lands inside a
randomly chosen unlink/rmdir/rename of the run's checkpoints/ (found by tracing one clean run:
66 points, saves and prunes alike); with --kill time it is a plain SIGKILL at a random moment
after the first checkpoint. A run is broken when the rerun does not complete with every listed
checkpoint loading whole.

Broken files: test_faults.py's CASES (14 ways to break a checkpoint) x the loaders its
test_each_broken_checkpoint_file_is_one_line_from_each_loader feeds them to, each as its own
process: `python -m engine.sft|sample|ppo|pretrain --run-dir`, `workbench chat` (python -m
ui.launcher, the entry point) and the app's model cache (python -c, the app has no CLI for it).

Ranking: `workbench rank --simulated` and a person's `workbench rank` (lines piped in) on one
project store, each SIGKILLed at a random moment; what was acknowledged before the kill (seen
committed by another connection, or shown as ranked on the person's screen) must be there after,
PRAGMA integrity_check must say ok, and the same command run again must finish the batch.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "tests", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import conftest  # noqa: E402  (tests/: the tiny LM fixture)
import test_faults as tf  # noqa: E402  (tests/: corpus, run folders, the broken-file CASES)
from engine import checkpoint as ckpt  # noqa: E402
from engine.runio import read_events  # noqa: E402
from engine.runlock import locked_by  # noqa: E402

WORKBENCH = [sys.executable, "-m", "ui.launcher"]       # what the `workbench` entry point runs
FS_CALLS = ("unlink", "unlinkat", "rmdir", "rename", "renameat", "renameat2")
STEPS = 6
CODE = ROOT        # where the processes under test run from (--code: another checkout, for "before")


class Dirs:
    """tmp_path_factory's one method, for the fixtures reused from tests/."""

    def __init__(self, root: Path):
        self.root, self.n = root, 0

    def mktemp(self, name: str) -> Path:
        self.n += 1
        path = self.root / f"{name}{self.n}"
        path.mkdir()
        return path


def fixture(fn):
    return getattr(fn, "__wrapped__", fn)


def stage(module: str, run_dir: Path, env: dict, pre: tuple = (), timeout: float = 600):
    return subprocess.run([*pre, sys.executable, "-m", f"engine.{module}", "--run-dir", str(run_dir)],
                          cwd=CODE, env=env, capture_output=True, text=True, timeout=timeout)


# --- (a) kills while a run saves and prunes --------------------------------------------------

def kill_points(run_dir: Path, env: dict) -> list[tuple[str, int]]:
    """(syscall, n): the n-th call of that syscall by the run's process touches checkpoints/.
    strace counts injections per thread, so n counts the main process's calls only."""
    trace = run_dir.parent / "trace.txt"
    r = stage("pretrain", run_dir, env, pre=("strace", "-f", "-qq", "-y", "-o", str(trace),
                                               "-e", "trace=" + ",".join(FS_CALLS)))
    assert r.returncode == 0, r.stderr[-2000:]
    main_pid, seen, points = None, {}, []
    for line in trace.read_text().splitlines():
        m = re.match(r"^(\d+)\s+(\w+)\((.*)", line)
        if not m or "resumed>" in line:
            continue
        pid, call, rest = m.groups()
        main_pid = main_pid or pid
        if pid != main_pid:
            continue
        seen[call] = seen.get(call, 0) + 1
        if "/checkpoints/" in rest:
            points.append((call, seen[call]))
    return points


def unloadable(run_dir: Path) -> int:
    n = 0
    for _step, path in ckpt.list_checkpoints(run_dir / "checkpoints"):
        try:
            ckpt.load_checkpoint(path)
        except Exception:
            n += 1
    return n


def measure_kills(root: Path, corpus: Path, env: dict, runs: int, how: str, rng: random.Random) -> dict:
    cfg = dict(max_steps=STEPS, keep_last=2, checkpoint_every=1)
    points = kill_points(tf.pretrain_dir(root / "count" / "run", corpus, **cfg), env) if how == "strace" else []
    c = dict(runs=runs, points=len(points), landed=0, tracebacks=0, unloadable_listed=0, stale_locks=0,
             restarted=0, broken=0, broken_detail=[])
    for i in range(runs):
        run_dir = tf.pretrain_dir(root / f"kill{i}", corpus, **cfg)
        if how == "strace":
            call, n = rng.choice(points)
            r = stage("pretrain", run_dir, env, pre=("strace", "-f", "-qq", "-o", os.devnull, "-e",
                                                    f"trace={call}", "-e", f"inject={call}:signal=SIGKILL:when={n}"))
            out, code, where = r.stdout + r.stderr, r.returncode, f"{call}#{n}"
        else:
            p = subprocess.Popen([sys.executable, "-m", "engine.pretrain", "--run-dir", str(run_dir)], cwd=CODE,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            deadline = time.monotonic() + 300
            while not ckpt.list_checkpoints(run_dir / "checkpoints") and p.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 1.5))            # a tiny run's remaining saves and prunes
            p.send_signal(signal.SIGKILL)
            out, code, where = p.communicate()[0], p.wait(), "time"
        landed = code != 0
        c["landed"] += landed
        c["tracebacks"] += "Traceback" in out
        c["unloadable_listed"] += unloadable(run_dir)
        c["stale_locks"] += locked_by(run_dir) is not None
        had = bool(ckpt.list_checkpoints(run_dir / "checkpoints"))
        r = stage("pretrain", run_dir, env)
        text = r.stdout + r.stderr
        events = read_events(run_dir)
        last_start = max(i for i, e in enumerate(events) if e["type"] == "start")
        first = next((e["step"] for e in events[last_start:] if "train/loss" in e), None)
        if landed and had and first == 1:
            c["restarted"] += 1
            c["broken_detail"].append(f"{where}: started over at step 1 though a checkpoint was listed")
        c["tracebacks"] += "Traceback" in text
        latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
        ok = (r.returncode == 0 and events[-1].get("status") == "completed" and latest is not None
              and latest.name == ckpt.step_dir_name(STEPS) and (run_dir / "summary.json").exists()
              and unloadable(run_dir) == 0)
        if not ok:
            c["broken"] += 1
            c["broken_detail"].append(f"{where}: rc {r.returncode}: {text.strip().splitlines()[-1:]}")
        shutil.rmtree(run_dir)
    return c


# --- (b) every broken checkpoint file through every loader's CLI ------------------------------

MODEL_CACHE = """
import sys
from workbench.model_cache import ModelCache, ModelCacheError
try:
    ModelCache(device="cpu").get(sys.argv[1])
except ModelCacheError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def stage_loader(module: str, run_dir: Path, config: dict, env: dict) -> tuple[int, str, str]:
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(config))
    r = stage(module, run_dir, env)
    events = read_events(run_dir) if (run_dir / "events.jsonl").exists() else []
    message = (events[-1].get("error") or "") if events else ""
    if (run_dir / "checkpoints").exists() or (run_dir / "samples.jsonl").exists():
        message += "\n(work was done)"                  # counted as a failed refusal below
    return r.returncode, r.stdout + r.stderr, message


def measure_files(root: Path, art: dict, env: dict, log) -> dict:
    a = art["root"]
    c = {"cases": 0, "tracebacks": 0, "exit_not_2": 0, "not_one_line_naming_file": 0,
         "chat_cases": 0, "chat_tracebacks": 0, "detail": []}
    for case, (name, fault, words) in tf.CASES.items():
        base = root / re.sub(r"\W+", "-", case)
        base.mkdir()
        tries = []                                     # (loader, bad file, thunk -> (rc, all output, message))
        if name in (tf.M, "state.json"):
            lm = base / "lm"
            bad = tf._copy_run(art["lm"], lm, fault, name)
            rm = base / "rm"
            bad_rm = tf._copy_run(art["rm"], rm, fault, name)
            ppo = {"device": "cpu", "prompts": [str(a / "prompts.txt")], "steps": 1, "rollout_batch_size": 2,
                   "minibatch_size": 2, "max_new_tokens": 4}
            tries += [
                ("sft init", bad, lambda: stage_loader("sft", base / "sft", {
                    "device": "cpu", "init": str(lm), "data": [str(a / "sft.jsonl")], "max_steps": 2,
                    "batch_size": 2, "eval_every": 2, "eval_batches": 1, "sample_every": 0}, env)),
                ("sample", bad, lambda: stage_loader("sample", base / "sample", {
                    "device": "cpu", "checkpoint": str(lm), "prompts": [str(a / "prompts.txt")], "k": 2,
                    "max_new_tokens": 4}, env)),
                ("ppo policy", bad, lambda: stage_loader("ppo", base / "ppo1", {
                    **ppo, "policy": str(lm), "reward_model": str(art["rm"])}, env)),
                ("ppo reward_model", bad_rm, lambda: stage_loader("ppo", base / "ppo2", {
                    **ppo, "policy": str(art["lm"]), "reward_model": str(rm)}, env)),
                ("workbench chat", bad, lambda: cli([*WORKBENCH, "chat", "--checkpoint", str(bad.parent)], env)),
                ("app model cache", bad, lambda: cli([sys.executable, "-c", MODEL_CACHE, str(lm)], env)),
            ]
        run = base / "resume"
        bad_run = tf._copy_run(art["pretrain"], run, fault, name)
        tf.set_config(run, max_steps=4)
        before = sorted(p.name for p in (run / "checkpoints").iterdir())

        def resume(run=run, before=before):
            r = stage("pretrain", run, env)
            events = read_events(run)
            message = events[-1].get("error") or ""
            if sorted(p.name for p in (run / "checkpoints").iterdir()) != before:
                message += "\n(work was done)"
            return r.returncode, r.stdout + r.stderr, message
        tries.append(("resume", bad_run, resume))
        for loader, bad_file, go in tries:
            rc, out, message = go()
            c["cases"] += 1
            tb, not2 = "Traceback" in out, rc != 2
            named = str(bad_file) in message and "\n" not in message.strip() and words in message
            c["tracebacks"] += tb
            c["exit_not_2"] += not2
            c["not_one_line_naming_file"] += not named
            if loader == "workbench chat":
                c["chat_cases"] += 1
                c["chat_tracebacks"] += tb
            if tb or not2 or not named:
                c["detail"].append(f"{case} / {loader}: rc {rc}: {(message or out).strip()[-300:]!r}")
        log(f"  {case}: {len(tries)} loader(s)")
        shutil.rmtree(base)
    return c


def cli(argv: list[str], env: dict) -> tuple[int, str, str]:
    r = subprocess.run(argv, cwd=CODE, env=env, capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    # A CLI's message is its stderr, one line; nothing that reads as an error on stdout.
    return r.returncode, r.stdout + r.stderr, r.stderr.strip()


# --- (c) kills of the ranking CLIs ------------------------------------------------------------

def rankings(project: Path, batch: int) -> set[int]:
    con = sqlite3.connect(f"file:{project / 'workbench.db'}?mode=ro", uri=True, timeout=30)
    try:
        return {r[0] for r in con.execute(
            "SELECT r.id FROM rankings r JOIN items i ON i.id = r.item_id "
            "WHERE i.batch_id = ? AND r.withdrawn_at IS NULL", (batch,))}
    finally:
        con.close()


def integrity(project: Path) -> str:
    con = sqlite3.connect(project / "workbench.db", timeout=30)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def measure_ranking(root: Path, env: dict, kills: int, rng: random.Random, items: int) -> dict:
    from test_store_concurrency import make_batch
    from workbench.store import Store
    project = root / "project"
    project.mkdir()
    (project / "workbench.toml").write_text('name = "faults"\n')
    c = dict(kills=0, landed=0, simulated=0, human=0, acknowledged=0, lost=0, integrity_failures=0, tracebacks=0,
             resume_failures=0)
    for i in range(kills):
        human = i % 2 == 1
        n = items if human else 3 * items              # the simulated annotator is that much faster
        with Store.for_project(project) as s:
            batch = make_batch(s, n, f"b{i}")
        argv = [*WORKBENCH, "rank", "--project", str(project), "--batch", str(batch)]
        argv += ["--annotator", "alice"] if human else ["--simulated"]
        p = subprocess.Popen(argv, cwd=CODE, env=env, stdin=subprocess.PIPE if human else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        shown = [0]                                    # the person's screen: "[N/M ranked ...]"
        out = []

        def read(p=p):
            for line in p.stdout:
                out.append(line)
                m = re.match(r"\[(\d+)/\d+ ranked", line.strip())
                if m:
                    shown[0] = int(m.group(1))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        if human:
            def feed(p=p):
                try:
                    for j in range(n):
                        p.stdin.write(("1 2 3 4" if j % 2 else "4 3=2 1") + "\n")
                        p.stdin.flush()
                        time.sleep(0.002)
                except (BrokenPipeError, ValueError, OSError):
                    pass
            threading.Thread(target=feed, daemon=True).start()
        time.sleep(rng.uniform(0.2, 2.5))               # start-up, opening, ranking, all within reach
        seen = rankings(project, batch) if (project / "workbench.db").exists() else set()
        acknowledged = max(shown[0], len(seen))
        c["landed"] += p.poll() is None and len(seen) < n
        p.send_signal(signal.SIGKILL)
        p.wait()
        reader.join(10)
        err = p.stderr.read()
        c["kills"] += 1
        c["human" if human else "simulated"] += 1
        c["tracebacks"] += "Traceback" in err
        after = rankings(project, batch)
        c["acknowledged"] += acknowledged
        c["lost"] += len(seen - after) + max(0, shown[0] - len(after))
        c["integrity_failures"] += integrity(project) != "ok"
        # The same command again finishes the batch: nothing doubled, nothing missing.
        again = subprocess.run(argv, cwd=CODE, env=env, capture_output=True, text=True, timeout=600,
                               input="".join("1 2 3 4\n" for _ in range(n)) + "q\n" if human else None)
        if again.returncode != 0 or "Traceback" in again.stderr or len(rankings(project, batch)) != n:
            c["resume_failures"] += 1
    return c


# --- the table --------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["kills", "files", "ranking"], action="append",
                    help="measure only this part (repeatable; default all three)")
    ap.add_argument("--runs", type=int, default=20, help="runs killed while saving/pruning (default 20)")
    ap.add_argument("--kill", choices=["strace", "time"], default=None,
                    help="strace: inside a random checkpoint syscall (default where strace is installed); "
                         "time: plain SIGKILL at a random moment")
    ap.add_argument("--rank-kills", type=int, default=20, help="kills of the ranking CLIs (default 20)")
    ap.add_argument("--rank-items", type=int, default=500, help="items in a person's batch; the simulated annotator gets 3x (default 500)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--verbose", action="store_true", help="list every failure")
    ap.add_argument("--code", type=Path, default=ROOT,
                    help="run the CLIs under test from this checkout (e.g. a git worktree of the code "
                         "before the fixes, to measure 'before'); the harness stays this one")
    args = ap.parse_args(argv)
    global CODE
    CODE = args.code.resolve()
    parts = args.only or ["kills", "files", "ranking"]
    how = args.kill or ("strace" if shutil.which("strace") else "time")
    if how == "strace" and not shutil.which("strace"):
        ap.error("strace is not installed (apt-get install strace), or use --kill time")
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="fault_counts-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CODE), os.environ.get("PYTHONPATH", "")]),
           "WORKBENCH_CACHE_DIR": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    os.environ["WORKBENCH_CACHE_DIR"] = env["WORKBENCH_CACHE_DIR"]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    rows, details = [], []
    try:
        dirs = Dirs(root)
        corpus = fixture(tf.corpus)(dirs) if {"kills", "files"} & set(parts) else None
        if "kills" in parts:
            t = time.monotonic()
            log(f"(a) {args.runs} runs killed while saving/pruning ({how}) ...")
            k = measure_kills(root, corpus, env, args.runs, how, rng)
            where = f", {k['points']} kill points" if how == "strace" else ""
            rows += [(f"(a) runs SIGKILLed in a save/prune ({how}{where})", k["runs"]),
                     ("    kills that landed (run did not finish)", k["landed"]),
                     ("    runs left unresumable (rerun fails)", k["broken"]),
                     ("    unloadable checkpoints listed after a kill", k["unloadable_listed"]),
                     ("    run folders left locked by the dead process", k["stale_locks"]),
                     ("    reruns that started over though a checkpoint was there", k["restarted"]),
                     ("    outputs with a traceback (killed run or rerun)", k["tracebacks"]),
                     ("    seconds", round(time.monotonic() - t))]
            details += k["broken_detail"]
        if "files" in parts:
            t = time.monotonic()
            log(f"(b) {len(tf.CASES)} broken-file cases x their loaders, one process each ...")
            art = fixture(tf.artifacts)(fixture(conftest.tiny_lm_ckpt)(dirs), corpus, dirs)
            (root / "files").mkdir()
            f = measure_files(root / "files", art, env, log)
            rows += [(f"(b) broken-file cases x loaders ({len(tf.CASES)} cases)", f["cases"]),
                     ("    outputs with a traceback", f["tracebacks"]),
                     ("    exits other than 2", f["exit_not_2"]),
                     ("    message not one line naming the file (or work done)", f["not_one_line_naming_file"]),
                     (f"    workbench chat: tracebacks in {f['chat_cases']}", f["chat_tracebacks"]),
                     ("    seconds", round(time.monotonic() - t))]
            details += f["detail"]
        if "ranking" in parts:
            t = time.monotonic()
            log(f"(c) {args.rank_kills} kills of workbench rank (simulated and a person) ...")
            r = measure_ranking(root, env, args.rank_kills, rng, args.rank_items)
            rows += [(f"(c) ranking CLIs SIGKILLed ({r['simulated']} --simulated, {r['human']} person)", r["kills"]),
                     ("    kills that landed mid-batch", r["landed"]),
                     ("    rankings acknowledged before the kills", r["acknowledged"]),
                     ("    acknowledged rankings lost", r["lost"]),
                     ("    PRAGMA integrity_check failures", r["integrity_failures"]),
                     ("    tracebacks", r["tracebacks"]),
                     ("    reruns that did not finish the batch exactly", r["resume_failures"]),
                     ("    seconds", round(time.monotonic() - t))]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  count")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>5}")
    if details:
        print(f"\n{len(details)} failure(s):" if args.verbose else f"\n{len(details)} failure(s) (--verbose lists them)")
        if args.verbose:
            print("\n".join(f"  {d}" for d in details))
    return 0


if __name__ == "__main__":
    sys.exit(main())
