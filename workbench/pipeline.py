"""`workbench pipeline`: every stage of the catalogue in order, each a run folder in the project.

    tokenizer -> pretrain -> sft -> sample -> rank (simulated) -> reward -> ppo [dpo grpo] -> evaluate

The alignment methods (the catalogue's `method` stages) run when --methods names them (PPO by
default); the evaluation sets each against the SFT model on the same held-out prompts.

Each stage's settings are made exactly as the app's panels make them for a new run
(workbench/runfolder.py: the engine's defaults, the demo's settings from the catalogue, the
project's data, the newest run of each input's stage), then the pipeline's own options on top;
each runs as a child process through the same job as the app's. The simulated ranking goes
through the project's annotation store and the session API a person uses; its rankings are
marked simulated. The table at the end gives each stage's key figure.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from engine import osproc as process
from engine.config import ConfigError
from engine.device import resolve_device
from engine.fsutil import atomic_write_text, disk_full_message, is_disk_full
from engine.runio import StageError, format_count, format_duration, iter_events
from workbench import demo, runfolder, stages
from workbench.cli import refuse
from workbench.jobs import JobResult, run_job
from workbench.methods import methods
from workbench.pipeline_journal import Journal, JournalError
from workbench.project import DEMO_WRITING, NoDataEntry, Project, ProjectError
from workbench.runfold import RunFold, fold_run
from workbench.store_types import StoreError

# Pipeline options onto the settings they set: (stage, setting), or several of them. The help
# shows the catalogue's demo value of the first as its default.
OPTIONS = {
    "vocab_size": ("tokenizer", "vocab_size"),
    "preset": ("pretrain", "preset"),
    "steps": ("pretrain", "max_steps"),
    "batch_size": ("pretrain", "batch_size"),
    "lr": ("pretrain", "lr"),
    "sft_steps": ("sft", "max_steps"),
    "sft_lr": ("sft", "lr"),
    "eval_tasks": (("sft", "eval_task_limit"), ("grpo", "eval_task_limit")),
    "rank_prompts": ("sample", "n_prompts"),
    "k": ("sample", "k"),
    "rm_epochs": ("reward", "epochs"),
    "rm_lr": ("reward", "lr"),
    "ppo_steps": ("ppo", "steps"),
    "ppo_lr": ("ppo", "lr"),
    "kl_coef": ("ppo", "kl_coef"),
    "dpo_lr": ("dpo", "lr"),
    "dpo_beta": ("dpo", "beta"),
    "grpo_steps": ("grpo", "steps"),
    "grpo_lr": ("grpo", "lr"),
}
COMMON = ("seed", "device", "nproc")        # set on every stage whose config has them
RANK, EVALUATE = "rank", "evaluate"


DEFAULT_METHODS = ("ppo",)


def targets(option: str) -> list[tuple[str, str]]:
    """The (stage, setting) pairs a pipeline option sets."""
    t = OPTIONS[option]
    return list(t) if isinstance(t[0], tuple) else [t]


def steps(chosen: Optional[tuple[str, ...]] = None) -> list[str]:
    """What the pipeline runs, in order: the catalogue's stages (of the alignment methods, the
    chosen ones; all when None), the simulated ranking after sampling, the evaluation at the end."""
    out = []
    for s in stages.STAGES:
        if not s.pipeline or (s.method and chosen is not None and s.name not in chosen):
            continue
        out.append(s.name)
        if s.produces == "samples":
            out.append(RANK)
    return out + [EVALUATE]


class ProgressLine:
    """One line per stage: rewritten in place on a terminal, every ~10 % otherwise."""

    def __init__(self, stage: str, stream=None):
        self.stage, self.stream = stage, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.fold = RunFold(keep=False)
        self.last_decile = -1

    def __call__(self, ev: dict) -> None:
        self.fold.add(ev)
        if ev.get("type") != "progress":
            return
        frac = ev["step"] / max(ev["total"], 1)
        text = f"  {self.stage:<10} {format_count(ev):>20} {frac:6.1%}"
        for key in ("train/loss", "objective/score"):
            if key in self.fold.metrics:
                text += f"  {key.split('/')[1]} {float(self.fold.metrics[key]):.3f}"
                break
        if ev.get("tokens_per_s"):
            text += f"  {ev['tokens_per_s'] / 1000:.1f}k tok/s"
        text += f"  ETA {format_duration(self.fold.eta_s())}"
        if self.tty:
            self.stream.write("\r" + text.ljust(78))
            self.stream.flush()
        elif int(frac * 10) > self.last_decile:
            self.last_decile = int(frac * 10)
            print(text, file=self.stream, flush=True)

    def finish(self, status: str, seconds: float, where: Path | str) -> None:
        if self.tty:
            self.stream.write("\n")
        print(f"  {self.stage:<10} {status} in {format_duration(seconds)}  ({where})", file=self.stream, flush=True)


@dataclass
class Row:
    stage: str
    run: str
    figure: str
    seconds: float
    restored: bool = False      # finished by an earlier pipeline (--resume)


class Stopped(Exception):
    """A stage stopped on request (Ctrl-C, SIGTERM, its STOP file), with a checkpoint."""


class Pipeline:
    def __init__(self, project: Project, args, journal: Journal):
        self.project, self.args, self.journal = project, args, journal
        self.made: dict[str, Path] = {}         # stage -> the run folder this pipeline made
        self.results: dict[str, JobResult] = {}
        self.batch: Optional[int] = None
        self.rankings = 0
        self.rows: list[Row] = []
        self.earlier_s = 0.0        # what a stage resumed here ran before it stopped

    def newest(self, parent: stages.Parent, method: bool = False) -> Optional[Path]:
        """The run this pipeline made last among the stages the input expects; an alignment
        method's model is the SFT run, so every method starts from the same one and compares."""
        if method and parent.kind == "checkpoint" and "sft" in parent.expects and "sft" in self.made:
            return self.made["sft"]
        order = list(self.made)
        made = [s for s in parent.expects if s in self.made]
        return self.made[max(made, key=order.index)] if made else None

    def values(self, stage: str) -> dict:
        method = stages.spec(stage).method
        values = runfolder.suggested_values(self.project, stage, lambda p: self.newest(p, method))
        fields = set(runfolder.defaults(stage)) | {p.field for p in stages.spec(stage).parents}
        for option in OPTIONS:
            value = getattr(self.args, option, None)
            for target, name in targets(option):
                if target == stage and value is not None:
                    values[name] = value
        for name in COMMON:
            if name in fields and getattr(self.args, name, None) is not None:
                values[name] = getattr(self.args, name)
        s = stages.spec(stage)
        if s.steps_field and values.get(s.steps_field):
            values.update(stages.follow_steps(s, values[s.steps_field]))
        return values

    def check(self, order: list[str]) -> Optional[str]:
        """What is wrong with the settings of any stage in `order` (None: nothing), found before
        the first stage runs: a bad option would otherwise surface only when its stage is
        reached, after the hours of the ones before. The runs and rankings that earlier stages
        will make stand in as placeholders; the data files the project names are read by the
        stages' own readers."""
        if getattr(self.args, "device", None) is not None:
            try:
                resolve_device(self.args.device)
            except ConfigError as e:
                return f"--device: {e.message}"
        read: dict = {}
        for stage in (s for s in order if s not in (RANK, EVALUATE)):
            s = stages.spec(stage)
            for d in (d for d in s.data if d.project):
                try:
                    files = self.project.data_files(d.project)
                except NoDataEntry:
                    continue      # the stage's own check names the setting it lacks
                except ProjectError as e:
                    return str(e)
                if missing := [f for f in files if not f.exists()]:
                    return (f"{self.project.path / 'workbench.toml'}: [defaults.data] '{d.project}' names "
                            f"{missing[0]}, which does not exist")
                if problem := _unreadable(d.kind, files[:1] if d.first_only else files, read):
                    return problem
            values = self.values(stage)
            for p in s.parents:
                if p.expects:
                    values.setdefault(p.field, f"<the {p.expects[0]} run>")
            values.update({d.field: [runfolder.RANKINGS] for d in s.data if d.rankings})
            try:
                runfolder.build(stage, values)
            except ConfigError as e:
                return f"{self._where(stage, e.field)}: {e.message}"
        if EVALUATE in order:
            try:
                self.project.data_files("eval_tasks")      # what the methods are measured on
            except (NoDataEntry, ProjectError) as e:
                return f"{e} (the evaluate step measures the methods on them)"
        return None

    def _where(self, stage: str, field: str) -> str:
        """Where a stage's setting came from, for a message: the option, workbench.toml, or
        the stage's own settings."""
        option = next((f"--{o.replace('_', '-')}" for o in OPTIONS for target, name in targets(o)
                       if target == stage and name == field and getattr(self.args, o, None) is not None),
                      None)
        option = option or next((f"--{n}" for n in COMMON if n == field), None)
        if option:
            return option
        section, key = stages.spec(stage).project_defaults.get(field, (None, None))
        if section and self.project.default(section, key) is not None:
            return f"{self.project.path / 'workbench.toml'}: [defaults.{section}] {key}"
        return f"the {stage} stage, setting {field!r}"

    def run_stage(self, stage: str) -> None:
        rankings = None
        if any(d.rankings for d in stages.spec(stage).data):
            rankings = runfolder.Rankings(
                include_simulated=True, batch_ids=[self.batch] if self.batch else None,
                min_agreement=getattr(self.args, "min_agreement", None),
                aggregate="borda" if getattr(self.args, "borda", False) else "each")
        run_dir, before = self.journal.stopped_run(stage)
        self.earlier_s += before
        if run_dir is None:
            run_dir = runfolder.new_run(self.project, stage, self.values(stage), rankings=rankings)
        else:
            fold = self._left_behind(stage, run_dir)
            if fold.status == "completed":        # finished as the pipeline was killed
                seconds = before + _last_part_s(run_dir)
                print(f"  {stage:<10} finished before ({run_dir.name})", flush=True)
                self.journal.done(stage, seconds, run=run_dir)
                self._made(stage, JobResult(stage, run_dir, fold.status, fold.error, None, fold), seconds)
                self.earlier_s += seconds - before     # none of it in this pipeline's time
                return
            print(f"  {stage:<10} resuming {run_dir.name}", flush=True)
        self.journal.started(stage, run_dir, before)
        line = ProgressLine(stage)
        t0 = time.perf_counter()
        result = run_job(stage, run_dir, on_event=line)
        seconds = time.perf_counter() - t0 + before     # a resumed stage's time is both parts
        line.finish(result.status, seconds, result.run_dir)
        if result.status == "stopped":
            self.journal.stopped(stage, run_dir, seconds)
            raise Stopped(f"{stage} stopped with a checkpoint ({run_dir}); the same command with "
                          "--resume goes on from there")
        if result.status != "completed":
            raise SystemExit(f"{stage} {result.status}: {result.error or 'stopped by request'}\n"
                             f"events: {run_dir / 'events.jsonl'}")
        self.journal.done(stage, seconds, run=run_dir)
        self._made(stage, result, seconds)

    def _left_behind(self, stage: str, run_dir: Path) -> RunFold:
        """The run a killed pipeline left, once its stage process has stopped: one still running
        (it stops by itself when its pipeline dies, after its step and checkpoint) is asked to
        stop through its STOP file, and waited for."""
        fold = fold_run(run_dir)
        if fold.status == "running" and process.alive(fold.pid, run_dir):
            if fold.stop_with is None or process.alive(fold.stop_with):
                # Resumed in the app or by `workbench run`, or a pipeline's that is alive:
                # someone else's work, not this pipeline's to stop.
                raise SystemExit(f"error: {stage}: {run_dir.name} is running in another process (pid "
                                 f"{fold.pid}), not one a stopped pipeline left (the app's, "
                                 "workbench run's or another pipeline's, or one an older version "
                                 "started): let it finish or stop it, then run the same command again")
            print(f"  {stage:<10} waiting for {run_dir.name} (pid {fold.pid}), left running by the "
                  "earlier pipeline, to stop with a checkpoint", flush=True)
            (run_dir / "STOP").touch()
            while process.alive(fold.pid, run_dir):
                time.sleep(0.5)
            fold = fold_run(run_dir)
        return fold

    def _made(self, stage: str, result: JobResult, seconds: float, restored: bool = False) -> None:
        self.made[stage], self.results[stage] = result.run_dir, result
        figure = FIGURES.get(stage, lambda p, r, s: "")(self, result, _summary(result.run_dir))
        self.rows.append(Row(stage, result.run_dir.name, figure, seconds, restored))

    def restore(self) -> Optional[str]:
        """Take up what the journal says an earlier pipeline finished (None), or say why not."""
        for entry in self.journal.finished:
            stage, seconds = entry["step"], float(entry.get("seconds", 0.0))
            if stage == RANK:
                self.batch, self.rankings = entry["batch"], entry["rankings"]
                self.rows.append(Row(RANK, f"batch {self.batch}", _rank_figure(self.rankings), seconds, True))
                continue
            run_dir = self.project.path / "runs" / entry["run"]
            fold = fold_run(run_dir) if (run_dir / "events.jsonl").is_file() else None
            if fold is None or fold.status != "completed":
                return (f"{self.journal.path}: the {stage} run {run_dir} it names is "
                        f"{'gone' if fold is None else fold.status}; run the pipeline without --resume")
            self._made(stage, JobResult(stage, run_dir, fold.status, fold.error, None, fold), seconds, True)
        stage = (self.journal.stop or {}).get("step")
        run_dir, _ = self.journal.stopped_run(stage) if stage else (None, 0.0)
        if run_dir is not None and not (run_dir / runfolder.CONFIG).is_file():
            return (f"{self.journal.path}: the stopped {stage} run {run_dir} is gone; run the "
                    "pipeline without --resume")
        return None

    def rank(self) -> None:
        from workbench.samples import import_sample_run
        from workbench.simulated import DEFAULT_NAME, rank_batch
        from workbench.store import Store
        t0 = time.perf_counter()
        with Store.for_project(self.project.path) as store:
            self.batch = import_sample_run(store, self.made["sample"])
            rank_batch(store, self.batch, DEFAULT_NAME, seed=self.args.seed)
            # All of the batch's, not this call's: a pipeline killed after ranking ranks none again.
            self.rankings = next((n for _batch, who, _kind, n in store.ranked_counts(self.batch)
                                  if who == DEFAULT_NAME), 0)
        s = time.perf_counter() - t0
        print(f"  {RANK:<10} {self.rankings} rankings by {DEFAULT_NAME} (simulated) in {format_duration(s)}",
              flush=True)
        self.journal.done(RANK, s, batch=self.batch, rankings=self.rankings)
        self.rows.append(Row(RANK, f"batch {self.batch}", _rank_figure(self.rankings), s))

    def evaluate(self) -> None:
        """Each alignment method's run against the SFT model it started from, on the same
        held-out prompts (workbench.methods, as `workbench compare-methods` does)."""
        from workbench import methods as side_by_side
        from workbench.evaluate import baseline
        prompts = side_by_side.held_out_tasks(self.project, self.values("sft").get("eval_task_limit") or 200)
        reference = baseline(self.made["sft"], prompts, reward_model=self.made.get("reward"))
        rows = []
        # A method's training time as the Runs page and compare-methods give it (its events' start
        # to done), not this pipeline's wall time for the stage, which adds the process's start.
        from workbench.runs import RunStore
        index = RunStore(self.project.path)
        try:
            took = {info.name: info.duration_s for info in index.sync()}
        finally:
            index.close()
        for method in (m for m in side_by_side.methods() if m in self.made):
            t0 = time.perf_counter()
            tuned = self.made[method]
            r = side_by_side.evaluate_method(method, reference, tuned, took.get(tuned.name))
            atomic_write_text(tuned / "evaluation.json", json.dumps(r, indent=2) + "\n")
            rows.append(r)
            score = f"; RM score {r['base_score']:+.3f} -> {r['score']:+.3f}" if "score" in r else ""
            self.rows.append(Row(EVALUATE, tuned.name,
                                 f"{stages.spec(method).title} vs SFT win rate {r['win_rate']:.1%} "
                                 f"(W{r['wins']}/T{r['ties']}/L{r['losses']}); KL {r['kl']:.2f} nats; "
                                 f"accuracy {side_by_side.percent(r['base_accuracy'])} -> "
                                 f"{side_by_side.percent(r['accuracy'])}{score}",
                                 time.perf_counter() - t0))
        reward = self.made.get("reward")
        side_by_side.save_result(self.project.path, self.made["sft"].name, reward.name if reward else None,
                                 len(prompts), rows)

    def table(self, total_s: float) -> str:
        lines = [f"{'stage':<10} {'run':<28} {'time':>7}  key figure"]
        for row in self.rows:
            lines.append(f"{row.stage:<10} {row.run:<28} {format_duration(row.seconds):>7}  {row.figure}")
        lines.append(f"{'total':<10} {'':<28} {format_duration(total_s):>7}")
        return "\n".join(lines)


