"""LoRA in the fine-tuning stages: only the adapters train, checkpoints are merged with the
adapters beside them, resume is exact, and the reference is the base with one copy of it."""
import dataclasses
import json
import random

import pytest
import torch

from engine import checkpoint as ckpt
from engine import dpo, ppo, reward, sft
from engine.artifacts import load_artifact
from engine.checkpoint import load_tensors
from engine.config import ConfigError, from_dict
from engine.device import setup
from engine.grpo import GRPOConfig
from engine.lora import ALL_TARGETS, Reference, add_adapters, adapters_off, has_adapters
from engine.model import ScalarModel, Transformer
from engine.weights import load_model, safetensors_state
from engine.runio import Emitter
from helpers import StopAt, losses, metrics
from test_reward import write_prefs

WORDS = "alpha beta gamma delta echo fox golf hotel india juliet kilo lima".split()
R, ALPHA = 4, 8.0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tiny_lm_ckpt, tmp_path_factory):
    """The tiny random LM with weights ten times larger: its frozen head then spans logits wide
    enough for the adapters to move the loss a long way in a few steps."""
    root = tmp_path_factory.mktemp("lora_lm")
    tok = ckpt.resolve_checkpoint(tiny_lm_ckpt) / "tokenizer.json"
    cfg = load_artifact(tiny_lm_ckpt).model.config
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(cfg, init_std=0.1))
    weights, meta = safetensors_state(model)
    ckpt.save_checkpoint(root / "checkpoints", 1, model=weights, model_metadata=meta,
                         state={"tokenizer_fingerprint": load_artifact(tiny_lm_ckpt).tokenizer.fingerprint()},
                         extra_files={"tokenizer.json": tok})
    return root


@pytest.fixture
def sft_data(tmp_path):
    """'Swap the two words': learnable by the tiny random model through its adapters."""
    rng = random.Random(0)
    lines = []
    for _ in range(80):
        a, b = rng.sample(WORDS, 2)
        lines.append(json.dumps({"prompt": f"{a} {b}", "response": f"{b} {a}"}))
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "sft.jsonl"


def sft_cfg(init, data, **kw):
    base = dict(init=str(init), data=[str(data)], batch_size=8, max_steps=16, lr=3e-2, warmup_steps=1,
                eval_every=8, eval_batches=1, sample_every=0, checkpoint_every=100, log_every=1, device="cpu",
                lora_rank=R, lora_alpha=ALPHA)
    base.update(kw)
    return from_dict(sft.SFTConfig, base)


def base_weights(init) -> dict:
    return load_model(ckpt.resolve_checkpoint(init) / "model.safetensors").state_dict()


