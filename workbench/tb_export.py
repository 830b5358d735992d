"""Runs as TensorBoard event files: `workbench export tensorboard RUN [RUN...] --out DIR`.

Each run's events.jsonl becomes DIR/<run folder name>/: every metric at each step it was logged,
under its own name (train/loss, val/loss, objective/kl, ...: TensorBoard groups a chart section
by the part before the slash), each sample as a text summary (samples/00, samples/01, ... one tag
per prompt, so one prompt's answers line up step after step), and the run's settings as the text
run/config. `tensorboard --logdir DIR` then shows the runs side by side. The mapping from events
is the one the live `log_to: tensorboard` setting uses (engine.trackers).

A resumed run is exported as the app draws it: the points from the step a resume went back to
are replaced by the new session's. Exporting again into the same DIR replaces a run's event
files rather than adding to them.
"""
from __future__ import annotations

import bisect
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from engine.runio import iter_events
from engine.trackers import SampleTags, TensorBoardWriter, config_markdown, sample_markdown, scalars_of

WORD = "tensorboard"        # `workbench export tensorboard RUN...`: the word that picks this export
USAGE = ("%(prog)s RUN [--format hf|gguf] --out PATH [--gguf-type f16|q8_0|f32] [--dtype float32|bfloat16|float16]\n"
         "       %(prog)s tensorboard RUN [RUN ...] --out DIR")
DESCRIPTION = """\
Export a checkpoint for the tools people already use, or runs' metrics for TensorBoard.

  workbench export RUN --format hf|gguf --out PATH
      the run's newest checkpoint (or a checkpoint folder) as a Hugging Face folder that
      transformers loads, or one GGUF file for llama.cpp (hf only: a reward model, or a model
      with a SentencePiece-style tokenizer such as TinyLlama or Llama 2); a folder's weights in
      float32, or in bfloat16 or float16 with --dtype (half the size)

  workbench export tensorboard RUN [RUN ...] --out DIR
      each run's events.jsonl as TensorBoard event files in DIR/<run name>/: every metric at its
      step (train/..., val/..., objective/...), samples as text, the settings as run/config;
      then: tensorboard --logdir DIR

To log to TensorBoard, MLflow or Weights & Biases while a run trains, set the stage's log_to
setting (workbench run STAGE --run-dir DIR --set 'log_to=["tensorboard"]'; in the app, the
stage's settings).
"""


class Points:
    """One tag's scalars in step order, compact (a long run has a million of them)."""

    def __init__(self):
        self.steps, self.values, self.times = array("q"), array("d"), array("d")

    def add(self, step: int, value: float, when: float) -> None:
        # A step at or before the last one: the run was resumed from an earlier checkpoint, and
        # what was logged from that step on is replaced (workbench.history.Series, the same rule).
        if self.steps and step <= self.steps[-1]:
            cut = bisect.bisect_left(self.steps, step)
            del self.steps[cut:], self.values[cut:], self.times[cut:]
        self.steps.append(step)
        self.values.append(value)
        self.times.append(when)


@dataclass
class Folded:
    """What a run's events hold for TensorBoard."""
    scalars: dict[str, Points] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str, float]]] = field(default_factory=dict)
    config: Optional[tuple[str, dict, float]] = None    # stage, settings, time of the first start


def fold(events: Iterable[dict]) -> Folded:
    out = Folded()
    tags = SampleTags()
    for ev in events:
        t, step, when = ev.get("type"), ev.get("step"), float(ev.get("time") or 0.0)
        if t == "start" and out.config is None and isinstance(ev.get("config"), dict):
            out.config = (str(ev.get("stage", "")), ev["config"], when)
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        if t == "metrics":
            for tag, v in scalars_of(ev).items():
                out.scalars.setdefault(tag, Points()).add(step, v, when)
        elif t == "sample":
            texts = out.texts.setdefault(tags(str(ev.get("prompt", ""))), [])
            while texts and texts[-1][0] >= step:    # a resume went back: its samples replace these
                texts.pop()
            texts.append((step, sample_markdown(ev), when))
    return out


