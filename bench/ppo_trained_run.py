"""One PPO measurement of a checkout on trained models, for bench/ppo_vs_commit.py --project.

    python bench/ppo_trained_run.py CHECKOUT POLICY_RUN REWARD_RUN PROMPTS ITERATIONS THREADS

Imports CHECKOUT's own engine and runs its bench/ppo_iteration.measure (its PPO stage with its
app settings) on copies of the two runs, and prints one JSON line: iteration, generation and
training seconds (medians), the mean answer length and the settings compared across commits.
The copies' weights name only the model-config fields CHECKOUT knows: an older commit refuses
a later one's fields, which must then all be at their off value.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path


def readable(run: Path, dst: Path, known: set[str]) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file
    shutil.copytree(run, dst)
    for f in dst.rglob("model.safetensors"):
        with safe_open(str(f), "pt") as h:
            meta, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
        cfg = json.loads(meta["config"])
        extra = {k: v for k, v in cfg.items() if k not in known}
        if any(extra.values()):
            raise SystemExit(f"{f}: this checkout cannot run a model with {extra}")
        meta["config"] = json.dumps({k: v for k, v in cfg.items() if k in known})
        save_file(tensors, str(f), metadata=meta)
    return dst


def main() -> int:
    root, policy, rm, prompts, iterations, threads = sys.argv[1:7]
    sys.path.insert(0, root)
    import torch
    torch.set_num_threads(int(threads))
    from bench.ppo_iteration import measure
    from engine.model import ModelConfig
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    with tempfile.TemporaryDirectory() as t:
        work = Path(t)
        r = measure(work, "trained", readable(Path(policy), work / "policy", known),
                    readable(Path(rm), work / "rm", known), Path(prompts), int(iterations))
    c = r["cfg"]
    print(json.dumps([r["time/step_s"], r["time/generation_s"], r["time/training_s"], r["rollout/length"],
                      [c.rollout_batch_size, c.max_new_tokens, c.temperature, c.ppo_epochs, c.minibatch_size]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