def test_lora_sft_trains_only_the_adapters_and_saves_them_merged(lm, sft_data, tmp_path):
    events = []
    assert sft.run(sft_cfg(lm, sft_data), tmp_path, events.append) == "completed"
    train = losses(events)
    assert sum(train[s] for s in (14, 15, 16)) < 0.85 * sum(train[s] for s in (1, 2, 3))
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    config = json.loads((last / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", R, ALPHA)
    assert sorted(config["target_modules"]) == sorted(ALL_TARGETS)

    # adapter_model.safetensors holds the adapters and nothing else: an A and a B per projection per layer.
    adapters = load_tensors(last / "adapter_model.safetensors")
    base = base_weights(lm)
    n_layer = load_model(last / "model.safetensors").config.n_layer
    assert len(adapters) == 2 * len(ALL_TARGETS) * n_layer
    assert all(".lora_A." in k or ".lora_B." in k for k in adapters)

    # model.safetensors is an ordinary model: every adapted W is exactly W + B A * alpha / r, and
    # every other tensor (embeddings, norms, the head) is the init's, bit for bit.
    merged = load_model(last / "model.safetensors").state_dict()
    assert set(merged) == set(base)
    adapted = 0
    for name, w in base.items():
        module = name.removesuffix(".weight")
        a = adapters.get(f"base_model.model.{module}.lora_A.weight")
        if a is None:
            assert torch.equal(merged[name], w), name
            continue
        b = adapters[f"base_model.model.{module}.lora_B.weight"]
        assert torch.equal(merged[name], w + (b @ a) * (ALPHA / R)), name
        assert not torch.equal(merged[name], w), name
        adapted += 1
    assert adapted == len(ALL_TARGETS) * n_layer

    # The optimizer's moments cover the adapters only (AdamW: step, exp_avg, exp_avg_sq each).
    opt = json.loads((last / "optimizer.json").read_text())
    assert sum(len(g["params"]) for g in opt["param_groups"]) == len(adapters)
    moments = load_tensors(last / "optimizer.safetensors")
    assert sum(v.numel() for k, v in moments.items() if k.endswith(".exp_avg")) == \
        sum(v.numel() for v in adapters.values())

    # A LoRA checkpoint loads like any other, for chat and every later stage.
    loaded = load_artifact(last)
    assert not has_adapters(loaded.model) and torch.equal(loaded.model.state_dict()["lm_head.weight"],
                                                          base["lm_head.weight"])


def test_lora_sft_resume_is_exact(lm, sft_data, tmp_path):
    # Dropout on the adapters' input: the RNG state has to come back too.
    c = sft_cfg(lm, sft_data, max_steps=8, eval_every=4, lora_dropout=0.1, lora_targets=["q_proj", "v_proj"])
    full, part, rest = [], [], []
    assert sft.run(c, tmp_path / "full", full.append) == "completed"
    assert sft.run(c, tmp_path / "res", part.append, StopAt(part, 3)) == "stopped"
    assert sft.run(c, tmp_path / "res", rest.append) == "completed"
    assert min(losses(rest)) == 4
    assert {**losses(part), **losses(rest)} == losses(full)
    a = ckpt.latest_checkpoint(tmp_path / "full" / "checkpoints")
    b = ckpt.latest_checkpoint(tmp_path / "res" / "checkpoints")
    for name in ("model.safetensors", "adapter_model.safetensors"):
        x, y = load_tensors(a / name), load_tensors(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_a_checkpoint_with_the_adapters_old_file_name_still_resumes_exactly(lm, sft_data, tmp_path):
    c = sft_cfg(lm, sft_data, max_steps=6, eval_every=3, lora_targets=["q_proj", "v_proj"])
    full, part, rest = [], [], []
    assert sft.run(c, tmp_path / "full", full.append) == "completed"
    assert sft.run(c, tmp_path / "res", part.append, StopAt(part, 3)) == "stopped"
    for folder in (tmp_path / "res" / "checkpoints").iterdir():      # as written before the rename
        (folder / "adapter_model.safetensors").rename(folder / "adapter.safetensors")
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"]["adapter.safetensors"] = manifest["files"].pop("adapter_model.safetensors")
        (folder / "manifest.json").write_text(json.dumps(manifest))
    assert sft.run(c, tmp_path / "res", rest.append) == "completed"
    assert {**losses(part), **losses(rest)} == losses(full)


def test_changing_lora_settings_on_resume_is_refused_by_name(lm, sft_data, tmp_path):
    part = []
    assert sft.run(sft_cfg(lm, sft_data), tmp_path, part.append, StopAt(part, 2)) == "stopped"
    for change, field in [(dict(lora_rank=8), "lora_rank"), (dict(lora_rank=0), "lora_rank"),
                          (dict(lora_alpha=32.0), "lora_alpha"), (dict(lora_dropout=0.1), "lora_dropout"),
                          (dict(lora_targets=["q_proj"]), "lora_targets")]:
        with pytest.raises(ConfigError) as e:
            sft.run(sft_cfg(lm, sft_data, **change), tmp_path, None)
        assert e.value.field == field


@pytest.mark.parametrize("change, field", [
    (dict(lora_rank=-1), "lora_rank"), (dict(lora_alpha=0.0), "lora_alpha"), (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_targets=[]), "lora_targets"), (dict(lora_targets=["q_proj", "qkv"]), "lora_targets"),
    (dict(lora_targets=["q_proj", "q_proj"]), "lora_targets")])
def test_bad_lora_settings_are_refused_by_name(change, field):
    for cls, required in [(sft.SFTConfig, dict(init="x", data=["d"])),
                          (reward.RewardConfig, dict(init="x", data=["d"])), (dpo.DPOConfig, dict(init="x", data=["d"])),
                          (ppo.PPOConfig, dict(policy="x", reward_model="y", prompts=["p"])),
                          (GRPOConfig, dict(policy="x", prompts=["p"]))]:
        with pytest.raises(ConfigError) as e:
            from_dict(cls, {**required, **change})
        assert e.value.field == field, cls


def test_lora_settings_that_do_not_fit_the_stage_or_the_model_are_refused_by_name(lm, sft_data, tmp_path):
    # PPO and GRPO keep dropout off in every model: their first ratio must be exactly 1.
    for cls, required in [(ppo.PPOConfig, dict(policy="x", reward_model="y", prompts=["p"])),
                          (GRPOConfig, dict(policy="x", prompts=["p"]))]:
        with pytest.raises(ConfigError) as e:
            from_dict(cls, {**required, "lora_rank": 4, "lora_dropout": 0.1})
        assert e.value.field == "lora_dropout"
    # A rank above the narrowest projection's width is refused once the model is known, before any step.
    with pytest.raises(ConfigError) as e:
        sft.run(sft_cfg(lm, sft_data, lora_rank=64), tmp_path / "run", None)
    assert e.value.field == "lora_rank" and not (tmp_path / "run" / "checkpoints").exists()


def test_reward_model_with_lora_trains_its_new_head_and_resumes_exactly(tiny_lm_ckpt, tmp_path):
    write_prefs(tmp_path / "prefs.jsonl", n=24)
    c = from_dict(reward.RewardConfig, dict(init=str(tiny_lm_ckpt), data=[str(tmp_path / "prefs.jsonl")], batch_size=4,
                                            lr=1e-2, epochs=0, max_steps=6, warmup_steps=1, eval_every=3,
                                            checkpoint_every=100, log_every=1, device="cpu", lora_rank=R))
    full, part, rest = [], [], []
    assert reward.run(c, tmp_path / "full", full.append) == "completed"
    assert reward.run(c, tmp_path / "res", part.append, StopAt(part, 3)) == "stopped"
    assert reward.run(c, tmp_path / "res", rest.append) == "completed"
    assert {**losses(part), **losses(rest)} == losses(full)
    last = ckpt.latest_checkpoint(tmp_path / "res" / "checkpoints")
    adapters = load_tensors(last / "adapter_model.safetensors")
    merged = load_model(last / "model.safetensors")
    # The scalar head is new: it trains, and is kept with the adapters (peft's modules_to_save).
    assert torch.equal(adapters["base_model.model.score.weight"], merged.score.weight.detach())
    assert json.loads((last / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    assert (last / reward.NORM_FILE).exists()       # PPO reads this reward model as any other
    final = ckpt.latest_checkpoint(tmp_path / "full" / "checkpoints")
    assert torch.equal(load_tensors(final / "model.safetensors")["score.weight"], merged.score.weight)
    torch.manual_seed(0)                            # the head the stage started from (seed 0)
    start = ScalarModel.from_lm(load_artifact(tiny_lm_ckpt).model)
    assert not torch.equal(merged.score.weight, start.score.weight)
    for name, w in start.state_dict().items():      # the backbone: frozen, or adapted in place
        adapted = name.removesuffix(".weight").rsplit(".", 1)[-1] in ALL_TARGETS
        assert adapted or name == "score.weight" or torch.equal(merged.state_dict()[name], w), name


def test_the_reference_is_the_init_model_and_holds_no_weights_of_its_own(tiny_lm_ckpt):
    cfg = sft_cfg(tiny_lm_ckpt, "d.jsonl")
    init = load_artifact(tiny_lm_ckpt).model.eval()
    policy = add_adapters(load_artifact(tiny_lm_ckpt).model, cfg, seed=0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ".lora_B." in name:
                p.normal_()         # as if trained: B starts at zero
    ref = Reference(policy)
    x = torch.randint(0, policy.config.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(ref(x), init(x))
        assert not torch.equal(policy(x), init(x))
        with adapters_off(policy):
            assert torch.equal(policy(x), init(x))
    # The switch is back on, and what trains still trains.
    assert all(p.requires_grad == (".lora_" in n) for n, p in policy.named_parameters())
    assert not isinstance(ref, torch.nn.Module) and ref.model is policy


def test_dpo_with_lora_keeps_its_reference_at_the_init_model(tiny_lm_ckpt, tmp_path, monkeypatch):
    seen = []

    class Recording(dpo.Hooks):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            seen.append(self)

    monkeypatch.setattr(dpo, "Hooks", Recording)
    write_prefs(tmp_path / "prefs.jsonl", n=24)
    c = from_dict(dpo.DPOConfig, dict(init=str(tiny_lm_ckpt), data=[str(tmp_path / "prefs.jsonl")], batch_size=4,
                                      lr=2e-2, beta=0.5, epochs=0, max_steps=10, warmup_steps=1, eval_every=10,
                                      checkpoint_every=100, log_every=1, sample_every=0, kl_prompts=2, kl_tokens=4,
                                      device="cpu", lora_rank=R))
    events = []
    assert dpo.run(c, tmp_path / "run", events.append) == "completed"
    val = [e for e in events if e["type"] == "metrics" and "val/kl" in e][-1]
    assert val["val/kl"] > 0                    # the policy moved away from its reference...
    hooks = seen[0]
    init = load_artifact(tiny_lm_ckpt).model.eval()
    x = torch.randint(0, init.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(hooks.ref(x), init(x))   # ...which is still the init model, exactly
    assert isinstance(hooks.ref, Reference)
    last = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert {"model.safetensors", "adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in last.iterdir()}


def ppo_cfg(lm, rm, prompts, **kw):
    """tests/test_ppo.py's settings, with adapters and a learning rate they move at."""
    from tests.test_ppo import cfg
    return cfg(lm, rm, prompts, **{"lr": 1e-2, "value_lr": 1e-2, "lora_rank": R, **kw})


def test_ppo_with_lora_first_ratio_is_one_and_kl_is_zero(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    events = []
    assert ppo.run(ppo_cfg(tiny_lm_ckpt, rm_ckpt, prompts), tmp_path, events.append) == "completed"
    m = metrics(events)
    assert m[1]["val/ratio_first"] == 1.0           # exactly, as with full fine-tuning
    assert m[1]["objective/kl"] == 0.0 and m[1]["objective/kl_exact"] == 0.0    # B = 0: the policy is its reference
    assert m[2]["objective/kl"] != 0.0 and m[3]["val/ratio_first"] == 1.0
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert {"model.safetensors", "adapter_model.safetensors", "value.safetensors", "value_adapter_model.safetensors",
            "value_adapter_config.json"} <= {p.name for p in last.iterdir()}
    value_adapters = load_tensors(last / "value_adapter_model.safetensors")
    assert "base_model.model.score.weight" in value_adapters      # the value head trains too


def _storages(*models) -> dict[int, int]:
    """{address: elements} of every tensor the models hold, each counted once however many of
    them hold it (a Reference holds what its model holds)."""
    held = {}
    for m in models:
        module = m.model if isinstance(m, Reference) else m
        for t in list(module.parameters()) + list(module.buffers()):
            held[t.data_ptr()] = t.numel()
    return held


def test_ppo_with_lora_holds_the_policys_base_once(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    device, dtype = setup("cpu", "float32")
    lm = load_artifact(tiny_lm_ckpt).model.num_params()

    def build(**kw):
        run = ppo.PPO(ppo_cfg(tiny_lm_ckpt, rm_ckpt, prompts, ema_decay=0.5, **kw), tmp_path, device, dtype,
                      Emitter(None))
        m = run.m
        return run, sum(_storages(m.policy, m.ref, m.rm, m.value, run.ema).values())

    def adapters(model):
        return sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)

    _, full = build(lora_rank=0)
    run, held = build()
    m = run.m
    assert isinstance(m.ref, Reference) and m.ref.model is m.policy
    # Full fine-tuning holds the policy's weights three times (policy, reference, EMA); LoRA once,
    # plus the adapters of the policy, of its EMA and of the value model.
    rm = m.rm.num_params()
    assert full == 3 * lm + 2 * rm
    assert held == lm + 2 * adapters(m.policy) + 2 * rm + adapters(m.value)
    with torch.no_grad():
        x = torch.randint(0, m.policy.config.vocab_size, (2, 8))
        assert torch.equal(m.ref(x), load_artifact(tiny_lm_ckpt).model(x))


def test_ppo_with_lora_resumes_exactly(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    c = ppo_cfg(tiny_lm_ckpt, rm_ckpt, prompts, steps=4, ema_decay=0.9)
    full, part, rest = [], [], []
    ppo.run(c, tmp_path / "full", full.append)
    assert ppo.run(c, tmp_path / "res", part.append, StopAt(part, 2)) == "stopped"
    assert ppo.run(c, tmp_path / "res", rest.append) == "completed"
    keys = ("objective/score", "objective/kl", "loss/policy", "loss/value")
    pick = lambda evs: {s: tuple(e[k] for k in keys) for s, e in metrics(evs).items()}  # noqa: E731
    assert min(metrics(rest)) == 3 and {**pick(part), **pick(rest)} == pick(full)
    a = ckpt.latest_checkpoint(tmp_path / "full" / "checkpoints")
    b = ckpt.latest_checkpoint(tmp_path / "res" / "checkpoints")
    for name in ("model.safetensors", "value_adapter_model.safetensors", "ema.safetensors",
                 "ema_adapter_model.safetensors"):
        x, y = load_tensors(a / name), load_tensors(b / name)
        assert all(torch.equal(x[k], y[k]) for k in x), name


def test_grpo_with_lora_first_ratio_is_one_and_kl_is_zero(tiny_lm_ckpt, tmp_path):
    from engine import grpo
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(f"What is {10 + i} + {3 * i}?" for i in range(8)) + "\n")
    c = from_dict(GRPOConfig, dict(policy=str(tiny_lm_ckpt), prompts=[str(p)], steps=2, prompts_per_step=2,
                                   group_size=4, minibatch_size=4, max_new_tokens=8, lr=1e-2, length_weight=1.0,
                                   kl_coef=0.1, probe_every=100, probe_tokens=8, checkpoint_every=100,
                                   eval_every=100, device="cpu", lora_rank=R))
    events = []
    assert grpo.run(c, tmp_path / "run", events.append) == "completed"
    m = metrics(events)
    assert m[1]["val/ratio_first"] == 1.0 and m[1]["objective/kl"] == 0.0 and m[1]["objective/kl_k3"] == 0.0
    assert (ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") / "adapter_model.safetensors").exists()


def test_the_adapter_loads_in_peft_on_the_exported_base(lm, sft_data, tmp_path):
    """adapter_model.safetensors and adapter_config.json are peft's: PeftModel loads the
    checkpoint folder as it is, puts them on the exported init and gets the merged checkpoint's
    outputs."""
    transformers = pytest.importorskip("transformers")
    import warnings
    from peft import PeftModel
    from engine.export import export
    assert sft.run(sft_cfg(lm, sft_data, max_steps=4), tmp_path / "run", None) == "completed"
    last = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    export(ckpt.resolve_checkpoint(lm), "hf", tmp_path / "base")
    export(last, "hf", tmp_path / "merged")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with warnings.catch_warnings():         # transformers 5 deprecates a name peft still reads
        warnings.simplefilter("ignore", FutureWarning)
        adapted = PeftModel.from_pretrained(base, last)
    x = torch.randint(0, merged.config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(adapted(x).logits, merged(x).logits, rtol=0, atol=1e-5)
