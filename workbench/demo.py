"""The offline demo project: a corpus, SFT data, held-out tasks and prompts, from nothing.

Everything comes from the Python install itself (docstrings and the `pydoc` topic pages of
the standard library, read with `ast`, never imported) and from `engine.tasks`, so the demo
needs no network. Output is a pure function of (seed, scale, this Python's standard library):
two calls write byte-identical files.

Task pools (see `engine.tasks.make_pools`): `eval` and `prompts` are held out (unique and
disjoint); `sft` and `corpus` never contain a held-out prompt, so neither pretraining nor SFT
sees an evaluation question.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import random
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Iterator

from engine.fsutil import atomic_write_bytes
from engine.tasks import Task, as_transcript, iter_tasks, make_pools
from workbench.project import DEMO_WRITING

# One place to tune the scales. Sizes are in bytes of UTF-8. A standard library holds only
# about 2 MB of docstrings and topic text, so "full" is in practice "all of it".
SCALES = {
    "tiny": {"docs_bytes": 300_000, "sft": 600, "eval": 110, "prompts": 110,
             "vocab_size": 2048, "model_preset": "tiny"},
    "small": {"docs_bytes": 2_000_000, "sft": 3000, "eval": 550, "prompts": 3000,
              "vocab_size": 4096, "model_preset": "mini"},
    "full": {"docs_bytes": 10_000_000, "sft": 10000, "eval": 1100, "prompts": 3000,
             "vocab_size": 8192, "model_preset": "small"},
}
TASK_SHARE = 0.25       # task transcripts' share of the whole corpus, by bytes
FILE_SHARE = 0.05       # no one module may fill more than this share of the docs budget
TOPICS_SHARE = 0.20     # the pydoc topic pages (the language reference) may fill this much
MIN_DOC_CHARS = 16      # shorter docstrings ("Return self.") teach little

# Folders that are not documentation: tests, the IDE, the old 2to3 tool, third-party code.
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages",
             "dist-packages", "__pycache__", "__phello__"}

# DEMO_WRITING is present while the demo is being written: a folder holding it is a demo cut
# short, whose files a new write may replace (any other files there are the user's).
FILES = {
    "docs": "data/corpus/python_docs.txt",
    "tasks": "data/corpus/tasks.txt",
    "sft": "data/sft.jsonl",
    "eval": "data/eval_tasks.jsonl",
    "prompts": "data/prompts.txt",
    "readme": "data/README.md",
}

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer with just the answer.",
    "Reply briefly and exactly.",
)

# For Alpaca records, some kinds read naturally as a fixed instruction plus an input.
ALPACA_SPLIT = {
    "reverse": ("Reverse the following word.", lambda d: d["word"]),
    "sort": ("Sort the following numbers in ascending order.",
             lambda d: ", ".join(str(x) for x in d["numbers"])),
    "first": ("What is the first letter of this word?", lambda d: d["word"]),
    "last": ("What is the last letter of this word?", lambda d: d["word"]),
    "length": ("How many letters does this word have?", lambda d: d["word"]),
}


# --- the standard library's own text ---------------------------------------------------------

def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path, seed: int) -> list[Path]:
    files = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(names):
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(Path(dirpath, name))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    # Shuffled so a small budget samples the whole library, not just asyncio and argparse.
    random.Random(f"workbench-demo/{seed}/files").shuffle(files)
    return files


def _clean(text: str) -> str | None:
    text = inspect.cleandoc(text.replace("\r\n", "\n"))
    if len(text) < MIN_DOC_CHARS:
        return None
    # Escapes in a docstring can yield NULs or lone surrogates, which no text file wants.
    if any((ord(c) < 32 and c not in "\n\t") or 0xD800 <= ord(c) <= 0xDFFF for c in text):
        return None
    return text


def _parse(path: Path) -> ast.Module | None:
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            # Old escape sequences in some modules warn; this is reading, not running.
            warnings.simplefilter("ignore")
            return ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return None


def _docstrings(tree: ast.Module, module: str) -> Iterator[str]:
    """'qualified.name\\ndocstring' for the module and every class and function, in source order."""
    def visit(node: ast.AST, prefix: str) -> Iterator[str]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child, clean=False)
                text = _clean(doc) if doc else None
                if text:
                    yield f"{name}\n{text}"
                yield from visit(child, name)

    doc = ast.get_docstring(tree, clean=False)
    text = _clean(doc) if doc else None
    if text:
        yield f"{module}\n{text}"
    yield from visit(tree, module)


def _topics(tree: ast.Module) -> Iterator[str]:
    """The pages of `pydoc_data/topics.py` (the language reference, as `help()` shows it)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant) \
                        and isinstance(value.value, str):
                    text = _clean(value.value)
                    if text:
                        yield text


