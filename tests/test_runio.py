import io
import json
from dataclasses import dataclass, field
from typing import Optional

import pytest

from engine.config import ConfigError, from_dict, load_config, require
from engine.runio import Control, EventLog, HumanPrinter, read_events, stage_main, StageError


@dataclass
class Cfg:
    name: str
    steps: int = 10
    lr: float = 1e-3
    tags: list[str] = field(default_factory=list)
    limit: Optional[int] = None

    def validate(self):
        require(self.steps > 0, "steps", "must be positive")


def test_config_errors_name_the_field(tmp_path):
    assert from_dict(Cfg, {"name": "a", "lr": 1}).lr == 1.0
    cases = [({"name": "a", "steps": "ten"}, "steps"), ({"name": "a", "stepz": 3}, "stepz"),
             ({"name": "a", "steps": 0}, "steps"), ({"name": "a", "tags": ["x", 2]}, "tags[1]"),
             ({"name": "a", "steps": True}, "steps"), ({"name": "a", "limit": 1.5}, "limit")]
    for data, fieldname in cases:
        with pytest.raises(ConfigError) as e:
            from_dict(Cfg, data)
        assert e.value.field == fieldname
    bad = tmp_path / "config.json"
    bad.write_text('{"name": "a",\n "steps": }')
    with pytest.raises(ConfigError, match=r"config.json.*line 2"):
        load_config(Cfg, bad)


def test_control_sees_stop_file_and_clear_removes_it(tmp_path):
    c = Control(tmp_path)
    assert not c.should_stop()
    (tmp_path / "STOP").touch()
    assert c.should_stop()
    c.clear()
    assert not c.should_stop() and not (tmp_path / "STOP").exists()


def test_control_stops_once_the_process_it_runs_for_is_gone(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    from engine import runio
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    monkeypatch.setattr(runio, "PARENT_CHECK_S", 0.0)
    monkeypatch.setenv(runio.STOP_WITH_ENV, str(os.getpid()))     # alive: runs on
    c = Control(tmp_path)
    assert not c.should_stop()
    (tmp_path / "STOP").touch()                # and a STOP file still stops it meanwhile
    assert c.should_stop()
    (tmp_path / "STOP").unlink()
    monkeypatch.setenv(runio.STOP_WITH_ENV, str(gone.pid))        # gone: stops
    assert Control(tmp_path).should_stop()


def test_event_log_appends_and_reader_skips_torn_line(tmp_path):
    seen = []
    log = EventLog(tmp_path, echo=seen.append)
    log({"type": "metrics", "step": 1, "train/loss": 2.0})
    log.close()
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"type": "metr')  # the writer was killed mid-line
    assert [e["type"] for e in read_events(tmp_path)] == ["metrics"]
    assert seen[0]["train/loss"] == 2.0


def test_human_printer_shows_loss_and_eta():
    out = io.StringIO()
    p = HumanPrinter("pretrain", out)
    p({"type": "metrics", "step": 10, "train/loss": 2.5, "train/lr": 1e-3})
    p({"type": "progress", "step": 10, "total": 100, "tokens_per_s": 12345.0, "eta_s": 75})
    line = out.getvalue().strip()
    assert line.startswith("[pretrain] step 10/100") and "loss 2.5" in line
    assert "12.3k tok/s" in line and "ETA 1m15s" in line
    p({"type": "progress", "step": 1_500_000, "total": 50_000_000, "unit": "bytes", "eta_s": 3})
    assert out.getvalue().splitlines()[-1].startswith("[pretrain] 1.5/50.0 MB")


def _stage(outcome):
    def run(cfg, run_dir, sink, control):
        if outcome == "error":
            raise StageError("bad data on line 3")
        if outcome == "crash":
            raise ZeroDivisionError("boom")
        return "completed"
    return run


@pytest.mark.parametrize("outcome,code,status", [("ok", 0, "completed"), ("error", 1, "failed"),
                                                 ("crash", 1, "failed")])
def test_stage_main_always_ends_with_done(tmp_path, capsys, outcome, code, status):
    (tmp_path / "config.json").write_text(json.dumps({"name": "x"}))
    (tmp_path / "STOP").touch()  # left over from an earlier stop: must not leak into this run
    assert stage_main("demo", Cfg, _stage(outcome), ["--run-dir", str(tmp_path)]) == code
    events = read_events(tmp_path)
    assert events[0]["type"] == "start" and events[-1]["type"] == "done"
    assert events[-1]["status"] == status
    assert not (tmp_path / "STOP").exists()
    stdout_events = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert stdout_events == events  # not a TTY: stdout carries the same JSON lines


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 3276800000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError()])
def test_running_out_of_memory_is_one_line_without_a_traceback(tmp_path, capsys, error):
    (tmp_path / "config.json").write_text(json.dumps({"name": "x"}))

    def run(cfg, run_dir, sink, control):
        raise error

    assert stage_main("demo", Cfg, run, ["--run-dir", str(tmp_path), "--log-format", "human"]) == 1
    done = read_events(tmp_path)[-1]
    assert done["status"] == "failed" and done["error"].startswith("out of memory")
    assert "lower batch_size" in done["error"]
    assert "Traceback" not in capsys.readouterr().out + "".join(json.dumps(e) for e in read_events(tmp_path))


def test_stage_main_refuses_bad_config_before_running(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"name": "x", "steps": -1}))
    ran = []
    assert stage_main("demo", Cfg, lambda *a: ran.append(1), ["--run-dir", str(tmp_path),
                                                              "--log-format", "human"]) == 2
    assert ran == []
    done = read_events(tmp_path)[-1]
    assert done["status"] == "failed" and "'steps'" in done["error"]
