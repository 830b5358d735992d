"""The whole pipeline headless on a tiny demo project: every stage runs and leaves its run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.store import Store

ROOT = Path(__file__).resolve().parents[1]


def test_demo_pipeline_end_to_end(tmp_path):
    # A project named relative to the working folder, as `workbench pipeline --demo` names its own.
    project = tmp_path / "demo"
    cmd = [sys.executable, "-m", "workbench.cli", "pipeline", "--demo", "--project", "demo",
           "--scale", "tiny", "--vocab-size", "300", "--steps", "12", "--sft-steps", "6",
           "--eval-tasks", "8", "--rank-prompts", "12", "--k", "3", "--rm-epochs", "1",
           "--ppo-steps", "2", "--methods", "ppo,dpo", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = proc.stdout[proc.stdout.index("stage      run"):]
    for stage in ("tokenizer", "pretrain", "sft", "sample", "rank", "reward", "ppo", "dpo", "evaluate"):
        assert f"\n{stage} " in table, table
    assert "PPO vs SFT win rate" in table and "DPO vs SFT win rate" in table
    runs = sorted(p.name.split("-")[0] for p in (project / "runs").iterdir())
    assert runs == ["dpo", "ppo", "pretrain", "reward", "sample", "sft", "tokenizer"]
    for run in (project / "runs").iterdir():
        events = [json.loads(l) for l in (run / "events.jsonl").read_text().splitlines()]
        assert events[-1]["type"] == "done" and events[-1]["status"] == "completed", run
    # The reward model trained on the store's simulated rankings, copied into its own folder.
    rm_run = next((project / "runs").glob("reward-*"))
    assert len((rm_run / "rankings.jsonl").read_text().splitlines()) == 12
    store = Store.for_project(project)
    try:
        ranked = store.rankings()
        assert len(ranked) == 12 and all(r.simulated for r in ranked)
    finally:
        store.close()
    for method in ("ppo", "dpo"):
        ev = json.loads(next((project / "runs").glob(f"{method}-*")).joinpath("evaluation.json").read_text())
        assert ev["n"] == 8 and ev["wins"] + ev["ties"] + ev["losses"] == 8 and ev["kl"] >= 0
        assert ev["method"] == method
        # its training time as the Runs page gives it: the run's own start to done
        run = next((project / "runs").glob(f"{method}-*"))
        events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        times = [e["time"] for e in events if e["type"] in ("start", "done")]
        assert ev["seconds"] == pytest.approx(times[-1] - times[0])


def test_an_unknown_method_is_refused_before_any_work(tmp_path):
    cmd = [sys.executable, "-m", "workbench.cli", "pipeline", "--demo", "--project", str(tmp_path / "p"),
           "--methods", "ppo,rlhf"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "rlhf" in proc.stderr and "choose from ppo, dpo" in proc.stderr
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("option, said", [(["--k", "1"], "error: --k: answers per prompt must be between 2 and 9"),
                                          (["--device", ""], "error: --device: unknown device ''"),
                                          (["--table-out", "."], "error: --table-out: . is a folder")])
def test_a_bad_option_of_a_later_stage_is_refused_before_any_stage_runs(tmp_path, monkeypatch, capsys,
                                                                         option, said):
    from workbench.cli import main as workbench
    monkeypatch.chdir(tmp_path)
    assert workbench(["pipeline", "--demo", "--project", str(tmp_path / "p"), "--scale", "tiny", *option]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "p" / "runs").exists()


def test_a_stopped_pipeline_goes_on_with_resume_and_keeps_what_it_finished(tmp_path, monkeypatch, capsys):
    from workbench import pipeline
    from workbench.cli import main as workbench
    from workbench.jobs import JobResult
    from workbench.runfold import RunFold
    monkeypatch.chdir(tmp_path)
    real_run_job = pipeline.run_job

    def stopped_in_pretrain(stage, run_dir, on_event=None):     # as Ctrl-C leaves it
        if stage == "pretrain":
            return JobResult(stage, run_dir, "stopped", None, 0, RunFold())
        return real_run_job(stage, run_dir, on_event=on_event)

    base = ["pipeline", "--demo", "--project", "p", "--scale", "tiny", "--vocab-size", "300",
            "--steps", "12", "--sft-steps", "6", "--eval-tasks", "8", "--rank-prompts", "12", "--k", "3",
            "--device", "cpu"]
    monkeypatch.setattr(pipeline, "run_job", stopped_in_pretrain)
    assert workbench(base + ["--until", "sft"]) == 0           # stopped on request: exit 0
    assert "pretrain stopped with a checkpoint" in capsys.readouterr().err
    runs = tmp_path / "p" / "runs"
    (stopped,) = runs.glob("pretrain-*")
    monkeypatch.setattr(pipeline, "run_job", real_run_job)
    # Other settings than the stopped pipeline's are refused, before any work.
    assert workbench(base[:9] + ["13"] + base[10:] + ["--resume"]) == 2
    assert "--steps 12 then, 13 now" in capsys.readouterr().err
    assert workbench(base[:-2] + ["--until", "sft", "--resume"]) == 2          # --device left out
    assert "--device cpu then, not given now" in capsys.readouterr().err
    assert workbench(base + ["--until", "sft", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer  done before" in out and f"resuming {stopped.name}" in out
    assert sorted(p.name.split("-")[0] for p in runs.iterdir()) == ["pretrain", "sft", "tokenizer"]
    assert "\nsft " in out[out.index("stage      run"):]
    # A later --until goes on from the finished stages.
    assert workbench(base + ["--until", "sample", "--resume"]) == 0
    table = capsys.readouterr().out.split("stage      run")[1]
    assert stopped.name in table and "\nsample " in table
    assert sorted(p.name.split("-")[0] for p in runs.iterdir()) == ["pretrain", "sample", "sft", "tokenizer"]
    # Killed after ranking, before the journal said so: ranked again (nothing new), the count is
    # the batch's.
    assert workbench(base + ["--until", "rank", "--resume"]) == 0
    journal = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    assert journal["finished"].pop()["step"] == "rank"
    (tmp_path / "p" / "pipeline.json").write_text(json.dumps(journal))
    capsys.readouterr()
    assert workbench(base + ["--until", "rank", "--resume"]) == 0
    assert "12 simulated rankings" in capsys.readouterr().out.split("stage      run")[1]


def test_resume_leaves_a_run_someone_else_resumed_running_and_stops_only_its_own_orphan(tmp_path, monkeypatch,
                                                                                       capsys):
    """The stopped stage's run, resumed meanwhile in the app (a live process working in its
    folder that no pipeline started): --resume refuses and leaves it running. A process a dead
    pipeline left (its start event names that pipeline) is asked to stop, and waited for."""
    import os
    import signal
    import time
    from workbench import pipeline
    from workbench.cli import main as workbench
    from workbench.jobs import JobResult
    from workbench.runfold import RunFold
    monkeypatch.chdir(tmp_path)
    base = ["pipeline", "--demo", "--project", "p", "--scale", "tiny", "--vocab-size", "300",
            "--steps", "12", "--until", "pretrain", "--device", "cpu"]
    real_run_job = pipeline.run_job
    monkeypatch.setattr(pipeline, "run_job", lambda stage, run_dir, on_event=None: (
        JobResult(stage, run_dir, "stopped", None, 0, RunFold()) if stage == "pretrain"
        else real_run_job(stage, run_dir, on_event=on_event)))
    assert workbench(base) == 0
    (run,) = (tmp_path / "p" / "runs").glob("pretrain-*")
    # Works in the folder until its STOP file appears, as a stage does.
    worker = subprocess.Popen([sys.executable, "-c", "import pathlib, sys, time\n"
                               "while not (pathlib.Path(sys.argv[1]) / 'STOP').exists(): time.sleep(0.05)",
                               str(run)])
    try:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        with open(run / "events.jsonl", "a") as f:
            f.write(json.dumps({"type": "start", "time": time.time(), "stage": "pretrain", "pid": worker.pid}) + "\n")
        with pytest.raises(SystemExit, match=f"pretrain: {run.name} is running in another process "
                                             rf"\(pid {worker.pid}\), not one a stopped pipeline left"):
            workbench(base + ["--resume"])
        assert worker.poll() is None and not (run / "STOP").exists()
        with open(run / "events.jsonl", "a") as f:
            f.write(json.dumps({"type": "start", "time": time.time(), "stage": "pretrain", "pid": worker.pid,
                                "stop_with": gone.pid}) + "\n")
        monkeypatch.setattr(pipeline, "run_job", lambda stage, run_dir, on_event=None: JobResult(
            stage, run_dir, "stopped", None, 0, RunFold()))
        assert workbench(base + ["--resume"]) == 0
        assert f"waiting for {run.name} (pid {worker.pid}), left running by the earlier pipeline" in capsys.readouterr().out
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)


def test_a_pipeline_killed_outright_leaves_no_stage_running_and_resumes_in_its_folder(tmp_path):
    import os
    import signal
    import time
    from engine.osproc import pid_alive
    base = [sys.executable, "-m", "workbench.cli", "pipeline", "--demo", "--project", "p", "--scale", "tiny",
            "--vocab-size", "300", "--preset", "tiny", "--steps", "400", "--until", "pretrain", "--device", "cpu"]
    with open(tmp_path / "first.log", "w") as log:
        pipe = subprocess.Popen(base, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    runs = tmp_path / "p" / "runs"

    def events(run):
        path = run / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    deadline = time.monotonic() + 300
    while not any(e["type"] == "metrics" for run in runs.glob("pretrain-*") for e in events(run)):
        assert pipe.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
        time.sleep(0.2)
    (run,) = runs.glob("pretrain-*")
    stage_pid = next(e["pid"] for e in events(run) if e["type"] == "start")
    pipe.send_signal(signal.SIGKILL)
    pipe.wait()
    # The stage sees its pipeline gone and stops by itself, with a checkpoint.
    deadline = time.monotonic() + 120
    while pid_alive(stage_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(stage_pid)
    assert events(run)[-1]["type"] == "done" and events(run)[-1]["status"] == "stopped"
    assert json.loads((tmp_path / "p" / "pipeline.json").read_text())["stopped"]["run"] == run.name

    proc = subprocess.run(base + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"resuming {run.name}" in proc.stdout and "tokenizer  done before" in proc.stdout
    assert [p.name for p in runs.glob("pretrain-*")] == [run.name]
    starts = [e for e in events(run) if e["type"] == "start"]
    assert len(starts) == 2 and events(run)[-1]["status"] == "completed"
    # Killed after the stage finished but before the journal said so: taken as done, not rerun.
    journal = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    entry = journal["finished"].pop()
    journal["stopped"] = {"step": "pretrain", "run": entry["run"], "seconds": 0.0, "running": True}
    (tmp_path / "p" / "pipeline.json").write_text(json.dumps(journal))
    proc = subprocess.run(base + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"pretrain   finished before ({run.name})" in proc.stdout
    assert len([e for e in events(run) if e["type"] == "start"]) == 2
    assert os.path.exists(run / "summary.json")


def test_eval_tasks_sets_every_stage_that_measures_task_accuracy(demo_project):
    from workbench.cli import build_parser
    from workbench.pipeline import Pipeline
    from workbench.pipeline_journal import Journal
    from workbench.project import Project
    args = build_parser().parse_args(["pipeline", "--project", str(demo_project), "--eval-tasks", "8"])
    pipe = Pipeline(Project.open(demo_project), args, Journal.start(demo_project, args))
    assert pipe.values("sft")["eval_task_limit"] == pipe.values("grpo")["eval_task_limit"] == 8


def test_the_projects_data_files_are_read_before_the_first_stage(demo_project, capsys):
    from workbench.cli import main as workbench
    base = ["pipeline", "--project", str(demo_project), "--steps", "3", "--device", "cpu"]
    sft = demo_project / "data" / "sft.jsonl"
    good = sft.read_text()
    n = len(good.splitlines())
    sft.write_text(good + '{"prompt": 7, "response": "x"}\n')
    assert workbench(base) == 2
    err = capsys.readouterr().err
    assert f"sft.jsonl:{n + 1}: field 'prompt'" in err and not (demo_project / "runs").exists()
    sft.write_text(good)
    tasks = demo_project / "data" / "eval_tasks.jsonl"
    tasks.write_text(tasks.read_text() + '{"prompt": "What is 1 + 1?", "answer": "2"}\n')
    assert workbench(base) == 2
    assert "eval_tasks.jsonl:" in capsys.readouterr().err and not (demo_project / "runs").exists()
    # No held-out tasks named at all: the evaluate step would need them at the very end.
    toml = demo_project / "workbench.toml"
    toml.write_text("\n".join(line for line in toml.read_text().splitlines() if not line.startswith("eval_tasks")))
    assert workbench(base) == 2
    assert "has no 'eval_tasks' entry (the evaluate step measures" in capsys.readouterr().err
    assert not (demo_project / "runs").exists()


def test_the_sft_row_without_held_out_tasks_shows_the_validation_loss():
    from types import SimpleNamespace
    from workbench.pipeline import FIGURES
    result = SimpleNamespace(metrics=lambda: {"val/loss": 1.2345})
    assert FIGURES["sft"](None, result, {}) == "val loss 1.234 (no held-out tasks to score)"
    assert FIGURES["sft"](None, result, {"task_accuracy_before": 0.0, "task_accuracy_after": 0.25,
                                         "eval_tasks": 8}) == "task accuracy 0.0% -> 25.0% on 8 held-out tasks"
