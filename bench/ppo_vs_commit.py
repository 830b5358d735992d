"""One PPO iteration here against the same iteration at an earlier commit, in one run.

    python bench/ppo_vs_commit.py --base d3e09a9 [--presets mini small] [--rounds 3] [--threads 1]
                                  [--project DIR]

Issue 20 asks for a PPO iteration at the app's settings at least 1.5x faster than at the commit
it was filed against, measured on the same machine in the same run. The base commit is
exported with `git archive` into a temporary folder; each round runs that checkout's
bench/ppo_iteration.py and then this one's (the order flipped every round, so a slow patch of a
shared machine lands on both), each in a process of its own that imports its own engine. Each
run reports the median of its iterations (the stage's own time/step_s, after a warm-up); the
table gives the median over rounds. Both sides run the app's PPO settings of their own commit:
they are the same in every commit since the catalogue's first (32 prompts, 24 new tokens, 2
epochs of 2 minibatches of 16); the section says so only when they match, and stops otherwise.

Random models answer to the full max_new_tokens; a trained policy does not. With --project, a
further row runs both commits' PPO stage on the project's own newest SFT and reward runs (what
the app's PPO page starts from, `workbench pipeline --demo --until reward` makes them) and its
prompts, through the same measure() of each checkout's bench/ppo_iteration.py.
"""
from __future__ import annotations

import argparse
import ast
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import markdown_table, publish, torch_machine  # noqa: E402

MARKER = "## One PPO iteration against an earlier commit"
SETTINGS = "PPO settings"   # ppo_iteration.py's section names them after this, "(where): ..."


def export(commit: str, where: Path) -> str:
    """The commit's files in `where`; returns its short hash."""
    short = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", commit], capture_output=True,
                           text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return short


def one_run(checkout: Path, preset: str, iterations: int, threads: int, out: Path) -> tuple[float, float, float, str]:
    """(iteration s, generation s, training s, the settings sentence) of one ppo_iteration.py run."""
    cmd = [sys.executable, str(checkout / "bench" / "ppo_iteration.py"), "--presets", preset,
           "--iterations", str(iterations), "--threads", str(threads), "--out", str(out)]
    r = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{checkout}: ppo_iteration.py failed:\n{r.stderr[-2000:]}")
    row = ast.literal_eval(next(line for line in r.stdout.splitlines() if line.startswith("(")))
    text = out.read_text()
    settings = text[text.index(SETTINGS):].split("): ", 1)[1].split(". Policy", 1)[0]
    return float(row[5].split()[0]), float(row[2].split()[0]), float(row[4]), settings


def project_models(project: Path) -> tuple[Path, Path, Path]:
    """(policy, reward model, prompts): the project's newest SFT and reward runs and its prompts."""
    newest = lambda kind: max((project / "runs").glob(f"{kind}-*"), default=None)  # noqa: E731
    policy, rm, prompts = newest("sft"), newest("reward"), project / "data" / "prompts.txt"
    if policy is None or rm is None or not prompts.is_file():
        raise SystemExit(f"{project}: needs runs/sft-*, runs/reward-* and data/prompts.txt "
                         "(workbench pipeline --demo --project DIR --until reward)")
    return policy, rm, prompts


def trained_run(checkout: Path, models: tuple[Path, Path, Path], iterations: int, threads: int) -> tuple:
    cmd = [sys.executable, str(ROOT / "bench" / "ppo_trained_run.py"), str(checkout), *map(str, models),
           str(iterations), str(threads)]
    r = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{checkout}: PPO on the trained models failed:\n{r.stderr[-2000:]}")
    step, gen, train, length, settings = json.loads(r.stdout.strip().splitlines()[-1])
    return step, gen, train, str(settings), length


def measure(base: Path, preset: str, args, tmp: Path) -> dict:
    runs: dict[str, list] = {"base": [], "here": []}
    for r in range(args.rounds):
        order = [("base", base), ("here", ROOT)]
        for side, checkout in (order if r % 2 == 0 else order[::-1]):
            if preset == "trained":
                runs[side].append(trained_run(checkout, args.models, args.iterations, args.threads))
            else:
                runs[side].append(one_run(checkout, preset, args.iterations, args.threads, tmp / f"{side}.md"))
            print(side, preset, runs[side][-1][:3], flush=True)
    if runs["base"][0][3] != runs["here"][0][3]:
        raise SystemExit(f"the two commits' PPO settings differ:\n  {runs['base'][0][3]}\n  {runs['here'][0][3]}")
    med = {side: [statistics.median(x[i] for x in v) for i in range(3)] for side, v in runs.items()}
    med["settings"] = runs["here"][0][3]
    med["length"] = runs["here"][0][4] if preset == "trained" else None
    med["per_round"] = [(b[0], h[0]) for b, h in zip(runs["base"], runs["here"])]
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the earlier commit (hash, tag or ref)")
    ap.add_argument("--presets", nargs="*", default=["mini", "small"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=5, help="measured iterations a run, after one warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each run (1: steadier when shared)")
    ap.add_argument("--project", type=Path,
                    help="also measure on this project's newest SFT and reward runs (trained models)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = ap.parse_args()
    args.models = project_models(args.project) if args.project else None
    here = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    rows, settings = [], ""
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        (tmp / "base").mkdir()
        short = export(args.base, tmp / "base")
        trained = ""
        for preset in args.presets + (["trained"] if args.project else []):
            m = measure(tmp / "base", preset, args, tmp)
            if preset == "trained":
                trained = (f" The row *trained* runs the PPO stage of each commit on {args.project}'s newest SFT "
                           f"and reward runs ({args.models[0].name}, {args.models[1].name}) and its prompts, with the same settings "
                           f"({m['settings']}: rollout batch, new tokens, temperature, epochs, minibatch), "
                           f"its answers {m['length']:.1f} tokens on average.")
            else:
                settings = m["settings"]
            (bi, bg, bt), (hi, hg, ht) = m["base"], m["here"]
            rows.append((preset, f"{bi:.2f}", f"{hi:.2f}", f"{bi / hi:.2f}x", f"{bg:.2f} / {hg:.2f}",
                         f"{bt:.2f} / {ht:.2f}", " / ".join(f"{b:.2f}:{h:.2f}" for b, h in m["per_round"])))
    header = ("preset", f"iteration s at {short}", "iteration s here", f"{short} / here",
              "generation s then / here", "training s then / here", "per round (then:here)")
    table = markdown_table(header, rows)
    cmd = (f"python bench/ppo_vs_commit.py --base {args.base} --presets {' '.join(args.presets)} "
           f"--rounds {args.rounds} --iterations {args.iterations} --threads {args.threads}"
           + (f" --project {args.project}" if args.project else ""))
    section = (f"{MARKER}\n\n`{cmd}` on {torch_machine()} (each run's own threads: {args.threads}), "
               f"here = {here or 'the working tree'}{' plus uncommitted changes' if _dirty() else ''}. "
               f"bench/ppo_iteration.py of each checkout, in a process of its own, alternating, the order "
               f"flipped every round; each run's figure is the median of its {args.iterations} iterations "
               f"after a warm-up one, the table's the median over {args.rounds} rounds. Both at the app's "
               f"PPO settings, the same in both commits: {settings}. Random models of the preset, so "
               f"every answer runs the full length.{trained}\n\n{table}\n")
    publish(args.out, MARKER, section, table)
    return 0


def _dirty() -> bool:
    return bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    raise SystemExit(main())
