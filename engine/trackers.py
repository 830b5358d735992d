"""Experiment trackers a run also reports to while it trains: TensorBoard, MLflow, Weights & Biases.

events.jsonl stays the record of a run; a tracker gets a copy of its metrics and samples as they
happen, so a run can be watched, and compared with runs made elsewhere, in the tool a team
already uses. A stage's `log_to` setting names them; `stage_main` wraps the run's event sink in
a `TrackerSink` (`with_trackers`), which hands each metrics event's scalars and each sample to
every tracker named:

    tensorboard   event files in RUN/tensorboard/  (tensorboard --logdir RUN/tensorboard)
    mlflow        the server MLFLOW_TRACKING_URI names, else RUN/mlflow.db (sqlite, local)
    wandb         offline into RUN/wandb/ unless WANDB_MODE says otherwise (wandb sync uploads it)

Nothing reaches the network unless the user pointed a tracker at it. A tracker named but not
installed refuses the run before any work; one that fails mid-run is dropped with a warning,
and the run goes on (its metrics are safe in events.jsonl).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from engine.config import ConfigError, require, to_dict
from engine.runio import Emitter

TRACKERS = ("tensorboard", "mlflow", "wandb")
TB_DIR = "tensorboard"          # RUN/tensorboard/: the live TensorBoard event files
IDS_FILE = "trackers.json"      # the MLflow / W&B run ids, so a resumed run continues its own
INSTALL = {"tensorboard": "pip install tensorboard",
           "mlflow": "pip install 'rlhf-workbench[mlflow]' (or pip install mlflow)",
           "wandb": "pip install 'rlhf-workbench[wandb]' (or pip install wandb)"}


@dataclass(kw_only=True)
class TrackerSettings:
    """Experiment trackers; the setting every training stage shares."""
    log_to: list[str] = field(default_factory=list)  # also log metrics and samples live to: tensorboard (RUN/tensorboard/), mlflow (MLFLOW_TRACKING_URI, else RUN/mlflow.db), wandb (offline unless WANDB_MODE is set)

    def validate_trackers(self) -> None:
        unknown = [t for t in self.log_to if t not in TRACKERS]
        require(not unknown, "log_to", f"unknown tracker(s) {', '.join(map(repr, unknown))}; "
                                       f"known: {', '.join(TRACKERS)}")
        require(len(set(self.log_to)) == len(self.log_to), "log_to", "a tracker is named twice")


# ---- what a tracker is given ---------------------------------------------------------------

def scalars_of(ev: dict) -> dict[str, float]:
    """A metrics event's values as floats under their names ("train/loss", "val/loss", ...).

    The names already carry their group before the slash, which is how TensorBoard, MLflow and
    W&B group charts. A non-finite value, written as "nan" or "inf", stays one: a diverged run
    should look diverged there too.
    """
    out = {}
    for k, v in ev.items():
        if "/" not in k or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif isinstance(v, str):
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def fenced(text: str) -> str:
    """Text as a Markdown code block that no backticks inside it can end early."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}\n{text}\n{fence}"


def sample_markdown(ev: dict) -> str:
    """A sample event as the Markdown TensorBoard's text tab shows: the prompt, then the answer."""
    head = "**answer**"
    if isinstance(ev.get("score"), (int, float)):
        head += f" (score {ev['score']:+.3f})"
    if ev.get("finished") is False:
        head += " (no end token)"
    return "\n\n".join(["**prompt**", fenced(str(ev.get("prompt", ""))), head, fenced(str(ev.get("text", "")))])


class SampleTags:
    """One text tag per prompt (samples/00, samples/01, ...), by first appearance: the answers
    to the same probe prompt then line up step after step under one tag."""

    def __init__(self):
        self._tags: dict[str, str] = {}

    def __call__(self, prompt: str) -> str:
        if prompt not in self._tags:
            self._tags[prompt] = f"samples/{len(self._tags):02d}"
        return self._tags[prompt]


def config_markdown(stage: str, config: dict) -> str:
    return f"**{stage}** settings (config.json)\n\n" + fenced(json.dumps(config, indent=2, ensure_ascii=False))


# ---- the trackers ----------------------------------------------------------------------------

def _quiet_writer_thread_errors() -> None:
    """tensorboard's writer thread hands a failed write (a full disk) to the next call that
    writes, where it is said in one line; Python would also print it from the thread, with a
    traceback. That second copy is left out, for this thread class alone."""
    from tensorboard.summary.writer import event_file_writer
    writer_thread = getattr(event_file_writer, "_AsyncWriterThread", None)
    previous = threading.excepthook
    if writer_thread is None or getattr(previous, "quiets", None) is writer_thread:
        return

    def hook(args) -> None:
        if not isinstance(args.thread, writer_thread):
            previous(args)
    hook.quiets = writer_thread
    threading.excepthook = hook


