"""The MFU ceiling is measured once per machine, device, dtype and thread count, then cached."""
from __future__ import annotations

import json

import torch

from engine import device as D


def test_the_ceiling_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(D, "machine_busy", lambda: None)
    measured = []

    def fake(dev, dtype, n=1024, seconds=0.25):
        measured.append(seconds)
        return 1e9 * len(measured)         # a different figure each try: the best one is kept

    monkeypatch.setattr(D, "measure_matmul_flops", fake)
    cpu = torch.device("cpu")
    flops, how = D.peak_flops(cpu, torch.float32)
    assert flops == 5e9 and len(measured) == D.CEILING_TRIES and "measured now" in how
    again, how = D.peak_flops(cpu, torch.float32)
    assert again == 5e9 and len(measured) == D.CEILING_TRIES and "cached in" in how
    cache = json.loads((tmp_path / D.CEILING_FILE).read_text())
    assert list(cache) == [D.ceiling_key(cpu, torch.float32)]

    torch.set_num_threads(2)               # another thread count is another ceiling
    D.peak_flops(cpu, torch.float32)
    assert len(measured) == 2 * D.CEILING_TRIES and len(json.loads(
        (tmp_path / D.CEILING_FILE).read_text())) == 2


def test_a_damaged_cache_is_measured_anew(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(D, "machine_busy", lambda: None)
    (tmp_path / D.CEILING_FILE).write_text("{not json")
    monkeypatch.setattr(D, "measure_matmul_flops", lambda *a, **k: 3e9)
    assert D.peak_flops(torch.device("cpu"), torch.float32)[0] == 3e9
    assert json.loads((tmp_path / D.CEILING_FILE).read_text())


def test_a_ceiling_measured_on_a_busy_machine_is_used_but_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(D, "measure_matmul_flops", lambda *a, **k: 2e9)
    monkeypatch.setattr(D, "machine_busy", lambda: "the machine was busy (load 3.0 on 2 cores)")
    flops, how = D.peak_flops(torch.device("cpu"), torch.float32)
    assert flops == 2e9 and "not cached: the machine was busy" in how
    assert not (tmp_path / D.CEILING_FILE).exists()


def test_half_precision_off_cuda_is_named_as_float32():
    cpu = torch.device("cpu")
    assert D.precision_warning("bfloat16", cpu, torch.bfloat16) == \
        "bfloat16 is used on CUDA only; training in float32 on cpu"
    assert D.precision_warning("auto", cpu, torch.float32) is None
    # The run's first log line says the precision it trains in, not the one asked for.
    assert D.describe(cpu, torch.bfloat16).endswith("threads), float32")
