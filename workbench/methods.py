"""The methods side by side: PPO, DPO and GRPO runs that started from one SFT model, each
evaluated against it on the same held-out prompts.

    workbench compare-methods --project DIR [--sft RUN] [--prompts N]

For each alignment method of the catalogue (a `method` stage), the newest completed run that
started from the SFT run is answered greedily on the project's held-out tasks, next to the SFT
model: win rate under the simulated annotator, task accuracy, the reward model's score (one
reward model judges every method: the newest completed reward run trained from that SFT run),
KL to SFT measured the same way for every method (workbench.evaluate.kl_to_base), and the
method's training time. The result is kept as PROJECT/methods.json, which the app's Methods page
shows. `workbench pipeline --methods ...` evaluates the runs it made through the same function.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from engine.fsutil import atomic_write_text
from engine.runio import format_duration
from workbench import stages
from workbench.project import Project
from workbench.runs import RunInfo, RunStore

RESULT_FILE = "methods.json"
DEFAULT_PROMPTS = 200


class MethodsError(ValueError):
    """Nothing to compare, or an SFT run that is not there: one line for the user."""


def methods() -> tuple[str, ...]:
    return tuple(s.name for s in stages.STAGES if s.method)


def held_out_tasks(project: Project, limit: int = DEFAULT_PROMPTS) -> list:
    """The project's held-out tasks (the ones SFT's accuracy is measured on): never trained on.
    A bad task file is a MethodsError naming its lines."""
    from engine.sft_data import read_tasks   # torch: not at import, the app's start needs this module
    from engine.runio import InputProblems
    try:
        return read_tasks(project.data_files("eval_tasks")[0], limit)
    except InputProblems as e:
        raise MethodsError(str(e)) from None


def sft_parent(run: RunInfo) -> Optional[str]:
    """The SFT run a method's run started from (its policy or init field), if in this project."""
    spec = stages.spec(run.stage)
    return next((run.parents[p.field] for p in spec.parents
                 if p.kind == "checkpoint" and p.field in run.parents), None)


def choose(runs: list[RunInfo], sft: Optional[str] = None) -> tuple[RunInfo, dict[str, RunInfo], Optional[RunInfo]]:
    """(the SFT run, its newest completed run of each method, the reward model that judges).

    With no `sft` given, the SFT run that the most methods started from (then the newest)."""
    done = [r for r in runs if r.status == "completed"]
    by_name = {r.name: r for r in runs}
    tried = [r for r in done if r.stage in methods() and sft_parent(r)]
    if sft is None:
        counts: dict[str, set] = {}
        for r in tried:
            counts.setdefault(sft_parent(r), set()).add(r.stage)
        if not counts:
            raise MethodsError(f"no completed {'/'.join(m.upper() for m in methods())} run that starts from "
                               "an SFT run of this project: run one first (or `workbench pipeline --methods`)")
        sft = max(counts, key=lambda name: (len(counts[name]), name))
    named = by_name.get(Path(sft).name)
    if sft not in by_name and named is not None and Path(sft).resolve() == Path(named.path).resolve():
        sft = named.name        # the run's folder, as chat, export and report take it
    if sft not in by_name:
        raise MethodsError(f"no run named {sft} in this project")
    chosen: dict[str, RunInfo] = {}
    for r in sorted(tried, key=lambda r: r.name):          # folder names sort by time: newest last
        if sft_parent(r) == sft:
            chosen[r.stage] = r
    if not chosen:
        raise MethodsError(f"no completed method run starts from {sft}")
    judges = sorted((r for r in done if r.stage == "reward" and sft in r.parents.values()), key=lambda r: r.name)
    return by_name[sft], {m: chosen[m] for m in methods() if m in chosen}, (judges[-1] if judges else None)


def evaluate_method(method: str, base, run: Path, seconds: Optional[float]) -> dict:
    """One method's run against `base` (a workbench.evaluate.Baseline: the SFT model, answered
    and scored once for every method)."""
    from workbench.evaluate import compare_to
    r = compare_to(base, run)
    r.update(method=method, run=run.name, seconds=seconds)
    return r


