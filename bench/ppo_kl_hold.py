"""Does an adaptive β hold PPO's KL at target_kl against a reward that pulls hard?

    python bench/ppo_kl_hold.py [--policy SFT | --project DIR] [--steps 200] [--target-kl 3] [--out FILE]

The reward is one the policy can satisfy cheaply: the share of digit tokens in prompt and
answer (`token_share_reward`, a reward model built by hand, not trained), so a fixed small β
lets the KL run away as the answers turn into lists of numbers. The policy is the demo
project's SFT model: --policy, or the newest `sft` run of --project, or, with neither, a demo
project made in a temporary folder and taken through `workbench pipeline --until sft`
(tokenizer, pretrain, SFT: about 5 minutes on an idle 2-core laptop). PPO runs in this process
with the app's PPO settings (the catalogue's demo settings): first --baseline-steps with the
fixed β of kl_coef, which shows the pull, then --steps with target_kl. The table gives each
run's 10-step mean KL (objective/kl_mean) at some steps, and from --hold-from on the range of
the KL of each step and of the 10-step mean, and the share of each within a factor of 1.5 of
the target. One batch's KL is an estimate: expect its steps to stray more than its means.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import checkpoint as ckpt  # noqa: E402
from engine.artifacts import load_artifact  # noqa: E402
from engine.model import RMSNorm, ScalarModel  # noqa: E402
from engine.weights import safetensors_state  # noqa: E402
from engine.reward import NORM_FILE  # noqa: E402

MARKER = "## PPO's KL held at target_kl against a reward that pulls hard"


def token_share_reward(policy: Path, out: Path, tokens: list[int], gain: float = 10.0) -> Path:
    """A reward-model checkpoint (the policy's shape and tokenizer) whose score is about
    `gain` x the share of `tokens` among all tokens of prompt + answer.

    Built by hand: every block's output is zeroed except one attention head of the first, whose
    query is zero, so it attends uniformly to every position so far and averages an indicator of
    `tokens` that the embedding carries in dimension 0. A constant dimension 1 keeps each RMSNorm
    close to a fixed scale, so the score stays near linear in the share. Its normalisation file
    says mean 0, std 1: scores are used as they are (clipped at reward_clip).
    """
    art = load_artifact(policy, field="policy", prefer="latest")
    cfg = art.model.config
    rm = ScalarModel(cfg)
    eps, d = 0.1, cfg.d_model
    with torch.no_grad():
        for p in rm.parameters():
            p.zero_()
        for m in rm.modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        emb = rm.model.embed_tokens.weight
        emb[:, 1] = 1.0
        emb[tokens, 0] = eps
        attn = rm.model.layers[0].self_attn
        attn.v_proj.weight[0, 0] = 1.0                      # head 0 reads the normalised indicator
        attn.o_proj.weight[2, 0] = 0.1 / (eps * math.sqrt(d))   # writes its average to dimension 2
        rm.score.weight[0, 2] = gain / (0.1 * math.sqrt(d))
    weights, meta = safetensors_state(rm)
    path = ckpt.save_checkpoint(out / "checkpoints", 1, model=weights, model_metadata=meta,
                                state={"tokenizer_fingerprint": art.tokenizer.fingerprint(), "stage": "reward"},
                                extra_files={"tokenizer.json": art.tokenizer_path})
    (path / NORM_FILE).write_text(json.dumps({"mean": 0.0, "std": 1.0, "n_answers": 0}))
    return out


def digit_tokens(tok) -> list[int]:
    """Every token whose text is digits (a leading space allowed): a surface property."""
    return [i for i in range(tok.vocab_size) if tok.decode([i]).strip().isdigit()]


def find_policy(args, work: Path) -> tuple[Path, Path]:
    """(policy, prompts): --policy, else the newest sft run of --project, else a demo project
    taken to SFT here."""
    project = args.project
    if args.policy is None and project is None:
        project = work / "demo"
        print(f"no --policy or --project: making a demo project in {project} and training it to SFT "
              "(tokenizer, pretrain, SFT; several minutes on an idle laptop)", flush=True)
        subprocess.run([sys.executable, "-m", "workbench.cli", "pipeline", "--demo", "--project", str(project),
                        "--until", "sft"], cwd=ROOT, check=True)
    policy = args.policy
    if policy is None:
        runs = sorted(p for p in (project / "runs").glob("sft-*") if (p / "checkpoints").is_dir())
        if not runs:
            raise SystemExit(f"{project} has no SFT run: give --policy, or run its pipeline to sft first")
        policy = runs[-1]
    prompts = args.prompts or (project / "data" / "prompts.txt" if project else None)
    if prompts is None:
        raise SystemExit("give --prompts (a .txt of prompts) with --policy")
    return policy, prompts


def run_ppo(policy: Path, rm: Path, prompts: Path, out: Path, steps: int, target_kl,
            seed: int, rollout: int = 0) -> tuple[list[dict], str]:
    """The PPO stage in this process with the app's PPO settings: its metrics events, and how
    it ended ("completed", or the guard that failed it: a fixed β can run into kl_limit)."""
    from engine.config import from_dict
    from engine.ppo import PPOConfig, run
    from engine.runio import StageError
    from workbench.stages import spec as stage_spec
    settings = dict(stage_spec("ppo").demo_settings())
    settings.update(policy=str(policy), reward_model=str(rm), prompts=[str(prompts)], steps=steps,
                    target_kl=target_kl, checkpoint_every=steps, probe_every=steps, log_every=1, seed=seed)
    if rollout:     # more answers a step: a steadier KL estimate; minibatches of half, as the app's
        settings.update(rollout_batch_size=rollout, minibatch_size=rollout // 2)
    events: list[dict] = []
    try:
        ended = run(from_dict(PPOConfig, settings), out, events.append)
    except StageError as e:
        ended = f"failed: {e}"
    return [e for e in events if e["type"] == "metrics"], ended


AT = (10, 20, 50, 100, 150, 200)       # steps whose 10-step mean KL the table shows


def row(name: str, m: list[dict], target: float, hold_from: int) -> tuple:
    """The run's KL through time, and how well it stayed within a factor of 1.5 of the target."""
    kl = [e["objective/kl_exact"] for e in m]
    sampled = [e["objective/kl"] for e in m]
    mean = [e["objective/kl_mean"] for e in m]
    at = " / ".join(f"{mean[s - 1]:.2f}" for s in AT if s <= len(m))
    first = (f"{name}, {len(m)} steps", at)
    if len(m) < hold_from:
        return first + (f"max {max(kl):.2f}", "", f"max {max(sampled):.2f}", "", "", "",
                        f"{m[-1]['objective/kl_coef']:.3f} (last)",
                        f"{statistics.mean(e['objective/score'] for e in m):+.2f}")
    lo, hi = target / 1.5, target * 1.5
    cells = ()
    for series in (kl, sampled, mean):
        held = series[hold_from - 1:]
        cells += (f"{min(held):.2f} to {max(held):.2f}", f"{sum(lo <= k <= hi for k in held) / len(held):.0%}")
    return first + cells + (
                    f"{statistics.median(e['objective/kl_coef'] for e in m[hold_from - 1:]):.3f} (median)",
                    f"{statistics.mean(e['objective/score'] for e in m[hold_from - 1:]):+.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", type=Path, help="SFT checkpoint or run folder (default: the newest sft run "
                                                "of --project)")
    ap.add_argument("--project", type=Path, help="a demo project with an SFT run")
    ap.add_argument("--prompts", type=Path, help="prompts file (default: the project's data/prompts.txt)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--target-kl", type=float, default=3.0)
    ap.add_argument("--hold-from", type=int, default=50, help="the step from which the KL is judged")
    ap.add_argument("--baseline-steps", type=int, default=50,
                    help="steps of the fixed-β run (kl_coef, no target) that shows the pull; 0: none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rollout-batch-size", type=int, default=0,
                    help="answers per step (default: the app's); minibatches are half of it")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.report import markdown_table, publish, torch_machine
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        policy, prompts = find_policy(args, work)
        tok = load_artifact(policy, field="policy", prefer="latest").tokenizer
        digits = digit_tokens(tok)
        rm = token_share_reward(policy, work / "reward-digits", digits)
        rows, ends = [], []
        for name, steps, target in [("fixed β", args.baseline_steps, None),
                                    (f"target_kl {args.target_kl:g}", args.steps, args.target_kl)]:
            if steps:
                m, ended = run_ppo(policy, rm, prompts, work / name.replace(" ", "-"), steps, target, args.seed,
                                   args.rollout_batch_size)
                rows.append(row(name, m, args.target_kl, args.hold_from))
                ends.append(f"{name}: {ended}")
                print(rows[-1], ended, flush=True)
    lo, hi = args.target_kl / 1.5, args.target_kl * 1.5
    header = ("run", f"10-step mean KL at steps {' / '.join(map(str, AT))}", f"KL from step {args.hold_from}",
              f"steps in [{lo:g}, {hi:g}]", f"sampled KL from step {args.hold_from}", f"steps in [{lo:g}, {hi:g}]",
              "10-step mean KL", f"means in [{lo:g}, {hi:g}]", "β",
              f"mean score from step {args.hold_from}")
    table = markdown_table(header, rows)
    cmd = "python bench/ppo_kl_hold.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("steps", "baseline_steps", "target_kl", "hold_from", "seed", "threads", "rollout_batch_size") and v)
    section = (f"{MARKER}\n\n`{cmd}` on {torch_machine()}, policy {policy.name} ({len(digits)} digit tokens "
               f"of {tok.vocab_size}). The PPO stage with the app's PPO settings (workbench/stages.py)"
               + (f", but {args.rollout_batch_size} answers a step in minibatches of {args.rollout_batch_size // 2},"
                  if args.rollout_batch_size else "") + " for "
               "a reward model built to pay for the share of digit tokens (bench/ppo_kl_hold.py: "
               f"token_share_reward), for {args.baseline_steps} steps with the fixed β of kl_coef and for "
               f"{args.steps} with target_kl {args.target_kl:g}. KL is objective/kl_exact, nats per answer "
               "(each answer's KL over its states' whole next-token distributions: the figure the "
               "controller reads); sampled KL is objective/kl (the log-ratios of the drawn tokens only, "
               "the same in expectation, noisier); the 10-step mean is objective/kl_mean (of the exact "
               "KL), the figure kl_budget is held to. How the runs ended: "
               f"{'; '.join(ends)}.\n\n"
               f"{table}\n")
    publish(args.out, MARKER, section, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
