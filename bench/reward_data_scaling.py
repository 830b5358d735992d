"""How the reward model's held-out accuracy grows with the number of rankings it trains on.

    python bench/reward_data_scaling.py --sft demo-project/runs/sft-... [--prompts demo-project/data/prompts.txt]
        [--n-prompts 3000] [--val 600] [--train 900 1600 2400] [--seeds 0] [--out docs/PERFORMANCE.md]

The demo pipeline's own path, at several sizes: the SFT run samples K=8 answers for each of
`--n-prompts` prompts (the sample stage, the pipeline's settings), the simulated annotator ranks
them (correct, then ended, then shorter) through the annotation store, and reward models with
the pipeline's settings (the catalogue's demo settings, workbench/stages.py) train on the first N rankings
for each N in `--train`. All of them are measured on the same last `--val` rankings, whose
prompts none of them trained on, so the sizes differ only in training data, and the figure
moves by about +-1% from noise instead of the +-4% of the pipeline's 10% split.

Held-out pairs are split by what decided them: *correctness* (one answer passes the task's
check, the other does not) and *the rest* (both equally correct: decided by ending, then by
length). The first is what the annotator cares about most and what a small model finds hard.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import markdown_table, publish, torch_machine  # noqa: E402
from engine import checkpoint as ckpt  # noqa: E402
from engine.weights import load_model  # noqa: E402
from engine.reward import RewardConfig, Scorer  # noqa: E402
from engine.reward_data import read_rankings  # noqa: E402
from engine.sample import SampleConfig  # noqa: E402
from engine.tasks import check, parse_task  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402
from workbench.preferences import write_rm_dataset  # noqa: E402
from workbench.jobs import run_job
from workbench.runfolder import prepare_run  # noqa: E402
from workbench.samples import import_sample_run  # noqa: E402
from workbench.simulated import DEFAULT_NAME, rank_batch  # noqa: E402
from workbench.store import Store  # noqa: E402
from workbench.stages import spec as stage_spec  # noqa: E402

MARKER = "## Reward-model accuracy against the amount of ranking data"


def make_rankings(work: Path, sft: Path, prompts: Path, n_prompts: int) -> tuple[list[str], float]:
    """The simulated annotator's rankings of the SFT model's answers, as RM JSONL lines."""
    sample_dir = work / "sample"
    settings = {k: v for k, v in stage_spec("sample").demo_settings().items() if k != "n_prompts"}
    prepare_run(sample_dir, SampleConfig(checkpoint=str(sft), prompts=[str(prompts)], n_prompts=n_prompts,
                                         seed=0, device="cpu", **settings))
    t0 = time.perf_counter()
    res = run_job("sample", sample_dir)
    if res.status != "completed":
        raise SystemExit(f"sample {res.status}: {res.error}")
    seconds = time.perf_counter() - t0
    store = Store(work / "rankings.db")
    batch = import_sample_run(store, sample_dir)
    rank_batch(store, batch, DEFAULT_NAME, seed=0)
    write_rm_dataset(store, work / "all.jsonl", include_simulated=True, batch_ids=[batch])
    store.close()
    return (work / "all.jsonl").read_text(encoding="utf-8").splitlines(), seconds


@torch.no_grad()
def accuracy_by_decider(run_dir: Path, val_file: Path) -> dict[str, tuple[int, int]]:
    """(right, pairs) on held-out pairs decided by correctness and by the rest."""
    final = ckpt.resolve_checkpoint(run_dir)
    model = load_model(final / "model.safetensors").eval()
    scorer = Scorer(Tokenizer.from_file(final / "tokenizer.json"), model.config.max_seq_len, torch.device("cpu"))
    items = read_rankings([val_file])
    out = {"correctness": [0, 0], "rest": [0, 0]}
    for i in range(0, len(items), 16):
        chunk = items[i:i + 16]
        packed, spans, _n = scorer.batch(chunk)
        r = packed.rewards(model)
        for item, (start, _k, pairs) in zip(chunk, spans):
            task = parse_task(item.prompt)
            correct = [task is not None and check(task, a) for a in item.answers]
            for w, lose in pairs:
                kind = "correctness" if correct[w] != correct[lose] else "rest"
                out[kind][0] += int(r[start + w] > r[start + lose])
                out[kind][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", type=Path, required=True, help="SFT run folder (or checkpoint) to sample from")
    ap.add_argument("--prompts", type=Path, default=None,
                    help="prompt file (default: the demo project's data/prompts.txt beside the run)")
    ap.add_argument("--n-prompts", type=int, default=3000)
    ap.add_argument("--val", type=int, default=600, help="held-out rankings (the last ones)")
    ap.add_argument("--train", type=int, nargs="+", default=[900, 1600, 2400], help="training sizes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = ap.parse_args(argv)
    prompts = args.prompts or args.sft.resolve().parents[1] / "data" / "prompts.txt"

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        lines, sample_s = make_rankings(work, args.sft.resolve(), prompts.resolve(), args.n_prompts)
        if len(lines) < args.val + max(args.train):
            raise SystemExit(f"{len(lines)} rankings (prompts whose answers all tie give none): fewer than "
                             f"--val {args.val} + the largest --train {max(args.train)}")
        val_file = work / "val.jsonl"
        val_file.write_text("\n".join(lines[-args.val:]) + "\n", encoding="utf-8")
        rows = []
        for n in args.train:
            train_file = work / f"train-{n}.jsonl"
            train_file.write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
            for seed in args.seeds:
                run_dir = work / f"reward-{n}-{seed}"
                prepare_run(run_dir, RewardConfig(init=str(args.sft.resolve()), data=[str(train_file)],
                                                  val_data=[str(val_file)], seed=seed, device="cpu",
                                                  **stage_spec("reward").demo_settings()))
                t0 = time.perf_counter()
                res = run_job("reward", run_dir)
                if res.status != "completed":
                    raise SystemExit(f"reward {res.status}: {res.error}")
                seconds = time.perf_counter() - t0
                summary = json.loads((run_dir / "summary.json").read_text())
                by = accuracy_by_decider(run_dir, val_file)
                rows.append([f"{n:,}", seed, f"{summary['val/accuracy']:.1%}",
                             *(f"{r / max(1, p):.1%} ({p:,})" for r, p in (by["correctness"], by["rest"])),
                             summary["step"], f"{seconds:.0f} s"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)

    table = markdown_table(["train rankings", "seed", "held-out pairwise accuracy", "pairs decided by correctness",
                            "pairs decided by ending/length", "steps", "time"], rows)
    settings = ", ".join(f"{k} {v:g}" for k, v in stage_spec("reward").demo_settings().items())
    cmd = " ".join(["python bench/reward_data_scaling.py", *(argv if argv is not None else sys.argv[1:])])
    section = (f"{MARKER}\n\n`{cmd}` on {torch_machine()}. {args.n_prompts:,} prompts x "
               f"{stage_spec('sample').demo_settings()['k']} answers from the SFT run ({sample_s:.0f} s), ranked by the simulated "
               f"annotator: {len(lines):,} rankings (a prompt whose answers all tie gives none). Every reward "
               f"model trains with the pipeline's settings ({settings}) on the first N rankings and is "
               f"measured on the same last {args.val} (held-out prompts).\n\n{table}\n")
    publish(args.out, MARKER, section, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
