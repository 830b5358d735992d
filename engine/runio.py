"""The run-folder contract every stage shares: events, stop requests, and the CLI wrapper.

A stage is `python -m engine.<stage> --run-dir DIR`. It reads `DIR/config.json`, appends one
JSON object per line to `DIR/events.jsonl` and echoes each on stdout, and ends with a `done`
event whose status is `completed`, `stopped` or `failed`. Event types:

    start       stage, config, pid, host (python, torch, threads, platform)
    metrics     step, then flat names such as "train/loss", "train/lr"
    progress    step, total, unit ("steps", "bytes", "prompts"), tokens_per_s, elapsed_s, eta_s
    sample      step, prompt, text
    checkpoint  step, path, best
    log         level ("info" | "warning" | "error"), message
    done        status, error, step

Stage loops never print: they hand event dicts to a `sink` (any callable; a list's `append`
in tests) and ask a `control` whether to stop, so tests need no process at all.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import signal
import sys
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from engine.config import ConfigError, default_config, field_docs, load_config, to_dict

Sink = Callable[[dict], None]


class StageError(RuntimeError):
    """A failure the user can act on (bad input, a non-finite loss): shown without a traceback."""


class InputProblems(StageError):
    """Bad input found before any work starts: every problem as `FILE:LINE: ...`, one error.

    Listing all of them (the first 20 shown) lets a user fix a file in one pass rather than
    one line per run. Found before any work, so the stage is refused: exit code 2.
    """
    MAX_SHOWN = 20
    exit_code = 2

    def __init__(self, problems, what: str = "input", consequence: str = "", indent: str = "  "):
        self.problems = list(problems)
        shown = self.problems[:self.MAX_SHOWN]
        more = len(self.problems) - len(shown)
        lines = [f"{len(self.problems)} problem(s) in the {what}{consequence}:"] + [indent + p for p in shown]
        if more:
            lines.append(f"{indent}... and {more} more")
        super().__init__("\n".join(lines))


class Emitter:
    """Builds event dicts and hands them to a sink; `sink=None` discards them."""

    def __init__(self, sink: Optional[Sink]):
        self.sink = sink

    def emit(self, type: str, **fields: Any) -> None:
        if self.sink is not None:
            self.sink({"type": type, "time": round(time.time(), 3), **fields})

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.emit("metrics", step=step, **{k: _jsonable(v) for k, v in values.items()})

    def progress(self, step: int, total: int, tokens_per_s: float | None, elapsed_s: float,
                 eta_s: float | None, unit: str = "steps") -> None:
        self.emit("progress", step=step, total=total, unit=unit, tokens_per_s=tokens_per_s,
                  elapsed_s=round(elapsed_s, 2), eta_s=None if eta_s is None else round(eta_s, 1))

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN; keep the fact visible instead of crashing the writer
    return v


# Set by a launcher that waits for the stage (`workbench pipeline`) to its own pid: the stage
# stops with a checkpoint once that process is gone, rather than train on as an orphan that
# holds its run folder while the launcher's --resume would want it. The app's jobs outlive the
# window on purpose and do not set it.
STOP_WITH_ENV = "WORKBENCH_STOP_WITH"
PARENT_CHECK_S = 1.0


class RunFolderMoved(StageError):
    """The run folder is not where the run started (moved, renamed or deleted under it)."""

    def __init__(self, run_dir: Path):
        super().__init__(f"the run folder {run_dir} was moved, renamed or deleted while the run was "
                         "going: it stopped without saving, so that no checkpoint lands in a new "
                         "folder of the old name; resume it where the folder is now")


class Control:
    """Cooperative stop: a `STOP` file in the run folder, SIGTERM / SIGINT, the end of the
    process named by STOP_WITH_ENV, or the run folder moved away under the run (the events
    still reach the moved folder, the log's file stays open; the save at the stop refuses the
    old name, RunFolderMoved, since it would make a new folder, a second half of the run)."""

    def __init__(self, run_dir: str | os.PathLike | None = None):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._flag = False
        parent = os.environ.get(STOP_WITH_ENV, "")
        self.stop_with = int(parent) if parent.isdigit() else None   # the launcher it stops with: in the start event
        self._checked = time.monotonic()

    def request_stop(self) -> None:
        self._flag = True

    def should_stop(self) -> bool:
        if self._flag:
            return True
        if self.run_dir is not None and (self.run_dir / "STOP").exists():
            self._flag = True
        if time.monotonic() - self._checked >= PARENT_CHECK_S:
            self._checked = time.monotonic()
            if self.stop_with is not None:
                from engine.osproc import pid_alive
                if not pid_alive(self.stop_with):
                    self._flag = True
            if folder_moved():
                # A stop, not a raise: under torchrun every rank must stop at one step (the
                # trainer asks them all); the save that follows refuses the old name and says why.
                self._flag = True
        return self._flag

    def clear(self) -> None:
        """A STOP left from the previous session must not end the resumed one at once."""
        self._flag = False
        if self.run_dir is not None:
            (self.run_dir / "STOP").unlink(missing_ok=True)

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            if self._flag and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C means "now"
            self._flag = True

        self._previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore_signal_handlers(self) -> None:
        """Put back what install_signal_handlers replaced: a stage run in-process (tests, the
        pipeline) must not leave its caller deaf to SIGTERM."""
        for s, previous in getattr(self, "_previous", {}).items():
            signal.signal(s, previous)
        self._previous = {}


# The folder the stage of this process works in, as stage_main found it at the start: (path,
# its device and inode). One stage runs in a stage process; a stage run in-process (tests,
# benchmarks) watches nothing.
_watched: Optional[tuple[Path, tuple[int, int]]] = None


def folder_moved() -> bool:
    """Is the run folder not the one the stage began in? Control looks every PARENT_CHECK_S
    and stops the run; a checkpoint's save looks before it writes (check_folder)."""
    return _watched is not None and _identity(_watched[0]) != _watched[1]


