"""Runs that travel: `workbench export tensorboard`, and a stage's log_to (TensorBoard, MLflow, W&B).

What TensorBoard shows is checked with TensorBoard's own reader (EventAccumulator) on the files
a tiny real pretraining run wrote live and the export wrote afterwards. MLflow and W&B are not
installed here: stand-in modules record what the trackers hand them.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, from_dict
from engine.pretrain import PretrainConfig
from engine.runio import read_events
from engine.tokenizer import train_tokenizer
from engine import trackers
from workbench import cli
from workbench.forms import LABELS, field_specs

WORDS = "the cat sat on a mat and the dog ran to the red ball".split()


def workbench(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:         # argparse's own refusals
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A pretraining run of 8 steps with evaluations and samples, run as a user runs it:
    `workbench run pretrain --run-dir DIR --set log_to=["tensorboard"]`."""
    root = tmp_path_factory.mktemp("tb")
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (8,), generator=g).tolist()) for _ in range(300)]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    train_tokenizer([root / "text.txt"], vocab_size=280, min_frequency=2).save(root / "tokenizer.json")
    run = root / "pretrain-tiny"
    run.mkdir()
    cfg = dict(tokenizer=str(root / "tokenizer.json"), inputs=[str(root / "text.txt")], preset="tiny",
               model={"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2, "d_ff": 64, "max_seq_len": 32},
               seq_len=32, batch_size=4, max_steps=8, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=1,
               sample_every=4, sample_tokens=4, checkpoint_every=100, log_every=1, device="cpu")
    (run / "config.json").write_text(json.dumps(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = cli.main(["run", "pretrain", "--run-dir", str(run), "--set", 'log_to=["tensorboard"]',
                       "--log-format", "json"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return run


def logged(run: Path) -> dict[str, dict[int, float]]:
    """Every metric of a run's events.jsonl: name -> {step: value}, read independently."""
    out: dict[str, dict[int, float]] = {}
    for ev in read_events(run):
        if ev["type"] == "metrics":
            for k, v in ev.items():
                if "/" in k and isinstance(v, (int, float)):
                    out.setdefault(k, {})[ev["step"]] = float(v)
    return out


def reader(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})   # 0: keep all
    acc.Reload()
    return acc


def assert_every_metric_and_step(acc, run: Path) -> None:
    expected = logged(run)
    assert len(expected) >= 5 and {"train/loss", "val/loss", "train/lr"} <= set(expected)
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert sorted(got) == sorted(points), tag
        assert got == pytest.approx(points, rel=1e-6), tag     # TensorBoard keeps float32


def text_of(acc, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]


def test_export_holds_every_metric_at_every_step_and_the_samples(tiny_run, tmp_path, capsys):
    rc, out, err = workbench(capsys, "export", "tensorboard", tiny_run, "--out", tmp_path / "tb")
    assert rc == 0 and err == "" and "tensorboard --logdir" in out
    acc = reader(tmp_path / "tb" / tiny_run.name)
    assert_every_metric_and_step(acc, tiny_run)
    samples = [e for e in read_events(tiny_run) if e["type"] == "sample"]
    assert len(samples) == 4
    # One text tag per prompt: its answers line up step after step.
    assert {"samples/00", "samples/01", "run/config"} <= set(acc.Tags()["tensors"])
    first = text_of(acc, "samples/00")
    assert [s for s, _ in first] == [4, 8] and samples[0]["prompt"] in first[0][1]
    assert samples[0]["text"] in first[0][1]
    assert '"max_steps": 8' in text_of(acc, "run/config")[0][1]


def test_export_again_replaces_its_files_and_keeps_runs_of_one_name_apart(tiny_run, tmp_path, capsys):
    out = tmp_path / "tb"
    for _ in range(2):
        rc, _, err = workbench(capsys, "export", "tensorboard", tiny_run, tiny_run, "--out", out)
        assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == [tiny_run.name, tiny_run.name + "-2"]
    for folder in out.iterdir():
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1
        assert_every_metric_and_step(reader(folder), tiny_run)


def test_log_to_tensorboard_writes_live_event_files_a_reader_loads(tiny_run):
    acc = reader(tiny_run / trackers.TB_DIR)
    assert_every_metric_and_step(acc, tiny_run)
    assert [s for s, _ in text_of(acc, "samples/01")] == [4, 8]


def _events(*steps_and_losses, start=True) -> list[dict]:
    evs = [{"type": "start", "time": 1.0, "stage": "pretrain", "config": {"lr": 1}, "pid": 1}] if start else []
    for step, loss in steps_and_losses:
        evs.append({"type": "metrics", "time": 1.0 + step, "step": step, "train/loss": loss})
        evs.append({"type": "sample", "time": 1.0 + step, "step": step, "prompt": "p", "text": f"answer {loss}"})
    return evs


def test_a_resumed_run_is_exported_as_the_app_draws_it(tmp_path, capsys):
    # Steps 1-4, then a resume from the checkpoint at step 2: steps 3 and 4 again, other values.
    run = tmp_path / "runs" / "sft-resumed"
    run.mkdir(parents=True)
    evs = _events((1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)) + _events((3, 2.5), (4, 2.25), (5, 2.0))
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
    rc, _, err = workbench(capsys, "export", "tensorboard", run, "--out", tmp_path / "tb")
    assert rc == 0, err
    acc = reader(tmp_path / "tb" / "sft-resumed")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 4.0), (2, 3.0), (3, 2.5), (4, 2.25), (5, 2.0)]
    assert [s for s, _ in text_of(acc, "samples/00")] == [1, 2, 3, 4, 5]
    assert "answer 2.5" in text_of(acc, "samples/00")[2][1]


def test_a_resumed_live_run_hides_what_the_resume_replaced(tiny_run, tmp_path):
    # The tiny run again, 4 steps longer: it resumes from its checkpoint at step 8.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = cli.main(["run", "pretrain", "--run-dir", str(run), "--set", "max_steps=12", "--log-format", "json"])
        assert rc == 0
    finally:
        torch.set_num_threads(threads)
    acc = reader(run / trackers.TB_DIR)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
    assert_every_metric_and_step(acc, run)
    # A session that went past its last checkpoint: a resume replaces what it logged after it.
    logdir = tmp_path / "tb"
    for session, purge in ((_events((1, 4.0), (2, 3.0), (3, 2.0), start=False), None),
                           (_events((2, 3.5), (3, 2.5), start=False), 2)):
        sink = trackers.TrackerSink(lambda ev: None, {"tensorboard": trackers.TensorBoardWriter(logdir, purge)})
        for ev in session:
            sink(ev)
        sink.close()
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2
    assert [(e.step, e.value) for e in reader(logdir).Scalars("train/loss")] == [(1, 4.0), (2, 3.5), (3, 2.5)]


@pytest.mark.parametrize("make, reason", [
    (lambda p: p / "nowhere", "does not exist"),
    (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is not a run folder (a file)"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "is not a run folder: it has no events.jsonl"),
])
def test_a_bad_run_is_refused_in_one_line_and_nothing_is_written(tiny_run, tmp_path, capsys, make, reason):
    bad = make(tmp_path)
    rc, out, err = workbench(capsys, "export", "tensorboard", tiny_run, bad, "--out", tmp_path / "tb")
    assert rc == 2 and out == ""
    assert err == f"error: {bad} {reason}\n"
    assert "Traceback" not in err and not (tmp_path / "tb").exists()


def test_export_tensorboard_refuses_checkpoint_options_and_no_runs(tiny_run, tmp_path, capsys):
    rc, _, err = workbench(capsys, "export", "tensorboard", "--out", tmp_path / "tb")
    assert rc == 2 and "at least one RUN" in err
    rc, _, err = workbench(capsys, "export", "tensorboard", tiny_run, "--format", "gguf", "--out", tmp_path / "tb")
    assert rc == 2 and "--format" in err and not (tmp_path / "tb").exists()


def test_checkpoint_export_still_parses_as_before(tmp_path, capsys, monkeypatch):
    import engine.export
    calls = []
    monkeypatch.setattr(engine.export, "export", lambda *a: calls.append(a) or a[2])
    assert workbench(capsys, "export", tmp_path / "run", "--out", tmp_path / "hf")[0] == 0
    assert workbench(capsys, "export", tmp_path / "run", "--format", "gguf", "--gguf-type", "q8_0",
                     "--out", tmp_path / "m.gguf")[0] == 0
    assert workbench(capsys, "export", tmp_path / "run", "--out", tmp_path / "bf", "--dtype", "bfloat16")[0] == 0
    assert calls == [(tmp_path / "run", "hf", tmp_path / "hf", "f16", "float32"),
                     (tmp_path / "run", "gguf", tmp_path / "m.gguf", "q8_0", "float32"),
                     (tmp_path / "run", "hf", tmp_path / "bf", "f16", "bfloat16")]
    rc, _, err = workbench(capsys, "export", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "x")
    assert rc == 2 and "export takes one RUN" in err and len(calls) == 3
    rc, _, err = workbench(capsys, "export", "tensorboard", tmp_path / "a", "--dtype", "bfloat16", "--out", tmp_path / "x")
    assert rc == 2 and "--dtype" in err and len(calls) == 3


def test_help_documents_export_tensorboard(capsys):
    rc, out, _ = workbench(capsys, "export", "--help")
    assert rc == 0
    assert "workbench export tensorboard RUN [RUN ...] --out DIR" in out and "--format" in out
    assert "log_to" in out
    assert "export tensorboard" in workbench(capsys, "--help")[1]


# ---- log_to: the setting, and the trackers it opens ---------------------------------------------

def config(**kw) -> PretrainConfig:
    return from_dict(PretrainConfig, {"tokenizer": "t.json", "inputs": ["c.txt"], **kw})


def test_log_to_is_a_setting_of_every_training_stage_with_its_help():
    assert config(log_to=["tensorboard", "wandb"]).log_to == ["tensorboard", "wandb"]
    for bad, message in [(["tb"], "unknown tracker"), (["mlflow", "mlflow"], "named twice")]:
        with pytest.raises(ConfigError, match=message) as e:
            config(log_to=bad)
        assert e.value.field == "log_to"
    for stage in ("pretrain", "sft", "reward", "dpo", "ppo", "grpo"):
        spec = next(s for s in field_specs(stage) if s.name == "log_to")
        assert spec.kind == "lines" and spec.default == [] and "tensorboard" in spec.help and "WANDB_MODE" in spec.help
    assert LABELS["log_to"].startswith("also log to")


def without(monkeypatch, *missing: str) -> None:
    """Make `missing` packages look not installed to the trackers' check."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))


def test_a_tracker_not_installed_refuses_the_run_in_one_line_before_any_work(tiny_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    cfg = json.loads((tiny_run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "log_to": ["tensorboard", "wandb"]}))
    without(monkeypatch, "wandb")
    from engine import pretrain
    rc = pretrain.main(["--run-dir", str(run), "--log-format", "human"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "'log_to': wandb is not installed: pip install 'rlhf-workbench[wandb]'" in err
    assert not (run / "checkpoints").exists() and not (run / trackers.TB_DIR).exists()


def test_mlflow_without_a_server_needs_its_local_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fake_modules(monkeypatch)
    without(monkeypatch, "sqlalchemy")
    with pytest.raises(ConfigError, match="set MLFLOW_TRACKING_URI"):
        trackers.with_trackers(print, config(log_to=["mlflow"]), tmp_path, "pretrain")


def test_a_tracker_that_fails_mid_run_is_dropped_with_a_warning():
    class Broken:
        def scalars(self, *a):
            raise ConnectionError("server went away")

        def close(self, status):
            pass

    seen = []
    sink = trackers.TrackerSink(seen.append, {"mlflow": Broken()})
    for step in (1, 2):
        sink({"type": "metrics", "time": 1.0, "step": step, "train/loss": 1.0})
    assert [e["type"] for e in seen] == ["metrics", "log", "metrics"]
    assert seen[1]["level"] == "warning" and "mlflow failed (ConnectionError: server went away)" in seen[1]["message"]
    assert sink.trackers == {}


class FakeWandbRun:
    def __init__(self, run_id):
        self.id, self.logged, self.exit_code = run_id or "w123", [], None

    def log(self, values, step=None):
        self.logged.append((step, values))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


class FakeMlflowClient:
    def __init__(self, tracking_uri):
        self.uri, self.calls = tracking_uri, []
        FakeMlflowClient.last = self

    def __getattr__(self, name):
        def call(*a, **kw):
            self.calls.append((name, a, kw))
            if name == "create_run":
                return types.SimpleNamespace(info=types.SimpleNamespace(run_id="m456"))
            return None
        return call


def fake_modules(monkeypatch) -> dict:
    """Stand-ins for wandb and mlflow, found by importlib like installed packages."""
    made = {}

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    def init(**kw):
        made["wandb_init"] = kw
        made["wandb_run"] = FakeWandbRun(kw.get("id"))
        return made["wandb_run"]

    module("wandb", init=init, Settings=dict, Table=lambda columns, data: ("table", columns, data))
    module("mlflow")
    module("mlflow.tracking", MlflowClient=FakeMlflowClient)
    module("mlflow.entities", Metric=lambda *a: ("metric", *a), Param=lambda *a: ("param", *a))
    return made


def run_session(sink, status="completed") -> None:
    sink({"type": "metrics", "time": 2.0, "step": 3, "train/loss": 1.5, "val/loss": "nan"})
    sink({"type": "sample", "time": 2.0, "step": 3, "prompt": "2+2?", "text": "4", "score": 0.5})
    sink({"type": "done", "time": 3.0, "status": status, "error": None})
    sink.close()


def test_wandb_runs_offline_in_the_run_folder_unless_wandb_mode_says_otherwise(tmp_path, monkeypatch):
    made = fake_modules(monkeypatch)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    seen = []
    run_session(trackers.with_trackers(seen.append, config(log_to=["wandb"]), tmp_path, "pretrain"))
    init, run = made["wandb_init"], made["wandb_run"]
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path) and init["name"] == tmp_path.name
    assert init["config"]["log_to"] == ["wandb"] and init["id"] is None
    assert run.logged[0][0] == 3 and run.logged[0][1]["train/loss"] == 1.5
    assert str(run.logged[0][1]["val/loss"]) == "nan" and run.logged[1][1]["samples"][0] == "table"
    assert run.exit_code == 0 and [e["type"] for e in seen] == ["metrics", "sample", "done"]
    # The run id is kept: a resumed run goes on as the same W&B run, online when asked.
    assert json.loads((tmp_path / trackers.IDS_FILE).read_text()) == {"wandb": "w123"}
    monkeypatch.setenv("WANDB_MODE", "online")
    run_session(trackers.with_trackers(seen.append, config(log_to=["wandb"]), tmp_path, "pretrain"), "failed")
    assert made["wandb_init"]["mode"] == "online" and made["wandb_init"]["id"] == "w123"
    assert made["wandb_init"]["resume"] == "allow" and made["wandb_run"].exit_code == 1


def test_mlflow_logs_into_the_run_folder_unless_a_tracking_uri_is_set(tmp_path, monkeypatch):
    fake_modules(monkeypatch)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "sqlalchemy" else real(n, *a))
    run_session(trackers.with_trackers(print, config(log_to=["mlflow"]), tmp_path, "pretrain"))
    client = FakeMlflowClient.last
    assert client.uri == "sqlite:///" + str((tmp_path / "mlflow.db").resolve())
    import os
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"     # nothing leaves the machine
    names = [c[0] for c in client.calls]
    assert names[:3] == ["get_experiment_by_name", "create_experiment", "create_run"]
    metrics = [c for c in client.calls if c[0] == "log_batch" and "metrics" in c[2]][0][2]["metrics"]
    assert ("metric", "train/loss", 1.5, 2000, 3) in metrics
    assert client.calls[-1][:2] == ("set_terminated", ("m456", "FINISHED"))
    assert any(c[0] == "log_text" and c[1][2] == "samples/00/step-0000003.md" for c in client.calls)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    run_session(trackers.with_trackers(print, config(log_to=["mlflow"]), tmp_path, "pretrain"), "stopped")
    client = FakeMlflowClient.last
    assert client.uri == "http://127.0.0.1:5000" and ("update_run", ("m456",), {"status": "RUNNING"}) in client.calls
    assert client.calls[-1][:2] == ("set_terminated", ("m456", "KILLED"))


# Their own deprecations (SQLAlchemy's under MLflow) and W&B's temporary folders are theirs.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")
def test_the_real_mlflow_and_wandb_get_the_metrics_locally(tmp_path, monkeypatch):
    """Where the extras are installed ([mlflow], [wandb]): the real packages, offline."""
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    for var in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    run_session(trackers.with_trackers(lambda ev: None, config(log_to=["mlflow", "wandb"]), tmp_path, "pretrain"))
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"))
    run_id = json.loads((tmp_path / trackers.IDS_FILE).read_text())["mlflow"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(3, 1.5)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_the_sft_form_takes_log_to_as_a_person_types_it(qtbot):
    from PySide6.QtCore import Qt
    from ui.config_form import ConfigForm
    from workbench.runfolder import defaults
    form = ConfigForm("sft", lambda kind: [])
    form.set_values({**defaults("sft"), "init": "pre", "data": ["sft.jsonl"]})
    qtbot.addWidget(form)
    form.show()
    qtbot.mouseClick(form.advanced_toggle, Qt.LeftButton)           # log_to is an advanced setting
    editor = form.editors["log_to"]
    assert editor.isVisible() and "WANDB_MODE" in editor.toolTip()
    editor.setFocus()
    qtbot.keyClicks(editor, "tensorboard")
    qtbot.keyClick(editor, Qt.Key_Return)
    qtbot.keyClicks(editor, "tb")
    qtbot.waitUntil(lambda: "log_to" in form.errors, timeout=10_000)
    assert "unknown tracker(s) 'tb'" in form.messages["log_to"].text()
    qtbot.keyClick(editor, Qt.Key_Backspace)
    qtbot.keyClick(editor, Qt.Key_Backspace)
    qtbot.waitUntil(lambda: "log_to" not in form.errors, timeout=10_000)
    assert form.values()["log_to"] == ["tensorboard"]


def test_a_full_disk_under_the_writer_thread_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    # tensorboard's writer thread hands the error on to the next write, and Python printed it
    # from the thread as well, with a traceback.
    import errno
    from tensorboard.summary.writer import record_writer

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    rc, out, err = workbench(capsys, "export", "tensorboard", tiny_run, "--out", tmp_path / "tb")
    assert rc == 1 and "No space left on device" in err and "Traceback" not in err