def collect_python_docs(max_bytes: int, seed: int = 0, root: Path | None = None) -> tuple[str, int]:
    """Docstring and topic text from the standard library, at most `max_bytes` of UTF-8.

    Returns (text, number of entries). Files are parsed lazily and the walk stops at the cap."""
    root = Path(root) if root is not None else stdlib_dir()
    parts: list[str] = []
    total = 0
    seen: set[str] = set()
    for path in _source_files(root, seed):
        rel = path.relative_to(root).with_suffix("")
        is_topics = rel.as_posix() == "pydoc_data/topics"
        # A floor, so that a small cap still takes whole docstrings rather than none.
        budget = max(int(max_bytes * (TOPICS_SHARE if is_topics else FILE_SHARE)), 4096)
        tree = _parse(path)
        if tree is None:
            continue
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts) or rel.name
        used = 0
        for entry in (_topics(tree) if is_topics else _docstrings(tree, module)):
            body = entry.split("\n", 1)[-1]
            if body in seen:  # many methods share a docstring; once is enough
                continue
            size = len((entry + "\n\n").encode("utf-8"))
            if used + size > budget:
                break
            if total + size > max_bytes:
                return "".join(parts), len(parts)
            seen.add(body)
            parts.append(entry + "\n\n")
            used += size
            total += size
    return "".join(parts), len(parts)


# --- SFT records in the three accepted formats ------------------------------------------------

def _sft_record(task: Task, second: Task, rng: random.Random) -> tuple[dict, bool]:
    """One record; the bool says whether `second` was used (a two-turn conversation)."""
    r = rng.random()
    if r < 0.35:
        return {"prompt": task.prompt, "response": task.answer}, False
    if r < 0.65:
        split = ALPACA_SPLIT.get(task.kind)
        if split and rng.random() < 0.5:
            return {"instruction": split[0], "input": split[1](task.data),
                    "output": task.answer}, False
        return {"instruction": task.prompt, "input": "", "output": task.answer}, False
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages += [{"role": "user", "content": task.prompt},
                 {"role": "assistant", "content": task.answer}]
    two = rng.random() < 0.4
    if two:
        messages += [{"role": "user", "content": second.prompt},
                     {"role": "assistant", "content": second.answer}]
    return {"messages": messages}, two


def _sft_lines(tasks: list[Task], n: int, seed: int) -> list[str]:
    rng = random.Random(f"workbench-demo/{seed}/sft")
    lines, i = [], 0
    while len(lines) < n:
        record, two = _sft_record(tasks[i % len(tasks)], tasks[(i + 1) % len(tasks)], rng)
        i += 2 if two else 1
        lines.append(json.dumps(record, ensure_ascii=False))
    return lines


# --- the project folder ------------------------------------------------------------------------

def _toml_str(s: str) -> str:
    # JSON's string escapes (\" \\ \n \uXXXX) are all valid in a TOML basic string.
    return json.dumps(s, ensure_ascii=False)


def _toml(scale: str, seed: int) -> str:
    cfg = SCALES[scale]
    pretrain = ", ".join(_toml_str(FILES[k]) for k in ("docs", "tasks"))
    return "\n".join([
        "# Written by `workbench demo`: an offline project built from the Python standard",
        "# library and generated tasks with checkable answers.",
        f"name = {_toml_str('Demo')}",
        "",
        "[demo]",
        f"seed = {seed}",
        f"scale = {_toml_str(scale)}",
        "",
        "[defaults.tokenizer]",
        f"vocab_size = {cfg['vocab_size']}",
        "",
        "[defaults.model]",
        f"preset = {_toml_str(cfg['model_preset'])}",
        "",
        "[defaults.data]",
        f"pretrain = [{pretrain}]",
        f"sft = {_toml_str(FILES['sft'])}",
        f"eval_tasks = {_toml_str(FILES['eval'])}",
        f"prompts = {_toml_str(FILES['prompts'])}",
        "",
    ])


README = """# Demo data

Written by `workbench demo` (scale {scale}, seed {seed}); rerunning with the same settings
on the same Python gives byte-identical files.

* `corpus/python_docs.txt`: docstrings and `help()` topic pages from this Python's standard
  library (read from source, not imported). Pretraining text.
* `corpus/tasks.txt`: "Question: ...\\nAnswer: ..." transcripts of small checkable tasks
  (arithmetic, reversing, sorting, counting, lookups, ...), about {share}% of the corpus.
* `sft.jsonl`: instruction data mixing the three accepted formats: `{{prompt, response}}`,
  Alpaca `{{instruction, input, output}}` and `{{messages: [...]}}` (some with a system message,
  some with two turns).
* `eval_tasks.jsonl`: held-out tasks (kind, prompt, answer, data) for accuracy and win rates;
  none of their prompts appears in the corpus, the SFT data or `prompts.txt`.
* `prompts.txt`: more held-out prompts, one per line, for sampling, ranking and PPO.
"""


def _is_demo(toml: Path) -> bool:
    """Did `workbench demo` write this workbench.toml (its [demo] table)? An unreadable one is
    not taken for a demo: it is not written over."""
    import tomllib
    try:
        return isinstance(tomllib.loads(toml.read_text(encoding="utf-8")).get("demo"), dict)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False


