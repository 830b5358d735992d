"""Checkpoints that are either complete or absent, and never need pickle.

Layout: `DIR/checkpoints/step-NNNNNN/` holding
    model.safetensors      the weights (engine.model writes the model config into its metadata)
    optimizer.safetensors  every tensor of the optimizer state, keyed "state.<param>.<name>"
    optimizer.json         the rest of the optimizer state: param groups and non-tensor values
    rng.safetensors        RNG states (torch, the data generator, CUDA) as uint8 tensors
    state.json             step, data position, metrics such as val_loss, the config
    manifest.json          every other file and its size: the completeness marker, written last
and anything else the stage adds (the tokenizer, so a checkpoint folder stands on its own).

A save goes to `checkpoints/.tmp-step-NNNNNN-<pid>/`; every file is fsynced, the manifest is
written and fsynced last, then the folder is renamed into place. A prune removes the manifest
first. So a `step-*` folder is a checkpoint only while its manifest is there, whatever moment a
kill lands, and every reader here (`list_checkpoints` and all built on it) skips one without.
Folders saved before manifests existed still count when their state.json parses and their
weights are there (a save by this code names its format in state.json, so one of those that
lost its manifest is half-deleted, never "old").

Every file is read through `read_json` / `load_tensors`, which turn any way a file can be
broken into one `CheckpointError` line naming the file and what is wrong.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from engine.fsutil import DiskFull, atomic_write_text, fault_point, fsync_dir, fsync_tree, is_disk_full
from engine.runio import StageError

STEP_RE = re.compile(r"^step-(\d{6,})$")
MANIFEST = "manifest.json"
FORMAT = 2          # state.json's "checkpoint_format"; absent in checkpoints without a manifest


class CheckpointError(StageError, ValueError):
    """A checkpoint or model file that cannot be used. Found before any work, so the stage is
    refused (exit code 2) as for a bad setting. A ValueError too, as the loaders raised before."""
    exit_code = 2


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

    def field(self, name: str, kind: type) -> Any:
        """state.json's `name`, or CheckpointError naming the file when it is absent or not a `kind`."""
        value = self.state.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{self.path / 'state.json'}: '{name}' is {value!r}, expected "
                                  f"{'an object' if kind is dict else 'a ' + kind.__name__}")
        return value


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# --- reading files -----------------------------------------------------------------------------

