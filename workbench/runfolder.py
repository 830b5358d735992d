"""The one way a run folder's settings are made, written and read back.

A run folder holds `config.json` (the only input the stage reads), with paths relative to the
folder so a project can be moved, and any input the stage needs from the project (the reward
model's `rankings.jsonl`), so every run is reproducible from its folder alone. The app, the
pipeline and `workbench run` all write through here, with one validation: the stage's own
config dataclass (a `ConfigError` naming the field).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from engine.config import ConfigError, from_dict, save_config
from workbench.project import Project, ProjectError
from workbench.stages import Parent, StageSpec, path_fields, spec, stage_of_folder

CONFIG = "config.json"
RANKINGS = "rankings.jsonl"


class RunFolderError(ValueError):
    """A run folder that cannot be used as it is; the message names the file."""


@dataclass
class Rankings:
    """Train on the project's rankings: written into the run folder when it is made.

    min_agreement: only items whose rankings agree on at least this share of answer-pair
    comparisons (workbench.agreement_items; items ranked by one person are kept).
    aggregate: "each" ranking of an item, or its "borda" aggregate (one record per item)."""
    include_simulated: bool = False
    batch_ids: Optional[list[int]] = None
    min_agreement: Optional[float] = None
    aggregate: str = "each"

    def __post_init__(self):
        from workbench.agreement_items import check_choice
        check_choice(self.min_agreement, self.aggregate)

    def dataset_options(self) -> dict:
        """write_rm_dataset's keyword arguments for this choice."""
        return dict(include_simulated=self.include_simulated, batch_ids=self.batch_ids,
                    min_agreement=self.min_agreement, aggregate=self.aggregate)


def build(stage: str, values: dict):
    """The stage's config from values (names, types and ranges checked); ConfigError if not."""
    return from_dict(spec(stage).config_class(), values)


def preflight(stage: str, values: dict, run_dir: Path, project_dir: Optional[Path] = None
              ) -> Optional[ConfigError]:
    """What would end a run of these values in `run_dir` at its start, found before its folder
    is made or its config.json changed, or None: a setting out of range, a device this machine
    lacks, and what the engine stage's own `preflight` finds without loading a weight (an input
    with no checkpoint or one of another kind, a length the model's context cannot hold, a
    setting a resume of `run_dir` cannot change). A new run's `run_dir` need not exist; paths
    are taken as write_config writes them (inside `project_dir`, relative to the run folder), so
    a resume compares them with what its checkpoints saved."""
    try:
        cfg = build(stage, relativize(stage, values, Path(run_dir), project_dir))
        if isinstance(getattr(cfg, "device", None), str):
            from engine.device import resolve_device
            resolve_device(cfg.device)
        check = getattr(importlib.import_module(spec(stage).module), "preflight", None)
        if check is not None:
            check(cfg, Path(run_dir))
    except ConfigError as e:
        return e
    return None


def relativize(stage: str, values: dict, run_dir: Path, project_dir: Optional[Path]) -> dict:
    """Absolute paths inside the project -> relative to the run folder (how the engine reads
    them); anything else as given."""
    if project_dir is None:
        return dict(values)
    root = os.path.abspath(project_dir)

    def rel(v):
        if isinstance(v, str) and os.path.isabs(v) and os.path.abspath(v).startswith(root + os.sep):
            return os.path.relpath(v, run_dir)
        return v

    out = dict(values)
    for key in path_fields(stage) & set(values):
        v = values[key]
        out[key] = [rel(x) for x in v] if isinstance(v, list) else rel(v)
    return out


def absolutize(stage: str, values: dict, run_dir: Path) -> dict:
    """A run's config with its paths made absolute (how a form shows them)."""
    out = dict(values)
    for key in path_fields(stage) & set(values):
        v = values[key]
        if isinstance(v, list):
            out[key] = [_resolve(run_dir, x) for x in v]
        elif isinstance(v, str) and v:
            out[key] = _resolve(run_dir, v)
    return out


def _resolve(base: Path, p) -> str:
    # Normalised, not resolved: a project opened through a symlink keeps its path, so that
    # relativize finds these paths inside it again (a resume compares them with its config).
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else Path(os.path.normpath(Path(base) / path)))


def write_config(stage: str, values: dict, run_dir: Path, project_dir: Optional[Path] = None):
    """Check `values` against the stage's config and write them as the folder's config.json
    (atomically); returns the config. Raises ConfigError naming the field, writing nothing."""
    cfg = build(stage, relativize(stage, values, run_dir, project_dir))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(run_dir) / CONFIG)
    return cfg


