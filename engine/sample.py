"""Sampling for ranking: K answers to each of N prompts from a checkpoint.

    python -m engine.sample --run-dir DIR

reads DIR/config.json (`SampleConfig`) and writes
    DIR/provenance.json   checkpoint, its step, the tokenizer fingerprint, settings, seed, K
    DIR/samples.jsonl     one line per prompt: {"prompt", "prompt_index",
                          "answers": [{"text", "n_tokens", "finished", "seed"}, ...]}
Each answer has a seed of its own, derived from (seed, prompt index, answer index), so an answer
does not depend on how prompts were batched and a stopped job resumes where it left off, with
the same answers it would have produced without the stop.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from engine.artifacts import load_artifact, peek_artifact
from engine.config import ConfigError, require, resolve_path
from engine.device import describe, resolve_device
from engine.fsutil import atomic_write_text
from engine.generate import generate_batch
from engine.jsonl import read_jsonl
from engine.runio import Emitter, InputProblems, NeverStop, Sink, stage_main, write_summary

OUT = "samples.jsonl"


class PromptFileError(InputProblems):
    def __init__(self, problems: list[str]):
        super().__init__(problems, "prompt files")


def read_prompts(paths: list[str | os.PathLike]) -> list[str]:
    """Prompts from .txt (one per line; blank lines skipped) or .jsonl (a string `prompt`)."""
    prompts, problems = [], []
    for path in map(Path, paths):
        if path.suffix not in (".txt", ".jsonl"):
            problems.append(f"{path}: expected a .txt or .jsonl file of prompts")
            continue
        if path.suffix == ".jsonl":
            for n, rec in read_jsonl(path, problems):
                p = rec.get("prompt") if isinstance(rec, dict) else None
                if not isinstance(p, str) or not p.strip():
                    problems.append(f"{path}:{n}: field 'prompt': " + ("missing" if p is None else "expected a non-empty string"))
                    continue
                prompts.append(p)
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            problems.append(f"{path}: cannot read: {e.strerror}")
            continue
        except UnicodeDecodeError as e:
            problems.append(f"{path}: invalid UTF-8 at byte offset {e.start}")
            continue
        prompts.extend(line.strip() for line in lines if line.strip())
    if not prompts and not problems:
        problems.append(f"{', '.join(map(str, paths))}: no prompts" if paths else
                        "no prompt file given: choose a .txt (one prompt a line) or .jsonl of prompts")
    if problems:
        raise PromptFileError(problems)
    return prompts


@dataclass
class SampleConfig:
    checkpoint: str                     # SFT (or any) checkpoint, or its run folder
    prompts: list[str]                  # .txt one per line, or .jsonl with "prompt"
    tokenizer: Optional[str] = None     # None: the checkpoint's own
    n_prompts: int = 0                  # 0: all of them
    k: int = 4                          # answers per prompt, 2..9
    max_new_tokens: int = 64            # answer length limit in tokens
    temperature: float = 1.0            # sampling temperature
    top_k: int = 0                      # sample from the k most likely tokens (0: off)
    top_p: float = 0.95                 # nucleus sampling threshold (1: off)
    repetition_penalty: float = 1.0     # above 1 discourages repeats (1: off)
    batch_size: int = 16                # answers generated together
    seed: int = 0                       # random seed: each answer's own seed derives from it
    device: str = "auto"                # auto | cpu | cuda | cuda:N | mps

    def validate(self) -> None:
        require(bool(self.checkpoint.strip()), "checkpoint", "a checkpoint or run folder is required")
        require(len(self.prompts) > 0, "prompts", "at least one prompt file is required")
        require(2 <= self.k <= 9, "k", "answers per prompt must be between 2 and 9")
        require(self.n_prompts >= 0, "n_prompts", "must be zero (all) or positive")
        require(self.max_new_tokens > 0, "max_new_tokens", "must be a positive integer")
        require(self.temperature > 0, "temperature", "must be positive: K greedy answers would all be the same")
        require(self.top_k >= 0, "top_k", "must be zero (off) or positive")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(self.repetition_penalty > 0, "repetition_penalty", "must be positive (1 = off)")
        require(self.batch_size > 0, "batch_size", "must be a positive integer")


# Settings a resumed run may change: they do not change an answer (each has its own seed), or
# are compared by what they resolve to (the checkpoint folder, the tokenizer's fingerprint, the
# prompts' texts) rather than as written.
RESUME_FREE = ("batch_size", "device", "checkpoint", "tokenizer", "prompts")


def _digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()


# The setting each of the provenance's own entries comes from.
PROVENANCE_FIELDS = {"checkpoint": "checkpoint", "step": "checkpoint", "stage": "checkpoint",
                     "tokenizer_fingerprint": "tokenizer", "prompts_sha256": "prompts"}


def _resume_conflicts(old: dict, new: dict) -> list[tuple[str, str]]:
    """(setting, what changed) for each difference between a run folder's provenance and this
    start's: ("temperature", "temperature: 1.0 -> 0.5")."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key == "settings":
            was, now = old.get(key) or {}, new[key]
            out += [(k, f"{k}: {was.get(k)!r} -> {now.get(k)!r}") for k in sorted(set(was) | set(now))
                    if k not in RESUME_FREE and k not in new and was.get(k) != now.get(k)]
        elif key == "prompts_sha256" and key not in old:
            continue        # written before the prompts' texts were recorded
        elif old.get(key) != new.get(key):
            what = ("the prompts' texts" if key == "prompts_sha256"
                    else f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
            out.append((PROVENANCE_FIELDS.get(key, key), what))
    return out


def answer_seed(seed: int, prompt_index: int, j: int) -> int:
    return (seed * 1_000_003 + prompt_index * 16 + j) % (2 ** 63)


def _done_prompts(path: Path) -> int:
    """Prompts already written; a torn last line (the job was killed mid-write) is cut off."""
    if not path.exists():
        return 0
    raw = path.read_bytes()
    keep = raw[:raw.rfind(b"\n") + 1]
    if len(keep) != len(raw):
        path.write_bytes(keep)
    return keep.count(b"\n")


def preflight(cfg: SampleConfig, run_dir: Path) -> None:
    """What would end a run of `cfg` at once, found without loading a model (see engine.sft):
    its settings against those a run folder's answers were sampled with, too."""
    peek_artifact(resolve_path(run_dir, cfg.checkpoint), field="checkpoint", prefer="latest", kind="lm")
    try:
        was = json.loads((Path(run_dir) / "provenance.json").read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return          # a new run, or one the run itself will say is broken
    # n_prompts is compared by the prompts it takes (0: all), which needs the prompts read.
    now = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "n_prompts"}
    was = {k: v for k, v in was.items() if k != "n_prompts"}
    _refuse_conflicts(_resume_conflicts({"settings": was}, {"settings": now}))


def _refuse_conflicts(changed: list[tuple[str, str]]) -> None:
    if changed:
        detail = "; ".join(what for _, what in changed)
        raise ConfigError(changed[0][0], f"cannot change on resume ({detail}): the run's answers "
                                         "would mix two kinds; set it back to resume, or start a new run")


def run(cfg: SampleConfig, run_dir: Path, sink: Optional[Sink] = None, control=None) -> str:
    ev = Emitter(sink)
    control = control or NeverStop()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    prompts = read_prompts([resolve_path(run_dir, p) for p in cfg.prompts])
    if cfg.n_prompts:
        prompts = prompts[:cfg.n_prompts]
    tok_arg = str(resolve_path(run_dir, cfg.tokenizer)) if cfg.tokenizer else None
    loaded = load_artifact(resolve_path(run_dir, cfg.checkpoint), tokenizer=tok_arg, device=device,
                           field="checkpoint", prefer="latest", kind="lm")
    model, tok = loaded.model, loaded.tokenizer

    provenance = {"checkpoint": str(loaded.checkpoint), "step": loaded.state.get("step"),
                  "stage": loaded.state.get("stage"), "tokenizer_fingerprint": tok.fingerprint(),
                  "settings": dataclasses.asdict(cfg), "seed": cfg.seed, "k": cfg.k,
                  "n_prompts": len(prompts), "prompts_sha256": _digest(prompts)}
    prov_path = run_dir / "provenance.json"
    if prov_path.exists():
        _refuse_conflicts(_resume_conflicts(json.loads(prov_path.read_text()), provenance))
    atomic_write_text(prov_path, json.dumps(provenance, indent=2) + "\n")

    out_path = run_dir / OUT
    start = _done_prompts(out_path)
    if start:
        ev.log(f"resuming after {start} prompt(s) already sampled")
    ev.log(f"sampling {cfg.k} answers to each of {len(prompts)} prompts from {loaded.checkpoint} "
           f"on {describe(device)}")
    per_batch = max(1, cfg.batch_size // cfg.k)   # whole prompts per batch, so lines stay whole
    stops = set(tok.stop_ids)       # where a chat reply ends (engine.chat.reply_batch says why)
    t0 = time.perf_counter()
    n_tokens = 0
    with open(out_path, "a", encoding="utf-8") as f:
        for lo in range(start, len(prompts), per_batch):
            if control.should_stop():
                ev.log(f"stopped after {lo} of {len(prompts)} prompts; run again to continue")
                return "stopped"
            idx = list(range(lo, min(lo + per_batch, len(prompts))))
            rendered = [tok.render_chat([{"role": "user", "content": prompts[i]}], add_generation_prompt=True)[0]
                        for i in idx]
            batch = [ids for ids in rendered for _ in range(cfg.k)]
            seeds = [answer_seed(cfg.seed, i, j) for i in idx for j in range(cfg.k)]
            outs = generate_batch(model, batch, cfg.max_new_tokens, temperature=cfg.temperature,
                                  top_k=cfg.top_k, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
                                  seed=seeds, stop_ids=stops, pad_id=tok.pad_id)
            for n, i in enumerate(idx):
                answers = []
                for j in range(cfg.k):
                    out = outs[n * cfg.k + j]
                    n_tokens += len(out)
                    finished = bool(out) and out[-1] in stops
                    answers.append({"text": tok.decode(out[:-1] if finished else out, skip_special=True),
                                    "n_tokens": len(out), "finished": finished, "seed": seeds[n * cfg.k + j]})
                f.write(json.dumps({"prompt": prompts[i], "prompt_index": i, "answers": answers},
                                   ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            done = idx[-1] + 1
            elapsed = time.perf_counter() - t0
            rate = (done - start) / max(elapsed, 1e-9)
            ev.progress(done, len(prompts), round(n_tokens / max(elapsed, 1e-9), 1), elapsed,
                        (len(prompts) - done) / rate if rate else None, unit="prompts")
    rows = [json.loads(line) for line in out_path.read_text(encoding="utf-8").splitlines()]
    answers = [a for r in rows for a in r["answers"]]
    summary = {"stage": "sample", "prompts": len(rows), "answers": len(answers),
               "finished_fraction": sum(a["finished"] for a in answers) / len(answers),
               "mean_tokens": sum(a["n_tokens"] for a in answers) / len(answers)}
    ev.metrics(len(rows), {"sample/finished_fraction": summary["finished_fraction"],
                           "sample/mean_tokens": summary["mean_tokens"]})
    write_summary(run_dir, summary)
    return "completed"


def main(argv: list[str] | None = None) -> int:
    return stage_main("sample", SampleConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
