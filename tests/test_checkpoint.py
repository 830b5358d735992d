import json
import pickle

import pytest
import torch

from engine import checkpoint as ckpt
from engine import fsutil


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


class Killed(BaseException):
    """Stands for SIGKILL in-process: no `except Exception` or `except OSError` sees it."""


@pytest.fixture
def kill_at(monkeypatch):
    """kill_at("phase") arms engine.fsutil's fault point, as WORKBENCH_FAULT does for a process."""
    def die():
        raise Killed()

    def arm(phase: str) -> None:
        monkeypatch.setenv(fsutil.FAULT_ENV, phase)
        fsutil._fault_hits.clear()

    monkeypatch.setattr(fsutil, "_die", die)
    yield arm
    fsutil._fault_hits.clear()


OPT = {"state": {0: {"m": torch.ones(4, 3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}


def save(root, step, seed=None, **state):
    return ckpt.save_checkpoint(root, step, model=small_state(step if seed is None else seed), optimizer=OPT,
                                state=state, rng={"torch": torch.arange(4, dtype=torch.uint8)})


def assert_every_listed_checkpoint_loads_whole(root, seeds):
    for step, path in ckpt.list_checkpoints(root):
        loaded = ckpt.load_checkpoint(path)
        assert loaded.step == step and torch.equal(loaded.model["a.weight"], small_state(seeds[step])["a.weight"])
        assert torch.equal(loaded.optimizer["state"][0]["m"], OPT["state"][0]["m"])


SAVE_PHASES = ["save:model-written", "save:files-written", "save:fsynced", "save:manifest-written",
               "save:renamed"]


@pytest.mark.parametrize("phase", SAVE_PHASES)
def test_a_save_killed_at_any_phase_never_looks_complete(tmp_path, kill_at, phase):
    save(tmp_path, 1)
    kill_at(phase)
    with pytest.raises(Killed):
        save(tmp_path, 2)
    assert_every_listed_checkpoint_loads_whole(tmp_path, {1: 1, 2: 2})
    ckpt.clean_partial(tmp_path)
    # Once the manifest is on disk the save is whole: the next start puts it in place.
    kept = [1, 2] if phase in ("save:manifest-written", "save:renamed") else [1]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.step_dir_name(s) for s in kept]
    assert_every_listed_checkpoint_loads_whole(tmp_path, {1: 1, 2: 2})


def test_a_resave_killed_between_its_renames_is_found_whole(tmp_path, kill_at):
    save(tmp_path, 7)
    kill_at("save:old-moved-aside")
    with pytest.raises(Killed):
        save(tmp_path, 7, seed=99)
    ckpt.clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000007"]
    loaded = ckpt.load_checkpoint(tmp_path / "step-000007").model["a.weight"]
    assert torch.equal(loaded, small_state(7)["a.weight"]) or torch.equal(loaded, small_state(99)["a.weight"])


@pytest.mark.parametrize("phase", ["prune:manifest-removed", "prune:renamed", "prune:file-removed@1",
                                   "prune:file-removed@4"])
def test_a_prune_killed_at_any_phase_never_leaves_a_checkpoint_that_is_not_one(tmp_path, kill_at, phase):
    for step in (1, 2, 3):
        save(tmp_path, step, val_loss=4.0 - step)
    kill_at(phase)
    with pytest.raises(Killed):
        ckpt.prune(tmp_path, keep_last=2)
    assert_every_listed_checkpoint_loads_whole(tmp_path, {1: 1, 2: 2, 3: 3})
    assert ckpt.resolve_checkpoint(tmp_path, prefer="latest").name == "step-000003"
    ckpt.clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003"]


def test_a_checkpoint_half_deleted_by_the_old_prune_never_comes_back(tmp_path):
    """Issue 16, item 1: the old prune renamed a doomed step-N to .old-step-N-PID and deleted it;
    a kill mid-delete left a folder that the next start renamed back to step-N without its
    state.json, and every later run died on it."""
    save(tmp_path, 1)
    save(tmp_path, 2)
    doomed = tmp_path / ".old-step-000001-999"
    (tmp_path / "step-000001").rename(doomed)
    for name in ("manifest.json", "state.json", "optimizer.json"):
        (doomed / name).unlink()
    ckpt.clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002"]


def test_a_step_folder_without_its_manifest_is_not_a_checkpoint(tmp_path):
    save(tmp_path, 1)
    p = save(tmp_path, 2)
    (p / "manifest.json").unlink()          # a prune killed right after its first act
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000001"
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_checkpoint(p)
    assert [q.name for q in ckpt.clean_partial(tmp_path)] == ["step-000002"]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["step-000001"]


def test_checkpoints_saved_before_manifests_still_load(tmp_path):
    for step in (1, 2):
        p = save(tmp_path, step, val_loss=3.0 - step)
        (p / "manifest.json").unlink()
        state = json.loads((p / "state.json").read_text())
        del state["checkpoint_format"]
        (p / "state.json").write_text(json.dumps(state))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2]
    assert_every_listed_checkpoint_loads_whole(tmp_path, {1: 1, 2: 2})
    (tmp_path / "step-000001" / "state.json").unlink()      # one the old code broke
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    save(tmp_path, 3, val_loss=0.5)
    ckpt.prune(tmp_path, keep_last=1)                         # old and new pruned alike
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3]


def test_every_file_of_a_checkpoint_is_checked_before_a_resume(tmp_path):
    p = save(tmp_path, 5)
    cases = [("model.safetensors", lambda b: b[:-7], "truncated or corrupt"),
             ("optimizer.json", lambda b: b[:-3] + b"   ", "not valid JSON"),
             ("rng.safetensors", lambda b: pickle.dumps({"torch": [1, 2]}), "pickled"),
             ("state.json", lambda b: b + b"\n\n", "bytes, but"),       # parses, yet is not what was saved
             ("state.json", lambda b: b.replace(b'"step": 5', b'"step": 6'), "says step 6")]
    for name, corrupt, words in cases:
        good = (p / name).read_bytes()
        (p / name).write_bytes(corrupt(good))
        with pytest.raises(ckpt.CheckpointError) as e:
            ckpt.load_checkpoint(p)
        assert str(p / name) in str(e.value) and words in str(e.value) and "\n" not in str(e.value)
        (p / name).write_bytes(good)
    assert ckpt.load_checkpoint(p).step == 5


def test_a_moment_altered_to_nan_is_named_at_load_not_blamed_on_the_model(tmp_path):
    from safetensors.torch import load_file, save_file
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 3)).pow(2).mean().backward()
    opt.step()
    path = ckpt.save_checkpoint(tmp_path, 1, model=model.state_dict(), optimizer=opt.state_dict(), state={})
    tensors = load_file(path / "optimizer.safetensors")
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.dim() > 0)
    tensors[name][0] = float("nan")        # same size: the manifest cannot tell
    save_file(tensors, path / "optimizer.safetensors")
    loaded = ckpt.load_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer.safetensors: 'exp_avg.*' of parameter \d holds NaN"):
        ckpt.restore_optimizer(torch.optim.AdamW(model.parameters()), loaded.optimizer,
                               path / "optimizer.safetensors")


def test_an_atomic_write_onto_a_folder_names_the_folder_not_its_temporary_file(tmp_path):
    from engine.fsutil import atomic_write_text
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        atomic_write_text(tmp_path / "out", "x")
    assert e.value.filename == str(tmp_path / "out") and ".tmp-" not in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
