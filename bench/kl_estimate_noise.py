"""How noisy is one PPO step's KL, for a policy that does not move?

    python bench/kl_estimate_noise.py --policy RUN --reference SFT --prompts FILE
                                      [--answers 32 128 256] [--batches 12] [--max-new-tokens 24]

A PPO step reports objective/kl_exact: the mean over its answers of each answer's KL to the
reference, summed over the answer's states' whole next-token distributions (what target_kl's
controller reads). Held at a fixed policy, that mean still differs from batch to batch, because
the answers and prompts drawn differ. This samples --batches batches of each size from --policy
(temperature 1, prompts drawn at random, as a step does), and prints the batches' mean KL, their
spread (the noise of one step's figure) and the spread of single answers. With a single answer's
spread s, a batch of n is good to about s/sqrt(n): the share of steps a band around the target
can hold even when the controller holds the policy perfectly.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.artifacts import load_artifact  # noqa: E402
from engine.generate import generate_batch  # noqa: E402
from engine.ppo import encode_prompt  # noqa: E402
from engine.ppo_core import build_rollout, state_kl  # noqa: E402
from engine.sample import read_prompts  # noqa: E402


@torch.no_grad()
def answer_kls(policy, ref, tok, prompts: list[str], n: int, max_new: int, gen: torch.Generator) -> torch.Tensor:
    """[n] each sampled answer's exact KL to the reference, as PPO's scoring computes it."""
    picked = torch.randint(0, len(prompts), (n,), generator=gen).tolist()
    ids = [encode_prompt(tok, prompts[i], policy.config.max_seq_len, max_new) for i in picked]
    seeds = torch.randint(0, 2 ** 62, (n,), generator=gen).tolist()
    outs = generate_batch(policy, ids, max_new, temperature=1.0, seed=seeds, stop_ids=tok.turn_end_ids,
                          pad_id=tok.pad_id)
    ro = build_rollout(ids, outs, tok.turn_end_ids, tok.pad_id)
    return (state_kl(policy(ro.ids), ref(ro.ids)) * ro.mask).sum(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", type=Path, required=True, help="the policy: a PPO run or checkpoint")
    ap.add_argument("--reference", type=Path, required=True, help="its reference: the SFT run it started from")
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--answers", type=int, nargs="+", default=[32, 128, 256], help="batch sizes")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pol = load_artifact(args.policy, prefer="latest", field="policy")
    ref = load_artifact(args.reference, prefer="latest", field="reference").model.eval()
    policy, tok = pol.model.eval(), pol.tokenizer
    prompts = read_prompts([args.prompts])
    gen = torch.Generator().manual_seed(args.seed)
    print("answers a step | batches | mean KL | spread of a step's KL | spread of one answer's KL")
    for n in args.answers:
        kls = [answer_kls(policy, ref, tok, prompts, n, args.max_new_tokens, gen) for _ in range(args.batches)]
        means = [float(k.mean()) for k in kls]
        single = float(torch.cat(kls).std())
        print(f"{n} | {args.batches} | {statistics.mean(means):.2f} | {statistics.stdev(means):.2f} "
              f"(s/sqrt(n) {single / n ** 0.5:.2f}) | {single:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
