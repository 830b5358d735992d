"""`workbench pipeline`: every stage in order, each a run folder in the project.

    tokenizer -> pretrain -> sft -> sample -> rank (simulated) -> reward -> ppo -> evaluate

Each training stage runs as a child process through the job runner, exactly as the app runs
it, so a pipeline's runs can be reopened later from their folders. The simulated ranking goes
through the project's annotation store and the same session API a person uses; its rankings
are marked simulated. The table at the end gives each stage's key figure.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.pretrain import PretrainConfig
from engine.runio import format_count, format_duration
from engine.tokenizer import TokenizerConfig
from workbench import demo
from workbench.project import Project, ProjectError
from workbench.runner import JobResult, prepare_run, run_job
from workbench.suggest import TRAINING

STAGE_ORDER = ("tokenizer", "pretrain", "sft", "sample", "rank", "reward", "ppo", "evaluate")


class ProgressLine:
    """One line per stage: rewritten in place on a terminal, every ~10 % otherwise."""

    def __init__(self, stage: str, stream=None):
        self.stage, self.stream = stage, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.loss = None
        self.last_decile = -1

    def __call__(self, ev: dict) -> None:
        if ev.get("type") == "metrics":
            for key in ("train/loss", "objective/score"):
                if key in ev:
                    self.loss = (key.split("/")[1], ev[key])
        if ev.get("type") != "progress":
            return
        frac = ev["step"] / max(ev["total"], 1)
        text = f"  {self.stage:<10} {format_count(ev):>20} {frac:6.1%}"
        if self.loss is not None:
            text += f"  {self.loss[0]} {self.loss[1]:.3f}"
        if ev.get("tokens_per_s"):
            text += f"  {ev['tokens_per_s'] / 1000:.1f}k tok/s"
        text += f"  ETA {format_duration(ev.get('eta_s'))}"
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


def rel(target: Path, runs: Path) -> str:
    # Configs hold paths relative to their run folder, so a project folder can be moved.
    return os.path.relpath(target, runs / "x")


def _job(project: Project, stage: str, config) -> tuple[JobResult, float]:
    run_dir = prepare_run(project.new_run_dir(stage), config)
    line = ProgressLine(stage)
    t0 = time.perf_counter()
    result = run_job(stage, run_dir, on_event=line)
    line.finish(result.status, time.perf_counter() - t0, result.run_dir)
    if result.status != "completed":
        raise SystemExit(f"{stage} {result.status}: {result.error or 'stopped by request'}\n"
                         f"events: {run_dir / 'events.jsonl'}")
    return result, time.perf_counter() - t0


def _summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_pipeline(args) -> int:
    from engine.ppo import PPOConfig
    from engine.reward import RewardConfig
    from engine.sample import SampleConfig
    from engine.sft import SFTConfig
    from workbench.evaluate import compare
    from workbench.preferences import write_rm_dataset
    from workbench.samples import import_sample_run
    from workbench.simulated import DEFAULT_NAME, rank_batch
    from workbench.store import Store

    project_dir = args.project or (Path("demo-project") if args.demo else None)
    if project_dir is None:
        raise SystemExit("error: give --project DIR, or --demo for the demo project")
    if args.until not in STAGE_ORDER:
        raise SystemExit(f"error: --until must be one of {', '.join(STAGE_ORDER)}")
    if args.demo and not (project_dir / "workbench.toml").exists():
        print(f"writing the demo project to {project_dir} ...", flush=True)
        demo.write_demo_project(project_dir, seed=args.seed, scale=args.scale)
    try:
        project = Project.open(project_dir)
        runs = project.path / "runs"
        corpus = [rel(p, runs) for p in project.data_files("pretrain")]
    except ProjectError as e:
        raise SystemExit(f"error: {e}")
    last = STAGE_ORDER.index(args.until)
    wanted = lambda stage: STAGE_ORDER.index(stage) <= last
    vocab_size = args.vocab_size or project.default("tokenizer", "vocab_size", 4096)
    preset = args.preset or project.default("model", "preset", "tiny")
    model = project.default("model", "overrides", {})
    print(f"project {project.name} at {project.path}", flush=True)
    t_all = time.perf_counter()
    rows: list[Row] = []

    res, s = _job(project, "tokenizer", TokenizerConfig(inputs=corpus, vocab_size=vocab_size, seed=args.seed))
    m = res.metrics()
    rows.append(Row("tokenizer", res.run_dir.name, f"vocab {m.get('tokenizer/vocab_size')}, "
                    f"{m.get('tokenizer/chars_per_token', 0):.2f} chars/token", s))
    tok_run = res.run_dir

    if wanted("pretrain"):
        steps = args.steps
        res, s = _job(project, "pretrain", PretrainConfig(
            tokenizer=rel(tok_run / "tokenizer.json", runs), inputs=corpus, preset=preset, model=model,
            max_steps=steps, batch_size=args.batch_size, seed=args.seed, device=args.device,
            nproc=args.nproc, lr=args.lr, warmup_steps=max(1, steps // 20),
            eval_every=max(1, steps // 6), sample_every=max(1, steps // 3),
            checkpoint_every=max(1, steps // 3), log_every=max(1, steps // 100)))
        m = res.metrics()
        rows.append(Row("pretrain", res.run_dir.name, f"val loss {m.get('val/loss', float('nan')):.3f} "
                        f"(unigram baseline {m.get('val/unigram_baseline', float('nan')):.3f})", s))
        pre_run = res.run_dir

    if wanted("sft"):
        res, s = _job(project, "sft", SFTConfig(
            init=rel(pre_run, runs), data=[rel(p, runs) for p in project.data_files("sft")],
            eval_tasks=rel(project.data_files("eval_tasks")[0], runs), eval_task_limit=args.eval_tasks,
            max_steps=args.sft_steps, batch_size=32, lr=args.sft_lr, warmup_steps=10,
            eval_every=max(1, args.sft_steps // 4), sample_every=max(1, args.sft_steps // 2),
            checkpoint_every=args.sft_steps, log_every=5, seed=args.seed, device=args.device,
            nproc=args.nproc))
        sm = _summary(res.run_dir)
        rows.append(Row("sft", res.run_dir.name, f"task accuracy {sm.get('task_accuracy_before', 0):.1%} -> "
                        f"{sm.get('task_accuracy_after', 0):.1%} on {args.eval_tasks} held-out tasks", s))
        sft_run = res.run_dir

    prompts = project.data_files("prompts")
    if wanted("sample"):
        res, s = _job(project, "sample", SampleConfig(
            checkpoint=rel(sft_run, runs), prompts=[rel(p, runs) for p in prompts], n_prompts=args.rank_prompts,
            k=args.k, max_new_tokens=24, temperature=1.0, top_p=1.0, seed=args.seed, device=args.device,
            batch_size=64))
        sm = _summary(res.run_dir)
        rows.append(Row("sample", res.run_dir.name, f"{sm.get('prompts')} prompts x {args.k} answers, "
                        f"{sm.get('finished_fraction', 0):.0%} ended", s))
        sample_run = res.run_dir

    if wanted("rank"):
        t0 = time.perf_counter()
        store = Store.for_project(project.path)
        batch = import_sample_run(store, sample_run)
        n = rank_batch(store, batch, DEFAULT_NAME, seed=args.seed)
        s = time.perf_counter() - t0
        print(f"  {'rank':<10} {n} rankings by {DEFAULT_NAME} (simulated) in {format_duration(s)}", flush=True)
        rows.append(Row("rank", f"batch {batch}", f"{n} simulated rankings (correct, ended, then shorter)", s))

    if wanted("reward"):
        rm_dir = project.new_run_dir("reward")
        # The job's input lives in its own folder, so the run can be reproduced from it alone.
        n = write_rm_dataset(store, rm_dir / "rankings.jsonl", include_simulated=True, batch_ids=[batch])
        store.close()
        settings = {**TRAINING["reward"], "epochs": args.rm_epochs, "lr": args.rm_lr}
        prepare_run(rm_dir, RewardConfig(init=rel(sft_run, runs), data=["rankings.jsonl"], **settings,
                                         seed=args.seed, device=args.device, nproc=args.nproc))
        line = ProgressLine("reward")
        t0 = time.perf_counter()
        res = run_job("reward", rm_dir, on_event=line)
        s = time.perf_counter() - t0
        line.finish(res.status, s, rm_dir)
        if res.status != "completed":
            raise SystemExit(f"reward {res.status}: {res.error}")
        sm = _summary(rm_dir)
        rows.append(Row("reward", rm_dir.name, f"held-out pairwise accuracy {sm.get('val/accuracy', 0):.1%} "
                        f"on {sm.get('val_rankings')} rankings ({n} in all)", s))
        rm_run = rm_dir

    if wanted("ppo"):
        res, s = _job(project, "ppo", PPOConfig(
            policy=rel(sft_run, runs), reward_model=rel(rm_run, runs), prompts=[rel(p, runs) for p in prompts],
            steps=args.ppo_steps, rollout_batch_size=32, minibatch_size=16, ppo_epochs=2, max_new_tokens=24,
            lr=args.ppo_lr, value_lr=args.ppo_lr, kl_coef=args.kl_coef, probe_every=max(1, args.ppo_steps // 4),
            checkpoint_every=args.ppo_steps, seed=args.seed, device=args.device))
        m = res.metrics()
        rows.append(Row("ppo", res.run_dir.name, f"score {m.get('objective/score', 0):+.3f}, "
                        f"KL {m.get('objective/kl', 0):.3f} nats", s))
        ppo_run = res.run_dir

    if wanted("evaluate"):
        from engine.tasks import Task
        t0 = time.perf_counter()
        tasks_file = project.data_files("eval_tasks")[0]
        lines = tasks_file.read_text(encoding="utf-8").splitlines()[:args.eval_tasks]
        held_out = [Task.from_dict(json.loads(line)).prompt for line in lines if line.strip()]
        r = compare(sft_run, ppo_run, held_out, reward_model=rm_run)
        s = time.perf_counter() - t0
        (ppo_run / "evaluation.json").write_text(json.dumps(r, indent=2) + "\n")
        rows.append(Row("evaluate", ppo_run.name,
                        f"PPO vs SFT win rate {r['win_rate']:.1%} (W{r['wins']}/T{r['ties']}/L{r['losses']}); "
                        f"accuracy {r['base_accuracy']:.1%} -> {r['accuracy']:.1%}; "
                        f"RM score {r['base_score']:+.3f} -> {r['score']:+.3f}", s))

    print()
    print(f"{'stage':<10} {'run':<28} {'time':>7}  key figure")
    for row in rows:
        print(f"{row.stage:<10} {row.run:<28} {format_duration(row.seconds):>7}  {row.figure}")
    print(f"{'total':<10} {'':<28} {format_duration(time.perf_counter() - t_all):>7}")
    return 0
