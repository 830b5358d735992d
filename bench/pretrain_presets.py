"""Pretraining throughput and peak memory per model preset, on the demo corpus.

    python bench/pretrain_presets.py [--presets tiny small] [--steps 60] [--out docs/PERFORMANCE.md]

Each preset runs as its own child process (through the same job runner the app uses), so peak
memory is that preset's alone. Tokens/s is the median over the logged intervals after the first
(which includes warm-up); MFU is against the matmul ceiling the stage measures at its start.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
MARKER = "## Pretraining throughput per preset"
sys.path.insert(0, str(ROOT))

from bench.report import markdown_table, publish, torch_machine  # noqa: E402
from engine.pretrain import PretrainConfig  # noqa: E402
from engine.runio import read_events  # noqa: E402
from engine.tokenizer import TokenizerConfig  # noqa: E402
from workbench.demo import write_demo_project  # noqa: E402
from workbench.jobs import run_job
from workbench.runfolder import prepare_run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "demo"
        write_demo_project(project, scale="small")
        corpus = [str(project / "data" / "corpus")]
        tok_dir = prepare_run(project / "runs" / "tok", TokenizerConfig(inputs=corpus, vocab_size=args.vocab_size))
        res = run_job("tokenizer", tok_dir)
        assert res.status == "completed", res.error
        rows = []
        for preset in args.presets:
            cfg = PretrainConfig(tokenizer=str(tok_dir / "tokenizer.json"), inputs=corpus, preset=preset,
                                 max_steps=args.steps, batch_size=args.batch_size, log_every=5,
                                 eval_every=args.steps, sample_every=0, checkpoint_every=args.steps,
                                 warmup_steps=5, device="cpu")
            run_dir = prepare_run(project / "runs" / f"pre-{preset}", cfg)
            t0 = time.perf_counter()
            res = run_job("pretrain", run_dir)
            wall = time.perf_counter() - t0
            assert res.status == "completed", res.error
            events = read_events(run_dir)
            perf = [e for e in events if e["type"] == "metrics" and "perf/tokens_per_s" in e]
            tok_s = statistics.median(e["perf/tokens_per_s"] for e in perf[1:] or perf)
            mfu = statistics.median(e["perf/mfu"] for e in perf[1:] or perf)
            params = next(e["message"] for e in events if e["type"] == "log" and "params" in e["message"])
            m = res.metrics()
            n_params = re.search(r"([\d,]+) params", params).group(1)
            rows.append((preset, f"{n_params} params", int(tok_s), f"{mfu:.1%}",
                         m["perf/peak_rss_mb"], f"{m['val/loss']:.3f} / {m['val/unigram_baseline']:.3f}",
                         f"{wall:.0f}"))
            print(rows[-1], flush=True)

    header = ("preset", "model", "tokens/s", "MFU", "peak RSS MB", f"val loss / unigram @ {args.steps} steps",
              "wall s")
    table = markdown_table(header, rows)
    machine = torch_machine()
    section = (f"{MARKER} (CPU, fp32)\n\n"
               f"`python bench/pretrain_presets.py --presets {' '.join(args.presets)} --steps {args.steps}` on {machine}; batch "
               f"{args.batch_size} x the preset's sequence length, vocab {args.vocab_size}, demo corpus.\n\n"
               f"{table}\n")
    publish(args.out, MARKER, section, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