class TensorBoardWriter:
    """Event files in `logdir`, written with the tensorboard package's own event-file writer.

    `purge_step`: a resumed run's file starts with a purge at the first step it trains again,
    and TensorBoard then hides what the earlier session logged from there on, as the app's plots
    drop the points a resume replaces. The file opens at the first value (none for a run refused
    before it logged anything).
    """

    def __init__(self, logdir: Path, purge_step: Optional[int] = None, flush_secs: int = 10):
        self.logdir = Path(logdir)
        self.purge_step = purge_step
        self.flush_secs = flush_secs
        self._w = None

    def _write(self, step: int, values: list, walltime: Optional[float]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        if self._w is None:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
            _quiet_writer_thread_errors()
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._w = EventFileWriter(str(self.logdir), flush_secs=self.flush_secs)
            if self.purge_step is not None:
                self._w.add_event(Event(wall_time=time.time(), step=self.purge_step,
                                        session_log=SessionLog(status=SessionLog.START)))
        self._w.add_event(Event(wall_time=walltime or time.time(), step=step, summary=Summary(value=values)))

    def scalars(self, step: int, values: dict[str, float], walltime: Optional[float] = None) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary
        self._write(step, [Summary.Value(tag=k, simple_value=v) for k, v in values.items()], walltime)

    def text(self, tag: str, text: str, step: int, walltime: Optional[float] = None) -> None:
        # The text plugin's own summary, under the tag as given (torch's add_text and the legacy
        # text summary append "/text_summary" to every tag).
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
        from tensorboard.plugins.text.metadata import create_summary_metadata
        tensor = TensorProto(dtype="DT_STRING", string_val=[text.encode("utf-8")],
                             tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
        value = Summary.Value(tag=tag, metadata=create_summary_metadata(display_name=tag, description=""),
                              tensor=tensor)
        self._write(step, [value], walltime)

    def close(self, status: Optional[str] = None) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


class MLflowTracker:
    """One MLflow run per workbench run, through the client API (no global active run)."""

    def __init__(self, run_dir: Path, stage: str, config: dict, run_id: Optional[str]):
        # MLflow 3 sends usage telemetry unless told not to: a local run must stay local.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        local = not uri
        if local:
            # The file store is refused by MLflow 3 ("maintenance mode"); sqlite is its local store.
            uri = "sqlite:///" + str((run_dir / "mlflow.db").resolve())
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "rlhf-workbench")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            name, artifact_location=(run_dir / "mlartifacts").resolve().as_uri() if local else None)
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")     # a resumed run goes on as itself
                self.run_id = run_id
                return
            except Exception:  # noqa: BLE001 - its store is gone (another server, a copied folder)
                pass
        run = self.client.create_run(exp_id, run_name=run_dir.name, tags={"workbench.stage": stage})
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[_param(k, v) for k, v in _flat(config).items()])

    def scalars(self, step: int, values: dict[str, float], walltime: Optional[float] = None) -> None:
        from mlflow.entities import Metric
        ms = int((walltime or time.time()) * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def text(self, tag: str, text: str, step: int, walltime: Optional[float] = None) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step-{step:07d}.md")

    def close(self, status: Optional[str] = None) -> None:
        self.client.set_terminated(self.run_id, {"completed": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED"))


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _param(key: str, value: Any):
    from mlflow.entities import Param
    return Param(key, json.dumps(value, ensure_ascii=False)[:6000] if not isinstance(value, str) else value[:6000])


class WandbTracker:
    """A W&B run in RUN/wandb/, offline unless WANDB_MODE asks for more (`wandb sync` uploads it)."""

    def __init__(self, run_dir: Path, stage: str, config: dict, run_id: Optional[str]):
        import wandb
        self.wandb = wandb
        # console="off": W&B must not capture stdout, which carries the stage's event lines.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlhf-workbench"), name=run_dir.name,
                              id=run_id, resume="allow" if run_id else None, dir=str(run_dir),
                              mode=os.environ.get("WANDB_MODE", "offline"), config=config, job_type=stage,
                              settings=wandb.Settings(console="off", silent=True))
        self.run_id = self.run.id
        self.rows: list[list] = []

    def scalars(self, step: int, values: dict[str, float], walltime: Optional[float] = None) -> None:
        self.run.log(values, step=step)

    def text(self, tag: str, text: str, step: int, walltime: Optional[float] = None) -> None:
        self.rows.append([step, tag, text])

    def close(self, status: Optional[str] = None) -> None:
        # The samples go up as one table at the end: a table logged per sample would make a
        # new artifact version each time.
        if self.rows:
            self.run.log({"samples": self.wandb.Table(columns=["step", "tag", "sample"], data=self.rows)})
        self.run.finish(exit_code=0 if status in ("completed", "stopped") else 1)


# ---- the sink ----------------------------------------------------------------------------------

def check_installed(names: list[str]) -> None:
    """Refuse, before any work, a tracker whose package is not installed: one line, how to get it."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError("log_to", f"{name} is not installed: {INSTALL[name]}")
    local = not os.environ.get("MLFLOW_TRACKING_URI")
    if "mlflow" in names and local and importlib.util.find_spec("sqlalchemy") is None:
        raise ConfigError("log_to", "mlflow's local store (RUN/mlflow.db) needs the full mlflow package "
                                    f"({INSTALL['mlflow']}); or set MLFLOW_TRACKING_URI to a tracking server")


def resume_step(run_dir: Path) -> Optional[int]:
    """Where a resumed run's TensorBoard curves start again: the step after the checkpoint it
    resumes from (0 with none: it starts over). None for a run that has logged nothing there.

    Not the first step the new session logs: a stage logs its starting figures (the unigram
    baseline) at the checkpoint's own step, and a purge from there would hide the last trained
    point of the earlier session, which nothing replaces.
    """
    if not any((run_dir / TB_DIR).glob("events.out.tfevents.*")):
        return None
    from engine.checkpoint import list_checkpoints
    saved = list_checkpoints(run_dir / "checkpoints")
    return saved[-1][0] + 1 if saved else 0


def open_tracker(name: str, run_dir: Path, stage: str, config: dict, ids: dict):
    if name == "tensorboard":
        return TensorBoardWriter(run_dir / TB_DIR, purge_step=resume_step(run_dir))
    if name == "mlflow":
        return MLflowTracker(run_dir, stage, config, ids.get("mlflow"))
    return WandbTracker(run_dir, stage, config, ids.get("wandb"))


class TrackerSink:
    """The run's sink, plus a copy of its metrics and samples for each tracker.

    The inner sink (events.jsonl) gets every event first: the record of the run must not
    depend on a tracker. A tracker that raises is dropped, with a warning in the run's log.
    """

    def __init__(self, inner: Callable[[dict], None], trackers: dict[str, Any]):
        self.inner = inner
        self.trackers = trackers
        self.tags = SampleTags()
        self.status: Optional[str] = None

    def __call__(self, ev: dict) -> None:
        self.inner(ev)
        t = ev.get("type")
        if t == "done":
            self.status = ev.get("status")
        if t not in ("metrics", "sample") or not isinstance(ev.get("step"), int):
            return
        step, when = ev["step"], ev.get("time")
        if t == "metrics":
            values = scalars_of(ev)
            if values:
                self._each(lambda tr: tr.scalars(step, values, when))
        else:
            tag, text = self.tags(str(ev.get("prompt", ""))), sample_markdown(ev)
            self._each(lambda tr: tr.text(tag, text, step, when))

    def _each(self, call) -> None:
        for name, tr in list(self.trackers.items()):
            try:
                call(tr)
            except Exception as e:  # noqa: BLE001 - a tracker's failure must not end the training
                del self.trackers[name]
                self._warn(f"log_to: {name} failed ({type(e).__name__}: {e}); the run goes on without it "
                           f"(its metrics are in events.jsonl)")

    def _warn(self, message: str) -> None:
        Emitter(self.inner).log(message, level="warning")

    def close(self) -> None:
        for name, tr in list(self.trackers.items()):
            try:
                tr.close(self.status)
            except Exception as e:  # noqa: BLE001
                print(f"warning: log_to: {name} did not close cleanly: {e}", file=sys.stderr, flush=True)
        self.trackers = {}
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def with_trackers(inner, cfg, run_dir: Path, stage: str):
    """`inner` itself when the config names no tracker; else a TrackerSink over it, every tracker
    open (ConfigError, before any work, for one that is missing or cannot start)."""
    names = list(getattr(cfg, "log_to", None) or [])
    if not names:
        return inner
    check_installed(names)
    ids_path = Path(run_dir) / IDS_FILE
    try:
        ids = json.loads(ids_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        ids = {}
    trackers: dict[str, Any] = {}
    config = to_dict(cfg)
    try:
        for name in names:
            trackers[name] = open_tracker(name, Path(run_dir), stage, config, ids)
    except Exception as e:  # noqa: BLE001 - any failure to start is the user's to fix, in one line
        for tr in trackers.values():
            tr.close("failed")
        raise ConfigError("log_to", f"{name} could not start: {type(e).__name__}: {e}") from None
    new = {n: tr.run_id for n, tr in trackers.items() if getattr(tr, "run_id", None)}
    if new and new != {k: ids.get(k) for k in new}:
        from engine.fsutil import atomic_write_text
        atomic_write_text(ids_path, json.dumps({**ids, **new}, indent=2) + "\n")
    sink = TrackerSink(inner, trackers)
    if "tensorboard" in trackers and trackers["tensorboard"].purge_step is None:
        trackers["tensorboard"].text("run/config", config_markdown(stage, config), 0)
    return sink
