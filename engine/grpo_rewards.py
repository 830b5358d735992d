"""GRPO's reward functions: each scores every answer of a step, and the reward is their weighted sum.

    task    the demo's task checker (engine/tasks.py): 1 for an answer `check` accepts to a
            prompt that parses as a task, else 0 (a prompt that is no task always gets 0)
    rm      a trained reward model's score, normalised with the statistics the reward stage
            saved (reward_norm.json) and clipped, as PPO scores
    length  -max(0, answer tokens - target) / max_new_tokens: in [-1, 0], 0 up to the target
    format  1 if the answer ended with the end token and its stripped text matches a regex
    user    your own Python function, `path/to/file.py:function`, called as
            function(prompt, answer) -> float for every answer

The user's function is the user's own code, imported and run inside the stage process, with the
stage's permissions: as trusted as running the file with python. It is loaded before any work,
so a missing file or function is refused at once; a call that raises, or returns something that
is not a finite number, stops the run with one line naming the function and the prompt.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import math
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from engine.config import ConfigError
from engine.device import autocast
from engine.model import ScalarModel
from engine.ppo_core import chunks, last_action_index
from engine.ragged import scores_at_ends
from engine.runio import StageError
from engine.tasks import Task, check, parse_task


@dataclass
class Answers:
    """One step's answers, as every reward function sees them (row i answers prompts[i])."""
    prompts: list[str]
    texts: list[str]           # decoded, without the end token
    finished: list[bool]       # ended with the end token
    lengths: list[int]         # answer tokens, the end token included
    ids: torch.Tensor          # [N, T] prompt | answer | pad, for the reward model
    mask: torch.Tensor         # [N, T] 1 on answer tokens


class TaskReward:
    name, key = "task", "reward/task"      # key: its metric (mean; key + "_std" its std)

    def __init__(self, weight: float):
        self.weight = weight
        self._tasks: dict[str, Optional[Task]] = {}

    def task(self, prompt: str) -> Optional[Task]:
        if prompt not in self._tasks:        # parsing tries every template: once per prompt
            self._tasks[prompt] = parse_task(prompt)
        return self._tasks[prompt]

    def judged(self, prompts: list[str]) -> torch.Tensor:
        """[N] bool: the rows whose prompt is a task the checker can score."""
        return torch.tensor([self.task(p) is not None for p in prompts], dtype=torch.bool)

    def __call__(self, a: Answers) -> torch.Tensor:
        return torch.tensor([float(t is not None and check(t, text))
                             for t, text in ((self.task(p), x) for p, x in zip(a.prompts, a.texts))])


class RewardModelReward:
    name, key = "rm", "reward/rm"

    def __init__(self, weight: float, model: ScalarModel, norm: dict, clip: float, batch: int,
                 device: torch.device, dtype: torch.dtype):
        self.weight, self.model, self.norm, self.clip = weight, model, norm, clip
        self.batch, self.device, self.dtype = batch, device, dtype

    @torch.no_grad()
    def __call__(self, a: Answers) -> torch.Tensor:
        ids, mask = a.ids.to(self.device), a.mask.to(self.device)
        last = last_action_index(mask)
        raw = torch.zeros(ids.size(0), device=self.device)
        with autocast(self.device, self.dtype):
            for c in chunks(torch.arange(ids.size(0), device=self.device), self.batch):
                raw[c] = scores_at_ends(self.model, ids[c], last[c])
        scores = (raw - self.norm["mean"]) / self.norm["std"]
        return scores.clamp(-self.clip, self.clip).cpu()


class LengthReward:
    name, key = "length", "reward/length"

    def __init__(self, weight: float, target: int, max_new_tokens: int):
        self.weight, self.target, self.scale = weight, target, max_new_tokens

    def __call__(self, a: Answers) -> torch.Tensor:
        return torch.tensor([-max(0, n - self.target) / self.scale for n in a.lengths], dtype=torch.float)


class FormatReward:
    name, key = "format", "reward/format"

    def __init__(self, weight: float, regex: str):
        self.weight = weight
        self.regex = re.compile(regex, re.DOTALL) if regex else None

    def __call__(self, a: Answers) -> torch.Tensor:
        return torch.tensor([float(fin and (self.regex is None or self.regex.fullmatch(t.strip()) is not None))
                             for t, fin in zip(a.texts, a.finished)])


