"""What every benchmark writes: a markdown table, the machine it ran on, and its section of
docs/PERFORMANCE.md (the other sections kept)."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def torch_machine(*extra: str) -> str:
    """'x86_64, 2 torch threads, torch 2.x, [extra, ]Python 3.x': the line above each table."""
    import torch
    n = torch.get_num_threads()
    parts = [platform.processor() or platform.machine(), f"{n} torch thread{'s' * (n != 1)}",
             f"torch {torch.__version__}", *extra, f"Python {platform.python_version()}"]
    return ", ".join(parts)


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the section that starts with `heading` (or append it); `section` includes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Performance\n\n"
    if heading in text:
        head, _, rest = text.partition(heading)
        tail = rest.split("\n## ", 1)
        text = head + section + ("\n## " + tail[1] if len(tail) > 1 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def publish(path: Path, heading: str, section: str, table: str) -> None:
    """Write the benchmark's section of the report and show its table on the terminal."""
    write_section(path, heading, section)
    print(table)
