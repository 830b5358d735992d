"""Faults a run folder must survive (issue 16): a kill at each phase of a save and a prune, two
processes on one folder, every kind of broken checkpoint file fed to every loader, a full disk,
torn event lines. Each ends with the run resumable and one line for the user, never a traceback.

The kills use engine.fsutil's fault points (WORKBENCH_FAULT=phase[@N]: the process SIGKILLs
itself there), so no test depends on timing. WORKBENCH_FAULTS_LONG=1 adds every phase at
several counts, and kills injected by strace into every unlink, rmdir and rename of a run.
"""
import importlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import TINY_WORDS
from engine import checkpoint as ckpt
from engine.config import from_dict
from engine.pretrain import PretrainConfig
from engine.runio import EventLog, read_events, stage_main
from engine.runlock import locked_by

ROOT = Path(__file__).resolve().parents[1]
LONG = os.environ.get("WORKBENCH_FAULTS_LONG") == "1"
long_only = pytest.mark.skipif(not LONG, reason="the long fault variant: WORKBENCH_FAULTS_LONG=1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from engine.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    words = "the cat sat on a mat and the dog ran to the red ball".split()
    lines = [" ".join(words[j] for j in torch.randint(0, len(words), (8,), generator=g).tolist())
             + f". count {i % 10}." for i in range(1200)]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    train_tokenizer([root / "text.txt"], vocab_size=300, min_frequency=2).save(root / "tokenizer.json")
    return root


def pretrain_dir(path: Path, corpus: Path, **kw) -> Path:
    cfg = dict(tokenizer=str(corpus / "tokenizer.json"), inputs=[str(corpus / "text.txt")],
               model={"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2, "d_ff": 64, "max_seq_len": 32},
               seq_len=32, batch_size=4, max_steps=8, lr=3e-3, warmup_steps=1, eval_every=4, eval_batches=1,
               sample_every=0, checkpoint_every=1, keep_last=1, log_every=1, device="cpu")
    cfg.update(kw)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def set_config(run_dir: Path, **kw) -> None:
    cfg = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**cfg, **kw}))


def run_main(module: str, run_dir: Path, capsys) -> tuple[int, str]:
    """A stage as `python -m engine.<module>` runs it, in this process."""
    rc = importlib.import_module(f"engine.{module}").main(["--run-dir", str(run_dir), "--log-format", "json"])
    out = capsys.readouterr()
    return rc, out.out + out.err


