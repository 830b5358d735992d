import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.weight": torch.randn(5, generator=g)}


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    rng = torch.get_rng_state()
    path = ckpt.save_checkpoint(tmp_path, 3, model=model.state_dict(), optimizer=opt.state_dict(),
                                state={"tokens_seen": 24}, rng={"torch": rng})
    loaded = ckpt.load_checkpoint(path)
    model2 = torch.nn.Linear(3, 2)
    model2.load_state_dict(loaded.model)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0)
    opt2.load_state_dict(loaded.optimizer)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["betas"] == (0.9, 0.95)
    # Continuing both must give identical parameters: the moments and step counts came back.
    x = torch.randn(8, 3)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).pow(2).mean().backward()
        o.step()
    assert torch.equal(model.weight, model2.weight)
    assert loaded.step == 3 and loaded.state["tokens_seen"] == 24
    assert torch.equal(loaded.rng["torch"], rng)
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in path.iterdir())


def test_refuses_non_finite_weights(tmp_path):
    state = small_state()
    state["a.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="a.weight"):
        ckpt.save_checkpoint(tmp_path, 1, model=state, state={})
    assert ckpt.list_checkpoints(tmp_path) == []


def test_resave_same_step_and_prune_keeps_last_and_best(tmp_path):
    for step, val in [(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.6)]:
        ckpt.save_checkpoint(tmp_path, step, model=small_state(step), state={"val_loss": val})
    ckpt.save_checkpoint(tmp_path, 40, model=small_state(99), state={"val_loss": 2.6})
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "step-000040").model["a.weight"],
                       small_state(99)["a.weight"])
    removed = ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["step-000010"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [20, 30, 40]
    assert ckpt.best_checkpoint(tmp_path).name == "step-000020"
    assert ckpt.resolve_checkpoint(tmp_path).name == "step-000020"
    assert ckpt.resolve_checkpoint(tmp_path, prefer="latest").name == "step-000040"


def test_a_resave_killed_between_its_renames_keeps_the_old_copy(tmp_path):
    ckpt.save_checkpoint(tmp_path, 7, model=small_state(7), state={})
    (tmp_path / "step-000007").rename(tmp_path / ".old-step-000007-999")  # the kill came here
    (tmp_path / ".tmp-step-000007-999").mkdir()
    ckpt.clean_partial(tmp_path)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [7]
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "step-000007").model["a.weight"], small_state(7)["a.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000007"]


def test_clean_partial_removes_leftovers(tmp_path):
    ckpt.save_checkpoint(tmp_path, 5, model=small_state(), state={})
    (tmp_path / ".tmp-step-000010-123").mkdir()
    (tmp_path / ".tmp-step-000010-123" / "model.safetensors").write_bytes(b"half")
    removed = ckpt.clean_partial(tmp_path)
    assert [p.name for p in removed] == [".tmp-step-000010-123"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000005"]


SAVER = r"""
import sys, torch
from engine import checkpoint as ckpt
root = sys.argv[1]
g = torch.Generator().manual_seed(0)
big = {f"w{i}": torch.randn(512, 1024, generator=g) for i in range(12)}   # ~25 MB per save
print("ready", flush=True)
step = 0
while True:
    step += 1
    ckpt.save_checkpoint(root, step, model=big, state={"marker": step},
                         optimizer={"state": {0: {"m": big["w0"]}}, "param_groups": [{"lr": 0.1, "params": [0]}]})
"""


def test_a_save_killed_half_way_never_looks_complete(tmp_path):
    root = tmp_path / "checkpoints"
    expected = None
    # Keep killing until one kill has landed mid-save (under load a save can take longer or
    # shorter than planned), with a bound so the test always ends.
    delays = [0.05, 0.13, 0.21, 0.34, 0.5, 0.77, 0.09, 0.17, 0.27, 0.41, 0.6, 0.03]
    for n, delay in enumerate(delays):
        if n >= 4 and root.exists() and any(p.name.startswith(".tmp-") for p in root.iterdir()):
            break
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(root)], stdout=subprocess.PIPE,
                                cwd=Path(__file__).resolve().parents[1], text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        # Every step-* folder that exists must load whole, with the exact tensors.
        for step, path in ckpt.list_checkpoints(root):
            loaded = ckpt.load_checkpoint(path)
            assert loaded.state["marker"] == step
            if expected is None:
                g = torch.Generator().manual_seed(0)
                expected = {f"w{i}": torch.randn(512, 1024, generator=g) for i in range(12)}
            assert all(torch.equal(loaded.model[k], v) for k, v in expected.items())
            assert torch.equal(loaded.optimizer["state"][0]["m"], expected["w0"])
    leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the kills should have caught at least one save half-way"
    ckpt.clean_partial(root)
    assert all(p.name.startswith("step-") for p in root.iterdir())