@dataclass
class Written:
    run: Path
    folder: Path
    tags: int
    points: int
    samples: int


def write(folded: Folded, folder: Path) -> tuple[int, int]:
    """The event files of one run in `folder`, replacing the ones an earlier export wrote."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("events.out.tfevents.*"):
        old.unlink()
    tb = TensorBoardWriter(folder, flush_secs=120)
    points = samples = 0
    try:
        if folded.config is not None:
            stage, config, when = folded.config
            tb.text("run/config", config_markdown(stage, config), 0, walltime=when or None)
        for tag, p in folded.scalars.items():
            for step, v, when in zip(p.steps, p.values, p.times):
                tb.scalars(step, {tag: v}, walltime=when or None)
            points += len(p.steps)
        for tag, texts in folded.texts.items():
            for step, text, when in texts:
                tb.text(tag, text, step, walltime=when or None)
            samples += len(texts)
    finally:
        tb.close()
    return points, samples


def problem(run: Path) -> Optional[str]:
    """Why `run` is not a run folder this export can read, or None."""
    if not run.exists():
        return f"{run} does not exist"
    if not run.is_dir():
        return f"{run} is not a run folder (a file)"
    if not (run / "events.jsonl").is_file():
        return f"{run} is not a run folder: it has no events.jsonl"
    return None


def folder_names(runs: list[Path]) -> list[str]:
    """Each run's subfolder: its folder's name, with -2, -3... where two runs share one."""
    names, seen = [], set()
    for run in runs:
        base = run.resolve().name or "run"
        name, n = base, 1
        while name in seen:
            n += 1
            name = f"{base}-{n}"
        seen.add(name)
        names.append(name)
    return names


def export_runs(runs: list[Path], out: Path) -> list[Written]:
    """Every run into out/<name>/; all checked first, so a bad one writes nothing."""
    for run in runs:
        why = problem(run)
        if why:
            raise ValueError(why)
    written = []
    for run, name in zip(runs, folder_names(runs)):
        folded = fold(iter_events(run))
        points, samples = write(folded, out / name)
        written.append(Written(run, out / name, len(folded.scalars), points, samples))
    return written


# ---- `workbench export` ------------------------------------------------------------------------

def add_arguments(p) -> None:
    from engine import export
    export.add_arguments(p, nargs="+")
    # None tells "not given" from the defaults, so `export tensorboard` can refuse a checkpoint option.
    p.set_defaults(format=None, gguf_type=None, dtype=None)


def run_from_args(args) -> int:
    """`workbench export`: the word tensorboard first exports runs' metrics; else a checkpoint."""
    sources: list[Path] = args.source
    if str(sources[0]) == WORD and not (len(sources) == 1 and sources[0].is_dir()):
        return _tensorboard(sources[1:], args)
    from engine import export
    if len(sources) > 1:
        return _refuse(f"export takes one RUN, got {len(sources)} (for metrics of several runs: "
                       f"workbench export {WORD} RUN [RUN ...] --out DIR)")
    args.source, args.format, args.gguf_type = sources[0], args.format or "hf", args.gguf_type or "f16"
    args.dtype = args.dtype or "float32"
    return export.run_from_args(args)


def _tensorboard(runs: list[Path], args) -> int:
    if not runs:
        return _refuse(f"export {WORD} needs at least one RUN folder")
    if args.format is not None or args.gguf_type is not None or args.dtype is not None:
        return _refuse(f"--format, --gguf-type and --dtype are for checkpoints; export {WORD} writes event files")
    try:
        written = export_runs(runs, args.out)
    except ValueError as e:
        return _refuse(str(e))
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    for w in written:
        print(f"{w.run}: {w.points} points of {w.tags} metrics, {w.samples} samples -> {w.folder}")
    print(f"view them: tensorboard --logdir {args.out}")
    return 0


def _refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