class UserReward:
    name, key = "user", "reward/user"

    def __init__(self, weight: float, spec: str, fn: Callable, path: Path):
        self.weight, self.spec, self.fn, self.path = weight, spec, fn, path

    def __call__(self, a: Answers) -> torch.Tensor:
        return torch.tensor([self._one(p, t) for p, t in zip(a.prompts, a.texts)], dtype=torch.float)

    def _one(self, prompt: str, answer: str) -> float:
        try:
            v = self.fn(prompt, answer)
        except Exception as e:  # noqa: BLE001 - whatever the user's code raises is reported, not crashed on
            raise StageError(f"user_reward {self.spec} raised {type(e).__name__}: {_one_line(str(e))}"
                             f"{self._where(e)} on the prompt {_clip(prompt)} (answer {_clip(answer)})") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise StageError(f"user_reward {self.spec} returned {repr(v)[:80]}, not a finite number, "
                             f"on the prompt {_clip(prompt)} (answer {_clip(answer)})")
        return float(v)

    def _where(self, e: BaseException) -> str:
        """' at file.py:LINE', the last line of the user's file the error passed through."""
        # Resolved: the run folder may be named relative to where the stage was started.
        mine = self.path.resolve()
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == mine]
        return f" at {self.path.name}:{frames[-1].lineno}" if frames else ""

    def fingerprint(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def _clip(text: str, n: int = 120) -> str:
    """The text quoted on one line (repr escapes newlines), cut to about n characters."""
    r = repr(text)
    return r if len(r) <= n else r[:n - 4] + "...'"


def parse_user_spec(spec: str) -> tuple[str, str]:
    """'path/to/file.py:function' -> (path, function); ConfigError on 'user_reward' otherwise.
    The last ':' splits, so a Windows drive letter ('C:/x.py:f') stays in the path."""
    path, sep, name = spec.strip().rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise ConfigError("user_reward", f"expected 'path/to/file.py:function', got {spec!r}")
    return path, name


def _missing(path: Path, given: str) -> ConfigError:
    where = "" if Path(given).expanduser().is_absolute() else (
        " (a relative path is read from the run's folder, as every path of a run's config is: "
        "give the file's full path)")
    return ConfigError("user_reward", f"{path}: no such file{where}")


def _top_level_names(tree: ast.Module) -> set[str] | None:
    """The names a module binds at its top level, as far as reading it tells; None where it
    cannot tell (`from x import *`, or it writes globals() or uses __getattr__)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" for a in node.names):
                return None
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        else:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    names.add(sub.id)
    if "__getattr__" in names or any(isinstance(n, ast.Name) and n.id == "globals"
                                     for n in ast.walk(tree)):
        return None
    return names


def check_user_file(spec: str) -> None:
    """What can be told of the user's file without running it, before a run is made: it is
    there, it parses, and it defines the function. Only an absolute path: a relative one is
    read from the run's folder, which does not exist yet (load_user_function checks it)."""
    given, name = parse_user_spec(spec)
    path = Path(given).expanduser()
    if not path.is_absolute():
        return
    if not path.is_file():
        raise _missing(path, given)
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as e:
        raise ConfigError("user_reward", f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except (OSError, ValueError) as e:
        raise ConfigError("user_reward", f"{path}: cannot read it: {e}") from None
    names = _top_level_names(tree)
    if names is not None and name not in names:
        raise ConfigError("user_reward", f"{path} defines no function {name!r}")


def load_user_function(spec: str, path: Path) -> Callable:
    """Import the user's file (it runs, as `python file.py` would run its top level) and return
    its function; every way it can be wrong is a ConfigError naming the file, before any work."""
    given, name = parse_user_spec(spec)
    if not path.is_file():
        raise _missing(path, given)
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=6).hexdigest()
    module_spec = importlib.util.spec_from_file_location(f"workbench_user_reward_{digest}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError("user_reward", f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - the user's module may raise anything on import
        raise ConfigError("user_reward", f"{path}: importing it raised {type(e).__name__}: "
                                         f"{_one_line(str(e))}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError("user_reward", f"{path} defines no function {name!r}")
    try:
        inspect.signature(fn).bind("prompt", "answer")
    except TypeError:
        raise ConfigError("user_reward", f"{name} in {path} must take two arguments: (prompt, answer)") from None
    except ValueError:
        pass                # a builtin without a signature: its first call will tell
    return fn


def weighted_total(fns: list, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ weight · score over the reward functions, in their order (fixed, so sums are exact
    across runs)."""
    total = torch.zeros_like(next(iter(scores.values())))
    for fn in fns:
        total = total + fn.weight * scores[fn.name]
    return total


def score_all(fns: list, a: Answers) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every function's scores [N] and their weighted total."""
    scores = {fn.name: fn(a).float() for fn in fns}
    return scores, weighted_total(fns, scores)
