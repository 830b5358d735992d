"""`workbench pipeline`: every available stage in order, each a run folder in the project.

Each stage runs as a child process through the job runner, exactly as the app runs it, so a
pipeline's runs can be reopened later from their folders. Today: tokenizer -> pretrain.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from engine.pretrain import PretrainConfig
from engine.runio import format_count, format_duration
from engine.tokenizer import TokenizerConfig
from workbench import demo
from workbench.project import Project, ProjectError
from workbench.runner import JobResult, prepare_run, run_job


class ProgressLine:
    """One line per stage: rewritten in place on a terminal, every ~10 % otherwise."""

    def __init__(self, stage: str, stream=None):
        self.stage, self.stream = stage, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.loss = None
        self.last_decile = -1

    def __call__(self, ev: dict) -> None:
        if ev.get("type") == "metrics" and "train/loss" in ev:
            self.loss = ev["train/loss"]
        if ev.get("type") != "progress":
            return
        frac = ev["step"] / max(ev["total"], 1)
        text = f"  {self.stage:<10} {format_count(ev):>20} {frac:6.1%}"
        if self.loss is not None:
            text += f"  loss {self.loss:.3f}"
        if ev.get("tokens_per_s"):
            text += f"  {ev['tokens_per_s'] / 1000:.1f}k tok/s"
        text += f"  ETA {format_duration(ev.get('eta_s'))}"
        if self.tty:
            self.stream.write("\r" + text.ljust(78))
            self.stream.flush()
        elif int(frac * 10) > self.last_decile:
            self.last_decile = int(frac * 10)
            print(text, file=self.stream, flush=True)

    def finish(self, result: JobResult, seconds: float) -> None:
        if self.tty:
            self.stream.write("\n")
        print(f"  {self.stage:<10} {result.status} in {format_duration(seconds)}  ({result.run_dir})",
              file=self.stream, flush=True)


def _stage(project: Project, stage: str, config) -> tuple[JobResult, float]:
    run_dir = prepare_run(project.new_run_dir(stage), config)
    line = ProgressLine(stage)
    t0 = time.perf_counter()
    result = run_job(stage, run_dir, on_event=line)
    line.finish(result, time.perf_counter() - t0)
    if result.status != "completed":
        raise SystemExit(f"{stage} {result.status}: {result.error or 'stopped by request'}\n"
                         f"events: {run_dir / 'events.jsonl'}")
    return result, time.perf_counter() - t0


def rel(target: Path, run_dir_parent: Path) -> str:
    # Configs hold paths relative to their run folder, so a project folder can be moved.
    return os.path.relpath(target, run_dir_parent / "x")


def run_pipeline(args) -> int:
    project_dir = args.project or (Path("demo-project") if args.demo else None)
    if project_dir is None:
        raise SystemExit("error: give --project DIR, or --demo for the demo project")
    if args.demo and not (project_dir / "workbench.toml").exists():
        print(f"writing the demo project to {project_dir} ...", flush=True)
        demo.write_demo_project(project_dir, seed=args.seed, scale=args.scale)
    try:
        project = Project.open(project_dir)
    except ProjectError as e:
        raise SystemExit(f"error: {e}")
    runs = project.path / "runs"
    try:
        corpus = [rel(p, runs) for p in project.data_files("pretrain")]
    except ProjectError as e:
        raise SystemExit(f"error: {e}")
    vocab_size = args.vocab_size or project.default("tokenizer", "vocab_size", 4096)
    preset = args.preset or project.default("model", "preset", "tiny")
    print(f"project {project.name} at {project.path}", flush=True)

    rows = []
    tok_cfg = TokenizerConfig(inputs=corpus, vocab_size=vocab_size, seed=args.seed)
    tok_res, tok_s = _stage(project, "tokenizer", tok_cfg)
    m = tok_res.metrics()
    rows.append(("tokenizer", tok_res.run_dir.name,
                 f"vocab {m.get('tokenizer/vocab_size')}, {m.get('tokenizer/chars_per_token', 0):.2f} chars/token",
                 tok_s))

    pre_cfg = PretrainConfig(tokenizer=rel(tok_res.run_dir / "tokenizer.json", runs),
                             inputs=corpus, preset=preset, max_steps=args.steps,
                             batch_size=args.batch_size, seed=args.seed, device=args.device,
                             eval_every=max(1, args.steps // 6), sample_every=max(1, args.steps // 3),
                             checkpoint_every=max(1, args.steps // 3), log_every=max(1, args.steps // 100))
    pre_res, pre_s = _stage(project, "pretrain", pre_cfg)
    m = pre_res.metrics()
    rows.append(("pretrain", pre_res.run_dir.name,
                 f"val loss {m.get('val/loss', float('nan')):.3f} (unigram baseline "
                 f"{m.get('val/unigram_baseline', float('nan')):.3f}), "
                 f"{m.get('perf/tokens_per_s', 0) / 1000:.1f}k tok/s", pre_s))

    print()
    print(f"{'stage':<10} {'run':<28} {'time':>7}  key figure")
    for stage, run, figure, seconds in rows:
        print(f"{stage:<10} {run:<28} {format_duration(seconds):>7}  {figure}")
    return 0
