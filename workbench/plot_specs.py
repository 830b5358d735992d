"""Which plots each stage shows and in what colours: data, no Qt. A stage with none here shows its
metrics under 'Other'.

The app's live plots (ui/plots.py, ui/plot_figures.py), its runs table (ui/runs_browser.py) and
the HTML report (workbench/report.py) all draw from these tables, so a report shows exactly the
plots the app shows for a stage. The keys are the ones the engine emits: engine/trainer.py
(every gradient stage), engine/pretrain.py, engine/sft.py, engine/reward.py, engine/ppo.py,
engine/dpo.py, engine/grpo.py, engine/tokenizer.py and engine/sample.py.
"""
from __future__ import annotations

from typing import Callable  # noqa: F401 - FIGURES' annotation

from workbench import stages

_STEP_KEYS = ["train/loss", "val/loss"]
_TRAINING = [("Learning rate", ["train/lr"]),
             ("Gradient norm", ["train/grad_norm"]),
             ("Throughput (tokens/s)", ["perf/tokens_per_s"])]

PLOT_SPECS: dict[str, list[tuple[str, list[str]]]] = {
    "hf_import": [],            # one step: its log says what was imported
    "tokenizer": [],            # one-off figures, not curves: FIGURES
    "pretrain": [("Loss", _STEP_KEYS + ["val/unigram_baseline"]), *_TRAINING,
                 ("Model FLOPs utilisation", ["perf/mfu"])],
    "sft": [("Loss", _STEP_KEYS), ("Task accuracy", ["eval/task_accuracy", "eval/task_score"]),
            *_TRAINING],
    "sample": [],
    "reward": [("Loss", _STEP_KEYS),
               ("Accuracy", ["train/accuracy", "val/accuracy"]),
               ("Margin", ["train/margin", "val/margin"]),
               ("Reward mean", ["train/reward_mean", "val/reward_mean"]),
               ("Reward std", ["train/reward_std", "val/reward_std"]),
               *_TRAINING],
    # KL and β get separate plots: β is ~0.05 and KL several nats, so on one axis β is a flat
    # line at zero exactly when an adaptive β is worth watching. loss/ptx (PPO-ptx only, an LM
    # loss of a few nats) would flatten the policy loss the same way: it is under Other metrics.
    "ppo": [("Score", ["objective/score", "objective/rlhf_reward"]),
            ("Score quantiles", ["score/p10", "score/p50", "score/p90"]),
            ("KL to reference (nats)", ["objective/kl", "objective/kl_exact", "objective/kl_mean"]),
            ("Score against KL", ["objective/score"]),
            ("KL coefficient β", ["objective/kl_coef"]),
            ("Entropy", ["objective/entropy"]),
            ("Clip fraction", ["policy/clipfrac", "value/clipfrac"]),
            ("Policy loss", ["loss/policy"]),
            ("Value loss", ["loss/value"]),
            ("Ratio π/π_old", ["val/ratio", "val/ratio_first"]),
            ("Answer length (tokens)", ["rollout/length"]),
            ("Answers that ended", ["rollout/eos_fraction"])],
    # DPO's rewards are β·log(π/π_ref) of the ranked answers: chosen rising and rejected falling
    # is learning the preference; both falling together is the policy drifting off its answers.
    "dpo": [("Loss", _STEP_KEYS),
            ("Reward accuracy", ["train/reward_accuracy", "val/reward_accuracy"]),
            ("Rewards β·log π/π_ref", ["train/reward_chosen", "train/reward_rejected",
                                      "val/reward_chosen", "val/reward_rejected"]),
            ("Reward margin", ["train/reward_margin", "val/reward_margin"]),
            ("Log-probs of the answers", ["train/logp_chosen", "train/logp_rejected"]),
            ("KL to reference (nats)", ["val/kl"]),
            *_TRAINING],
    # GRPO: the weighted total and each reward function's mean (their stds are under Other
    # metrics); accuracy on the training groups beside the held-out one; the share of groups
    # whose answers all scored alike, which get zero advantage and teach nothing.
    "grpo": [("Reward", ["reward/total", "reward/total_std"]),
             ("Reward per function", ["reward/task", "reward/rm", "reward/length", "reward/format",
                                      "reward/user"]),
             ("Task accuracy", ["task/accuracy", "eval/task_accuracy"]),
             ("Groups that all scored alike", ["groups/uniform_fraction"]),
             ("KL to reference (nats)", ["objective/kl"]),
             ("Entropy", ["objective/entropy"]),
             ("Clip fraction", ["policy/clipfrac"]),
             ("Policy loss", ["loss/policy"]),
             ("Answer length (tokens)", ["rollout/length"]),
             ("Answers that ended", ["rollout/eos_fraction"])],
}

# Plots drawn against another metric instead of the step: stage -> {title: (x key, x axis label)},
# as points (one per step), since the x values go back and forth. PPO's score against its KL
# shows over-optimisation coming: KL still growing while the score has stopped paying for it.
PLOT_X: dict[str, dict[str, tuple[str, str]]] = {
    "ppo": {"Score against KL": ("objective/kl", "KL to reference (nats)")},
}

# Tableau 10: distinct on white and on dark grey, and mostly colour-blind safe in its first five.
COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
          "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]

def _chars_per_token(h) -> str:
    # Measured on the training text when the corpus is too small to hold any out (the log says).
    held = "tokenizer/heldout_chars" in h and (h.last("tokenizer/heldout_chars") or 0) > 0
    return (f"{h.last('tokenizer/chars_per_token'):.2f} "
            + ("(held-out text)" if held else "(training text: too little to hold some out)"))


# One-off figures shown as a table instead of plots, for the stages that report a few numbers
# once at the end: stage -> (title, metric key, form), in the order shown. A form formats the
# metric's last value, or is a function of the run's history (a figure whose wording depends
# on another): figure_text says which.
FIGURES: dict[str, list[tuple[str, str, "str | Callable"]]] = {
    "tokenizer": [("Vocabulary size", "tokenizer/vocab_size", "{:,.0f} tokens"),
                  ("Characters per token", "tokenizer/chars_per_token", _chars_per_token),
                  ("Training text", "tokenizer/train_chars", "{:,.0f} characters"),
                  ("Held-out text", "tokenizer/heldout_chars", "{:,.0f} characters")],
    "sample": [("Answers that ended", "sample/finished_fraction", "{:.0%}"),
               ("Mean answer length", "sample/mean_tokens", "{:.1f} tokens")],
}


def figure_text(form, key: str, history) -> str:
    """One figure of FIGURES as shown, from a run's history that holds its key."""
    return form(history) if callable(form) else form.format(history.last(key))


# The figures that say how a run went, per stage (each stage's spec holds its own).
KEY_METRICS = {s.name: list(s.key_metrics) for s in stages.STAGES}