def check_folder() -> None:
    """RunFolderMoved if the folder moved: saved by its old name, a checkpoint would make a new
    folder holding the rest of the run."""
    if folder_moved():
        raise RunFolderMoved(_watched[0])


def _identity(path: Optional[Path]) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st is not None else None


class NeverStop:
    def should_stop(self) -> bool:
        return False


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_count(ev: dict) -> str:
    """'step 120/2000', '1.2/50.0 MB' for bytes read, '30/200 prompts' for other units."""
    unit = ev.get("unit", "steps")
    if unit == "bytes":
        return f"{ev['step'] / 1e6:.1f}/{ev['total'] / 1e6:.1f} MB"
    if unit != "steps":
        return f"{ev['step']}/{ev['total']} {unit}"
    return f"step {ev['step']}/{ev['total']}"


# The figures a progress line shows when the stage logs them: the gradient stages' loss, the
# reward model's pair accuracy, PPO's score, GRPO's reward, the KL, and the learning rate.
PROGRESS_FIGURES = (("train/loss", "loss", "{:.4g}"), ("train/accuracy", "acc", "{:.1%}"),
                    ("objective/score", "score", "{:+.3f}"), ("reward/total", "reward", "{:+.3f}"),
                    ("objective/kl", "KL", "{:.3f}"),
                    ("train/lr", "lr", "{:.3g}"))
# ... and what an evaluation line adds to the validation loss.
EVAL_FIGURES = (("val/accuracy", "val acc", "{:.1%}"), ("eval/task_accuracy", "task acc", "{:.1%}"))


def _figures(values: dict, figures) -> list[str]:
    out = []
    for key, label, fmt in figures:
        v = values.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(f"{label} {fmt.format(v)}")
        elif v is not None:
            out.append(f"{label} {v}")   # a non-finite value arrives as its string
    return out


