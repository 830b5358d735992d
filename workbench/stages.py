"""The stage catalogue: the one place that lists the stages and holds each one's facts.

A stage is an engine module (`python -m engine.<name> --run-dir DIR`) with a config dataclass.
Everything the rest of the workbench needs to know about it is here: which config fields name
another run (and which stages' runs they expect), which name data (and what kind), what the
stage produces for later stages, which settings a form shows up front, the settings the demo
pipeline uses on a laptop CPU, its titles and description. The forms, the run index, the job
runner, the pipeline and the app's pages are all derived from this table. Adding a stage is two
files: its engine module (`engine/<name>.py`, named as the stage) and its spec here. Optional:
a panel class in ui/stage_pages.py for special widgets, plots in workbench/plot_specs.py (without
them its metrics show under "Other") and an icon in assets/icons/<name>.svg (else a generic one).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Parent:
    """A config field that names another run's artifact."""
    field: str
    kind: str                       # tokenizer | checkpoint | reward: what the field loads
    expects: tuple[str, ...] = ()   # stages whose runs it should name; the newest is suggested
    why: str = ""                   # shown when the named run is of another stage
    used_if: Optional[str] = None   # a weight field: at 0 the input is not read, so not a parent


@dataclass(frozen=True)
class Data:
    """A config field that names data files."""
    field: str
    kind: str                       # pretrain | sft | prompts | tasks | preferences
    project: Optional[str] = None   # the [defaults.data] key of workbench.toml that fills it
    first_only: bool = False        # the field takes one file: the project entry's first
    preview: bool = True            # shown in the Data tab
    rankings: bool = False          # may be the project's rankings, written into the run folder


@dataclass(frozen=True)
class StageSpec:
    name: str
    title: str                      # sidebar and menu
    heading: str                    # the page's heading
    blurb: str                      # what the stage does, for the page and `workbench run --help`
    config: str                     # "engine.pretrain:PretrainConfig"
    produces: str                   # tokenizer | checkpoint | reward | samples
    parents: tuple[Parent, ...] = ()
    data: tuple[Data, ...] = ()
    basic: tuple[str, ...] = ()     # settings shown up front (inputs always are)
    demo: dict = field(default_factory=dict)     # the demo pipeline's settings (2 CPU cores)
    steps_field: Optional[str] = None            # its length: optimizer steps, iterations, prompts
    # Settings that are a share of the run's length: they follow steps_field when it changes.
    follows: dict = field(default_factory=dict)
    action: str = ""                # what a person does to make one of its runs ("train a tokenizer")
    # Settings whose product is the work of one step, for estimating a run's time from another's.
    work: tuple[str, ...] = ()
    page: Optional[str] = None      # the app page it lives on, if not its own
    project_defaults: dict = field(default_factory=dict)   # field -> (workbench.toml section, key)
    # An alignment method that starts from the SFT model (PPO, DPO, GRPO): `workbench pipeline`
    # runs the ones its --methods names, and the methods comparison sets them side by side.
    method: bool = False
    pipeline: bool = True           # `workbench pipeline` runs it (importing a model is a choice, not a step)
    chat_ready: bool = False        # its models answer in the chat format without fine-tuning here
    sidebar: bool = True            # has a page in the app's sidebar (an import is begun from the File menu)
    memory: str = ""                # the shape of its runs for the memory plan (engine.memory_plan.SHAPES)
    origin: str = ""                # the setting naming where a run comes from outside the project
    # The figures that say how a run went, (metric, label, format): the runs table's Result
    # column, the sidebar and the report's lineage show the first ones a run has.
    key_metrics: tuple[tuple[str, str, str], ...] = ()

    @property
    def module(self) -> str:
        return self.config.split(":")[0]

    def config_class(self) -> type:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)

    def parent(self, name: str) -> Optional[Parent]:
        return next((p for p in self.parents if p.field == name), None)

    def parents_read(self, config: dict) -> tuple[Parent, ...]:
        """The inputs a run of this config reads: not one whose weight it sets to 0."""
        return tuple(p for p in self.parents if not p.used_if or config.get(p.used_if, 1) != 0)

    def data_field(self, name: str) -> Optional[Data]:
        return next((d for d in self.data if d.field == name), None)

    def demo_settings(self) -> dict:
        """The demo's settings, with the ones that follow the run's length filled in."""
        values = dict(self.demo)
        if self.steps_field and self.steps_field in values:
            values.update(follow_steps(self, values[self.steps_field]))
        return values


