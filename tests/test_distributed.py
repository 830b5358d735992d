"""DDP under torchrun, on CPU with gloo and two processes: the same run as one process with the
same global batch, identical ranks, resume at the same and at another world size, a stop that
reaches every rank, and a killed rank that fails the others instead of hanging them."""
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import checkpoint as ckpt
from engine import pretrain, reward, sft
from engine.config import ConfigError, from_dict, save_config
from engine.runio import read_events
from engine.tokenizer import train_tokenizer
from workbench.jobs import run_job, stage_command

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat and the dog ran to the red ball while birds sang in old trees".split()
TINY = {"d_model": 32, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "d_ff": 64, "max_seq_len": 32}
# A constant learning rate, so a run whose max_steps is raised on resume follows the same
# schedule as one that was given the larger max_steps from the start.
FLAT = dict(warmup_steps=0, min_lr_ratio=1.0, log_every=1, sample_every=0, checkpoint_every=100,
            device="cpu")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_corpus")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) + f". count {i % 10}." for i in range(800)]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    train_tokenizer([root / "text.txt"], vocab_size=300, min_frequency=2).save(root / "tokenizer.json")
    return root


@contextlib.contextmanager
def one_thread():
    """The in-process reference runs on one thread, like each torchrun worker (OMP_NUM_THREADS=1),
    so its matmuls add in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pre_cfg(corpus: Path, **kw) -> pretrain.PretrainConfig:
    base = dict(tokenizer=str(corpus / "tokenizer.json"), inputs=[str(corpus / "text.txt")], preset="tiny",
                model=TINY, seq_len=32, batch_size=4, max_steps=3, lr=3e-3, eval_every=3, eval_batches=2, **FLAT)
    base.update(kw)
    return from_dict(pretrain.PretrainConfig, base)


def launch(stage: str, run_dir: Path, cfg) -> dict:
    """A run folder's config written, the stage run through the job runner (torchrun if nproc > 1)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    res = run_job(stage, run_dir)
    assert res.status == "completed", (res.error, (run_dir / "config.json").read_text())
    return res.metrics()


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"))


def assert_close(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tol, f"parameters differ by {worst}"


def test_the_launcher_uses_torchrun_only_for_several_processes(corpus, tmp_path):
    save_config(pre_cfg(corpus), tmp_path / "config.json")
    assert "torch.distributed.run" not in stage_command("pretrain", tmp_path)
    save_config(pre_cfg(corpus, nproc=2), tmp_path / "config.json")
    cmd = stage_command("pretrain", tmp_path)
    assert cmd[cmd.index("torch.distributed.run") + 1:][:2] == ["--standalone", "--nproc_per_node=2"]


def test_pretrain_on_two_processes_is_the_single_process_run(corpus, tmp_path):
    # Two processes with one micro-batch each = one process accumulating two micro-batches.
    ddp = launch("pretrain", tmp_path / "ddp", pre_cfg(corpus, nproc=2))
    with one_thread():
        assert pretrain.run(pre_cfg(corpus, grad_accum=2, max_steps=5), tmp_path / "one", None) == "completed"
    assert ddp["ddp/max_param_divergence"] == 0.0      # every rank ended with rank 0's parameters
    assert ddp["train/tokens"] == 3 * 2 * 4 * 32       # tokens of both ranks are counted

    # Resume at the same world size (max_steps raised: a constant lr keeps the schedule).
    launch("pretrain", tmp_path / "ddp", pre_cfg(corpus, nproc=2, max_steps=4))
    # Rank 0's checkpoint, at world size 1: the same run as long as grad_accum x nproc is kept.
    with one_thread():
        assert pretrain.run(pre_cfg(corpus, grad_accum=2, max_steps=5), tmp_path / "ddp", None) == "completed"
    assert_close(weights(tmp_path / "ddp"), weights(tmp_path / "one"))
    assert [e["world_size"] for e in read_events(tmp_path / "ddp") if e["type"] == "start"] == [2, 2]
    assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "ddp" / "checkpoints"))["world_size"] == 1

    with pytest.raises(ConfigError) as e:
        pretrain.run(pre_cfg(corpus, max_steps=6), tmp_path / "ddp", None)
    assert e.value.field == "grad_accum" and "2 x 1" in str(e.value)


