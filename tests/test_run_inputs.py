"""The checkpoints a run reads its models from stay those it started with (engine.artifacts.
RunInputs): a run folder named as an input that is trained further between a stop and a resume
changes nothing in the resumed run, and a checkpoint the run needs that has gone since is named.
And a model stored in bf16 trains with float32 weights."""
import shutil

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import ConfigError, from_dict
from engine.dpo import DPOConfig, run as run_dpo
from engine.grpo import GRPOConfig, run as run_grpo
from engine.ppo import run as run_ppo
from engine.sft import SFTConfig, run as run_sft
from engine.weights import load_model, safetensors_state
from helpers import StopAt, losses, metrics
from test_ppo import cfg as ppo_cfg
from test_reward import write_prefs


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def train_further(run_dir, step: int) -> None:
    """A newer checkpoint in run_dir, as if its run had been trained on: other weights, the same
    kind of model and tokenizer."""
    last = ckpt.latest_checkpoint(run_dir / "checkpoints")
    model = load_model(last / "model.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    weights, meta = safetensors_state(model)
    extra = {p.name: p for p in last.iterdir() if p.name not in ("model.safetensors", "state.json", "manifest.json")}
    ckpt.save_checkpoint(run_dir / "checkpoints", step, model=weights, model_metadata=meta,
                         state=ckpt.read_state(last), extra_files=extra)


def logs(events) -> list[str]:
    return [e["message"] for e in events if e["type"] == "log"]


def test_ppo_resumes_against_the_policy_and_reward_model_it_started_with(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    sft, rm = copy_run(tiny_lm_ckpt, tmp_path / "sft"), copy_run(rm_ckpt, tmp_path / "rm")
    c = ppo_cfg(sft, rm, prompts, steps=4)
    full, part, rest = [], [], []
    run_ppo(c, tmp_path / "full", full.append)
    assert run_ppo(c, tmp_path / "res", part.append, StopAt(part, 2)) == "stopped"
    train_further(sft, 20)
    train_further(rm, 30)
    assert run_ppo(c, tmp_path / "res", rest.append) == "completed"
    keys = ("objective/score", "objective/kl_exact", "loss/policy", "loss/value")
    pick = lambda evs: {s: tuple(e[k] for k in keys) for s, e in metrics(evs).items()}  # noqa: E731
    assert min(metrics(rest)) == 3 and {**pick(part), **pick(rest)} == pick(full)
    said = logs(rest)
    assert any(m.startswith("policy: resuming with ") and "step-000010" in m and "step-000020" in m for m in said)
    assert any(m.startswith("reward_model: resuming with ") and "step-000003" in m for m in said)

    # Once the checkpoint the run started from is gone, the resume names it and stops.
    shutil.rmtree(sft / "checkpoints" / "step-000010")
    with pytest.raises(ConfigError, match=r"policy.*step-000010, which no longer exists"):
        run_ppo(ppo_cfg(sft, rm, prompts, steps=6), tmp_path / "res", [].append)


def test_grpo_resumes_against_the_reference_it_started_with(tiny_lm_ckpt, prompts, tmp_path):
    sft = copy_run(tiny_lm_ckpt, tmp_path / "sft")
    c = from_dict(GRPOConfig, dict(policy=str(sft), prompts=[str(prompts)], steps=3, prompts_per_step=2,
                                   group_size=3, minibatch_size=3, max_new_tokens=6, lr=1e-3, task_weight=0.0,
                                   length_weight=1.0, length_target=2, kl_coef=0.1, probe_every=100,
                                   checkpoint_every=100, device="cpu"))
    full, part, rest = [], [], []
    run_grpo(c, tmp_path / "full", full.append)
    assert run_grpo(c, tmp_path / "res", part.append, StopAt(part, 1)) == "stopped"
    train_further(sft, 20)
    assert run_grpo(c, tmp_path / "res", rest.append) == "completed"
    pick = lambda evs: {s: (e["objective/kl"], e["loss/policy"]) for s, e in metrics(evs).items()}  # noqa: E731
    assert {**pick(part), **pick(rest)} == pick(full)
    assert any(m.startswith("policy: resuming with ") for m in logs(rest))


def test_dpo_resumes_against_the_reference_it_started_with(tiny_lm_ckpt, tmp_path):
    sft = copy_run(tiny_lm_ckpt, tmp_path / "sft")
    write_prefs(tmp_path / "prefs.jsonl", n=24)
    c = from_dict(DPOConfig, dict(init=str(sft), data=[str(tmp_path / "prefs.jsonl")], batch_size=4, lr=3e-3,
                                  beta=0.5, epochs=0, max_steps=8, warmup_steps=2, eval_every=100,
                                  checkpoint_every=100, log_every=1, sample_every=0, kl_prompts=4, kl_tokens=6,
                                  device="cpu"))
    full, part, rest = [], [], []
    run_dpo(c, tmp_path / "full", full.append)
    assert run_dpo(c, tmp_path / "res", part.append, StopAt(part, 4)) == "stopped"
    train_further(sft, 20)
    assert run_dpo(c, tmp_path / "res", rest.append) == "completed"
    assert min(losses(rest)) == 5 and {**losses(part), **losses(rest)} == losses(full)


@pytest.fixture
def bf16_lm(tiny_lm_ckpt, tmp_path):
    """The tiny LM stored in bfloat16, as `import-model --dtype bfloat16` keeps one."""
    src = ckpt.latest_checkpoint(tiny_lm_ckpt / "checkpoints")
    weights, meta = safetensors_state(load_model(src / "model.safetensors").to(torch.bfloat16))
    ckpt.save_checkpoint(tmp_path / "bf16" / "checkpoints", 10, model=weights, model_metadata=meta,
                         state=ckpt.read_state(src), extra_files={"tokenizer.json": src / "tokenizer.json"})
    return tmp_path / "bf16"


def test_a_bf16_checkpoint_trains_with_float32_weights(bf16_lm, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(f'{{"prompt": "alpha beta {i}", "response": "gamma delta echo"}}\n' for i in range(40)))
    c = from_dict(SFTConfig, dict(init=str(bf16_lm), data=[str(data)], max_steps=3, batch_size=4, lr=1e-5,
                                  warmup_steps=0, eval_every=100, sample_every=0, checkpoint_every=100,
                                  device="cpu", dtype="float32"))
    events = []
    assert run_sft(c, tmp_path / "run", events.append) == "completed"
    before = load_model(ckpt.latest_checkpoint(bf16_lm / "checkpoints") / "model.safetensors")
    after = load_model(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") / "model.safetensors")
    assert {p.dtype for p in after.parameters()} == {torch.float32}
    # At lr 1e-5 a bf16 weight (8 bits of mantissa) keeps its value under most Adam updates;
    # a float32 one takes them.
    moved = [(a.float() != b.float()).float().mean().item()
             for a, b in zip(after.parameters(), before.parameters())]
    assert sum(moved) / len(moved) > 0.5
    assert "init is stored in bfloat16: this run holds its weights in float32 (its own checkpoints are float32)" \
        in logs(events)


def test_ppo_from_a_bf16_policy_starts_at_exactly_zero_kl(bf16_lm, rm_ckpt, prompts, tmp_path):
    events = []
    assert run_ppo(ppo_cfg(bf16_lm, rm_ckpt, prompts, steps=1), tmp_path, events.append) == "completed"
    m = metrics(events)[1]
    assert m["val/ratio_first"] == 1.0 and m["objective/kl_exact"] == 0.0


def test_an_input_named_anew_on_resume_is_read_from_where_it_now_points(tiny_lm_ckpt, tmp_path):
    # GRPO lets reward_model change on resume (with a warning): then the new one is meant.
    from types import SimpleNamespace

    from engine.artifacts import RunInputs
    src = ckpt.latest_checkpoint(tiny_lm_ckpt / "checkpoints")
    weights, meta = safetensors_state(load_model(src / "model.safetensors"))
    state = {"config": {"policy": "sft", "reward_model": "rm-a"},
             "sources": {"policy": str(src), "reward_model": str(src)}}
    ckpt.save_checkpoint(tmp_path / "run" / "checkpoints", 5, model=weights, model_metadata=meta, state=state)
    inputs = RunInputs(tmp_path / "run", SimpleNamespace(policy="sft", reward_model="rm-b"), print)
    assert inputs.path("policy", tmp_path / "elsewhere") == src
    assert inputs.path("reward_model", tmp_path / "rm-b") == tmp_path / "rm-b"


@pytest.mark.parametrize("config_class, fields", [
    (SFTConfig, dict(init="x", data=["y"])),
    (DPOConfig, dict(init="x", data=["y"])),
    (GRPOConfig, dict(policy="x", prompts=["y"])),
])
def test_float16_training_is_refused_by_name(config_class, fields):
    # Without loss scaling its small gradients underflow to zero; bf16 has float32's range.
    with pytest.raises(ConfigError, match="dtype.*float16 training needs loss scaling"):
        from_dict(config_class, dict(fields, dtype="float16"))
    assert from_dict(config_class, dict(fields, dtype="bfloat16")).dtype == "bfloat16"


def test_preflight_finds_what_a_run_would_fail_on_without_loading_a_model(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    """runfolder.preflight, as the app's form and Resume ask it: the same refusals the stages
    give once running, each naming its field, before any folder is made or written."""
    from workbench.runfolder import preflight
    ppo = dict(policy=str(tiny_lm_ckpt), reward_model=str(rm_ckpt), prompts=[str(prompts)], steps=3,
               rollout_batch_size=6, minibatch_size=3, max_new_tokens=8, device="cpu")
    new = tmp_path / "runs" / "ppo-new"
    assert preflight("ppo", ppo, new) is None
    no_norm = copy_run(rm_ckpt, tmp_path / "rm-without-norm")
    for n in no_norm.rglob("reward_norm.json"):
        n.unlink()
    for changes, field, says in [
            ({"reward_model": str(tiny_lm_ckpt)}, "reward_model", "holds a language model, not a reward (scalar) model"),
            ({"policy": str(rm_ckpt)}, "policy", "holds a reward (scalar) model, not a language model"),
            ({"policy": str(tmp_path / "nothing")}, "policy", "no checkpoint found in"),
            ({"reward_model": str(no_norm)}, "reward_model", "reward_norm.json is missing"),
            ({"max_new_tokens": 44}, "max_new_tokens", "must leave room for the prompt in the context (48 tokens)")]:
        problem = preflight("ppo", {**ppo, **changes}, new)
        assert problem is not None and problem.field == field and says in problem.message, (changes, problem)
    grpo = dict(policy=str(tiny_lm_ckpt), prompts=[str(prompts)], eval_tokens=60, device="cpu")
    assert preflight("grpo", grpo, new).field == "eval_tokens"
    assert preflight("sft", dict(init=str(tiny_lm_ckpt), data=[str(prompts)], seq_len=49), new).field == "seq_len"
    assert not new.exists()
    # A resume: what the run's checkpoints saved cannot change.
    run = tmp_path / "sft-1"
    cfg = dict(init=str(tiny_lm_ckpt), data=[str(prompts)], max_steps=1, batch_size=2, seq_len=16,
               eval_every=1, checkpoint_every=1, sample_every=0, device="cpu")
    ckpt.save_checkpoint(run / "checkpoints", 1, model=safetensors_state(load_model(
        ckpt.latest_checkpoint(tiny_lm_ckpt / "checkpoints") / "model.safetensors"))[0],
        state={"config": from_dict(SFTConfig, cfg).__dict__})
    assert preflight("sft", cfg, run) is None
    problem = preflight("sft", {**cfg, "batch_size": 4, "max_steps": 5}, run)
    assert problem.field == "batch_size" and "batch_size: 2 -> 4" in problem.message