def follow_steps(spec: StageSpec, steps: int) -> dict:
    """The settings that scale with a run of `steps` steps (eval, samples, checkpoints...)."""
    return {name: max(1, int(steps * share + 1e-9)) for name, share in spec.follows.items()}


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        name="tokenizer", title="Tokenizer", heading="Tokenizer",
        blurb="Learn a byte-level BPE vocabulary from the corpus, with the chat template's special "
              "tokens. Every later stage uses it.",
        config="engine.tokenizer:TokenizerConfig", produces="tokenizer", action="train a tokenizer",
        data=(Data("inputs", "pretrain", project="pretrain"),),
        basic=("vocab_size", "min_frequency"),
        project_defaults={"vocab_size": ("tokenizer", "vocab_size")},
        key_metrics=(("tokenizer/vocab_size", "vocab", "{:.0f}"),
                     ("tokenizer/chars_per_token", "chars/token", "{:.2f}"))),
    StageSpec(
        name="pretrain", title="Pretrain", heading="Pretrain",
        blurb="Train a small GPT-style model from scratch to predict the next token of the corpus. "
              "Watch the validation loss fall below the unigram baseline.",
        config="engine.pretrain:PretrainConfig", produces="checkpoint", action="pretrain a model",
        work=("batch_size", "grad_accum", "seq_len"),
        parents=(Parent("tokenizer", "tokenizer", ("tokenizer",)),),
        data=(Data("inputs", "pretrain", project="pretrain"),),
        basic=("preset", "max_steps", "batch_size", "lr", "seq_len", "device", "nproc"),
        demo=dict(max_steps=1000, batch_size=16, lr=2e-3),
        steps_field="max_steps",
        follows=dict(warmup_steps=0.05, eval_every=1 / 6, sample_every=1 / 3, checkpoint_every=1 / 3,
                     log_every=0.01),
        project_defaults={"preset": ("model", "preset"), "model": ("model", "overrides")},
        memory="causal-lm",
        key_metrics=(("val/loss", "val loss", "{:.3f}"),
                     ("train/loss", "loss", "{:.3f}"))),
    StageSpec(
        name="hf_import", title="Import", heading="Import a Hugging Face model",
        blurb="Start from a real model: a Hugging Face model folder (Llama, SmolLM, TinyLlama, Qwen2/2.5, "
              "Qwen3), or one already in the local Hugging Face cache by its name; nothing is downloaded. "
              "SFT, the reward model, PPO, DPO, GRPO and chat can start from it like from a pretrained run.",
        config="engine.hf_import:ImportConfig", produces="checkpoint", action="import a model",
        basic=("source", "dtype", "chat_template"), pipeline=False, chat_ready=True, sidebar=False,
        origin="source",
        key_metrics=(("import/params_m", "params", "{:.3g}M"),
                     ("import/vocab_size", "vocab", "{:.0f}"))),
    StageSpec(
        name="sft", title="SFT", heading="Supervised fine-tuning",
        blurb="Supervised fine-tuning: teach the pretrained model to answer, on prompt/response pairs "
              "rendered through the chat template. Only the answer tokens are trained on.",
        config="engine.sft:SFTConfig", produces="checkpoint", action="fine-tune a model with SFT",
        work=("batch_size", "grad_accum"),
        parents=(Parent("init", "checkpoint", ("pretrain", "hf_import"),
                        "SFT usually starts from a pretrained or imported model"),
                 Parent("tokenizer", "tokenizer")),
        data=(Data("data", "sft", project="sft"), Data("val_data", "sft", preview=False),
              Data("eval_tasks", "tasks", project="eval_tasks", first_only=True, preview=False)),
        basic=("epochs", "max_steps", "batch_size", "lr", "lora_rank", "device", "nproc"),
        demo=dict(max_steps=500, batch_size=32, lr=1e-3, eval_task_limit=200),
        steps_field="max_steps",
        follows=dict(warmup_steps=0.02, eval_every=0.25, sample_every=0.5, checkpoint_every=0.5,
                     log_every=0.01),
        memory="causal-lm",
        key_metrics=(("eval/task_accuracy", "task acc", "{:.1%}"),
                     ("val/loss", "val loss", "{:.3f}"))),
    StageSpec(
        name="sample", title="Sample", heading="Sample answers",
        blurb="Sample K answers per prompt from a checkpoint, to be ranked.",
        config="engine.sample:SampleConfig", produces="samples", page="rank", action="sample answers",
        steps_field="n_prompts", work=("k", "max_new_tokens"),
        parents=(Parent("checkpoint", "checkpoint", ("sft", "ppo", "hf_import"),
                        "answers to rank usually come from a fine-tuned (SFT or PPO) model"),
                 Parent("tokenizer", "tokenizer")),
        data=(Data("prompts", "prompts", project="prompts"),),
        basic=("n_prompts", "k", "temperature", "top_p", "max_new_tokens", "seed", "device"),
        demo=dict(n_prompts=3000, k=8, max_new_tokens=24, temperature=1.0, top_p=1.0, batch_size=64),
        memory="generation",
        key_metrics=(("sample/finished_fraction", "ended", "{:.0%}"),)),
    StageSpec(
        name="reward", title="Reward model", heading="Reward model",
        blurb="Train a reward model on the rankings: a scalar head on the SFT model, scored on every "
              "pair of each ranking. Held-out pairwise accuracy says how well it agrees with people.",
        config="engine.reward:RewardConfig", produces="reward", action="train a reward model",
        parents=(Parent("init", "checkpoint", ("sft", "hf_import"),
                        "InstructGPT starts the reward model from the SFT model"),
                 Parent("tokenizer", "tokenizer")),
        data=(Data("data", "preferences", rankings=True), Data("val_data", "preferences", preview=False)),
        basic=("epochs", "batch_size", "lr", "lora_rank", "device", "nproc"),
        demo=dict(epochs=2.0, batch_size=8, lr=3e-4, eval_every=50),
        memory="ranking",
        key_metrics=(("val/accuracy", "val acc", "{:.1%}"),
                     ("val/margin", "margin", "{:.2f}"))),
    StageSpec(
        name="ppo", title="PPO", heading="PPO",
        blurb="Optimise the SFT policy against the reward model with PPO, held near the SFT model by a "
              "KL penalty. Watch score, KL and entropy together: a score that rises while KL explodes "
              "is reward hacking.",
        config="engine.ppo:PPOConfig", produces="checkpoint", action="run PPO", method=True,
        work=("rollout_batch_size", "max_new_tokens", "ppo_epochs"),
        parents=(Parent("policy", "checkpoint", ("sft", "hf_import"),
                        "PPO starts from the SFT model (or an imported chat model); a base model has not "
                        "learned to answer"),
                 Parent("reward_model", "reward", ("reward",)),
                 Parent("value_model", "reward")),
        data=(Data("prompts", "prompts", project="prompts"), Data("ptx_data", "pretrain", preview=False)),
        basic=("steps", "rollout_batch_size", "lr", "kl_coef", "target_kl", "kl_budget", "max_new_tokens", "device"),
        demo=dict(steps=40, rollout_batch_size=32, minibatch_size=16, ppo_epochs=2, max_new_tokens=24,
                  lr=3e-5, value_lr=3e-5, kl_coef=0.05),
        steps_field="steps",
        follows=dict(probe_every=0.25, checkpoint_every=0.5),
        memory="actor-critic",
        key_metrics=(("objective/score", "score", "{:+.3f}"),
                     ("objective/kl", "KL", "{:.2f}"))),
    StageSpec(
        name="dpo", title="DPO", heading="Direct preference optimisation",
        blurb="Optimise the SFT model on the rankings directly, with no reward model and no sampling: "
              "each ranking's better answers gain probability over its worse ones, measured against "
              "the frozen SFT model, and beta holds the policy near it. Pairwise uses every pair of a "
              "ranking; Plackett-Luce the whole order.",
        config="engine.dpo:DPOConfig", produces="checkpoint", action="run DPO", method=True,
        work=("batch_size", "grad_accum"),
        parents=(Parent("init", "checkpoint", ("sft", "hf_import"),
                        "DPO starts from the SFT model (or an imported chat model), which is also the "
                        "reference it is held near"),
                 Parent("tokenizer", "tokenizer")),
        data=(Data("data", "preferences", rankings=True), Data("val_data", "preferences", preview=False)),
        basic=("epochs", "beta", "loss", "form", "batch_size", "lr", "lora_rank", "device", "nproc"),
        demo=dict(epochs=1.0, batch_size=8, lr=1e-4, beta=0.1, eval_every=50, sample_every=100),
        memory="preference",
        key_metrics=(("val/reward_accuracy", "reward acc", "{:.1%}"),
                     ("val/kl", "KL", "{:.2f}"))),
    # GRPO trains on the demo's prompts.txt (task prompts the checker can score, held out from
    # the corpus and SFT), never on eval_tasks: those only measure it, as they measure SFT and the
    # pipeline's evaluation.
    StageSpec(
        name="grpo", title="GRPO", heading="GRPO with verifiable rewards",
        blurb="Sample a group of answers to each prompt and push the policy toward the ones that beat "
              "their group. The reward is a weighted sum: the demo's task checker, a reward model, "
              "length and format rules, or your own Python function. Watch held-out task accuracy "
              "and KL to the starting model; groups whose answers all scored alike teach nothing.",
        config="engine.grpo:GRPOConfig", produces="checkpoint", action="run GRPO", method=True,
        work=("prompts_per_step", "group_size", "max_new_tokens", "grpo_epochs"),
        parents=(Parent("policy", "checkpoint", ("sft", "ppo", "hf_import"),
                        "GRPO starts from a model that already answers (SFT, or PPO to go on from it); "
                        "a base model's answers rarely score, so its groups teach nothing"),
                 Parent("reward_model", "reward", ("reward",), used_if="rm_weight"),
                 Parent("tokenizer", "tokenizer")),
        data=(Data("prompts", "prompts", project="prompts"),
              Data("eval_tasks", "tasks", project="eval_tasks", first_only=True, preview=False)),
        basic=("steps", "prompts_per_step", "group_size", "lr", "task_weight", "rm_weight", "user_reward",
               "kl_coef", "max_new_tokens", "device"),
        demo=dict(steps=100, prompts_per_step=16, group_size=8, minibatch_size=32, max_new_tokens=16,
                  lr=1e-4, temperature=1.0, kl_coef=0.0, eval_task_limit=200, task_weight=1.0, rm_weight=0.0),
        steps_field="steps",
        follows=dict(eval_every=0.25, probe_every=0.25, checkpoint_every=0.5),
        memory="group-rl",
        key_metrics=(("eval/task_accuracy", "task acc", "{:.1%}"),
                     ("reward/total", "reward", "{:+.3f}"),
                     ("objective/kl", "KL", "{:.2f}"))),
)