def killed_run(run_dir: Path, phase: str, pre: tuple = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "WORKBENCH_FAULT": phase} if phase else dict(os.environ)
    return subprocess.run([*pre, sys.executable, "-m", "engine.pretrain", "--run-dir", str(run_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def assert_checkpoints_whole(run_dir: Path) -> None:
    for _step, path in ckpt.list_checkpoints(run_dir / "checkpoints"):
        ckpt.load_checkpoint(path)


def assert_completes(run_dir: Path, capsys, max_steps: int) -> None:
    rc, text = run_main("pretrain", run_dir, capsys)
    assert rc == 0 and "Traceback" not in text, text[-3000:]
    assert read_events(run_dir)[-1]["status"] == "completed"
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == ckpt.step_dir_name(max_steps)
    assert (run_dir / "summary.json").exists()
    assert_checkpoints_whole(run_dir)


# --- kills ------------------------------------------------------------------------------------

def test_a_run_killed_in_saves_and_prunes_resumes_and_completes(corpus, tmp_path, capsys):
    """One run killed four times (mid-save, after a save's manifest, after a prune's first act,
    mid-delete), each start resuming what the last one left; then it runs to the end."""
    run_dir = pretrain_dir(tmp_path / "run", corpus)
    kills = ["save:files-written@2", "save:manifest-written@2", "prune:manifest-removed@1", "prune:file-removed@2"]
    for phase in kills:
        r = killed_run(run_dir, phase)
        assert r.returncode == -signal.SIGKILL, (phase, r.stdout[-2000:], r.stderr[-2000:])
        assert "Traceback" not in r.stdout + r.stderr
        assert_checkpoints_whole(run_dir)
        assert locked_by(run_dir) is None          # a killed holder leaves no lock behind
    assert_completes(run_dir, capsys, 8)
    # Every start's `start` event is there: no torn line swallowed one.
    assert sum(e["type"] == "start" for e in read_events(run_dir)) == len(kills) + 1


def test_a_kill_inside_the_manifest_write_leaves_no_torn_marker(corpus, tmp_path, capsys):
    """Found by CI: a kill while manifest.json was being written left it empty in the save's
    leftover folder, the next start put that folder in place as complete, and the run could not
    resume ("manifest.json: not valid JSON")."""
    run_dir = pretrain_dir(tmp_path / "run", corpus, max_steps=4)
    r = killed_run(run_dir, "save:manifest-opened@2")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    leftovers = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and not (leftovers[0] / ckpt.MANIFEST).exists()
    assert_checkpoints_whole(run_dir)
    assert_completes(run_dir, capsys, 4)


PHASES = ["save:model-written", "save:files-written", "save:fsynced", "save:manifest-opened",
          "save:manifest-written", "save:renamed",
          "prune:manifest-removed", "prune:renamed", "prune:file-removed"]


@long_only
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("nth", [1, 2, 3])
def test_long_a_kill_at_each_phase_leaves_a_run_that_resumes(corpus, tmp_path, capsys, phase, nth):
    run_dir = pretrain_dir(tmp_path / "run", corpus, max_steps=6)
    r = killed_run(run_dir, f"{phase}@{nth}")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert_checkpoints_whole(run_dir)
    assert_completes(run_dir, capsys, 6)


def strace_points(run_dir: Path, syscall: str) -> int:
    trace = run_dir.parent / "trace.txt"
    r = killed_run(run_dir, "", pre=("strace", "-f", "-qq", "-o", str(trace), "-e", f"trace={syscall}"))
    assert r.returncode == 0, r.stderr[-2000:]
    return sum(1 for line in trace.read_text().splitlines() if f" {syscall}(" in line)


@long_only
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize("syscall", ["unlink", "rmdir", "rename"])
def test_long_a_kill_in_any_unlink_or_rename_leaves_a_run_that_resumes(corpus, tmp_path, capsys, syscall):
    n = strace_points(pretrain_dir(tmp_path / "count", corpus, max_steps=6), syscall)
    assert n > 0
    for when in range(1, n + 1):
        run_dir = pretrain_dir(tmp_path / f"run{when}", corpus, max_steps=6)
        killed_run(run_dir, "", pre=("strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={syscall}",
                                     "-e", f"inject={syscall}:signal=SIGKILL:when={when}"))
        assert_checkpoints_whole(run_dir)
        assert_completes(run_dir, capsys, 6)
        shutil.rmtree(run_dir)


# --- two processes ----------------------------------------------------------------------------

def wait_for(condition, what: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_second_process_on_a_run_folder_is_refused_naming_the_first(corpus, tmp_path, capsys):
    run_dir = pretrain_dir(tmp_path / "run", corpus, max_steps=100_000, eval_every=1000)
    first = subprocess.Popen([sys.executable, "-m", "engine.pretrain", "--run-dir", str(run_dir)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: ckpt.list_checkpoints(run_dir / "checkpoints"), "the first run's first checkpoint")
        assert locked_by(run_dir) == first.pid
        rc, text = run_main("pretrain", run_dir, capsys)
        assert rc == 2 and f"pid {first.pid}" in text and "Traceback" not in text
        assert len(text.strip().splitlines()) == 1
        assert first.poll() is None                            # the first one runs on, unharmed
        assert [e["pid"] for e in read_events(run_dir) if e["type"] == "start"] == [first.pid]
    finally:
        first.kill()
        first.wait()
    assert locked_by(run_dir) is None
    assert_checkpoints_whole(run_dir)
    last = ckpt.list_checkpoints(run_dir / "checkpoints")[-1][0]
    set_config(run_dir, max_steps=last + 1)
    assert_completes(run_dir, capsys, last + 1)


# --- hostile checkpoint files -----------------------------------------------------------------

def _resave(path: Path, change) -> None:
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    name = sorted(k for k, v in tensors.items() if v.dim() == 2)[0]
    meta = change(tensors, name, meta) or meta
    save_file(tensors, str(path), metadata=meta)


def _meta_disagrees(t, name, meta):
    cfg = json.loads(meta["config"])
    cfg["d_ff"] *= 2
    return {**meta, "config": json.dumps(cfg)}


def _nan(t, name, meta):
    t[name].view(-1)[0] = float("nan")


def _drop(t, name, meta):
    del t[name]


def _patch(path: Path, fn) -> None:
    path.write_bytes(fn(path.read_bytes()))


M = "model.safetensors"
# name: (file, how it is broken, words the message must hold)
CASES = {
    "truncated": (M, lambda p: _patch(p, lambda b: b[:-100]), ""),
    "empty": (M, lambda p: p.write_bytes(b""), ""),
    "corrupt header": (M, lambda p: _patch(p, lambda b: b[:8] + b"{garbage" + b[16:]), ""),
    "giant header": (M, lambda p: _patch(p, lambda b: struct.pack("<Q", 2 ** 60) + b[8:]), ""),
    "pickle": (M, lambda p: torch.save({"w": torch.zeros(3)}, p), "pickle"),
    "shape": (M, lambda p: _resave(p, lambda t, n, m: t.update({n: torch.zeros(t[n].shape[0] + 1, t[n].shape[1])})), ""),
    "dtype": (M, lambda p: _resave(p, lambda t, n, m: t.update({n: t[n].half()})), ""),
    "missing tensor": (M, lambda p: _resave(p, _drop), ""),
    "extra tensor": (M, lambda p: _resave(p, lambda t, n, m: t.update({"model.layers.9.x.weight": torch.zeros(2, 2)})), ""),
    "metadata disagrees": (M, lambda p: _resave(p, _meta_disagrees), ""),
    "nan weight": (M, lambda p: _resave(p, _nan), "NaN"),
    "corrupt state.json": ("state.json", lambda p: _patch(p, lambda b: b[: len(b) // 2]), ""),
    "corrupt optimizer.json": ("optimizer.json", lambda p: _patch(p, lambda b: b[:-5] + b"]]]]]"), ""),
    "truncated optimizer": ("optimizer.safetensors", lambda p: _patch(p, lambda b: b[:200]), ""),
}


@pytest.fixture(scope="module")
def artifacts(tiny_lm_ckpt, corpus, tmp_path_factory):
    """A tiny LM run, a reward model made from it, a pretraining run to resume, and data."""
    from engine import pretrain
    from engine.model import ScalarModel
    from engine.weights import load_model, safetensors_state
    from engine.reward import NORM_FILE
    root = tmp_path_factory.mktemp("artifacts")
    lm_ck = ckpt.latest_checkpoint(tiny_lm_ckpt / "checkpoints")
    torch.manual_seed(1)
    rm = ScalarModel.from_lm(load_model(lm_ck / M))
    weights, meta = safetensors_state(rm)
    state = json.loads((lm_ck / "state.json").read_text())
    rm_ck = ckpt.save_checkpoint(root / "rm" / "checkpoints", 3, model=weights, model_metadata=meta,
                                 state={"tokenizer_fingerprint": state["tokenizer_fingerprint"], "stage": "reward"},
                                 extra_files={"tokenizer.json": lm_ck / "tokenizer.json"})
    (rm_ck / NORM_FILE).write_text(json.dumps({"mean": 0.1, "std": 0.5, "n_answers": 10}))
    run = pretrain_dir(root / "pretrain", corpus, max_steps=2, keep_last=2)
    assert pretrain.run(from_dict(PretrainConfig, json.loads((run / "config.json").read_text())), run, []
                        .append) == "completed"
    rows = [{"prompt": f"say {w}", "response": w} for w in TINY_WORDS * 3]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompts.txt").write_text("".join(f"question {w}\n" for w in TINY_WORDS))
    return {"lm": tiny_lm_ckpt, "rm": root / "rm", "pretrain": run, "root": root}


def _copy_run(src: Path, dst: Path, fault, name: str) -> Path:
    """A copy of run `src` whose newest checkpoint's `name` is broken by `fault`; that file."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".run.*"))
    bad = ckpt.latest_checkpoint(dst / "checkpoints") / name
    fault(bad)
    return bad


def _refused_stage(module: str, run_dir: Path, config: dict, capsys) -> str:
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(config))
    rc, text = run_main(module, run_dir, capsys)
    done = read_events(run_dir)[-1]
    assert rc == 2 and "Traceback" not in text and done["status"] == "failed", text[-3000:]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "samples.jsonl").exists()
    return done["error"]


@pytest.fixture(scope="module")
def model_cache():
    from workbench.model_cache import ModelCache
    return ModelCache(device="cpu")


@pytest.mark.parametrize("case", list(CASES))
def test_each_broken_checkpoint_file_is_one_line_from_each_loader(artifacts, model_cache, case, tmp_path, capsys):
    from workbench import cli
    from workbench.model_cache import ModelCacheError
    name, fault, words = CASES[case]
    messages = {}
    if name in (M, "state.json"):
        lm = tmp_path / "lm"
        bad = _copy_run(artifacts["lm"], lm, fault, name)
        a = artifacts["root"]
        common = {"device": "cpu"}
        messages["sft init"] = (bad, _refused_stage("sft", tmp_path / "sft", {
            **common, "init": str(lm), "data": [str(a / "sft.jsonl")], "max_steps": 2, "batch_size": 2,
            "eval_every": 2, "eval_batches": 1, "sample_every": 0}, capsys))
        messages["sample"] = (bad, _refused_stage("sample", tmp_path / "sample", {
            **common, "checkpoint": str(lm), "prompts": [str(a / "prompts.txt")], "k": 2, "max_new_tokens": 4},
            capsys))
        ppo = {**common, "prompts": [str(a / "prompts.txt")], "steps": 1, "rollout_batch_size": 2,
               "minibatch_size": 2, "max_new_tokens": 4}
        messages["ppo policy"] = (bad, _refused_stage("ppo", tmp_path / "ppo1", {
            **ppo, "policy": str(lm), "reward_model": str(artifacts["rm"])}, capsys))
        rm = tmp_path / "rm"
        bad_rm = _copy_run(artifacts["rm"], rm, fault, name)
        messages["ppo reward_model"] = (bad_rm, _refused_stage("ppo", tmp_path / "ppo2", {
            **ppo, "policy": str(artifacts["lm"]), "reward_model": str(rm)}, capsys))
        rc = cli.main(["chat", "--checkpoint", str(bad.parent)])
        out = capsys.readouterr()
        assert rc == 2 and out.out == "" and "Traceback" not in out.err
        messages["chat"] = (bad, out.err.strip())
        with pytest.raises(ModelCacheError) as e:
            model_cache.get(lm)
        messages["app chat (model cache)"] = (bad, str(e.value))
    run = tmp_path / "resume"
    bad = _copy_run(artifacts["pretrain"], run, fault, name)
    set_config(run, max_steps=4)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    rc, text = run_main("pretrain", run, capsys)
    assert rc == 2 and "Traceback" not in text, text[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before     # no work was done
    messages["resume"] = (bad, read_events(run)[-1]["error"])
    for loader, (path, message) in messages.items():
        assert str(path) in message and "\n" not in message and words in message, (loader, message)


# --- a full disk, torn event lines ------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only; skipped elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small disk needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes(corpus, small_disk, capsys):
    from engine import pretrain
    run_dir = pretrain_dir(small_disk / "run", corpus, max_steps=4, checkpoint_every=2)
    filler = small_disk / "filler"

    def run(cfg, run_dir, sink, control):
        def filling(ev):
            sink(ev)
            if ev["type"] == "metrics" and ev["step"] >= 1 and not filler.exists():
                filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 16_000))
        return pretrain.run(cfg, run_dir, filling, control)

    rc = stage_main("pretrain", PretrainConfig, run, ["--run-dir", str(run_dir), "--log-format", "json"])
    text = capsys.readouterr().out
    done = read_events(run_dir)[-1]
    assert rc == 1 and "Traceback" not in text
    assert done["type"] == "done" and done["error"].startswith("disk full: ") and f"MB free in {run_dir}" in done["error"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    filler.unlink()
    assert_completes(run_dir, capsys, 4)
    assert sum(e["type"] == "start" for e in read_events(run_dir)) == 2


def test_a_line_torn_by_a_full_disk_does_not_swallow_the_next(tmp_path, monkeypatch):
    real_write = os.write
    log = EventLog(tmp_path)
    log({"type": "start", "n": 1})

    def half_then_full(fd, data):
        real_write(fd, bytes(data[:7]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="disk full"):
        log({"type": "metrics", "step": 1})
    monkeypatch.setattr(os, "write", real_write)
    log({"type": "metrics", "step": 2})
    log.close()
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"type": "metrics", "st')             # killed mid-line
    EventLog(tmp_path)({"type": "start", "n": 2})
    assert [(e["type"], e.get("n", e.get("step"))) for e in read_events(tmp_path)] == [
        ("start", 1), ("metrics", 2), ("start", 2)]


def test_an_event_glued_to_a_torn_line_by_the_old_writer_is_read(tmp_path):
    (tmp_path / "events.jsonl").write_text('{"type": "start", "n": 1}\n{"type": "metr{"type": "start", "n": 2}\n')
    assert [e["n"] for e in read_events(tmp_path)] == [1, 2]


def test_a_stage_run_in_process_leaves_the_signal_handlers_as_it_found_them(tmp_path, capsys):
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        name: str = "x"

    (tmp_path / "config.json").write_text("{}")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert stage_main("demo", Cfg, lambda *a: "completed", ["--run-dir", str(tmp_path)]) == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_the_pipeline_on_a_full_disk_says_so_in_one_line(small_disk, tmp_path, capsys, monkeypatch):
    from workbench.cli import main as workbench
    monkeypatch.chdir(tmp_path)
    filler = small_disk / "filler"

    def fill(leave: int) -> None:
        filler.unlink(missing_ok=True)
        filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - leave))
    project = small_disk / "p"
    args = ["pipeline", "--demo", "--project", str(project), "--scale", "tiny", "--until", "tokenizer"]
    fill(200_000)                           # the demo project does not fit
    assert workbench(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: disk full: " in err
    filler.unlink()
    from workbench.demo import write_demo_project
    write_demo_project(project, scale="tiny")
    fill(2_000)                             # the project is there; the journal does not fit
    assert workbench(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: disk full: " in err and str(project) in err, err
    assert "pipeline.json" not in os.listdir(project)


def test_a_stage_that_cannot_write_its_first_event_on_a_full_disk_is_said_so(small_disk, tmp_path):
    from workbench import runfolder
    from workbench.jobs import run_job
    from workbench.project import Project
    from workbench.demo import write_demo_project
    write_demo_project(tmp_path / "p", scale="tiny")
    project = Project.open(tmp_path / "p")
    values = runfolder.suggested_values(project, "tokenizer", lambda parent: None)
    run_dir = runfolder.new_run(project, "tokenizer", {**values, "vocab_size": 300})
    moved = small_disk / run_dir.name
    shutil.copytree(run_dir, moved)
    (small_disk / "filler").write_bytes(b"\0" * shutil.disk_usage(small_disk).free)
    result = run_job("tokenizer", moved)
    assert result.status == "failed"
    assert result.error.startswith("the tokenizer process exited before it started: disk full: ")


def test_a_run_folder_moved_under_a_running_stage_ends_it_in_the_moved_folder(corpus, tmp_path, capsys):
    """`mv` of a running run's folder: the stage stops within about a second, says why in the
    moved folder's events, makes no new folder of the old name (checkpoints saved there split
    the run in two) and resumes where the folder is now."""
    run = pretrain_dir(tmp_path / "runs" / "pretrain-1", corpus, max_steps=100_000, checkpoint_every=50,
                       eval_every=100_000)
    proc = subprocess.Popen([sys.executable, "-m", "engine.pretrain", "--run-dir", str(run)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(e["type"] == "metrics" for e in read_events(run)):
            assert proc.poll() is None and time.monotonic() < deadline, read_events(run)[-3:]
            time.sleep(0.1)
        moved = run.with_name("pretrain-renamed")
        run.rename(moved)
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not run.exists()
    done = read_events(moved)[-1]
    assert done["type"] == "done" and done["status"] == "failed"
    assert "was moved, renamed or deleted while the run was going" in done["error"]
    set_config(moved, max_steps=60)
    rc, text = run_main("pretrain", moved, capsys)
    assert rc == 0 and read_events(moved)[-1]["status"] == "completed", text[-2000:]
