"""Two training jobs at once on the same cores: OpenMP's spin-waiting, and engine.osproc's answer.

    python bench/concurrent_jobs.py [--preset mini] [--steps 30] [--rounds 2]

Each run is a process of its own doing `--steps` training steps (forward, backward, fused AdamW)
of the preset at the pretraining shape (16 x 128 tokens, vocab 4096), with torch's own thread
count, and reports its tokens/s. Four ways, each `--rounds` times, medians:
alone; two at once as they used to start (both spin-waiting: OpenMP's default); two at once the
way the app now starts a job beside a running one (engine/osproc.py SHARED_CPU_ENV on the second
only); and alone with SHARED_CPU_ENV (what the second job gives up when it ends up alone).
Then the app's chat beside a job: batch-1 greedy generation of the `small` preset (what the
window's own process runs) beside the same training job, as before (both spinning) and now
(the app with SHARED_CPU_ENV: engine.osproc.spin_briefly), and alone.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import markdown_table, publish, torch_machine  # noqa: E402
from engine.osproc import SHARED_CPU_ENV, SPIN_SETTINGS  # noqa: E402

MARKER = "## Two jobs at once"
STEPS = """
import sys, time, torch
sys.path.insert(0, sys.argv[3])
from engine.model import Transformer, config_from_preset
torch.manual_seed(0)
m = Transformer(config_from_preset(sys.argv[1], 4096))
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
x, y = torch.randint(0, 4096, (16, 128)), torch.randint(0, 4096, (16, 128))
def step():
    m(x, y, loss_only=True).backward(); opt.step(); opt.zero_grad()
for _ in range(3):
    step()
n, t = int(sys.argv[2]), time.perf_counter()
for _ in range(n):
    step()
print(n * 16 * 128 / (time.perf_counter() - t))
"""
CHAT = """
import sys, time, torch
sys.path.insert(0, sys.argv[2])
from engine.model import Transformer, config_from_preset
from engine.generate import generate_batch
torch.manual_seed(0)
m = Transformer(config_from_preset("small", 4096)).eval()
prompt = [list(range(5, 25))]
generate_batch(m, prompt, 8, temperature=0, stop_ids=(), pad_id=0)
n, t = int(sys.argv[1]), time.perf_counter()
for _ in range(n):
    generate_batch(m, prompt, 64, temperature=0, stop_ids=(), pad_id=0)
print(n * 64 / (time.perf_counter() - t))
"""


def start(preset: str, steps: int, shared: bool, script: str = STEPS) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in SPIN_SETTINGS}
    if shared:
        env.update(SHARED_CPU_ENV)
    args = [preset, str(steps)] if script is STEPS else [str(steps)]
    return subprocess.Popen([sys.executable, "-c", script, *args, str(ROOT)], env=env,
                            stdout=subprocess.PIPE, text=True)


def rates(*procs: subprocess.Popen) -> list[float]:
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def chat_table(args) -> str:
    """The app's chat (batch-1 generation in its own process) beside a training job."""
    ways = {"chat alone": [], "chat alone, with SHARED_CPU_ENV": [],
            "job + chat, both spinning (before)": [], "job + chat, the app with SHARED_CPU_ENV (now)": []}
    n = 4 * args.steps // 3          # about as long as the job's steps
    for _ in range(args.rounds):
        ways["chat alone"].append((None, *rates(start("", n, False, CHAT))))
        ways["chat alone, with SHARED_CPU_ENV"].append((None, *rates(start("", n, True, CHAT))))
        for way, shared in (("job + chat, both spinning (before)", False),
                            ("job + chat, the app with SHARED_CPU_ENV (now)", True)):
            ways[way].append(tuple(rates(start(args.preset, args.steps, False), start("", n, shared, CHAT))))
        print({w: v[-1] for w, v in ways.items()}, flush=True)
    med = lambda v, i: statistics.median(r[i] for r in v) if v[0][i] is not None else None  # noqa: E731
    rows = [(w, "" if med(v, 0) is None else f"{med(v, 0):,.0f}", f"{med(v, 1):,.0f}") for w, v in ways.items()]
    return markdown_table(("the app's chat", "training tokens/s", "chat tokens/s (small, batch 1)"), rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = ap.parse_args()
    ways = {"alone": (False,), "two at once, both spinning (before)": (False, False),
            "two at once, the second with SHARED_CPU_ENV (now)": (False, True),
            "alone, with SHARED_CPU_ENV": (True,)}
    got: dict[str, list[list[float]]] = {w: [] for w in ways}
    for _ in range(args.rounds):
        for way, shared in ways.items():
            got[way].append(rates(*[start(args.preset, args.steps, s) for s in shared]))
            print(way, [f"{r:,.0f}" for r in got[way][-1]], flush=True)
    alone = statistics.median(r[0] for r in got["alone"])
    rows = []
    for way, runs in got.items():
        each = [statistics.median(r[i] for r in runs) for i in range(len(runs[0]))]
        rows.append((way, " + ".join(f"{r:,.0f}" for r in each), f"{sum(each):,.0f}", f"{sum(each) / alone:.2f}x"))
    table = markdown_table(("jobs", "tokens/s of each", "together", "vs one alone"), rows)
    table += "\n\n" + chat_table(args)
    env = ", ".join(f"{k}={v}" for k, v in SHARED_CPU_ENV.items())
    section = (f"{MARKER}\n\n`python bench/concurrent_jobs.py --preset {args.preset} --steps {args.steps} "
               f"--rounds {args.rounds}` on {torch_machine()}. Each job a process of its own training the "
               f"{args.preset} preset at 16 x 128 tokens (forward, backward, fused AdamW) for {args.steps} "
               f"steps, torch's own thread count in each; medians of {args.rounds} rounds. OpenMP's worker "
               f"threads spin-wait between parallel regions: two jobs that both spin on the same cores take "
               f"each other's turns. The app now starts a job beside a running one with {env} "
               f"(engine/osproc.py); the first keeps its spin, so one job alone runs as before. The app's "
               f"own process (chat, compare) takes the same setting before it loads torch "
               f"(osproc.spin_briefly), and jobs it starts alone do not inherit it: the second table "
               f"is batch-1 greedy generation of the small preset (64 tokens a call) beside the "
               f"training job.\n\n{table}\n")
    publish(args.out, MARKER, section, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
