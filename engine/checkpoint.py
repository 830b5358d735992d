"""Checkpoints that are either complete or absent, and never need pickle.

Layout: `DIR/checkpoints/step-NNNNNN/` holding
    model.safetensors      the weights (engine.model writes the model config into its metadata)
    optimizer.safetensors  every tensor of the optimizer state, keyed "state.<param>.<name>"
    optimizer.json         the rest of the optimizer state: param groups and non-tensor values
    rng.safetensors        RNG states (torch, the data generator, CUDA) as uint8 tensors
    state.json             step, data position, metrics such as val_loss, the config
and anything else the stage adds (the tokenizer, so a checkpoint folder stands on its own).

A save goes to `checkpoints/.tmp-step-NNNNNN-<pid>/`, every file is fsynced, then the folder
is renamed into place and its parent fsynced: a `step-*` folder that exists is complete.
Leftover `.tmp-*` folders from a killed save are removed by `clean_partial` on the next start.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from engine.fsutil import fsync_dir, fsync_tree

STEP_RE = re.compile(r"^step-(\d{6,})$")


@dataclass
class Checkpoint:
    path: Path
    state: dict
    model: dict[str, torch.Tensor]
    optimizer: Optional[dict] = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.state["step"])


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def optimizer_to_files(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (safetensors) and plain values (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict] = {}
    for pid, entries in opt_state["state"].items():
        plain = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[name] = value
        plain_state[str(pid)] = plain
    meta = {"param_groups": opt_state["param_groups"], "plain_state": plain_state}
    return tensors, meta


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(pid): dict(plain) for pid, plain in meta["plain_state"].items()}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _all_finite(tensors: dict[str, torch.Tensor]) -> Optional[str]:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def save_checkpoint(root: Path, step: int, *, model: dict[str, torch.Tensor],
                    state: dict[str, Any], optimizer: Optional[dict] = None,
                    rng: Optional[dict[str, torch.Tensor]] = None,
                    model_metadata: Optional[dict[str, str]] = None,
                    extra_files: Optional[dict[str, Path]] = None) -> Path:
    """Write a checkpoint atomically and return its folder.

    Refuses (ValueError) weights with NaN or inf: a checkpoint must always be safe to resume.
    """
    bad = _all_finite(model)
    if bad is not None:
        raise ValueError(f"refusing to save a checkpoint at step {step}: '{bad}' has non-finite values")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata=model_metadata)
    if optimizer is not None:
        tensors, meta = optimizer_to_files(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
    if rng:
        save_file({k: v.detach().cpu().contiguous() for k, v in rng.items()},
                  str(tmp / "rng.safetensors"))
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    fsync_tree(tmp)
    if final.exists():
        # Same step saved again (a resume stopped at once): swap, never leave a gap.
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    return final


def load_checkpoint(path: Path, *, with_optimizer: bool = True) -> Checkpoint:
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    model = load_file(str(path / "model.safetensors"))
    opt = None
    if with_optimizer and (path / "optimizer.json").exists():
        meta = json.loads((path / "optimizer.json").read_text())
        opt = optimizer_from_files(load_file(str(path / "optimizer.safetensors")), meta)
    rng = load_file(str(path / "rng.safetensors")) if (path / "rng.safetensors").exists() else {}
    return Checkpoint(path=path, state=state, model=model, optimizer=opt, rng=rng)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def best_checkpoint(root: Path, metric: str = "val_loss") -> Optional[Path]:
    """The checkpoint with the lowest `metric` in its state.json (ties: the later one)."""
    best, best_value = None, None
    for _step, p in list_checkpoints(root):
        value = read_state(p).get(metric)
        if isinstance(value, (int, float)) and (best_value is None or value <= best_value):
            best, best_value = p, value
    return best


def clean_partial(root: Path) -> list[Path]:
    """Remove leftovers of saves that were killed half-way; returns what was removed."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.startswith(".old-"):
                # A re-save of the same step was killed between its two renames: the old folder
                # is complete and its step has no other copy, so it goes back into place.
                name = p.name[len(".old-"):].rsplit("-", 1)[0]
                if STEP_RE.match(name) and not (root / name).exists() and p.is_dir():
                    os.replace(p, root / name)
                    continue
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def prune(root: Path, keep_last: int, metric: str = "val_loss") -> list[Path]:
    """Keep the newest `keep_last` checkpoints and the best by `metric`; delete the rest."""
    found = list_checkpoints(root)
    keep = {p for _s, p in found[-keep_last:]} if keep_last > 0 else set()
    best = best_checkpoint(root, metric)
    if best is not None:
        keep.add(best)
    removed = []
    for _s, p in found:
        if p not in keep:
            # Rename first so a crash mid-delete never leaves a partial step-* folder behind.
            doomed = p.with_name(f".old-{p.name}-{os.getpid()}")
            os.replace(p, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(p)
    return removed


def resolve_checkpoint(path: str | os.PathLike, prefer: str = "best") -> Path:
    """A checkpoint folder from a checkpoint folder, a run folder or its checkpoints/ folder."""
    p = Path(path)
    if (p / "model.safetensors").exists():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    chosen = best_checkpoint(root) if prefer == "best" else None
    chosen = chosen or latest_checkpoint(root)
    if chosen is None:
        raise FileNotFoundError(f"no checkpoint found in {p}")
    return chosen
