"""Supervised fine-tuning: the pretraining loss on chat-rendered (prompt, answer) pairs,
counted on the answer tokens only.

    python -m engine.sft --run-dir DIR

reads DIR/config.json (`SFTConfig`), loads the `init` checkpoint (a pretraining checkpoint or
run folder) with its tokenizer, checks every data record before any work (engine.sft_data),
trains through engine.trainer and writes DIR/checkpoints/step-NNNNNN/ (each with its
tokenizer.json, so engine.artifacts.load_artifact reads SFT checkpoints like any other),
DIR/events.jsonl and, at the end, DIR/summary.json. A fresh run is evaluated once before the
first step, so plots and the summary show the task accuracy before SFT next to after.
A run folder with checkpoints resumes from the newest, exactly (on CPU). With lora_rank > 0
only LoRA adapters train on the frozen init (engine.lora); checkpoints are merged all the same.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from engine import checkpoint as ckpt
from engine import distributed
from engine.artifacts import RunInputs
from engine.config import require, resolve_path
from engine.device import autocast, describe, setup
from engine.chat import reply_batch, task_metrics
from engine.lora import LORA_FIELDS, LoRASettings, add_adapters, describe as describe_lora, uses_lora
from engine.runio import Emitter, NeverStop, Sink, StageError, stage_main, write_summary
from engine.sft_data import (TOO_LONG, EpochSampler, Example, SFTDataError, collate,
                             data_fingerprint, read_records, read_tasks, render, split_records)
from engine.trackers import TrackerSettings
from engine.trainer import Stage, TrainConfig, check_resume_preflight, run_summary, train, trained_fixed

DEFAULT_PROMPTS = ["What is 12 + 7?", "Reverse the word 'garden'.",
                   "What is the capital of France?", "Tell me about the sea."]


@dataclass(kw_only=True)
class SFTConfig(LoRASettings, TrainConfig, TrackerSettings):
    init: str                             # pretraining checkpoint, or its run folder (best one)
    data: list[str]                       # JSONL files: see engine.sft_data for the formats
    tokenizer: Optional[str] = None       # None: the init checkpoint's own tokenizer.json
    val_data: list[str] = field(default_factory=list)  # empty: hold out val_fraction of data
    val_fraction: float = 0.05            # share of the data held out for validation (when val_data is empty)
    epochs: float = 0.0                   # > 0: sets max_steps from the number of samples
    seq_len: int = 0                      # 0: the model's max_seq_len; samples are cut to it
    too_long: str = "drop"                # a sample the context cuts into its answer or its whole prompt: drop | refuse | keep
    eval_batches: int = 20                # val loss on the first eval_batches * batch_size samples
    eval_tasks: Optional[str] = None      # JSONL of engine.tasks.Task: greedy task accuracy
    eval_task_limit: int = 100            # the first N tasks (0: all)
    task_tokens: int = 32                 # answer length limit when checking tasks
    sample_prompts: list[str] = field(default_factory=DEFAULT_PROMPTS.copy)  # prompts answered at each sample step
    sample_tokens: int = 64               # answer length limit of the samples
    sample_temperature: float = 0.0       # 0: greedy, so samples at different steps compare
    # Fine-tuning starts from a model that already works: a smaller step than pretraining's
    # keeps it from forgetting, and no weight decay, which would pull it toward zero rather
    # than toward where it started.
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int = 500
    eval_every: int = 50
    sample_every: int = 100
    checkpoint_every: int = 100

    def validate(self) -> None:
        self.validate_training()
        self.validate_lora()
        self.validate_trackers()
        require(bool(self.init.strip()), "init", "a pretraining checkpoint or run folder is required")
        require(len(self.data) > 0, "data", "at least one JSONL file is required")
        for name in ("data", "val_data"):
            for i, p in enumerate(getattr(self, name)):
                require(p.strip() != "", f"{name}[{i}]", "empty path")
        if self.tokenizer is not None:
            require(self.tokenizer.strip() != "", "tokenizer", "empty path (leave it out to use "
                                                               "the checkpoint's own)")
        if not self.val_data:
            require(0 < self.val_fraction < 0.5, "val_fraction",
                    "must be between 0 and 0.5 (or give val_data)")
        require(self.epochs >= 0 and math.isfinite(self.epochs), "epochs",
                "must be 0 (train max_steps) or a positive number of passes over the data")
        require(self.seq_len == 0 or self.seq_len >= 3, "seq_len",
                "0 (the model's context) or at least 3: bos, the assistant token, one answer token")
        require(self.too_long in TOO_LONG, "too_long", f"one of {', '.join(TOO_LONG)}")
        require(self.eval_batches > 0, "eval_batches", "must be a positive integer")
        if self.eval_tasks is not None:
            require(self.eval_tasks.strip() != "", "eval_tasks", "empty path")
        require(self.eval_task_limit >= 0, "eval_task_limit", "must be zero (all) or positive")
        require(self.task_tokens > 0, "task_tokens", "must be a positive integer")
        require(self.sample_tokens > 0, "sample_tokens", "must be a positive integer")
        require(self.sample_temperature >= 0, "sample_temperature", "must be zero or positive")


# What the run *is*: changing any of these on resume would train a different run under the old
# name. The data files' contents are checked too (a fingerprint in state.json).
FIXED_ON_RESUME = ("init", "tokenizer", "data", "val_data", "val_fraction", "seq_len", "too_long", *LORA_FIELDS)


def _per_kind(metrics: dict) -> dict:
    return {k.removeprefix("eval/acc/"): v for k, v in metrics.items() if k.startswith("eval/acc/")}


def _batches(examples: list[Example], size: int, pad_id: int) -> list[tuple]:
    return [collate(examples[i:i + size], pad_id) for i in range(0, len(examples), size)]


@dataclass
class SFTData:
    """The rendered examples of both splits, their reports and the eval tasks, all checked."""
    train: list[Example]
    val: list[Example]
    train_rep: object
    val_rep: object
    tasks: list
    files: list[Path]          # every data file, for the fingerprint that guards a resume


def load_data(cfg: SFTConfig, run_dir: Path, tok, seq_len: int, ev: Emitter) -> SFTData:
    """Read, split and render the data; every problem in every file is one error, before any work."""
    data_files = [resolve_path(run_dir, p) for p in cfg.data]
    val_files = [resolve_path(run_dir, p) for p in cfg.val_data]
    # One error for every bad line in every input file, so one pass fixes them all.
    problems: list[str] = []

    def checked(read, *args) -> list:
        try:
            return read(*args)
        except SFTDataError as e:
            problems.extend(e.problems)
            return []

    records = checked(read_records, data_files)
    val_recs = checked(read_records, val_files) if val_files else []
    in_data = len(problems)
    tasks = checked(read_tasks, resolve_path(run_dir, cfg.eval_tasks), cfg.eval_task_limit) \
        if cfg.eval_tasks else []
    if problems:
        # Named for the files at fault: the held-out tasks are not SFT data.
        what = ("SFT data" if len(problems) == in_data else "held-out tasks" if not in_data
                else "SFT data and the held-out tasks")
        raise SFTDataError(problems, what=what)
    if val_files:
        train_recs = records
    else:
        train_recs, val_recs = split_records(records, cfg.val_fraction, cfg.seed)
    # Both splits are rendered before either refuses, so one error names every such sample.
    rendered = {}
    for split, recs in (("train", train_recs), ("validation", val_recs)):
        rendered[split] = checked(render, recs, tok, seq_len, cfg.too_long) or ([], None)
    if problems:
        raise SFTDataError(problems)
    (train_ex, train_rep), (val_ex, val_rep) = rendered["train"], rendered["validation"]
    for split, rep in (("train", train_rep), ("validation", val_rep)):
        message = rep.message(seq_len, split)
        if message:
            ev.emit("log", level="warning", message=message, split=split, samples=rep.total,
                    truncated=len(rep.truncated), prompt_lost=len(rep.prompt_lost),
                    answer_cut=len(rep.answer_cut), dropped=rep.dropped, no_answer=len(rep.empty),
                    truncated_lines=rep.truncated[:5], no_answer_lines=rep.empty[:5])
    for split, examples, rep in (("training", train_ex, train_rep), ("validation", val_ex, val_rep)):
        if not examples and rep.damaged and rep.too_long == "drop":
            raise SFTDataError([f"no {split} sample fits the context ({seq_len} tokens): "
                                f"{len(rep.damaged)} of {rep.total} would lose all of the prompt or "
                                f"part of the answer (e.g. {', '.join(rep.damaged[:3])}). Raise "
                                f"seq_len (up to the model's context), or set too_long to keep to "
                                f"train on them cut."])
        if not examples:
            # The most common SFT bug is a loss mask that is all zeros: the run "trains" and
            # nothing changes. Refuse it loudly instead.
            raise SFTDataError([f"no {split} sample has an answer token to learn from: all "
                                f"{rep.total} loss masks are empty (e.g. {', '.join(rep.empty[:3])}). "
                                f"Check that records have assistant answers and that the context "
                                f"({seq_len} tokens) leaves room for them."])
    return SFTData(train_ex, val_ex, train_rep, val_rep, tasks, data_files + val_files)


class Hooks:
    """What the SFT stage hands the trainer (batches, loss, evaluation, samples, resume state),
    and the evaluations before the first step and at the last."""

    def __init__(self, cfg: SFTConfig, art, data: SFTData, ev: Emitter, device, sources: dict):
        self.cfg, self.art, self.tok, self.data, self.ev, self.device = cfg, art, art.tokenizer, data, ev, device
        self.sources = sources       # RunInputs.state(): the checkpoints this run reads
        self.sampler = EpochSampler(len(data.train), cfg.seed)
        self.fingerprint = data_fingerprint(data.files)
        self.val_batches = _batches(data.val[:cfg.eval_batches * cfg.batch_size], cfg.batch_size, self.tok.pad_id)
        self.init_metrics: dict = {}
        self.last_eval: dict = {}

    def _take(self) -> list[int]:
        epoch = self.sampler.epoch
        idx = self.sampler.take(self.cfg.batch_size)
        if self.sampler.epoch != epoch:
            self.ev.log(f"epoch {self.sampler.epoch + 1} begins")
        return idx

    def next_batch(self, _gen: torch.Generator):
        x, y, n, lengths = collate([self.data.train[i] for i in self._take()], self.tok.pad_id)
        return x.to(self.device), y.to(self.device), n, lengths.to(self.device)

    def skip_batch(self, _gen: torch.Generator) -> None:
        self._take()

    @staticmethod
    def loss(m, batch):
        # The mean over this batch's answer tokens, as HF's SFT does: a batch of short answers
        # weighs as much as one of long answers.
        x, y, n, lengths = batch
        return m(x, y, loss_only=True, lengths=lengths), n

    def evaluate(self, m) -> dict[str, float]:
        # Token-weighted over a fixed set of samples, so curves compare across steps.
        total, count = 0.0, 0
        for x, y, _, lengths in self.val_batches:
            k = int((y != -100).sum())
            total += float(m(x.to(self.device), y.to(self.device), loss_only=True, lengths=lengths.to(self.device))) * k
            count += k
        values = {"val/loss": total / count}
        tasks = self.data.tasks
        if tasks:
            values.update(task_metrics(m, self.tok, tasks, self.cfg.task_tokens))
        self.last_eval = dict(values)
        return values

    def sample(self, m, step: int) -> None:
        cfg = self.cfg
        replies = reply_batch(m, self.tok, cfg.sample_prompts, cfg.sample_tokens,
                              temperature=cfg.sample_temperature, seed=cfg.seed)
        for prompt, (text, finished) in zip(cfg.sample_prompts, replies):
            self.ev.emit("sample", step=step, prompt=prompt, text=text, finished=finished)

    def state(self) -> dict:
        return {"tokenizer_fingerprint": self.tok.fingerprint(), "sampler": self.sampler.state(),
                "data_fingerprint": self.fingerprint, **self.sources,
                "init_metrics": self.init_metrics}

    def restore(self, saved: dict) -> None:
        if saved.get("data_fingerprint") != self.fingerprint:
            raise StageError("the SFT data files changed since this run started; resuming would "
                             "train a different run under the old name: start a new run")
        self.sampler.load(saved["sampler"])
        self.init_metrics.update(saved.get("init_metrics") or {})

    def evaluate_now(self, model, dtype, samples: bool = False) -> dict:
        model.eval()
        with torch.no_grad(), autocast(self.device, dtype):
            values = self.evaluate(model)
        if samples:
            self.sample(model, 0)
        model.train()
        return values


def preflight(cfg: SFTConfig, run_dir: Path) -> None:
    """What would end a run of `cfg` in `run_dir` at once, found without loading a model (the
    app's form asks before it makes a run folder or writes a resume's settings)."""
    inputs = RunInputs(run_dir, cfg)
    init = inputs.peek("init", resolve_path(run_dir, cfg.init), required=uses_lora(cfg), kind="lm")
    init.config.check_fits("seq_len", cfg.seq_len)
    check_resume_preflight(run_dir, cfg, trained_fixed(FIXED_ON_RESUME))


def run(cfg: SFTConfig, run_dir: Path, sink: Optional[Sink] = None, control=None) -> str:
    ev = Emitter(sink)
    control = control or NeverStop()
    run_dir = Path(run_dir)
    device, dtype = setup(cfg.device, cfg.dtype)

    # Everything that can be wrong with the inputs is found here, before any step or checkpoint.
    inputs = RunInputs(run_dir, cfg, ev.log)
    # Under LoRA a resume rebuilds the frozen base from init; else its weights come from the run's own.
    art = inputs.load("init", resolve_path(run_dir, cfg.init), required=uses_lora(cfg), device=device,
                      tokenizer=resolve_path(run_dir, cfg.tokenizer) if cfg.tokenizer else None, kind="lm")
    model = art.model
    if uses_lora(cfg):
        add_adapters(model, cfg, cfg.seed)
        ev.log(describe_lora(model))
    model.config.check_fits("seq_len", cfg.seq_len)
    seq_len = cfg.seq_len or model.config.max_seq_len
    data = load_data(cfg, run_dir, art.tokenizer, seq_len, ev)

    steps_per_epoch = len(data.train) / (cfg.batch_size * cfg.grad_accum)
    tcfg = cfg
    if cfg.epochs > 0:
        # Computed, never written back into config.json: the trainer gets a copy.
        tcfg = dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.epochs * steps_per_epoch)))
    n_targets = sum(e.n_targets for e in data.train)
    ev.log(f"device {describe(device, dtype)}; init {art.checkpoint.resolve()} "
           f"({model.num_params():,} params, context {seq_len}); {len(data.train)} train / "
           f"{len(data.val)} val samples, {n_targets:,} answer tokens; {tcfg.max_steps} steps = "
           f"{tcfg.max_steps / steps_per_epoch:.2f} epochs"
           + (f"; {len(data.tasks)} eval tasks" if data.tasks else ""))

    hooks = Hooks(cfg, art, data, ev, device, inputs.state())
    stage = Stage("sft", hooks.next_batch, hooks.loss, hooks.evaluate, hooks.sample, fixed_on_resume=FIXED_ON_RESUME,
                  state=hooks.state, restore=hooks.restore, extra_files=art.tokenizer_files,
                  flops_per_token=model.flops_per_token(seq_len), skip_batch=hooks.skip_batch,
                  uniform_loss=math.log(model.config.vocab_size))
    fresh = ckpt.latest_checkpoint(run_dir / "checkpoints") is None
    if fresh and distributed.is_main():
        # Said first: on a CPU this can take a while, before the first step shows any progress.
        ev.log("measuring the starting model before the first step (validation loss"
               + (f", {len(data.tasks)} held-out tasks" if data.tasks else "") + ")")
        hooks.init_metrics.update(hooks.evaluate_now(model, dtype, samples=bool(cfg.sample_every)))
    status = train(tcfg, run_dir, model, stage, device=device, dtype=dtype, sink=sink,
                   control=control, init_metrics=dict(hooks.init_metrics) if fresh else None)
    if status != "completed" or not distributed.is_main():
        return status
    if not hooks.last_eval:  # resumed at max_steps: the trainer had nothing left to do or evaluate
        hooks.evaluate_now(model, dtype)
    write_summary(run_dir, _summary(run_dir, tcfg, art, data, hooks, steps_per_epoch))
    return status


def _summary(run_dir: Path, tcfg: SFTConfig, art, data: SFTData, hooks: Hooks, steps_per_epoch: float) -> dict:
    before, after = hooks.init_metrics, hooks.last_eval
    summary = {"stage": "sft", **run_summary(run_dir, tcfg), "init": str(art.checkpoint.resolve()),
               "max_steps": tcfg.max_steps, "epochs": round(tcfg.max_steps / steps_per_epoch, 3),
               "train_samples": len(data.train), "val_samples": len(data.val),
               "truncated": len(data.train_rep.truncated) + len(data.val_rep.truncated),
               "prompt_lost": len(data.train_rep.prompt_lost) + len(data.val_rep.prompt_lost),
               "answer_cut": len(data.train_rep.answer_cut) + len(data.val_rep.answer_cut),
               "dropped": data.train_rep.dropped + data.val_rep.dropped,
               "no_answer": len(data.train_rep.empty) + len(data.val_rep.empty),
               "val_loss_before": before.get("val/loss"), "val_loss_after": after.get("val/loss")}
    if data.tasks:
        summary.update({
            "eval_tasks": len(data.tasks),
            "task_accuracy_before": before.get("eval/task_accuracy"),
            "task_accuracy_after": after.get("eval/task_accuracy"),
            "per_kind_before": _per_kind(before),
            "per_kind_after": _per_kind(after)})
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("sft", SFTConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
