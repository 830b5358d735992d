"""Importing a finished sample run (engine.sample's output) into the store as a ranking batch.

A sample run folder holds:

    samples.jsonl     one line per prompt:
                      {"prompt": str, "prompt_index": int,
                       "answers": [{"text": str, "n_tokens": int, "finished": bool, "seed": int}, ...]}
    provenance.json   {"checkpoint": str, "settings": {...}, "seed": int, "k": int}

Every line is checked before anything is written; all problems come back in one InputError
as `FILE:LINE: field 'x': what is wrong`. Importing the same run twice returns the batch made
the first time (matched by a hash of both files, so a copied or renamed run folder is still
the same run) instead of making a duplicate that would be ranked twice.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.jsonl import read_jsonl
from workbench.store import MAX_K, MIN_K, InputError, Store

SAMPLES = "samples.jsonl"
PROVENANCE = "provenance.json"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _provenance(path: Path, problems: list[str]) -> dict:
    try:
        prov = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{path}: missing (a finished sample run writes it)")
        return {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path}: not valid JSON ({e})")
        return {}
    if not isinstance(prov, dict):
        problems.append(f"{path}: expected a JSON object, got {type(prov).__name__}")
        return {}
    if not isinstance(prov.get("checkpoint"), str) or not prov["checkpoint"]:
        problems.append(f"{path}: field 'checkpoint' must be a non-empty string")
    if not isinstance(prov.get("settings"), dict):
        problems.append(f"{path}: field 'settings' must be an object")
    if not _is_int(prov.get("seed")):
        problems.append(f"{path}: field 'seed' must be an integer")
    k = prov.get("k")
    if not _is_int(k) or not MIN_K <= k <= MAX_K:
        problems.append(f"{path}: field 'k' must be an integer from {MIN_K} to {MAX_K}, got {k!r}")
    return prov


def _answer_problems(where: str, i: int, a) -> list[str]:
    field = f"answers[{i}]"
    if not isinstance(a, dict):
        return [f"{where}: field '{field}' must be an object"]
    out = []
    if not isinstance(a.get("text"), str):
        out.append(f"{where}: field '{field}.text' must be a string")
    if not _is_int(a.get("n_tokens")) or a["n_tokens"] < 0:
        out.append(f"{where}: field '{field}.n_tokens' must be an integer >= 0")
    if not isinstance(a.get("finished"), bool):
        out.append(f"{where}: field '{field}.finished' must be true or false")
    if not _is_int(a.get("seed")):
        out.append(f"{where}: field '{field}.seed' must be an integer")
    return out


def read_sample_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    """(provenance, items ready for Store.create_batch); raises InputError listing every problem."""
    run_dir = Path(run_dir)
    problems: list[str] = []
    prov = _provenance(run_dir / PROVENANCE, problems)
    k = prov.get("k") if _is_int(prov.get("k")) else None
    checkpoint = prov.get("checkpoint")
    path = run_dir / SAMPLES
    items: list[dict] = []
    seen_index: dict[int, int] = {}
    if not path.exists():
        raise InputError(problems + [f"{path}: missing (has the sample run finished?)"],
                         "sample run")
    for lineno, rec in read_jsonl(path, problems):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            problems.append(f"{where}: expected a JSON object, got {type(rec).__name__}")
            continue
        bad = []
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            bad.append(f"{where}: field 'prompt' must be a non-empty string")
        index = rec.get("prompt_index")
        if not _is_int(index) or index < 0:
            bad.append(f"{where}: field 'prompt_index' must be an integer >= 0")
        elif index in seen_index:
            bad.append(f"{where}: field 'prompt_index' {index} repeats line {seen_index[index]}")
        else:
            seen_index[index] = lineno
        answers = rec.get("answers")
        if not isinstance(answers, list):
            bad.append(f"{where}: field 'answers' must be a list")
            answers = []
        elif k is not None and len(answers) != k:
            bad.append(f"{where}: field 'answers' has {len(answers)} answers, provenance.json says k={k}")
        elif not MIN_K <= len(answers) <= MAX_K:
            bad.append(f"{where}: field 'answers' has {len(answers)} answers; {MIN_K} to {MAX_K} needed")
        for i, a in enumerate(answers):
            bad += _answer_problems(where, i, a)
        problems += bad
        if bad:
            continue
        # Per-answer metadata keeps everything but the text (and any field a later sampler
        # adds); the checkpoint is per answer too, so a batch may mix answers of two models.
        items.append({
            "prompt": rec["prompt"],
            "meta": {"prompt_index": index},
            "answers": [{"text": a["text"],
                         "meta": {"checkpoint": checkpoint,
                                  **{key: v for key, v in a.items() if key != "text"}}}
                        for a in answers],
        })
    if not items and not problems:
        problems.append(f"{path}: no samples in the file")
    if problems:
        raise InputError(problems, "sample run")
    return prov, items


def run_key(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    h = hashlib.sha256()
    for name in (PROVENANCE, SAMPLES):
        data = (run_dir / name).read_bytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return "sample-run:" + h.hexdigest()


def import_sample_run(store: Store, run_dir: str | Path, name: str | None = None) -> int:
    """The batch id for this sample run: a new batch, or the one an earlier import made.

    `name` defaults to the run folder's name (made unique with " (2)", ...); an explicit name
    that is already taken is an error."""
    run_dir = Path(run_dir)
    prov, items = read_sample_run(run_dir)
    key = run_key(run_dir)
    settings = {"checkpoint": prov["checkpoint"], "seed": prov["seed"], "k": prov["k"],
                "sampling": prov["settings"]}
    with store.transaction():  # look-up and insert together: two importers make one batch
        existing = store.batch_by_source_key(key)
        if existing is not None:
            return existing.id
        return store.create_batch(
            name if name is not None else store.unique_batch_name(run_dir.name), items,
            kind="sampled", source=str(run_dir.resolve()), source_key=key, settings=settings,
            k=prov["k"])