def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                              "truncated or corrupt") from None


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except FileNotFoundError:
        return CheckpointError(f"{path}: missing")
    except OSError as oe:
        return CheckpointError(f"{path}: cannot be read ({oe})")
    if not head:
        return CheckpointError(f"{path}: empty file")
    pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if (pickled or head[:4] == b"PK\x03\x04") and head[8:9] != b"{":
        # A pickle's protocol bytes, or the zip of torch.save (where a safetensors file has its
        # header length, then "{"): unpickling it could run any code.
        return CheckpointError(f"{path}: a pickled (PyTorch .pt/.bin) file renamed to .safetensors; "
                               "it is not loaded, since unpickling can run code")
    detail = str(e).removeprefix("Error while deserializing header: ")
    return CheckpointError(f"{path}: not a valid safetensors file ({detail}): truncated or corrupt")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's metadata, reading only its header."""
    path = Path(path)
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        tensors = load_file(os.fspath(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None
    # A tensor read from the file sits at the header's length mod 64, and the CPU kernels pick
    # their vector path (so the last bit of a sum) by alignment: without the copy, a longer
    # config in the metadata would change a reloaded model's outputs.
    for k, v in tensors.items():
        if v.device.type == "cpu" and v.data_ptr() % 64:
            tensors[k] = v.clone()
    return tensors


def check_manifest(path: Path) -> None:
    """Every file the save wrote is there with the size it had: truncation caught before parsing."""
    manifest = read_json(path / MANIFEST) if (path / MANIFEST).exists() else None
    if manifest is None:
        return
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{path / MANIFEST}: no file list: corrupt")
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (the checkpoint's {MANIFEST} lists it)")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, but {size} were saved: truncated or "
                                  "overwritten since")


# --- writing -----------------------------------------------------------------------------------

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


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict, path: Optional[Path] = None) -> dict:
    try:
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
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        where = path or "the optimizer state"
        raise CheckpointError(f"{where}: not an optimizer state this program wrote "
                              f"({type(e).__name__}: {e})") from None
    return {"state": state, "param_groups": groups}


def restore_optimizer(opt: torch.optim.Optimizer, state: dict, path: Path) -> None:
    """Load a saved optimizer state into `opt`, or CheckpointError naming `path` if it was not
    saved from an optimizer over parameters of these shapes (torch accepts moments of another
    shape and fails only at the next step, in the middle of the run)."""
    if bad := _non_finite_moment(state):
        # A run never saves one (its guard stops first): the file was altered since, and the
        # first step would blame the model's weights.
        raise CheckpointError(f"{path}: {bad} holds NaN or infinite values: the file was altered since it was saved")
    try:
        saved_groups = state["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in opt.param_groups]:
            raise ValueError(f"parameter groups of sizes {[len(g['params']) for g in saved_groups]}, "
                             f"this model's optimizer has {[len(g['params']) for g in opt.param_groups]}")
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in opt.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for name, v in state["state"].get(i, {}).items():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                    raise ValueError(f"'{name}' of parameter {i} has shape {list(v.shape)}, the parameter "
                                     f"{list(p.shape)}")
        opt.load_state_dict(state)
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: does not fit this model's optimizer ({detail})") from None


def _non_finite_moment(state: dict) -> Optional[str]:
    """Which saved moment holds NaN or inf ("'exp_avg' of parameter 3"), if one does."""
    for i, moments in state.get("state", {}).items():
        for name, v in moments.items():
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return f"'{name}' of parameter {i}"
    return None


def _all_finite(tensors: dict[str, torch.Tensor]) -> Optional[str]:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _write_json(path: Path, data: Any, **kw) -> None:
    path.write_text(json.dumps(data, **kw))


def _write_files(tmp: Path, step: int, model, state, optimizer, rng, model_metadata, extra_files) -> None:
    weights = {k: v.detach().cpu().contiguous() for k, v in model.items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata=model_metadata)
    fault_point("save:model-written")
    if optimizer is not None:
        tensors, meta = optimizer_to_files(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", meta)
    if rng:
        save_file({k: v.detach().cpu().contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
    _write_json(tmp / "state.json", {"step": step, **state, "checkpoint_format": FORMAT}, indent=2)
    fault_point("save:files-written")
    fsync_tree(tmp)
    fault_point("save:fsynced")
    # The marker, last: a folder holding it holds everything it lists, already on disk.
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    # Atomic: a kill inside the write must leave no manifest at all, never a torn one that a
    # resume would take for the marker.
    atomic_write_text(tmp / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1),
                      fault="save:manifest-opened")
    fault_point("save:manifest-written")


def save_checkpoint(root: Path, step: int, *, model: dict[str, torch.Tensor],
                    state: dict[str, Any], optimizer: Optional[dict] = None,
                    rng: Optional[dict[str, torch.Tensor]] = None,
                    model_metadata: Optional[dict[str, str]] = None,
                    extra_files: Optional[dict[str, Path]] = None) -> Path:
    """Write a checkpoint atomically and return its folder.

    Refuses (ValueError) weights with NaN or inf: a checkpoint must always be safe to resume.
    A full disk raises DiskFull after removing the half-written folder that holds the space.
    """
    bad = _all_finite(model)
    if bad is not None:
        raise ValueError(f"refusing to save a checkpoint at step {step}: '{bad}' has non-finite values")
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_files(tmp, step, model, state, optimizer, rng, model_metadata, extra_files)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise DiskFull(root) from None
        raise
    if final.exists():
        # Same step saved again (a resume stopped at once): swap, never leave a gap.
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        fault_point("save:old-moved-aside")
        os.replace(tmp, final)
        remove_folder(old)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    fault_point("save:renamed")
    return final


# --- finding and loading -----------------------------------------------------------------------

def is_complete(path: Path) -> bool:
    """Does this folder hold a whole checkpoint (see the module's docstring)?"""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return True
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(state, dict) and "checkpoint_format" not in state
            and (path / "model.safetensors").is_file())


def _check_state(path: Path, state: Any) -> dict:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / 'state.json'}: expected a JSON object, got {type(state).__name__}")
    m = STEP_RE.match(path.name)
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise CheckpointError(f"{path / 'state.json'}: 'step' is {step!r}, not a step number")
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"{path / 'state.json'}: says step {step}, but the folder is {path.name}")
    return state


def load_checkpoint(path: Path, *, with_optimizer: bool = True) -> Checkpoint:
    """Everything a resume needs, with every file of the folder checked first: the sizes the
    save wrote, each JSON file parsed and each safetensors header read (files a stage loads
    itself, such as PPO's value model, included), so a broken file stops the resume here."""
    path = Path(path)
    for f in sorted(path.iterdir()):    # first, so that the message says how a file is broken
        if f.suffix == ".json":
            read_json(f)
        elif f.suffix == ".safetensors":
            read_metadata(f)
    check_manifest(path)
    state = _check_state(path, read_json(path / "state.json"))
    model = load_tensors(path / "model.safetensors")
    opt = None
    if with_optimizer and (path / "optimizer.json").exists():
        meta = read_json(path / "optimizer.json")
        opt = optimizer_from_files(load_tensors(path / "optimizer.safetensors"), meta, path / "optimizer.json")
    rng = load_tensors(path / "rng.safetensors") if (path / "rng.safetensors").exists() else {}
    return Checkpoint(path=path, state=state, model=model, optimizer=opt, rng=rng)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def read_state(path: Path) -> dict:
    return _check_state(Path(path), read_json(Path(path) / "state.json"))


def best_checkpoint(root: Path, metric: str = "val_loss") -> Optional[Path]:
    """The checkpoint with the lowest `metric` in its state.json (ties: the later one)."""
    best, best_value = None, None
    for _step, p in list_checkpoints(root):
        value = read_state(p).get(metric)
        if isinstance(value, (int, float)) and (best_value is None or value <= best_value):
            best, best_value = p, value
    return best


def resolve_checkpoint(path: str | os.PathLike, prefer: str = "best") -> Path:
    """A checkpoint folder from a checkpoint folder, a run folder or its checkpoints/ folder."""
    p = Path(path)
    if (p / "model.safetensors").exists():
        if STEP_RE.match(p.name) and not is_complete(p):
            raise CheckpointError(f"{p}: not a complete checkpoint (no {MANIFEST}): its save or its "
                                  "deletion was interrupted")
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    chosen = best_checkpoint(root) if prefer == "best" else None
    chosen = chosen or latest_checkpoint(root)
    if chosen is None:
        raise FileNotFoundError(f"no checkpoint found in {p}")
    return chosen


# --- removing ----------------------------------------------------------------------------------

def remove_folder(path: Path) -> None:
    """Delete a checkpoint-like folder so that no moment of the deletion looks complete: the
    manifest goes first, the folder then leaves the step-* names, then state.json (which is what
    makes an old, manifest-less checkpoint count), then the rest."""
    path = Path(path)
    try:
        if (path / MANIFEST).exists():
            (path / MANIFEST).unlink()
            fsync_dir(path)
        fault_point("prune:manifest-removed")
        if not path.name.startswith(".old-"):
            doomed = path.with_name(f".old-{path.name}-{os.getpid()}")
            os.replace(path, doomed)
            path = doomed
        fault_point("prune:renamed")
        (path / "state.json").unlink(missing_ok=True)
        for f in sorted(path.iterdir()):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
            fault_point("prune:file-removed")
        path.rmdir()
    except OSError:
        pass    # what is left is incomplete, and clean_partial removes it on the next start


def clean_partial(root: Path) -> list[Path]:
    """Tidy what killed saves and prunes left; returns what was removed.

    A leftover that is complete (it holds its manifest) and whose step has no checkpoint goes
    into place instead: a save killed after its manifest, or a re-save of the same step killed
    between its two renames, loses nothing.
    """
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for p in sorted(root.iterdir()):
        if p.name.startswith((".tmp-", ".old-")):
            name = p.name.split("-", 1)[1].rsplit("-", 1)[0]
            if STEP_RE.match(name) and p.is_dir() and _manifest_holds(p) and not (root / name).exists():
                os.replace(p, root / name)
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
        elif STEP_RE.match(p.name) and p.is_dir() and not is_complete(p) and _saved_by_this_format(p):
            remove_folder(p)     # a prune killed after the manifest went, before the rename
            removed.append(p)
    if removed:
        fsync_dir(root)
    return removed


def _manifest_holds(path: Path) -> bool:
    """A leftover goes into place only when its manifest parses and every file it lists is whole."""
    if not (path / MANIFEST).is_file():
        return False
    try:
        check_manifest(path)
    except CheckpointError:
        return False
    return True


def _saved_by_this_format(path: Path) -> bool:
    try:
        return "checkpoint_format" in json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def prune(root: Path, keep_last: int, metric: str = "val_loss") -> list[Path]:
    """Keep the newest `keep_last` checkpoints (at least the newest: the run resumes from it) and
    the best by `metric`; delete the rest."""
    found = list_checkpoints(root)
    keep = {p for _s, p in found[-max(keep_last, 1):]}
    best = best_checkpoint(root, metric)
    if best is not None:
        keep.add(best)
    removed = []
    for _s, p in found:
        if p not in keep:
            remove_folder(p)
            removed.append(p)
    return removed
