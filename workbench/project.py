"""A project folder: workbench.toml, workbench.db (annotation store and run index), data/, runs/<id>/."""
from __future__ import annotations

import json
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SETTINGS = "workbench.toml"     # what makes a folder a project
# Present while `workbench demo` writes a project's demo files: if it is still there, the
# writing was cut short and the files may come from two runs of it (another seed or scale).
DEMO_WRITING = ".demo-writing"
# It and the store beside it (workbench.store.DB_NAME, with its WAL files).
PROJECT_FILES = (SETTINGS, "workbench.db", "workbench.db-wal", "workbench.db-shm")


class ProjectError(ValueError):
    pass


class NoDataEntry(ProjectError):
    """workbench.toml's [defaults.data] names no file for a key (the user picks one)."""


@dataclass
class Project:
    path: Path
    settings: dict

    @classmethod
    def open(cls, path: Path) -> "Project":
        # Absolute: run configs name other runs by paths the engine reads from the run folder,
        # and a path relative to the working directory means nothing there.
        path = Path(path).absolute()
        toml = path / SETTINGS
        if not toml.is_file():
            raise ProjectError(f"{path} is not a workbench project (no workbench.toml)")
        try:
            settings = tomllib.loads(toml.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ProjectError(f"{toml}: {e}") from None
        except UnicodeDecodeError as e:
            raise ProjectError(f"{toml}: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise ProjectError(f"{toml}: cannot be read ({e.strerror or e})") from None
        if problem := unknown_setting(settings):
            raise ProjectError(f"{toml}: {problem}")
        if (path / DEMO_WRITING).exists():
            raise ProjectError(f"{path}: writing its demo files was cut short ({DEMO_WRITING} is "
                               f"there), so they may not belong together: `workbench demo --project "
                               f"{path}` writes them again whole")
        return cls(path, settings)

    def all_data_files(self) -> list[Path]:
        """Every file [defaults.data] names (a folder counts as itself)."""
        data = self.settings.get("defaults", {}).get("data", {})
        keys = data if isinstance(data, dict) else {}
        out = []
        for key in keys:
            try:
                out += self.data_files(key)
            except ProjectError:
                pass
        return out

    @property
    def name(self) -> str:
        return str(self.settings.get("name", self.path.name))

    def default(self, section: str, key: str, fallback=None):
        """A value from [defaults.<section>] of workbench.toml."""
        return self.settings.get("defaults", {}).get(section, {}).get(key, fallback)

    def data_files(self, key: str) -> list[Path]:
        """The data named by [defaults.data] <key>, resolved against the project folder."""
        value = self.default("data", key)
        if value is None:
            raise NoDataEntry(f"{self.path / 'workbench.toml'}: [defaults.data] has no '{key}' entry")
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v for v in values):
            raise ProjectError(f"{self.path / 'workbench.toml'}: [defaults.data] '{key}' must be a path or a list "
                               f"of paths (relative to the project folder), not {value!r}")
        return [(self.path / v).resolve() for v in values]

    def new_run_dir(self, stage: str) -> Path:
        """runs/<stage>-<YYYYmmdd-HHMMSS>[-N]: sortable by time, unique, readable in a file browser."""
        runs = self.path / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        base = f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        candidate, n = runs / base, 1
        while candidate.exists():
            n += 1
            candidate = runs / f"{base}-{n}"
        candidate.mkdir()
        return candidate


def creation_problem(path: Path) -> str | None:
    """Why a new project cannot be made in `path` (None: it can), asked before anything else."""
    path = Path(path)
    if (path / SETTINGS).exists():
        return f"{path} already holds a project: open it (File ▸ Open Project…)"
    if path.exists() and any(p for p in path.iterdir() if not p.name.startswith(".")):
        return f"{path} is not empty; choose an empty or new folder"
    return None


def create_project(path: Path, name: str) -> Project:
    """Make `path` a project: a workbench.toml naming it. Data is added later (its
    [defaults.data] entries name the files the panels start with)."""
    path = Path(path)
    if problem := creation_problem(path):
        raise ProjectError(problem)
    toml = path / SETTINGS
    path.mkdir(parents=True, exist_ok=True)
    (path / "data").mkdir(exist_ok=True)
    toml.write_text(f"name = {json.dumps(name, ensure_ascii=False)}\n\n"
                    "[defaults.tokenizer]\nvocab_size = 4096\n\n"
                    "[defaults.model]\npreset = \"tiny\"\n\n"
                    "# Files the panels start with, relative to this folder, e.g.\n"
                    "# [defaults.data]\n# pretrain = [\"data/corpus\"]\n# sft = \"data/sft.jsonl\"\n"
                    "# prompts = \"data/prompts.txt\"\n", encoding="utf-8")
    return Project.open(path)


def output_problem(out: Path, project_dir: Path | None = None, *,
                   run_suffixes: Sequence[str] = ()) -> str | None:
    """Why a file a command is about to write (an export, a report) would destroy what a project
    or a run holds, or None: the project's settings or database, anything in a run folder (but
    a file ending in one of `run_suffixes`: a report's own page), or an existing file of the
    data its workbench.toml names (an earlier export in data/ may be replaced). The project is
    `project_dir`, or the folder above `out` with a workbench.toml."""
    out = Path(out).absolute()
    if out.name in PROJECT_FILES:
        return "is a project's own file"
    own = bool(run_suffixes) and out.name.endswith(tuple(run_suffixes))
    run = next((p for p in out.parents if (p / "events.jsonl").is_file()), None)
    if run is not None and not own:
        return f"is inside the run folder {run}"
    project = (Path(project_dir).absolute() if project_dir is not None else
               next((p for p in out.parents if (p / SETTINGS).is_file()), None))
    if project is None:
        return None
    if project / "runs" in out.parents and not own:
        return "is inside the project's runs folder"
    if out.exists() and _holds_project_data(project, out):
        return "would replace the project's data"
    return None


def _holds_project_data(project: Path, out: Path) -> bool:
    try:
        named = Project.open(project).all_data_files()
    except ProjectError:
        named = []
    resolved = out.resolve()
    return any(resolved == f or f in resolved.parents for f in named)


def known_settings() -> dict[str, set[str]]:
    """{[defaults.<section>]: its keys} that some stage reads (the catalogue says which)."""
    from workbench.stages import STAGES     # the catalogue imports nothing of the project
    known: dict[str, set[str]] = {"data": set()}
    for s in STAGES:
        for section, key in s.project_defaults.values():
            known.setdefault(section, set()).add(key)
        known["data"].update(d.project for d in s.data if d.project)
    return known


def unknown_setting(settings: dict) -> str | None:
    """What in a workbench.toml no stage reads (a typo would otherwise be silently ignored)."""
    top = sorted(set(settings) - {"name", "demo", "defaults"})
    if top:
        return f"unknown setting '{top[0]}' (known: name, [demo], [defaults.*])"
    defaults = settings.get("defaults", {})
    if not isinstance(defaults, dict):
        return "[defaults] must be a table of sections"
    known = known_settings()
    for section, values in defaults.items():
        if section not in known:
            return f"unknown section [defaults.{section}] (known: {', '.join(sorted(known))})"
        if not isinstance(values, dict):
            return f"[defaults.{section}] must be a table"
        bad = sorted(set(values) - known[section])
        if bad:
            return (f"[defaults.{section}] has an unknown key '{bad[0]}' "
                    f"(known: {', '.join(sorted(known[section]))})")
    return None