def read_config(run_dir: Path) -> dict:
    """The folder's config.json as it is on disk ({} when there is none yet)."""
    path = Path(run_dir) / CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise RunFolderError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise RunFolderError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(values, dict):
        raise RunFolderError(f"{path}: expected a JSON object of settings")
    return values


def form_values(stage: str, run_dir: Path) -> dict:
    """A run's settings for a form: every field (defaults for ones added since), paths absolute."""
    try:
        saved = read_config(run_dir)
    except RunFolderError:
        saved = {}
    return absolutize(stage, {**defaults(stage), **saved}, run_dir)


def defaults(stage: str) -> dict:
    """The engine's default for every setting that has one."""
    import dataclasses
    out = {}
    for f in dataclasses.fields(spec(stage).config_class()):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# --- a new run ---------------------------------------------------------------------------------

Newest = Callable[[Parent], Optional[Path]]


def suggested_values(project: Project, stage: str, newest: Newest, demo: bool = True) -> dict:
    """Settings for a new run: the engine's defaults, the demo's settings (`demo`), the project's
    data and defaults from workbench.toml, and for each input run the newest run of the stage
    it expects (`newest(parent)`; the app asks its run list, the pipeline the runs it made)."""
    s = spec(stage)
    values = defaults(stage)
    if demo:
        values.update(s.demo_settings())
    for name, (section, key) in s.project_defaults.items():
        value = project.default(section, key)
        if value not in (None, {}, []):
            values[name] = value
    for d in s.data:
        if d.project is None:
            continue
        try:
            files = [str(p) for p in project.data_files(d.project)]
        except ProjectError:
            continue
        if files:
            values[d.field] = files[0] if d.first_only else files
    for p in s.parents:
        if p.expects:
            run = newest(p)
            if run is not None:
                values[p.field] = str(run)
    return values


def new_run(project: Project, stage: str, values: dict, rankings: Optional[Rankings] = None,
            run_dir: Optional[Path] = None) -> Path:
    """Make a run folder for a new run: its inputs, then its config. Nothing is left behind
    when it fails (ConfigError naming the field, or ValueError saying what is missing)."""
    values = dict(values)
    if rankings is not None:
        values[_rankings_field(spec(stage))] = [RANKINGS]
    build(stage, values)        # refuse bad settings before a folder exists
    run_dir = Path(run_dir) if run_dir is not None else project.new_run_dir(stage)
    try:
        if rankings is not None:
            _write_rankings(project, run_dir, rankings)
        write_config(stage, values, run_dir, project.path)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


def _rankings_field(s: StageSpec) -> str:
    field = next((d.field for d in s.data if d.rankings), None)
    if field is None:
        raise ValueError(f"the {s.name} stage does not train on rankings")
    return field


def _write_rankings(project: Project, run_dir: Path, choice: Rankings) -> None:
    from workbench.preferences import write_rm_dataset
    from workbench.store import Store
    with Store.for_project(project.path) as store:
        n = write_rm_dataset(store, run_dir / RANKINGS, **choice.dataset_options())
    if n == 0 and choice.min_agreement is not None:
        raise ValueError(f"No item's rankings agree on {choice.min_agreement:.0%} of answer pairs "
                         "or more: lower the agreement threshold (the Agreement tab of Sample & "
                         "Rank shows each item's).")
    if n == 0:
        raise ValueError("There are no rankings to train on yet: rank some answers in Sample & Rank "
                         "(or include simulated rankings).")


def update_config(stage: str, run_dir: Path, changes: dict):
    """Merge `changes` into a folder's config.json (made if absent) and write it back checked."""
    values = {**read_config(run_dir), **changes}
    return write_config(stage, values, run_dir)


def folder_stage(run_dir: Path) -> Optional[str]:
    """The stage whose run a folder holds: its first event's, or for a folder with a config and
    no events yet, the one its name starts with (runs/<stage>-<time>); None for a new folder."""
    try:
        with open(Path(run_dir) / "events.jsonl", "rb") as f:
            first = json.loads(f.readline() or b"{}")
        if isinstance(first, dict) and isinstance(first.get("stage"), str):
            return first["stage"]
    except (OSError, ValueError):
        pass
    return stage_of_folder(Path(run_dir).name) if (Path(run_dir) / CONFIG).is_file() else None


def config_error_line(e: ConfigError, run_dir: Optional[Path] = None) -> str:
    where = e.source or (str(Path(run_dir) / CONFIG) if run_dir is not None else "")
    return f"{where}: config field '{e.field}': {e.message}" if where else str(e)




def prepare_run(run_dir: Path, config) -> Path:
    """Create a run folder for an already built config (scripts and benchmarks) and write its
    config.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG)
    return run_dir