def test_a_config_for_two_processes_refuses_to_run_alone(corpus, tmp_path):
    save_config(pre_cfg(corpus, nproc=2), tmp_path / "config.json")
    proc = subprocess.run([sys.executable, "-m", "engine.pretrain", "--run-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    done = read_events(tmp_path)[-1]
    assert done["status"] == "failed" and "nproc" in done["error"] and "torchrun" in done["error"]


def test_sft_on_two_processes_is_the_single_process_run(tiny_lm_ckpt, tmp_path):
    rng = random.Random(0)
    words = "alpha beta gamma delta echo fox golf hotel".split()
    rows = [{"prompt": f"{rng.choice(words)} {rng.choice(words)}", "response": rng.choice(words)}
            for _ in range(40)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def cfg(**kw):
        return from_dict(sft.SFTConfig, dict(init=str(tiny_lm_ckpt), data=[str(tmp_path / "sft.jsonl")],
                                             batch_size=4, epochs=0, max_steps=4, lr=3e-3, eval_every=4,
                                             eval_batches=1, **FLAT, **kw))
    ddp = launch("sft", tmp_path / "ddp", cfg(nproc=2))
    with one_thread():
        assert sft.run(cfg(grad_accum=2), tmp_path / "one", None) == "completed"
    assert ddp["ddp/max_param_divergence"] == 0.0
    assert_close(weights(tmp_path / "ddp"), weights(tmp_path / "one"))
    # Rank 0 alone writes the summary, with the same figures as the single process.
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert two["val_loss_after"] == pytest.approx(one["val_loss_after"], abs=1e-6)


def test_reward_model_on_two_processes_is_the_single_process_run(tiny_lm_ckpt, tmp_path):
    rng = random.Random(0)
    words = "alpha beta gamma delta echo fox golf hotel".split()
    lines = []
    for i in range(32):
        answers = [" ".join(rng.sample(words, 2)) + (" good" if j == 0 else " bad") for j in range(3)]
        lines.append(json.dumps({"prompt": f"question {i}", "answers": answers, "ranking": [[0], [1], [2]]}))
    (tmp_path / "prefs.jsonl").write_text("\n".join(lines) + "\n")

    def cfg(**kw):
        return from_dict(reward.RewardConfig, dict(init=str(tiny_lm_ckpt), data=[str(tmp_path / "prefs.jsonl")],
                                                   batch_size=2, epochs=0, max_steps=4, lr=3e-3, eval_every=4,
                                                   **FLAT, **kw))
    ddp = launch("reward", tmp_path / "ddp", cfg(nproc=2))
    with one_thread():
        assert reward.run(cfg(grad_accum=2), tmp_path / "one", None) == "completed"
    assert ddp["ddp/max_param_divergence"] == 0.0
    assert_close(weights(tmp_path / "ddp"), weights(tmp_path / "one"))
    assert (ckpt.latest_checkpoint(tmp_path / "ddp" / "checkpoints") / reward.NORM_FILE).exists()


def start_ddp(corpus: Path, run_dir: Path) -> subprocess.Popen:
    run_dir.mkdir()
    save_config(pre_cfg(corpus, nproc=2, max_steps=100000), run_dir / "config.json")
    return subprocess.Popen(stage_command("pretrain", run_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@contextlib.contextmanager
def killed_at_exit(proc: subprocess.Popen):
    """Whatever the test's outcome, nothing of the job outlives it."""
    try:
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_training(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e["type"] == "progress" for e in read_events(run_dir)):
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    raise AssertionError("no progress event")


def workers(run_dir: Path) -> dict[int, int]:
    """{rank: pid} of the stage processes training on run_dir."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"engine.pretrain" in cmd and str(run_dir).encode() in cmd and b"torch.distributed.run" not in cmd:
            out[int(env[b"RANK"])] = int(entry.name)
    return out


def test_a_stop_request_stops_every_rank_with_one_checkpoint(corpus, tmp_path):
    run_dir = tmp_path / "run"
    with start_ddp(corpus, run_dir) as proc, killed_at_exit(proc):
        wait_for_training(run_dir, proc)
        (run_dir / "STOP").touch()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert read_events(run_dir)[-1]["status"] == "stopped"
    assert len(ckpt.list_checkpoints(run_dir / "checkpoints")) == 1


def test_a_killed_rank_makes_the_others_fail_not_hang(corpus, tmp_path):
    run_dir = tmp_path / "run"
    with start_ddp(corpus, run_dir) as proc, killed_at_exit(proc):
        wait_for_training(run_dir, proc)
        ranks = workers(run_dir)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
        deadline = time.monotonic() + 30
        while workers(run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert workers(run_dir) == {}, "rank 0 outlived the run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_torchrun_a_killed_peer_fails_rank_0_with_an_error(corpus, tmp_path):
    # No launcher to tear the group down: rank 0 must notice the dead peer by itself.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(pre_cfg(corpus, nproc=2, max_steps=100000), run_dir / "config.json")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(subprocess.Popen(
            [sys.executable, "-m", "engine.pretrain", "--run-dir", str(run_dir)], cwd=ROOT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True)) for r in (0, 1)]
        for p in procs:
            stack.enter_context(killed_at_exit(p))
        wait_for_training(run_dir, procs[0])
        procs[1].kill()
        procs[1].wait()
        code = procs[0].wait(timeout=120)
        assert code == 1, procs[0].stderr.read()[-3000:]
        done = read_events(run_dir)[-1]
        assert done["type"] == "done" and done["status"] == "failed" and done["error"]


def test_nproc_is_offered_by_the_forms_and_checked():
    from workbench.forms import field_specs
    for stage in ("pretrain", "sft", "reward"):
        spec = next(s for s in field_specs(stage) if s.name == "nproc")
        assert spec.basic and spec.kind == "int" and spec.default == 1
    assert all(s.name != "nproc" for s in field_specs("ppo"))
    with pytest.raises(ConfigError) as e:
        from_dict(pretrain.PretrainConfig, dict(tokenizer="t", inputs=["x"], nproc=0))
    assert e.value.field == "nproc"