BY_NAME = {s.name: s for s in STAGES}
NAMES = tuple(BY_NAME)
# Which stages' runs an artifact picker offers for each kind a config field loads.
ARTIFACT_STAGES = {kind: tuple(s.name for s in STAGES if s.produces == kind)
                   for kind in ("tokenizer", "checkpoint", "reward")}


def spec(name: str) -> StageSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage '{name}' (known: {', '.join(NAMES)})") from None


def artifact_fields() -> dict[str, str]:
    """Every config field that names a run, across stages: field -> the kind it loads."""
    return {p.field: p.kind for s in STAGES for p in s.parents}


def fine_tunes(stage: Optional[str]) -> bool:
    """Do the stage's models answer in the chat format: does it start from another model (so its
    runs are fine-tuned, not base, models), or bring one that does (an imported chat model)?"""
    return stage in BY_NAME and (BY_NAME[stage].chat_ready
                                 or any(p.kind == "checkpoint" for p in BY_NAME[stage].parents))


def path_fields(stage: str) -> set[str]:
    """The config fields of a stage that hold paths (runs and data)."""
    s = spec(stage)
    return {p.field for p in s.parents} | {d.field for d in s.data}


def stage_of_folder(name: str) -> Optional[str]:
    """The stage a run folder belongs to, from its name (runs/<stage>-<time>)."""
    head = name.split("-", 1)[0]
    return head if head in BY_NAME else None
