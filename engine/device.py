"""Device choice, precision and the throughput yardstick for MFU.

The same config runs on CUDA, MPS and CPU; only speed differs. On CUDA we train in bf16
autocast with TF32 matmuls; elsewhere in fp32, because CPU autocast to bf16 is slower than
fp32 on most laptops and MPS bf16 support is uneven.
"""
from __future__ import annotations

import contextlib
import json
import platform
import time

import torch

from engine.config import ConfigError, require

# Dense bf16 tensor-core peaks (FLOP/s) for common GPUs; MFU on others falls back to measuring.
GPU_PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
    "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA was asked for but no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device", "MPS was asked for but is not available")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ConfigError("device", f"unknown device '{name}' (auto, cpu, cuda, cuda:N, mps)")
    return torch.device(name)


TRAIN_DTYPES = ("auto", "float32", "bfloat16")


def check_train_dtype(name: str) -> None:
    """A training stage's dtype setting. float16 is not one: its gradients underflow without
    loss scaling, which the stages do not do (bf16 has float32's range and needs none)."""
    if name == "float16":
        raise ConfigError("dtype", "float16 training needs loss scaling, which the workbench does not do: "
                                   "use bfloat16 (on a GPU that has it) or float32")
    require(name in TRAIN_DTYPES, "dtype", ", ".join(TRAIN_DTYPES[:-1]) + f" or {TRAIN_DTYPES[-1]}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ConfigError("dtype", f"unknown dtype '{name}' (auto, float32, bfloat16, float16)")
    return table[name]


def fused_adamw(device_type: str) -> bool:
    """Whether the trainers use torch's fused AdamW kernel: on CUDA, and on CPU, where it makes
    one pass over each parameter instead of a dozen and allocates no temporaries (several times
    faster a step: docs/PERFORMANCE.md). MPS keeps the default."""
    return device_type in ("cuda", "cpu")


def half_on_cuda(device: torch.device, dtype: torch.dtype) -> bool:
    """Does a run train in `dtype` here? Half precision runs on CUDA only; elsewhere the
    run trains in float32."""
    return dtype != torch.float32 and device.type == "cuda"


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision only where it pays (CUDA); weights and optimizer stay fp32."""
    if not half_on_cuda(device, dtype):
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def precision_warning(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """What a run asked for half precision where `autocast` keeps float32 is told (None if
    nothing): a bf16 run on a CPU must not be taken for one."""
    if dtype != torch.float32 and not half_on_cuda(device, dtype):
        return f"{name} is used on CUDA only; training in float32 on {device.type}"
    return None


def setup_backends(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def setup(device_name: str, dtype_name: str) -> tuple[torch.device, torch.dtype]:
    """The device and precision a stage runs with, backends configured for them."""
    device = resolve_device(device_name)
    from engine.distributed import current
    if device.type == "cuda" and device.index is None and current().enabled:
        # Under torchrun each process trains on its own GPU (torchrun's LOCAL_RANK).
        device = torch.device("cuda", current().local_rank)
    dtype = resolve_dtype(dtype_name, device)
    setup_backends(device)
    return device, dtype


def describe(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The device, and with `dtype` the precision it trains in: half precision asked for off
    CUDA trains in float32 (precision_warning), so the log says float32 there."""
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        where = f"cpu ({torch.get_num_threads()} threads)"
    else:
        where = device.type
    if dtype is None:
        return where
    if half_on_cuda(device, dtype):
        return f"{where}, {str(dtype).removeprefix('torch.')} autocast"
    return f"{where}, float32"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                         n: int = 1024, seconds: float = 0.25) -> float:
    """The machine's achievable dense-matmul FLOP/s, measured here: the MFU denominator on CPU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (thread pools, kernels)
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0:
            _sync(device)
            if time.perf_counter() - t0 >= seconds:
                break
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, how it was found): the datasheet peak on a known GPU, else the matmul ceiling
    measured once for this machine, device, dtype and thread count (cached_ceiling)."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"datasheet bf16 peak of {key}"
    return cached_ceiling(device, dtype)


CEILING_FILE = "matmul_ceiling.json"
CEILING_TRIES = 5


def ceiling_key(device: torch.device, dtype: torch.dtype) -> str:
    what = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    return f"{platform.node()}|{device.type}:{what}|{dtype}|{torch.get_num_threads()} threads"


def machine_busy() -> str | None:
    """Why a CPU ceiling measured now would be too low to cache (None if the machine is idle):
    the load average of the last minute, less this process's own threads, above a third of
    the cores."""
    import os
    import psutil
    cores = os.cpu_count() or 1
    load = psutil.getloadavg()[0]
    if load - 1.0 > cores / 3:
        return f"the machine was busy (load {load:.1f} on {cores} cores)"
    return None


def cached_ceiling(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The achievable matmul FLOP/s, measured the first time (best of CEILING_TRIES, so a
    moment of load elsewhere does not lower it) and then read from the cache: re-measured each
    run it moved with whatever else the machine was doing, and MFU with it."""
    from engine.fsutil import atomic_write_text
    from engine.osproc import cache_dir
    path = cache_dir() / CEILING_FILE
    key = ceiling_key(device, dtype)
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}     # a damaged cache is measured anew
    entry = known.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)):
        return float(entry["flops"]), (f"matmul ceiling measured {entry.get('measured')} "
                                       f"(best of {CEILING_TRIES}), cached in {path}")
    flops = max(measure_matmul_flops(device, dtype, seconds=0.2) for _ in range(CEILING_TRIES))
    busy = machine_busy() if device.type == "cpu" else None
    if busy:
        # Measured while other work held the cores, the figure is too low to keep for good.
        return flops, f"matmul ceiling measured now (best of {CEILING_TRIES}), not cached: {busy}"
    known[key] = {"flops": flops, "measured": time.strftime("%Y-%m-%d %H:%M")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(known, indent=1) + "\n")
        where = f"cached in {path}"
    except OSError as e:
        where = f"not cached: {e.strerror or e}"
    return flops, f"matmul ceiling measured now (best of {CEILING_TRIES}), {where}"


def clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done. CUDA and MPS run asynchronously:
    without the sync, a phase's kernels would be billed to whichever later phase first waits."""
    _sync(device)
    return time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