def _rank_figure(rankings: int) -> str:
    return f"{rankings} simulated rankings (correct, ended, then shorter)"


def _unreadable(kind: str, files: list[Path], seen: dict) -> Optional[str]:
    """What is wrong with a stage's data files, read by the stage's own reader now, before hours
    of the stages before it (`seen`: the file sets read so far, each read once). The corpus is
    read first by the tokenizer stage anyway; preference data comes from the project's store."""
    from engine.runio import InputProblems
    from engine.sample import read_prompts
    from engine.sft_data import read_records, read_tasks
    readers = {"sft": read_records, "prompts": read_prompts, "tasks": lambda fs: read_tasks(fs[0])}
    key = (kind, tuple(files))
    if kind in readers and key not in seen:
        try:
            readers[kind](files)
            seen[key] = None
        except InputProblems as e:
            seen[key] = str(e)
    return seen.get(key)


def _last_part_s(run_dir: Path) -> float:
    """Seconds from the run's last start to its done event: the part of a stage a killed
    pipeline did not live to count."""
    start = end = None
    for ev in iter_events(run_dir):
        if ev.get("type") == "start":
            start = ev.get("time")
        elif ev.get("type") == "done":
            end = ev.get("time")
    if not (isinstance(start, (int, float)) and isinstance(end, (int, float))):
        return 0.0
    return max(0.0, end - start)


