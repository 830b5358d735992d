"""The settings a new run of a stage starts with in the app: the project's data and the newest
runs to build on, plus training settings that work on the demo project on a laptop CPU.

The engine's dataclass defaults are safe general values; these are the ones `workbench
pipeline --demo` uses (its measured table is in the README), so a user who presses Start on
every panel in order gets the same result as the pipeline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from workbench.project import Project, ProjectError

# Per stage: settings proven on the demo project (README table), for 2 CPU cores.
TRAINING = {
    "tokenizer": {},
    "pretrain": dict(max_steps=1000, batch_size=16, lr=2e-3, warmup_steps=50, eval_every=166,
                     sample_every=333, checkpoint_every=333, log_every=10),
    "sft": dict(max_steps=500, batch_size=32, lr=1e-3, warmup_steps=10, eval_every=125, sample_every=250,
                checkpoint_every=250, log_every=5, eval_task_limit=200),
    "sample": dict(n_prompts=3000, k=8, max_new_tokens=24, temperature=1.0, top_p=1.0, batch_size=64),
    "reward": dict(epochs=2.0, batch_size=8, lr=3e-4, eval_every=50),
    "ppo": dict(steps=40, rollout_batch_size=32, minibatch_size=16, ppo_epochs=2, max_new_tokens=24,
                lr=3e-5, value_lr=3e-5, kl_coef=0.05, probe_every=10, checkpoint_every=20),
}
# Which stage's newest run feeds each artifact field.
PARENTS = {
    "pretrain": {"tokenizer": "tokenizer"},
    "sft": {"init": "pretrain"},
    "sample": {"checkpoint": "sft"},
    "reward": {"init": "sft"},
    "ppo": {"policy": "sft", "reward_model": "reward"},
}


def suggested_values(project: Project, stage: str, newest: Callable[[str], Path | None]) -> dict:
    """Form values for a new run; `newest(stage)` gives the newest usable run folder of a stage."""
    values = dict(TRAINING.get(stage, {}))

    def data(key: str) -> list[str]:
        try:
            return [str(p) for p in project.data_files(key)]
        except ProjectError:
            return []

    if stage == "tokenizer":
        values.update(inputs=data("pretrain"), vocab_size=project.default("tokenizer", "vocab_size", 4096))
    elif stage == "pretrain":
        values.update(inputs=data("pretrain"), preset=project.default("model", "preset", "tiny"))
        overrides = project.default("model", "overrides", {})
        if overrides:
            values["model"] = overrides
    elif stage == "sft":
        values["data"] = data("sft")
        tasks = data("eval_tasks")
        if tasks:
            values["eval_tasks"] = tasks[0]
    elif stage in ("sample", "ppo"):
        values["prompts"] = data("prompts")
    for field, parent_stage in PARENTS.get(stage, {}).items():
        run = newest(parent_stage)
        if run is not None:
            values[field] = str(run)
    return values