def write_demo_project(project_dir, *, seed: int = 0, scale: str = "small",
                       overwrite: bool = False) -> dict:
    """Write the demo project into `project_dir`; returns a summary of what was written.

    Raises FileExistsError if the folder already holds a workbench.toml (unless `overwrite`, or
    writing its demo was cut short: DEMO_WRITING), or, not being a project, holds a file the
    demo would write."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    start = time.perf_counter()
    root = Path(project_dir)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} is a file, not a folder: name a new or empty folder")
    if (root / "workbench.toml").exists():
        # A demo cut short is written again without --force: it was being replaced anyway.
        if not overwrite and not (root / DEMO_WRITING).exists():
            raise FileExistsError(f"{root} already holds a project (workbench.toml); --force "
                                  "replaces its demo files")
        if not _is_demo(root / "workbench.toml"):
            raise FileExistsError(f"{root} holds a project that is not a demo ({root / 'workbench.toml'} "
                                  "has no [demo] table): --force replaces only a demo's files; name a "
                                  "new or empty folder")
    elif not (root / DEMO_WRITING).exists():
        # Not a project, nor a demo cut short: whatever is there is the user's.
        theirs = [rel for rel in FILES.values() if (root / rel).exists()]
        if theirs:
            raise FileExistsError(f"{root / theirs[0]} is already there and {root} is not a "
                                  "workbench project: name a new or empty folder for the demo")
    cfg = SCALES[scale]

    docs, n_docs = collect_python_docs(cfg["docs_bytes"], seed)
    if not docs:
        raise RuntimeError(f"no Python source with docstrings found under {stdlib_dir()}")
    docs_bytes = len(docs.encode("utf-8"))
    task_budget = int(docs_bytes * TASK_SHARE / (1 - TASK_SHARE))
    pools = make_pools(seed, {"eval": cfg["eval"], "prompts": cfg["prompts"]},
                       {"sft": cfg["sft"] * 5 // 4 + 2})  # two-turn records use a second task
    held_out = {t.prompt for t in pools["eval"] + pools["prompts"]}
    transcripts, used = [], 0
    for task in iter_tasks(seed, stream="corpus", exclude=held_out):
        text = as_transcript(task) + "\n"
        size = len(text.encode("utf-8"))
        if used + size > task_budget:
            break
        transcripts.append(text)
        used += size

    contents = {
        "workbench.toml": _toml(scale, seed),
        FILES["docs"]: docs,
        FILES["tasks"]: "".join(transcripts),
        FILES["sft"]: "".join(line + "\n" for line in _sft_lines(pools["sft"], cfg["sft"], seed)),
        FILES["eval"]: "".join(json.dumps(t.to_dict(), ensure_ascii=False) + "\n"
                               for t in pools["eval"]),
        FILES["prompts"]: "".join(t.prompt + "\n" for t in pools["prompts"]),
        FILES["readme"]: README.format(scale=scale, seed=seed, share=round(TASK_SHARE * 100)),
    }
    sizes = {}
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_WRITING).touch()
    # workbench.toml last: its presence marks a complete project.
    for rel in sorted(contents, key=lambda r: r == "workbench.toml"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = contents[rel].encode("utf-8")
        atomic_write_bytes(path, data)
        sizes[rel] = len(data)
    (root / DEMO_WRITING).unlink()
    return {
        "project": str(root), "scale": scale, "seed": seed, "files": sizes,
        "counts": {"docstrings": n_docs, "transcripts": len(transcripts), "sft": cfg["sft"],
                   "eval_tasks": len(pools["eval"]), "prompts": len(pools["prompts"])},
        "elapsed_s": round(time.perf_counter() - start, 2),
    }


# --- command line ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", required=True, metavar="DIR",
                        help="folder to write the demo project into (created if missing)")
    parser.add_argument("--scale", choices=list(SCALES), default="small",
                        help="how much data to write (default: small)")
    parser.add_argument("--seed", type=int, default=0, help="seed for every random choice")
    parser.add_argument("--force", action="store_true",
                        help="replace the demo files of a folder that already holds a demo project "
                        "(its runs and rankings stay); a folder that is not a demo project is never "
                        "written over")


def run_from_args(args: argparse.Namespace) -> int:
    if not str(args.project).strip():     # an unset variable: the current folder was not meant
        print("workbench demo: --project is empty: name the folder to write the demo project into",
              file=sys.stderr)
        return 2
    try:
        summary = write_demo_project(args.project, seed=args.seed, scale=args.scale,
                                     overwrite=args.force)
    except (FileExistsError, RuntimeError, ValueError) as e:
        print(f"workbench demo: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"workbench demo: cannot write {e.filename or args.project}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    print(f"Demo project written to {summary['project']} "
          f"(scale {summary['scale']}, seed {summary['seed']}, {summary['elapsed_s']} s):")
    for rel, size in summary["files"].items():
        print(f"  {rel:32s} {size / 1000:10.1f} kB")
    c = summary["counts"]
    print(f"  {c['docstrings']} docstrings and topics, {c['transcripts']} task transcripts, "
          f"{c['sft']} SFT records, {c['eval_tasks']} held-out tasks, {c['prompts']} prompts")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.demo",
                                     description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
