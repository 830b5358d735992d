"""The SFT stage on a tiny pretrained model: learning, masks, bad input, tokenizers, resume."""
import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from engine import checkpoint as ckpt
from engine import pretrain
from engine.artifacts import load_artifact
from engine.config import ConfigError, from_dict
from engine.runio import StageError, read_events
from engine.sft import SFTConfig, run
from engine.sft_data import SFTDataError, read_records, targets_for
from engine.tokenizer import Tokenizer, render_chat, train_tokenizer
from helpers import StopAt, losses

ROOT = Path(__file__).resolve().parents[1]
WORDS = "cat dog sun red big box hat pen cup map".split()
MODEL = {"d_model": 32, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "d_ff": 64, "max_seq_len": 48}


def sft_record(i: int, rng: random.Random) -> dict:
    """One 'repeat the words' record, cycling through the three formats."""
    words = " ".join(rng.choice(WORDS) for _ in range(2))
    if i % 3 == 0:
        return {"prompt": f"Repeat: {words}", "response": words}
    if i % 3 == 1:
        return {"instruction": "Repeat the words.", "input": words, "output": words}
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": f"Repeat: {words}"},
                         {"role": "assistant", "content": words}]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tokenizer, a pretraining run of a few steps, and SFT data in all three formats."""
    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    lines = []
    for _ in range(600):
        words = " ".join(rng.choice(WORDS) for _ in range(2))
        lines.append(f"Repeat: {words}\n{words}. Repeat the words. Be brief.")
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    tok = train_tokenizer([root / "text.txt"], vocab_size=300, min_frequency=2)
    tok.save(root / "tokenizer.json")
    cfg = from_dict(pretrain.PretrainConfig, dict(
        tokenizer=str(root / "tokenizer.json"), inputs=[str(root / "text.txt")], preset="tiny",
        model=MODEL, seq_len=48, batch_size=8, max_steps=30, lr=3e-3, warmup_steps=2,
        eval_every=30, eval_batches=1, sample_every=0, checkpoint_every=30, log_every=10, device="cpu"))
    assert pretrain.run(cfg, root / "pre", None) == "completed"
    rng = random.Random(1)
    data = [sft_record(i, rng) for i in range(120)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    tasks = [{"kind": "first", "prompt": f"What is the first letter of '{w}'?", "answer": w[0],
              "data": {"word": w}} for w in WORDS[:4]]
    (root / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return root


def make_cfg(base: Path, **kw) -> SFTConfig:
    cfg = dict(init=str(base / "pre"), data=[str(base / "sft.jsonl")], val_fraction=0.1,
               batch_size=8, max_steps=8, lr=3e-3, warmup_steps=1, eval_every=4, eval_batches=2,
               sample_every=0, checkpoint_every=100, log_every=1, device="cpu")
    cfg.update(kw)
    return from_dict(SFTConfig, cfg)


def test_loss_falls_and_the_run_reports_before_and_after(base, tmp_path):
    events = []
    cfg = make_cfg(base, max_steps=40, eval_every=20, sample_every=20, sample_tokens=6,
                   sample_prompts=["Repeat: cat dog"], eval_tasks=str(base / "tasks.jsonl"),
                   task_tokens=4, checkpoint_every=20)
    assert run(cfg, tmp_path, events.append) == "completed"
    train = losses(events)
    assert sum(train[s] for s in range(36, 41)) < 0.7 * sum(train[s] for s in range(1, 6))
    evals = [e for e in events if e["type"] == "metrics" and "val/loss" in e]
    assert [e["step"] for e in evals] == [0, 20, 40]  # step 0: before any update
    # ... and said before it starts: the app shows it while no step has run yet.
    said = next(i for i, e in enumerate(events) if e["type"] == "log" and e["message"].startswith(
        "measuring the starting model before the first step (validation loss, "))
    assert said < events.index(evals[0])
    assert evals[-1]["val/loss"] < evals[0]["val/loss"]
    assert all(0 <= e["eval/task_accuracy"] <= 1 and "eval/acc/first" in e for e in evals)
    samples = [e for e in events if e["type"] == "sample"]
    assert [s["step"] for s in samples] == [0, 20, 40] and samples[0]["prompt"] == "Repeat: cat dog"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train_samples"] + summary["val_samples"] == 120  # every format parsed
    assert summary["val_loss_before"] == evals[0]["val/loss"]
    assert summary["val_loss_after"] == evals[-1]["val/loss"] == summary["val_loss"]
    assert summary["task_accuracy_before"] == evals[0]["eval/task_accuracy"]
    assert set(summary["per_kind_after"]) == {"first"}
    # an SFT checkpoint loads like any other, with its tokenizer
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    loaded = load_artifact(last)
    assert loaded.tokenizer.fingerprint() == load_artifact(base / "pre").tokenizer.fingerprint()


def test_only_answer_tokens_are_targets_end_to_end(base, tmp_path, monkeypatch):
    from engine import model as model_mod
    seen = []
    real_forward = model_mod.Transformer.forward

    def spy(self, idx, targets=None, **kw):
        if targets is not None and self.training:
            seen.append((idx.clone(), targets.clone()))
        return real_forward(self, idx, targets, **kw)

    monkeypatch.setattr(model_mod.Transformer, "forward", spy)
    assert run(make_cfg(base, max_steps=3), tmp_path, None) == "completed"
    tok = load_artifact(base / "pre").tokenizer
    expected = {}
    for r in read_records([base / "sft.jsonl"]):
        ids, mask = render_chat(tok, r.messages)
        expected[tuple(ids[:-1])] = targets_for(ids, mask)
    rows = 0
    for x, y in seen:
        for xi, yi in zip(x.tolist(), y.tolist()):
            n = sum(t != tok.pad_id for t in xi)  # encode() never yields the pad id: pads are right
            want = expected[tuple(xi[:n])]
            assert yi[:n] == want and set(yi[n:]) <= {-100}
            assert {t for t, v in enumerate(yi) if v != -100} == {t for t, v in enumerate(want) if v != -100}
            rows += 1
    assert rows == 3 * 8


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "Repeat: cat", "response": ', "malformed JSON"),
    ('{"prompt": "Repeat: cat"}', "field 'response': missing"),
    ('{"prompt": "Repeat: cat", "response": ""}', "field 'response': is empty"),
    ('{"instruction": ["x"], "output": "cat"}', "field 'instruction': expected a string"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "field 'messages[0].role': unknown role"),
])
def test_bad_input_is_refused_before_any_checkpoint(base, tmp_path, line, field):
    good = (base / "sft.jsonl").read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(good[:3] + [line] + good[3:10]) + "\n")
    with pytest.raises(SFTDataError) as e:
        run(make_cfg(base, data=[str(bad)]), tmp_path / "run", None)
    assert e.value.problems[0].startswith(f"{bad}:4: {field}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_mismatched_tokenizer_is_refused_by_field(base, tmp_path):
    (tmp_path / "other.txt").write_text("completely different text about boats and rivers\n" * 200)
    other = train_tokenizer([tmp_path / "other.txt"], vocab_size=280)
    other.save(tmp_path / "other.json")
    with pytest.raises(ConfigError) as e:
        run(make_cfg(base, tokenizer=str(tmp_path / "other.json")), tmp_path / "run", None)
    assert e.value.field == "tokenizer"
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ConfigError) as e:
        run(make_cfg(base, init=str(tmp_path / "nowhere")), tmp_path / "run", None)
    assert e.value.field == "init"


def test_all_empty_masks_are_an_error_not_a_silent_no_op(base, tmp_path, monkeypatch):
    def no_targets(tok, messages, add_generation_prompt=False):
        ids, mask = render_chat(tok, messages, add_generation_prompt)
        return ids, [0] * len(mask)

    monkeypatch.setattr(Tokenizer, "render_chat", no_targets)
    with pytest.raises(StageError, match="loss masks are empty"):
        run(make_cfg(base), tmp_path, None)
    assert not (tmp_path / "checkpoints").exists()


def test_resume_is_exact(base, tmp_path):
    full = []
    assert run(make_cfg(base), tmp_path / "full", full.append) == "completed"
    part = []
    assert run(make_cfg(base), tmp_path / "resumed", part.append, StopAt(part, 5)) == "stopped"
    rest = []
    assert run(make_cfg(base), tmp_path / "resumed", rest.append) == "completed"
    assert min(losses(rest)) == 6
    assert {**losses(part), **losses(rest)} == losses(full)  # bit for bit, every step
    vals = lambda evs: {e["step"]: e["val/loss"] for e in evs if e["type"] == "metrics" and "val/loss" in e}
    assert {**vals(part), **vals(rest)} == vals(full)
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["val_loss_before"] == vals(full)[0]  # carried across the resume


def test_resume_refuses_changed_data(base, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text((base / "sft.jsonl").read_text())
    part = []
    run(make_cfg(base, data=[str(data)]), tmp_path / "run", part.append, StopAt(part, 2))
    data.write_text((base / "sft.jsonl").read_text().replace("cat", "dog"))
    with pytest.raises(StageError, match="data files changed"):
        run(make_cfg(base, data=[str(data)]), tmp_path / "run", None)


def test_config_validation_names_the_field(base):
    for bad, field in [({"init": ""}, "init"), ({"data": []}, "data"), ({"val_fraction": 0.0}, "val_fraction"),
                       ({"epochs": -1.0}, "epochs"), ({"seq_len": 2}, "seq_len"), ({"lr": 0.0}, "lr"),
                       ({"eval_task_limit": -1}, "eval_task_limit")]:
        with pytest.raises(ConfigError) as e:
            make_cfg(base, **bad)
        assert e.value.field == field
    make_cfg(base, val_fraction=0.0, val_data=[str(base / "sft.jsonl")])  # val_data replaces the split
    with pytest.raises(ConfigError) as e:
        run(make_cfg(base, seq_len=64), Path("/nonexistent-run"), None)
    assert e.value.field == "seq_len"


def test_cli_epochs_set_the_steps_without_touching_config_json(base, tmp_path):
    cfg = dataclasses.asdict(make_cfg(base, epochs=0.5, max_steps=1000, eval_every=1000))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    before = (tmp_path / "config.json").read_text()
    proc = subprocess.run([sys.executable, "-m", "engine.sft", "--run-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = read_events(tmp_path)
    assert events[-1]["type"] == "done" and events[-1]["status"] == "completed"
    # 108 training samples, batch 8: half an epoch is ceil(6.75) = 7 steps
    assert max(e["step"] for e in events if e["type"] == "progress") == 7
    assert (tmp_path / "config.json").read_text() == before
    state = ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert state["config"]["max_steps"] == 7 and state["sampler"]["index"] == 56


def test_truncation_is_reported_with_counts_and_lines(base, tmp_path):
    events = []
    cfg = make_cfg(base, seq_len=8, max_steps=2, too_long="keep")
    assert run(cfg, tmp_path, events.append) == "completed"
    (warn,) = [e for e in events if e["type"] == "log" and e.get("split") == "train"]
    assert warn["level"] == "warning" and warn["truncated"] > 0 and warn["no_answer"] == 0
    assert warn["truncated_lines"][0].startswith(f"{base / 'sft.jsonl'}:")
    assert 0 < warn["prompt_lost"] + warn["answer_cut"] <= warn["truncated"] and warn["dropped"] == 0
    assert "are trained on anyway (too_long = keep)" in warn["message"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["truncated"] >= summary["prompt_lost"] + summary["answer_cut"] > 0
    # By default they are left out, and when that leaves nothing the run says why at once.
    with pytest.raises(StageError, match=r"no validation sample fits the context \(8 tokens\): "
                                         r"\d+ of \d+ would lose all of the prompt"):
        run(make_cfg(base, seq_len=8, max_steps=2), tmp_path / "dropped", [].append)


def test_problems_in_data_val_data_and_eval_tasks_come_as_one_error(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3, "response": "b"}\n')
    val = tmp_path / "val.jsonl"
    val.write_text('{"messages": []}\n')
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"kind": "add"}\n')
    with pytest.raises(SFTDataError) as e:
        run(make_cfg(base, data=[str(bad)], val_data=[str(val)], eval_tasks=str(tasks)), tmp_path, None)
    assert [p.split(": ")[0] for p in e.value.problems] == [f"{bad}:2", f"{val}:1", f"{tasks}:1"]
    assert str(e.value).startswith("3 problem(s) in the SFT data and the held-out tasks")
    with pytest.raises(SFTDataError, match=r"^1 problem\(s\) in the held-out tasks"):      # the tasks alone
        run(make_cfg(base, eval_tasks=str(tasks)), tmp_path, None)
