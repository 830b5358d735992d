"""Data-parallel training under torchrun: one process per GPU (or per CPU share, with gloo).

    torchrun --standalone --nproc_per_node N -m engine.pretrain --run-dir DIR

Every rank draws the same stream of micro-batches from the same seeded generator and trains on
every N-th one, so a step sees the micro-batches a single process with N times the gradient
accumulation would see, in the same order: the run is the same run at any world size, and
resume is exact. Rank 0 alone writes events, checkpoints and summaries; every rank reads the
checkpoint it resumes from. A rank that dies breaks the next collective on the others, which
then fail rather than hang.

The state lives here, as it does in torch.distributed itself: stages ask `current()` instead
of threading a handle through every function.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from engine.config import ConfigError

# A dead peer closes its sockets and the next collective fails at once; this only bounds a
# peer that hangs (or rank 0 encoding a large corpus while the others wait for it).
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> World:
    """The world torchrun describes in the environment (a lone process is a world of one)."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        return World()


_world = World()


def current() -> World:
    return _world


def is_main() -> bool:
    return _world.is_main


def start(nproc: int | None, device_name: str) -> World:
    """Join the process group torchrun set up; check it has the `nproc` ranks the config asks for.

    `nproc` None: the stage has no data-parallel mode and must run alone.
    """
    global _world
    world = from_env()
    if nproc is None:
        if world.enabled:
            raise ConfigError("nproc", f"this stage runs in a single process, but it was started as one "
                                       f"of {world.size}: start it without torchrun")
        return world
    if world.size != nproc:
        how = (f"start it with `torchrun --standalone --nproc_per_node {nproc} -m engine.<stage> "
               f"--run-dir DIR` (or `workbench run`, which does)" if nproc > 1 else
               "set nproc to the number of processes torchrun starts")
        raise ConfigError("nproc", f"is {nproc}, but this process is one of {world.size}: {how}")
    if world.enabled and not tdist.is_initialized():
        use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(world.local_rank)
        tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    _world = world
    return world


def stop(clean: bool) -> None:
    """Leave the process group. After a clean end the ranks first meet: one tearing its gloo
    connections down while a peer is still saving a checkpoint aborted it now and then."""
    global _world
    if tdist.is_initialized():
        if clean:
            tdist.barrier()
        tdist.destroy_process_group()
    _world = World()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model every rank trains through: DDP when there are several, else the model itself."""
    if not _world.enabled:
        return model
    ids = [device.index if device.index is not None else _world.local_rank] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def no_sync(model: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce on all but a step's last micro-batch (DDP's own shortcut)."""
    if skip and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks, in float64 (token counts stay exact)."""
    if not _world.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    tdist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a stop request reaching one rank stops all)."""
    if not _world.enabled:
        return flag
    return all_sum([1.0 if flag else 0.0])[0] > 0


def from_main(flag: bool) -> bool:
    """Rank 0's value of `flag`, on every rank."""
    if not _world.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_collective_device())
    tdist.broadcast(t, 0)
    return bool(t.item())


def barrier() -> None:
    if _world.enabled:
        tdist.barrier()


def max_divergence(model: torch.nn.Module) -> float:
    """The largest difference between this rank's parameters and rank 0's, over all ranks."""
    if not _world.enabled:
        return 0.0
    worst = 0.0
    for p in model.parameters():
        ref = p.detach().clone()
        tdist.broadcast(ref, 0)
        worst = max(worst, float((p.detach() - ref).abs().max()))
    t = torch.tensor([worst], dtype=torch.float64, device=_collective_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())


def _collective_device() -> torch.device:
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