class HumanPrinter:
    """The terminal view of the event stream: one readable line per progress event."""

    def __init__(self, stage: str, stream=None, errors=None):
        self.stage = stage
        self.stream = stream or sys.stdout
        # A failure and error log lines go to stderr, as every workbench command's errors do,
        # so `2>errors.txt` or a wrapper that shows stderr catches them.
        self.errors = errors or (stream if stream is not None else sys.stderr)
        self.last: dict[str, Any] = {}

    def __call__(self, ev: dict) -> None:
        t = ev.get("type")
        line = None
        if t == "metrics":
            self.last.update({k: v for k, v in ev.items() if "/" in k})
            if "val/loss" in ev:
                line = "  ".join([f"[{self.stage}] step {ev['step']}  val loss {_num(ev['val/loss'])}",
                                  *_figures(ev, EVAL_FIGURES)])
        elif t == "progress":
            parts = [f"[{self.stage}] {format_count(ev)}", *_figures(self.last, PROGRESS_FIGURES)]
            if ev.get("tokens_per_s"):
                parts.append(f"{ev['tokens_per_s'] / 1000:.1f}k tok/s")
            parts.append(f"ETA {format_duration(ev.get('eta_s'))}")
            line = "  ".join(parts)
        elif t == "sample":
            # repr shows a newline as \n once (escaping it first showed \\n, like a typed backslash).
            text = str(ev.get("text", ""))
            line = f"[{self.stage}] sample @ {ev.get('step')}: {ev.get('prompt', '')!r} -> {text[:160]!r}"
            if isinstance(ev.get("score"), (int, float)):
                line += f"  (score {ev['score']:+.3f})"
        elif t == "checkpoint":
            line = f"[{self.stage}] saved {ev['path']}" + ("  (best)" if ev.get("best") else "")
        elif t == "log":
            prefix = "" if ev.get("level", "info") == "info" else ev["level"].upper() + ": "
            line = f"[{self.stage}] {prefix}{ev['message']}"
        elif t == "start":
            line = f"[{self.stage}] started (pid {ev.get('pid')})"
        elif t == "done":
            line = f"[{self.stage}] {ev['status']}" + (f": {ev['error']}" if ev.get("error") else "")
        else:
            body = {k: v for k, v in ev.items() if k not in ("type", "time")}
            line = f"[{self.stage}] {t}: {json.dumps(body, ensure_ascii=False)}"
        if line:
            failed = (t == "done" and ev.get("status") == "failed"
                      or t == "log" and ev.get("level") == "error")
            print(line, file=self.errors if failed else self.stream, flush=True)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class EventLog:
    """The sink used by the CLI: appends to events.jsonl, echoes on stdout, one write per line.

    A line torn by a kill or a full disk must not swallow the next one (a reader drops the line
    it is glued to: the next run's `start`, say), so a session starts on a fresh line, and after
    a failed write the next line starts with a newline too.
    """

    def __init__(self, run_dir: Path, echo: Optional[Sink] = None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "events.jsonl"
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
        self._fd = os.open(self.path, flags, 0o644)
        self._torn = _ends_torn(self.path)
        self.echo = echo

    def __call__(self, ev: dict) -> None:
        try:
            self._write((json.dumps(ev, ensure_ascii=False) + "\n").encode("utf-8"))
        finally:
            if self.echo is not None:
                self.echo(ev)   # stdout still carries an event the disk had no room for

    def _write(self, data: bytes) -> None:
        if self._torn:
            data = b"\n" + data
        self._torn = True
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            from engine.fsutil import DiskFull, is_disk_full
            if is_disk_full(e):
                raise DiskFull(self.path.parent) from None
            raise
        self._torn = False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _ends_torn(path: Path) -> bool:
    """Does the file end inside a line (its writer died mid-line)?"""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def iter_events(run_dir: str | os.PathLike) -> Iterator[dict]:
    """The events of a run, one at a time. A torn line (its writer was killed, or the disk was
    full, mid-line) is skipped; an event glued to its end by an older writer is recovered.
    Folding them as they come keeps a long run's 100k events from being alive at once: in the
    app, the collector that runs on the UI thread would have to walk them all."""
    path = Path(run_dir) / "events.jsonl"
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            ev = parse_event_line(line)
            if ev is not None:
                yield ev


def reported_at(run_dir: str | os.PathLike, step: int) -> dict:
    """The metrics the run's events hold for `step` (later events win): what a run resumed at
    its last step, which trains no more, writes into its summary again."""
    out: dict = {}
    for ev in iter_events(run_dir):
        if ev.get("type") == "metrics" and ev.get("step") == step:
            out.update({k: v for k, v in ev.items() if k not in ("type", "time", "step")})
    return out


def parse_event_line(line: str) -> Optional[dict]:
    """One events.jsonl line as an event, or None; a torn event's remains before a whole one
    on the same line are dropped (every event is written with "type" as its first key)."""
    start = 0
    while start >= 0:
        try:
            ev = json.loads(line[start:])
            return ev if isinstance(ev, dict) else None
        except json.JSONDecodeError:
            start = line.find('{"type"', start + 1)
    return None


def read_events(run_dir: str | os.PathLike) -> list[dict]:
    """All events of a run (iter_events as a list)."""
    return list(iter_events(run_dir))


def write_summary(run_dir: Path, summary: dict) -> None:
    """DIR/summary.json: the run's final figures, for the pipeline table and the runs browser."""
    from engine.fsutil import atomic_write_text
    atomic_write_text(Path(run_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")


def json_echo(ev: dict) -> None:
    sys.stdout.write(json.dumps(ev, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _json_and_failure(stage: str) -> Sink:
    """Events as JSON on stdout, and a failure's reason on stderr too, as in the human format:
    a caller that reads only stderr (`2>err`, a wrapper) still sees why a stage was refused."""
    said = HumanPrinter(stage, stream=io.StringIO(), errors=sys.stderr)

    def echo(ev: dict) -> None:
        json_echo(ev)
        if ev.get("type") == "done" and ev.get("status") == "failed":
            said(ev)
    return echo


StageFn = Callable[[Any, Path, Sink, Any], str]


def stage_main(stage: str, config_cls: type, run: StageFn, argv: list[str] | None = None) -> int:
    """`python -m engine.<stage> --run-dir DIR`: load and check the config, run, report `done`.

    Exit codes: 0 completed or stopped, 1 failed while running, 2 refused before starting.
    """
    args = _parser(stage, config_cls).parse_args(argv)
    if args.write_config is not None:
        return write_default_config(stage, config_cls, args.write_config)
    fmt = args.log_format
    if fmt == "auto":
        fmt = "human" if sys.stdout.isatty() else "json"
    echo = HumanPrinter(stage) if fmt == "human" else _json_and_failure(stage)
    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        print(f"error: run folder {run_dir} does not exist", file=sys.stderr)
        return 2
    from engine import distributed
    from engine.runlock import RunLock
    world = distributed.from_env()
    # Rank 0 locks the folder before touching anything in it (the STOP file, a killed save's
    # leftovers): a second process would take this one's files for leftovers and delete them.
    lock = RunLock(run_dir) if world.is_main else None
    try:
        if lock is not None:
            lock.acquire()
    except (StageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    global _watched
    here = Path(os.path.abspath(run_dir))
    if world.is_main:       # rank 0 speaks for the run (under torchrun the others only train)
        _watched = (here, _identity(here))
    try:
        return _run_stage(stage, config_cls, run, run_dir, echo, world)
    finally:
        _watched = None
        if lock is not None:
            lock.release()


def _run_stage(stage: str, config_cls: type, run: StageFn, run_dir: Path, echo: Sink, world) -> int:
    from engine import distributed
    from engine.fsutil import disk_full_message, is_disk_full
    # Under torchrun rank 0 speaks for the run; the others only report their own failures, and
    # only rank 0 reads the STOP file, which it clears at the start (a rank that saw the old one
    # before it was cleared would stop the run at once).
    try:
        log = EventLog(run_dir, echo) if world.is_main else RankErrors(world.rank, stage)
    except OSError as e:
        print(f"error: {disk_full_message(run_dir) if is_disk_full(e) else e}", file=sys.stderr)
        return 2
    ev = Emitter(log)

    def done(**fields) -> None:
        try:
            ev.emit("done", **fields)
        except OSError:
            pass        # no room for it on disk: EventLog has still echoed it on stdout

    control = Control(run_dir if world.is_main else None)
    control.clear()
    control.install_signal_handlers()
    try:
        cfg = load_config(config_cls, run_dir / "config.json")
        if world.is_main:
            # log_to: TensorBoard, MLflow, W&B get a copy of the metrics (a tracker named but not
            # installed is a ConfigError here, before any work).
            from engine.trackers import with_trackers
            log = ev.sink = with_trackers(log, cfg, run_dir, stage)
        distributed.start(getattr(cfg, "nproc", None), getattr(cfg, "device", "auto"))
    except ConfigError as e:
        done(status="failed", error=str(e), step=None)
        log.close()
        control.restore_signal_handlers()
        return 2
    code = 0
    try:
        # stop_with: the launcher this process stops with (a pipeline), so that the pipeline's
        # --resume tells its own orphan, which it may stop, from a run someone else started.
        ev.emit("start", stage=stage, config=to_dict(cfg), pid=os.getpid(), host=host_info(),
                **({"world_size": world.size} if world.enabled else {}),
                **({"stop_with": control.stop_with} if control.stop_with is not None else {}))
        status = run(cfg, run_dir, log, control)
        done(status=status, error=None)
    except (StageError, ConfigError) as e:
        # A bad setting, or a file it names that is broken, is found before any work: refused.
        code = getattr(e, "exit_code", 2 if isinstance(e, ConfigError) else 1)
        done(status="failed", error=str(e))
    except KeyboardInterrupt:
        done(status="stopped", error="interrupted twice: stopped without a checkpoint")
        code = 130
    except Exception as e:  # noqa: BLE001 - the app must see every failure as a done event
        if is_disk_full(e):
            done(status="failed", error=disk_full_message(run_dir))
        elif is_out_of_memory(e):
            what = (str(e).splitlines() or [type(e).__name__])[0][:160]
            done(status="failed", error=f"out of memory ({what}): lower batch_size or the sequence "
                                        "length, or use gradient checkpointing or LoRA")
        else:
            ev.log(traceback.format_exc(), level="error")
            done(status="failed", error=f"{type(e).__name__}: {e}")
        code = 1
    finally:
        log.close()
        control.restore_signal_handlers()
        distributed.stop(clean=code == 0)
    return code


def is_out_of_memory(e: BaseException) -> bool:
    """The allocator could not give a tensor its memory (CPU or GPU): a setting too large for
    the machine, said in one line, not a bug's traceback."""
    text = str(e)
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or (isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)))


def host_info() -> dict:
    """What the run ran on, kept in its start event: a run folder outlives the machine and the
    environment it ran in, and a report of the run (workbench/report.py) names them."""
    import platform
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    # The stage module has imported torch by now if it uses it; the tokenizer does not, and is
    # not made to wait for it.
    torch = sys.modules.get("torch")
    if torch is not None:
        info.update(torch=torch.__version__, threads=torch.get_num_threads())
        if torch.version.cuda:
            info["cuda"] = torch.version.cuda
    return info


class RankErrors:
    """The sink of a rank other than 0: its errors on stderr (torchrun shows them), nothing else."""

    def __init__(self, rank: int, stage: str):
        self.prefix = f"[{stage} rank {rank}]"

    def __call__(self, ev: dict) -> None:
        if ev.get("type") == "done" and ev.get("error"):
            print(f"{self.prefix} {ev['status']}: {ev['error']}", file=sys.stderr, flush=True)
        elif ev.get("type") == "log" and ev.get("level") == "error":
            print(f"{self.prefix} {ev['message']}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _parser(stage: str, config_cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m engine.{stage}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            f"Run the {stage} stage on a run folder. Reads DIR/config.json (the settings below; a "
            f"setting left out takes its default) and writes everything it produces, and "
            f"DIR/events.jsonl, into DIR. Create DIR/STOP or send SIGTERM to stop with a checkpoint; "
            f"run it again on DIR to resume. Exit codes: 0 completed or stopped, 1 failed while "
            f"running, 2 refused before starting.", 100),
        epilog=settings_help(stage, config_cls))
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir", type=Path, metavar="DIR", help="the run folder")
    where.add_argument("--write-config", type=Path, metavar="DIR",
                       help="write DIR/config.json with every setting at its default and each "
                            "required one null, to edit before a run (never overwrites one)")
    parser.add_argument("--log-format", choices=["auto", "human", "json"], default="auto",
                        help="stdout: readable lines (human), one JSON event per line (json), "
                             "or human on a terminal and json otherwise (auto, the default)")
    return parser


def settings_help(stage: str, config_cls: type, width: int = 100) -> str:
    """The settings of config.json for `--help`: type, default and meaning, in groups:
    the required ones, the stage's own, then each shared set (the training settings)."""
    docs = field_docs(config_cls)
    groups: dict[str, list] = {"required (no default: config.json must give them)": [d for d in docs if d.required],
                               f"{stage} settings": []}
    for d in docs:
        if not d.required:
            # A shared set is a root config class (TrainConfig); a base between it and the stage
            # (RankingsConfig, of reward and DPO) holds settings the user reads as the stage's own.
            shared = d.owner is not config_cls and not any(dataclasses.is_dataclass(b) for b in d.owner.__bases__)
            title = ((d.owner.__doc__ or d.owner.__name__).split(";")[0].split(".")[0].strip().lower() if shared
                     else f"{stage} settings")
            groups.setdefault(title, []).append(d)
    name_w = max(len(d.name) for d in docs)
    type_w = max(len(d.type) for d in docs)
    col = name_w + type_w + 20
    lines = ["settings (config.json):"]
    for title, members in groups.items():
        if members:
            lines += ["", f"{title}:"]
            lines += [_setting_line(d, name_w, type_w, col, width) for d in members]
    return "\n".join(lines)


def _setting_line(d, name_w: int, type_w: int, col: int, width: int) -> str:
    left = f"  {d.name:<{name_w}}  {d.type:<{type_w}}"
    if not d.required:
        left += f"  {json.dumps(d.default, ensure_ascii=False)}"
    help_lines = textwrap.wrap(d.help or "-", max(30, width - col)) or [""]
    if len(left) + 2 > col:
        return "\n".join([left] + [" " * col + h for h in help_lines])
    return "\n".join([left.ljust(col) + help_lines[0]] + [" " * col + h for h in help_lines[1:]])


def write_default_config(stage: str, config_cls: type, folder: Path) -> int:
    """`--write-config DIR`: a config.json of defaults (required settings null) to edit."""
    path = folder / "config.json"
    required = [d.name for d in field_docs(config_cls) if d.required]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as f:
            f.write(json.dumps(default_config(config_cls), indent=2, ensure_ascii=False) + "\n")
    except FileExistsError:
        print(f"error: {path} exists: not overwritten (edit it, or name a new folder)", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return 2
    todo = f"fill in {', '.join(required)} (null now), then " if required else "edit it, then "
    print(f"wrote {path}: {todo}run python -m engine.{stage} --run-dir {folder}")
    return 0