def compare_methods(project: Project, sft: Optional[str] = None, n_prompts: int = DEFAULT_PROMPTS,
                    on_progress=None) -> dict:
    """Evaluate every method's newest run from one SFT run; the result is also saved."""
    store = RunStore(project.path)
    try:
        runs = store.sync()
    finally:
        store.close()
    from workbench.evaluate import baseline
    base, chosen, judge = choose(runs, sft)
    prompts = held_out_tasks(project, n_prompts)
    reference = baseline(base.path, prompts, reward_model=judge.path if judge else None)
    rows = []
    for i, (method, run) in enumerate(chosen.items()):
        if on_progress:
            on_progress(i, len(chosen), method)
        rows.append(evaluate_method(method, reference, run.path, run.duration_s))
    return save_result(project.path, base.name, judge.name if judge else None, len(prompts), rows)


def save_result(project_dir: Path, sft: str, reward_model: Optional[str], n_prompts: int, rows: list[dict]) -> dict:
    result = {"sft": sft, "reward_model": reward_model, "prompts": n_prompts, "created_at": time.time(),
              "rows": rows}
    atomic_write_text(Path(project_dir) / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result


def read_result(project_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(project_dir) / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def out_of_date(result: dict, runs: list[RunInfo]) -> tuple[set[str], list[str]]:
    """(the runs of a saved comparison that are gone, one line per way it no longer shows the
    project: a run deleted, a newer run of a method from that SFT run)."""
    names = {r.name for r in runs}
    gone = {n for n in [result["sft"]] + [row["run"] for row in result["rows"]] if n not in names}
    notes = [f"{n} was deleted" for n in sorted(gone)]
    if result["sft"] in names:
        try:
            chosen = choose(runs, result["sft"])[1]
        except MethodsError:
            chosen = {}
        compared = {row["method"]: row["run"] for row in result["rows"]}
        for method, run in chosen.items():
            if compared.get(method) != run.name:
                notes.append(f"{stages.spec(method).title} has a newer run from {result['sft']}, "
                             f"{run.name}")
    return gone, notes


def percent(x: Optional[float]) -> str:
    """A share as the tables print it; "-" where there was nothing to measure (no checkable task)."""
    return "-" if x is None else f"{x:.1%}"


def table(result: dict) -> str:
    """The comparison as a plain-text table, one row per method."""
    lines = [f"against {result['sft']} on {result['prompts']} held-out prompts"
             + (f", scored by {result['reward_model']}" if result.get("reward_model") else ""),
             f"{'method':<7} {'run':<26} {'win rate':>8} {'W/T/L':>11} {'accuracy':>15} {'RM score':>16} "
             f"{'KL':>6} {'time':>7}"]
    for r in result["rows"]:
        score = f"{r['base_score']:+.3f}->{r['score']:+.3f}" if "score" in r else "-"
        acc = "-" if r.get("accuracy") is None else f"{percent(r.get('base_accuracy'))}->{percent(r['accuracy'])}"
        secs = format_duration(r["seconds"]) if r.get("seconds") is not None else "-"
        wtl = f"{r['wins']}/{r['ties']}/{r['losses']}"
        lines.append(f"{r['method']:<7} {r['run']:<26} {r['win_rate']:>8.1%} {wtl:>11} {acc:>15} {score:>16} "
                     f"{r['kl']:>6.2f} {secs:>7}")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--project", type=Path, required=True, metavar="DIR", help="the project folder")
    p.add_argument("--sft", default=None, metavar="RUN",
                   help="the SFT run the methods started from, by name or folder (default: the one most "
                        "methods started from)")
    p.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS, metavar="N",
                   help=f"held-out tasks answered by each model (default {DEFAULT_PROMPTS})")


def run_from_args(args) -> int:
    from engine.config import ConfigError
    from workbench.cli import refuse
    from workbench.project import ProjectError
    if args.prompts < 1:
        return refuse("--prompts must be a positive integer")
    try:
        project = Project.open(args.project)
        result = compare_methods(project, args.sft, args.prompts,
                                 on_progress=lambda i, n, m: print(f"  evaluating {m} ({i + 1} of {n}) ...",
                                                                   flush=True))
    except (MethodsError, ProjectError, ConfigError, ValueError) as e:
        return refuse(str(e))
    print(table(result))
    print(f"saved as {project.path / RESULT_FILE}")
    return 0
