"""Run `workbench pipeline --demo --methods ppo,dpo,grpo` on a fresh demo project and put its
table into the README.

    python docs/pipeline_table.py [--project /tmp/pipeline-demo] [--readme README.md] [--check]

The README's table sits between `<!-- pipeline-table -->` and `<!-- /pipeline-table -->`; this
script replaces what is between them with what the landed code prints, and the line under it
with the machine it ran on. `--check` only runs the pipeline and says whether the README's
figures (everything but the run names and times) are still what it prints.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- pipeline-table -->", "<!-- /pipeline-table -->"
METHODS = "ppo,dpo,grpo"      # every alignment method, so the table sets them side by side


def run_pipeline(project: Path) -> str:
    if project.exists():
        shutil.rmtree(project)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "table.txt"
        subprocess.run([sys.executable, "-m", "workbench.cli", "pipeline", "--demo", "--project", str(project),
                        "--methods", METHODS, "--table-out", str(table)], check=True, cwd=ROOT)
        return table.read_text(encoding="utf-8").rstrip("\n")


def block(table: str) -> str:
    cores = os.cpu_count()
    return (f"{START}\n```text\n{table}\n```\n"
            f"(`python docs/pipeline_table.py`, {cores} CPU cores, nothing else running)\n{END}")


def figures(text: str) -> list[str]:
    """The table's figures without run names and times, which change from run to run."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        # the table's rows only: not its header and total, nor the README's fence and machine line
        if len(parts) > 3 and parts[0] not in ("stage", "total") and not parts[0].startswith(("(", "`")):
            rows.append(re.sub(r"\S+-\d{8}-\d{6}(-\d+)?|\b\d+m\d\ds\b|\b\d+s\b", "", line).split())
    return [" ".join(r) for r in rows]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", type=Path, default=Path(tempfile.gettempdir()) / "pipeline-demo")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--check", action="store_true", help="compare, do not rewrite")
    args = p.parse_args()
    readme = args.readme.read_text(encoding="utf-8")
    if START not in readme or END not in readme:
        raise SystemExit(f"{args.readme}: no {START} ... {END} block to replace")
    table = run_pipeline(args.project)
    head, rest = readme.split(START, 1)
    old, tail = rest.split(END, 1)
    if args.check:
        same = figures(old) == figures(table)
        print("the README's figures are what the pipeline prints" if same else
              "the README's figures differ from what the pipeline prints:\n" + table)
        return 0 if same else 1
    args.readme.write_text(head + block(table) + tail, encoding="utf-8")
    print(f"{args.readme}: table replaced\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
