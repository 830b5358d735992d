"""Write tests/slow_tests.txt: the tests left out of the fast loop, `pytest -m "not slow"`.

    QT_QPA_PLATFORM=offscreen python -m pytest -q --durations=0 --durations-min=0 > durations.log
    python tests/slow_list.py durations.log [--budget 90]

Every test's time (setup + call + teardown, as pytest's --durations lists them) is summed; the
quickest tests are kept in the fast loop until their total reaches the budget in seconds, and
every other test is listed as slow. tests/conftest.py marks the listed ones `slow` when it
collects them; a test not in the list (a new one) runs in the fast loop until the list is
written again. The whole suite still runs every test.
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*([\d.]+)s (setup|call|teardown)\s+(\S+)$")
OUT = Path(__file__).with_name("slow_tests.txt")


def times(log: Path) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for line in log.read_text().splitlines():
        m = LINE.match(line)
        if m:
            total[m.group(3)] += float(m.group(1))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--budget", type=float, default=90.0)
    args = ap.parse_args()
    total = times(args.log)
    kept, spent = set(), 0.0
    for node, t in sorted(total.items(), key=lambda kv: kv[1]):
        if spent + t > args.budget:
            break
        kept.add(node)
        spent += t
    slow = sorted(set(total) - kept)
    OUT.write_text("# Written by tests/slow_list.py from a --durations=0 run; see its docstring.\n"
                   + "".join(f"{n}\n" for n in slow))
    print(f"{len(kept)} tests in the fast loop ({spent:.0f} s measured), {len(slow)} marked slow "
          f"({sum(total[n] for n in slow):.0f} s); wrote {OUT}")


if __name__ == "__main__":
    main()
