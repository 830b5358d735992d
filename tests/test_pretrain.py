"""The pretraining stage driven in-process (a list as sink, a flag as control) and as a CLI."""
import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import checkpoint as ckpt
from engine.config import ConfigError, from_dict
from engine.pretrain import PretrainConfig, run
from engine.trainer import lr_at
from engine.runio import StageError, read_events
from engine.tokenizer import train_tokenizer
from helpers import StopAt, losses

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat and the dog ran to the red ball while birds sang in old trees".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small patterned corpus and a tokenizer trained on it, shared by the tests here."""
    root = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(1500):
        idx = torch.randint(0, len(WORDS), (8,), generator=g).tolist()
        lines.append(" ".join(WORDS[j] for j in idx) + f". count {i % 10} {i % 10 + 1} {i % 10 + 2}.")
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    tok = train_tokenizer([root / "text.txt"], vocab_size=300, min_frequency=2)
    tok.save(root / "tokenizer.json")
    return root


def make_cfg(corpus: Path, **kw) -> PretrainConfig:
    base = dict(tokenizer=str(corpus / "tokenizer.json"), inputs=[str(corpus / "text.txt")],
                preset="tiny", model={"d_model": 32, "n_layer": 2, "n_head": 2, "n_kv_head": 2,
                                      "d_ff": 64, "max_seq_len": 32},
                seq_len=32, batch_size=4, max_steps=12, lr=3e-3, warmup_steps=2, eval_every=4,
                eval_batches=2, sample_every=0, checkpoint_every=100, log_every=1, device="cpu")
    base.update(kw)
    return from_dict(PretrainConfig, base)