def _summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _lines(path: Path) -> int:
    """Records in a JSONL file the stage trained on (a ranking that ties every answer is not
    written: it gives no pair)."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def _nan(m: dict, key: str) -> float:
    v = m.get(key)
    return float(v) if isinstance(v, (int, float)) else float("nan")


Figure = Callable[[Pipeline, JobResult, dict], str]
# The table's key figure per stage (a stage without one shows none).
FIGURES: dict[str, Figure] = {
    "tokenizer": lambda p, r, s: (f"vocab {_nan(r.metrics(), 'tokenizer/vocab_size'):.0f}, "
                                  f"{_nan(r.metrics(), 'tokenizer/chars_per_token'):.2f} chars/token"),
    "pretrain": lambda p, r, s: (f"val loss {_nan(r.metrics(), 'val/loss'):.3f} "
                                 f"(unigram baseline {_nan(r.metrics(), 'val/unigram_baseline'):.3f})"),
    "sft": lambda p, r, s: (f"task accuracy {s.get('task_accuracy_before', 0):.1%} -> "
                            f"{s.get('task_accuracy_after', 0):.1%} on {s['eval_tasks']} held-out tasks"
                            if s.get("eval_tasks") else
                            f"val loss {_nan(r.metrics(), 'val/loss'):.3f} (no held-out tasks to score)"),
    "sample": lambda p, r, s: (f"{s.get('prompts')} prompts x {s.get('answers', 0) // max(s.get('prompts') or 1, 1)} answers, "
                               f"{s.get('finished_fraction', 0):.0%} ended"),
    "reward": lambda p, r, s: (f"held-out pairwise accuracy {s.get('val/accuracy', 0):.1%} "
                               f"on {s.get('val_rankings')} rankings ({_lines(r.run_dir / runfolder.RANKINGS)} "
                               "in all)"),
    "ppo": lambda p, r, s: (f"score {_nan(r.metrics(), 'objective/score'):+.3f}, "
                            f"KL {_nan(r.metrics(), 'objective/kl'):.3f} nats"),
    "dpo": lambda p, r, s: (f"held-out reward accuracy {_nan(s, 'val/reward_accuracy'):.1%} on "
                            f"{s.get('val_rankings')} rankings, KL {_nan(s, 'val/kl'):.3f} nats"),
    "grpo": lambda p, r, s: (f"task accuracy {_nan(s, 'task_accuracy_before'):.1%} -> "
                             f"{_nan(s, 'task_accuracy_after'):.1%} on {s.get('eval_tasks', '?')} held-out tasks, "
                             f"reward {_nan(s, 'reward/total'):+.3f}, KL {_nan(s, 'objective/kl'):.3f} nats"),
}


def run_pipeline(args) -> int:
    project_dir = args.project or (Path("demo-project") if args.demo else None)
    if project_dir is None:
        return refuse("give --project DIR, or --demo for the demo project")
    chosen = tuple(m.strip() for m in (getattr(args, "methods", None) or ",".join(DEFAULT_METHODS)).split(",")
                   if m.strip())
    unknown = [m for m in chosen if m not in methods()]
    if unknown or not chosen:
        return refuse(f"--methods: {', '.join(unknown) or 'none given'}: choose from {', '.join(methods())}")
    order = steps(chosen)
    if args.until not in order:
        return refuse(f"--until must be one of {', '.join(order)} (with --methods {','.join(chosen)})")
    threshold = getattr(args, "min_agreement", None)
    if threshold is not None and not 0.0 <= threshold <= 1.0:   # before hours of pretraining
        return refuse(f"--min-agreement is a share from 0 to 1, got {threshold}")
    table_out = Path(args.table_out) if getattr(args, "table_out", None) else None
    if table_out is not None and not table_out.absolute().parent.is_dir():
        return refuse(f"--table-out: {table_out.parent} is not a folder")
    if table_out is not None and table_out.is_dir():
        return refuse(f"--table-out: {table_out} is a folder; give the file to write the table to")
    if args.demo and (not (project_dir / "workbench.toml").exists() or (project_dir / DEMO_WRITING).exists()):
        print(f"writing the demo project to {project_dir} ...", flush=True)
        try:
            demo.write_demo_project(project_dir, seed=args.seed, scale=args.scale)
        except FileExistsError as e:
            return refuse(str(e))
        except OSError as e:
            return refuse(_os_error(e, project_dir))
    try:
        project = Project.open(project_dir)
    except ProjectError as e:
        return refuse(str(e))
    print(f"project {project.name} at {project.path}", flush=True)
    try:
        journal = (Journal.resume if getattr(args, "resume", False) else Journal.start)(project.path, args)
    except JournalError as e:
        return refuse(str(e))
    pipe = Pipeline(project, args, journal)
    todo = order[:order.index(args.until) + 1]
    if problem := pipe.restore() or pipe.check(todo):
        return refuse(problem)
    try:
        journal.save()
    except OSError as e:
        return refuse(_os_error(e, journal.path))
    return _run_steps(pipe, todo, table_out)


def _os_error(e: OSError, path: Path) -> str:
    """One line for a file the pipeline itself could not write."""
    return disk_full_message(path) if is_disk_full(e) else f"cannot write {e.filename or path}: {e.strerror or e}"


def _run_steps(pipe: Pipeline, todo: list[str], table_out: Optional[Path]) -> int:
    t_all = time.perf_counter()
    try:
        for step in todo:
            earlier = next((r for r in pipe.rows if r.stage == step and r.restored), None)
            if earlier is not None:
                print(f"  {step:<10} done before ({earlier.run})", flush=True)
            elif step == RANK:
                pipe.rank()
            elif step == EVALUATE:
                pipe.evaluate()
            else:
                pipe.run_stage(step)
    except Stopped as e:
        print(str(e), file=sys.stderr)
        return 0
    except (ConfigError, ProjectError, StageError, StoreError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:        # a file of the pipeline's own (a stage says its own in its events)
        raise SystemExit(f"error: {_os_error(e, pipe.project.path)}")
    earlier = pipe.earlier_s + sum(r.seconds for r in pipe.rows if r.restored)
    table = pipe.table(time.perf_counter() - t_all + earlier)
    print()
    print(table)
    if table_out is not None:
        try:
            table_out.write_text(table + "\n", encoding="utf-8")
        except OSError as e:
            print(f"error: --table-out: cannot write {table_out}: {e.strerror or e}", file=sys.stderr)
            return 1
    return 0
