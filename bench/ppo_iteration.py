"""Where one PPO iteration spends its time: generation, scoring, training.

    python bench/ppo_iteration.py [--presets mini small] [--iterations 5] [--threads 0] [--out docs/PERFORMANCE.md]

The real stage (engine.ppo.run, in this process, its events into a list) on the demo project's
prompts and tokenizer, with the settings the app's PPO panel starts with
(the catalogue's demo settings, workbench/stages.py). Each iteration the stage itself reports
time/generation_s (the rollout), time/scoring_s (policy, reference, value and reward-model
passes, rewards, GAE), time/training_s (the PPO epochs of minibatch updates) and
time/generation_share; this script takes their medians over `--iterations` iterations after
a warm-up one. The probe samples and the checkpoint, which the stage runs every
probe_every / checkpoint_every iterations, are outside all three phases.

Policy and reward model are randomly initialised models of the preset (speed does not depend
on what the weights say), saved as checkpoints as the SFT and reward stages would. One
difference from a trained policy: a random one almost never samples the end token, so every
answer runs the full max_new_tokens. That is the worst case for generation; a trained SFT
model's answers end earlier (the table gives the mean answer length).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import markdown_table, publish, torch_machine  # noqa: E402
from engine import checkpoint as ckpt  # noqa: E402
from engine.config import from_dict  # noqa: E402
from engine.model import ScalarModel, Transformer, config_from_preset  # noqa: E402
from engine.weights import safetensors_state  # noqa: E402
from engine.ppo import PPOConfig, run as run_ppo  # noqa: E402
from engine.reward import NORM_FILE  # noqa: E402
from engine.tokenizer import Tokenizer, TokenizerConfig, run as run_tokenizer  # noqa: E402
from workbench.demo import write_demo_project  # noqa: E402
from workbench.stages import spec as stage_spec  # noqa: E402

MARKER = "## One PPO iteration: generation, scoring, training"
PHASES = ("time/generation_s", "time/scoring_s", "time/training_s", "time/step_s")


def save_model(model: Transformer, root: Path, tok_path: Path, fingerprint: str, stage: str) -> Path:
    weights, meta = safetensors_state(model)
    return ckpt.save_checkpoint(root / "checkpoints", 1, model=weights, model_metadata=meta,
                                state={"tokenizer_fingerprint": fingerprint, "stage": stage},
                                extra_files={"tokenizer.json": tok_path})


def make_models(work: Path, preset: str, tok_path: Path, fingerprint: str, vocab: int) -> tuple[Path, Path, int]:
    """A random SFT-like policy and a reward model on its backbone, as their stages save them."""
    torch.manual_seed(0)
    lm = Transformer(config_from_preset(preset, vocab))
    policy = work / f"sft-{preset}"
    save_model(lm, policy, tok_path, fingerprint, "sft")
    torch.manual_seed(1)
    rm = work / f"reward-{preset}"
    path = save_model(ScalarModel.from_lm(lm), rm, tok_path, fingerprint, "reward")
    # The reward stage writes these statistics of its scores; PPO refuses a model without them.
    (path / NORM_FILE).write_text(json.dumps({"mean": 0.0, "std": 1.0, "n_answers": 1}))
    return policy, rm, lm.num_params()


def measure(work: Path, preset: str, policy: Path, rm: Path, prompts: Path, iterations: int) -> dict:
    settings = dict(stage_spec("ppo").demo_settings())
    settings.update(steps=1 + iterations, device="cpu", log_every=1)
    cfg = from_dict(PPOConfig, dict(settings, policy=str(policy), reward_model=str(rm), prompts=[str(prompts)]))
    events: list[dict] = []
    status = run_ppo(cfg, work / f"ppo-{preset}", events.append)
    if status != "completed":
        raise SystemExit(f"PPO on {preset} ended {status}")
    steps = [e for e in events if e["type"] == "metrics"][1:]   # step 1 is the warm-up
    # Medians: one iteration that shares the CPU with another job should not move the figure.
    out = {k: statistics.median(e[k] for e in steps) for k in PHASES + ("rollout/length",)}
    out["spread"] = (min(e["time/step_s"] for e in steps), max(e["time/step_s"] for e in steps))
    out["cfg"] = cfg
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["mini", "small"])
    ap.add_argument("--iterations", type=int, default=5, help="measured iterations, after one warm-up")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: torch's choice); 1 is steadier on a shared machine")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows, cfg = [], None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_demo_project(work / "demo", scale="small")
        tok_dir = work / "tokenizer"
        tok_dir.mkdir()
        assert run_tokenizer(TokenizerConfig(inputs=[str(work / "demo" / "data" / "corpus")],
                                             vocab_size=args.vocab_size), tok_dir) == "completed"
        tok = Tokenizer.from_file(tok_dir)
        prompts = work / "demo" / "data" / "prompts.txt"
        for preset in args.presets:
            policy, rm, n_params = make_models(work, preset, tok_dir / "tokenizer.json", tok.fingerprint(),
                                               tok.vocab_size)
            r = measure(work, preset, policy, rm, prompts, args.iterations)
            cfg = r["cfg"]
            gen, score, train, step = (r[k] for k in PHASES)
            phases = gen + score + train
            new_tokens = cfg.rollout_batch_size * r["rollout/length"]
            rows.append((f"{preset} ({n_params / 1e6:.1f}M)", f"{r['rollout/length']:.1f}",
                         f"{gen:.2f} ({new_tokens / gen:,.0f} tok/s)", f"{score:.2f}", f"{train:.2f}",
                         f"{step:.2f} ({r['spread'][0]:.2f}-{r['spread'][1]:.2f})", f"{gen / phases:.0%}",
                         f"{score / phases:.0%}", f"{train / phases:.0%}"))
            print(rows[-1], flush=True)

    header = ("preset (params)", "mean answer tokens", "generation s", "scoring s", "training s",
              "iteration s (min-max)", "generation share", "scoring share", "training share")
    table = markdown_table(header, rows)
    machine = torch_machine()
    cmd = (f"python bench/ppo_iteration.py --presets {' '.join(args.presets)} --iterations {args.iterations}"
           + (f" --threads {args.threads}" if args.threads else ""))
    n_mb = -(-cfg.rollout_batch_size // cfg.minibatch_size)
    section = (f"{MARKER}\n\n"
               f"`{cmd}` on {machine}. The PPO stage itself (engine/ppo.py, in-process) with the app's "
               f"PPO settings (the stage catalogue, workbench/stages.py): {cfg.rollout_batch_size} prompts of the demo project "
               f"per iteration, up to {cfg.max_new_tokens} new tokens at temperature {cfg.temperature:g}, "
               f"{cfg.ppo_epochs} PPO epochs of {n_mb} minibatches of {cfg.minibatch_size}, fp32 on CPU, "
               f"vocab {args.vocab_size}. Policy and reward model are random models of the preset, so answers "
               f"run to the full length (a trained policy stops earlier: the worst case for generation). "
               f"Times are the stage's own per-iteration metrics (time/generation_s, time/scoring_s, "
               f"time/training_s, time/step_s; the shares are of the three phases), medians of "
               f"{args.iterations} iterations after a warm-up one. Generation is the sampled rollout with the "
               f"KV cache (tokens/s counts new tokens over the batch); scoring is one no-grad forward pass "
               f"each of policy, reference, value model and reward model over prompt + answer, then rewards "
               f"and GAE; training is the clipped policy and value updates (forward and backward of policy "
               f"and value model per minibatch)."
               + (" `--threads 1` keeps the figures steady when other jobs share the CPU: with two threads "
                  "spin-waiting against them, iterations here ran 10-40x slower and varied as much."
                  if args.threads == 1 else "")
               + "\n\n"
               f"{table}\n")
    publish(args.out, MARKER, section, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