def test_loss_falls_below_unigram_baseline_and_run_folder_is_complete(corpus, tmp_path):
    events = []
    cfg = make_cfg(corpus, max_steps=60, eval_every=20, sample_every=30, sample_tokens=8,
                   checkpoint_every=20, keep_last=1)
    assert run(cfg, tmp_path, events.append) == "completed"
    vals = [e["val/loss"] for e in events if e["type"] == "metrics" and "val/loss" in e]
    baseline = next(e["val/unigram_baseline"] for e in events if "val/unigram_baseline" in e)
    assert vals[-1] < vals[0] and vals[-1] < baseline
    train = losses(events)
    assert train[60] < train[1] * 0.7
    assert any(e["type"] == "sample" and e["prompt"] for e in events)
    assert any(e["type"] == "progress" and e["total"] == 60 for e in events)
    kept = [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    best = ckpt.best_checkpoint(tmp_path / "checkpoints")
    assert 60 in kept and len(kept) <= 2 and best is not None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(vals[-1]) and summary["unigram_baseline"] == baseline
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert (last / "tokenizer.json").exists() and (last / "model.safetensors").exists()


def lr_schedule_shape():
    cfg = PretrainConfig(tokenizer="t", inputs=["x"], lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    return [lr_at(s, cfg) for s in range(110)]


def test_lr_warms_up_then_decays_to_the_floor():
    lrs = lr_schedule_shape()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_resume_is_exact_and_needs_the_rng_state(corpus, tmp_path):
    full = []
    assert run(make_cfg(corpus), tmp_path / "full", full.append) == "completed"

    part = []
    assert run(make_cfg(corpus), tmp_path / "resumed", part.append, StopAt(part, 5)) == "stopped"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [5]
    rest = []
    assert run(make_cfg(corpus), tmp_path / "resumed", rest.append) == "completed"
    assert min(losses(rest)) and min(losses(rest).keys()) == 6
    assert {**losses(part), **losses(rest)} == losses(full)  # bit for bit, every step

    # Negative control: the same resume with the data RNG state replaced diverges.
    part2 = []
    run(make_cfg(corpus), tmp_path / "control", part2.append, StopAt(part2, 5))
    rng_file = tmp_path / "control" / "checkpoints" / "step-000005" / "rng.safetensors"
    states = load_file(str(rng_file))
    states["data"] = torch.Generator().manual_seed(1234).get_state()
    save_file(states, str(rng_file))
    rest2 = []
    run(make_cfg(corpus), tmp_path / "control", rest2.append)
    assert losses(rest2)[6] != losses(full)[6]


def test_tied_embeddings_save_load_and_resume(corpus, tmp_path):
    from engine.weights import load_model
    model_kw = {"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "d_ff": 64,
                "max_seq_len": 32, "tie_embeddings": True}
    part = []
    assert run(make_cfg(corpus, model=model_kw, max_steps=4), tmp_path, part.append, StopAt(part, 2)) == "stopped"
    rest = []
    assert run(make_cfg(corpus, model=model_kw, max_steps=4), tmp_path, rest.append) == "completed"
    model = load_model(ckpt.latest_checkpoint(tmp_path / "checkpoints") / "model.safetensors")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert min(losses(rest).keys()) == 3


def test_resume_refuses_batch_size_and_warns_about_lr(corpus, tmp_path):
    part = []
    run(make_cfg(corpus), tmp_path, part.append, StopAt(part, 3))
    with pytest.raises(ConfigError) as e:
        run(make_cfg(corpus, batch_size=8), tmp_path, [].append)
    assert e.value.field == "batch_size"
    events = []
    assert run(make_cfg(corpus, lr=1e-3), tmp_path, events.append) == "completed"
    warnings = [e["message"] for e in events if e["type"] == "log" and e["level"] == "warning"]
    assert any("'lr'" in w for w in warnings)


def test_non_finite_loss_stops_with_the_step_and_no_nan_checkpoint(corpus, tmp_path, monkeypatch):
    from engine import model as model_mod
    real_forward = model_mod.Transformer.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 7:
                return out * float("nan") if kw.get("loss_only") else (out[0], out[1] * float("nan"))
        return out

    monkeypatch.setattr(model_mod.Transformer, "forward", poisoned)
    with pytest.raises(StageError, match=r"non-finite loss.*step 7"):
        run(make_cfg(corpus, checkpoint_every=3), tmp_path, [].append)
    for _step, path in ckpt.list_checkpoints(tmp_path / "checkpoints"):
        weights = ckpt.load_checkpoint(path).model
        assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [3, 6]


def test_config_validation_names_the_field(corpus):
    for bad, field in [({"preset": "huge"}, "preset"), ({"lr": -1.0}, "lr"),
                       ({"model": {"d_modle": 3}}, "model.d_modle"), ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(ConfigError) as e:
            make_cfg(corpus, **bad)
        assert e.value.field == field


def _start_cli(corpus: Path, run_dir: Path, **kw) -> subprocess.Popen:
    run_dir.mkdir()
    cfg = dataclasses.asdict(make_cfg(corpus, max_steps=100000, **kw))
    (run_dir / "config.json").write_text(json.dumps(cfg))
    return subprocess.Popen([sys.executable, "-m", "engine.pretrain", "--run-dir", str(run_dir)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_progress(proc, run_dir: Path) -> None:
    for line in proc.stdout:
        if json.loads(line)["type"] == "progress":
            return
    raise AssertionError(f"no progress event: {proc.stderr.read()}")


@pytest.mark.parametrize("how", ["stop-file", "sigterm", "sigint"])
def test_cli_stops_cleanly_with_a_checkpoint(corpus, tmp_path, how):
    run_dir = tmp_path / "run"
    proc = _start_cli(corpus, run_dir)
    _wait_for_progress(proc, run_dir)
    if how == "stop-file":
        (run_dir / "STOP").touch()
    else:
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    done = read_events(run_dir)[-1]
    assert done["type"] == "done" and done["status"] == "stopped"
    saved = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1 and saved[0][0] > 0


def test_cli_refuses_a_bad_config_before_any_work(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"tokenizer": "t.json", "inputs": ["x"],
                                                      "warmup_steps": -5}))
    proc = subprocess.run([sys.executable, "-m", "engine.pretrain", "--run-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    done = json.loads(proc.stdout.splitlines()[-1])
    assert done["status"] == "failed" and "'warmup_steps'" in done["error"]
    assert not (tmp_path / "data").exists() and not (tmp_path / "checkpoints").exists()


def test_a_half_precision_dtype_off_cuda_is_said_to_train_in_float32(corpus, tmp_path):
    events = []
    assert run(make_cfg(corpus, dtype="bfloat16", max_steps=2), tmp_path, events.append) == "completed"
    warnings = [e["message"] for e in events if e["type"] == "log" and e["level"] == "warning"]
    assert "bfloat16 is used on CUDA only; training in float32 on cpu" in warnings



def test_a_missing_input_is_named_with_its_setting(corpus, tmp_path):
    with pytest.raises(ConfigError) as e:
        run(make_cfg(corpus, inputs=[str(tmp_path / "gone.txt")]), tmp_path / "run", [].append)
    assert e.value.field == "inputs" and f"{tmp_path / 'gone.txt'}: no such file or folder" in e.value.message


def test_a_checkpoint_between_evaluations_claims_no_val_loss_and_is_never_the_best(corpus, tmp_path):
    """Saved at steps 2, 4, 6, 8, evaluated at 6 only: step 8's weights were never measured, and
    the val loss of step 6's must not become theirs (a tie would make them the best)."""
    events = []
    cfg = make_cfg(corpus, max_steps=24, checkpoint_every=2, eval_every=6, keep_last=100, lr=3.0, warmup_steps=0)
    assert run(cfg, tmp_path, events.append, StopAt(events, 8)) == "stopped"
    recorded = {p.name: json.loads((p / "state.json").read_text())["val_loss"]
                for _s, p in ckpt.list_checkpoints(tmp_path / "checkpoints")}
    measured = next(e["val/loss"] for e in events if e["type"] == "metrics" and "val/loss" in e)
    assert recorded == {"step-000002": None, "step-000004": None, "step-000006": measured,
                        "step-000008": None}
    assert ckpt.best_checkpoint(tmp_path / "checkpoints").name == "step-000006"
    best = {e["step"]: e["best"] for e in events if e["type"] == "checkpoint"}
    assert best == {2: False, 4: False, 6: True, 8: False}
    # resumed, the first save between evaluations still claims nothing
    rest = []
    assert run(cfg, tmp_path, rest.append, StopAt(rest, 10)) == "stopped"
    assert json.loads((tmp_path / "checkpoints" / "step-000010" / "state.json").read_text())["val_loss"] is None


def test_keep_last_zero_is_refused_and_the_newest_checkpoint_is_never_pruned(corpus, tmp_path):
    with pytest.raises(ConfigError, match="keep_last"):
        make_cfg(corpus, keep_last=0)
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, step, model={"w": torch.zeros(1)}, state={"val_loss": None})
    assert ckpt.prune(tmp_path, 0) == [tmp_path / "step-000002"]
    assert [p.name for _s, p in ckpt.list_checkpoints(tmp_path)] == ["step-000004"]
