"""What `workbench pipeline` has done in a project, so that `--resume` goes on from there.

PROJECT/pipeline.json holds the settings the pipeline ran with (every option that shapes a run:
not --until, --methods or --table-out, which only choose how far it goes and what it prints),
each step it finished in order (a stage's run folder, or the simulated ranking's batch) with its
time, and the stage it stopped in with a checkpoint, if it did. It is rewritten whole after
each step. A new pipeline without --resume starts a new journal; with --resume it takes up the
finished steps, resumes the stopped stage in its own run folder and runs the rest, so a
pipeline stopped by Ctrl-C, or one run `--until sft` first, goes on to its end. The stage being
run is written down before its process starts: a pipeline killed outright is resumed in that
stage's folder too (from its last checkpoint, or taken as done if it had finished).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from engine.fsutil import atomic_write_text

JOURNAL = "pipeline.json"
# Options that choose how far the pipeline goes or what it prints, not what a run is.
NOT_SETTINGS = ("resume", "until", "methods", "table_out", "demo", "project", "scale", "func",
                "command")


def settings_of(args) -> dict[str, Any]:
    """The options of a pipeline that shape its runs, JSON-ready."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())
            if k not in NOT_SETTINGS and not callable(v)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class JournalError(ValueError):
    pass


class Journal:
    def __init__(self, project_dir: Path, settings: dict[str, Any]):
        self.path = Path(project_dir) / JOURNAL
        self.settings = settings
        self.finished: list[dict] = []
        self.stop: Optional[dict] = None

    @classmethod
    def start(cls, project_dir: Path, args) -> "Journal":
        """A new journal; `save` puts it in place of any earlier one."""
        return cls(project_dir, settings_of(args))

    @classmethod
    def resume(cls, project_dir: Path, args) -> "Journal":
        """The project's journal, refused (JournalError) if there is none or it ran otherwise."""
        path = Path(project_dir) / JOURNAL
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            settings, finished, stop = data["settings"], list(data["finished"]), data.get("stopped")
            if not isinstance(settings, dict) or not all(isinstance(e, dict) and "step" in e for e in finished):
                raise ValueError("not a pipeline journal")
        except FileNotFoundError:
            raise JournalError(f"--resume: no earlier pipeline in {project_dir} ({JOURNAL} is missing)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise JournalError(f"{path}: cannot be read ({e}); run the pipeline without --resume") from None
        now = settings_of(args)
        said = lambda v: "not given" if v is None else v      # noqa: E731
        changed = [f"{_flag(k)} {said(settings.get(k))} then, {said(now.get(k))} now"
                   for k in sorted(set(settings) | set(now)) if settings.get(k) != now.get(k)]
        if changed:
            raise JournalError("--resume: the earlier pipeline ran with other settings ("
                               + "; ".join(changed) + "): give the same options, or leave out --resume")
        journal = cls(project_dir, settings)
        journal.finished, journal.stop = finished, stop
        return journal

    def stopped_run(self, stage: str) -> tuple[Optional[Path], float]:
        """(the run folder `stage` stopped in, to be resumed, and the seconds it ran before),
        or (None, 0) if `stage` is not the one that stopped."""
        if self.stop and self.stop.get("step") == stage:
            return self.path.parent / "runs" / self.stop["run"], float(self.stop.get("seconds", 0.0))
        return None, 0.0

    def done(self, step: str, seconds: float, run: Optional[Path] = None, **facts) -> None:
        entry = {"step": step, "seconds": round(seconds, 2), **({"run": run.name} if run else {}), **facts}
        self.finished = [e for e in self.finished if e["step"] != step] + [entry]
        if self.stop and self.stop.get("step") == step:
            self.stop = None
        self.save()

    def started(self, step: str, run: Path, seconds: float) -> None:
        """The stage runs now in `run` (having run `seconds` before): saved before its process
        starts, so that a pipeline killed outright (no stop it could record) is still resumed
        in that folder, not in a new one."""
        self.stop = {"step": step, "run": run.name, "seconds": round(seconds, 2), "running": True}
        self.save()

    def stopped(self, step: str, run: Path, seconds: float) -> None:
        self.stop = {"step": step, "run": run.name, "seconds": round(seconds, 2)}
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"settings": self.settings, "finished": self.finished,
                                                 "stopped": self.stop}, indent=1) + "\n")
