"""The memory plan shown before Start: the form's values read as the run will use them, a warning
and the change that fits when the device lacks the room."""
import pytest

from engine.memory_plan import GB
from workbench import memory, runfolder, stages


def values(stage, ckpt, **kw):
    v = runfolder.defaults(stage)
    parent = next(p for p in stages.spec(stage).parents if p.kind == "checkpoint")
    return {**v, parent.field: str(ckpt), "device": "cpu", **kw}


@pytest.mark.parametrize("stage", [s.name for s in stages.STAGES if s.memory and s.name != "pretrain"])
def test_every_stage_with_a_model_gets_a_plan(tiny_lm_ckpt, stage):
    p, free = memory.plan_for(stage, values(stage, tiny_lm_ckpt))
    assert p.total > 0 and free > 0 and p.inputs["stage"] == stages.spec(stage).memory
    assert p.inputs["model_cfg"].d_model == 32                   # the checkpoint's own model
    assert p.inputs["seq_len"] <= p.inputs["model_cfg"].max_seq_len


def test_lora_in_the_form_shrinks_the_optimizer_and_pretraining_is_never_offered_it(tiny_lm_ckpt):
    full, _ = memory.plan_for("sft", values("sft", tiny_lm_ckpt))
    lora, _ = memory.plan_for("sft", values("sft", tiny_lm_ckpt, lora_rank=4))
    assert lora.optimizer < full.optimizer / 3 and lora.gradients < full.gradients
    assert full.inputs["can_lora"] and not memory.plan_for("sft", {})


def test_a_run_that_does_not_fit_is_flagged_with_the_change_that_fits(tiny_lm_ckpt, monkeypatch):
    v = values("sft", tiny_lm_ckpt, batch_size=64)
    p, _ = memory.plan_for("sft", v)
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(p.total * 0.9))
    note = memory.memory_note("sft", v)
    assert note.startswith("⚠ Memory: ≈") and "does not fit" in note and "To fit: " in note
    monkeypatch.setattr(memory, "free_bytes", lambda device: 64 * GB)
    assert not memory.memory_note("sft", v).startswith("⚠")


def test_pretraining_longer_than_its_presets_context_is_planned_at_that_length(tiny_lm_ckpt):
    """seq_len above the preset's context raises the model's context (PretrainConfig.model_config):
    the plan follows it, where it planned 128 tokens and called a 32 GB run 0.4 GB."""
    v = {**runfolder.defaults("pretrain"), "tokenizer": str(tiny_lm_ckpt / "tok.json"), "inputs": ["corpus.txt"],
         "preset": "tiny", "device": "cpu"}
    short, _ = memory.plan_for("pretrain", v)
    long, _ = memory.plan_for("pretrain", {**v, "seq_len": 4096})
    assert short.inputs["seq_len"] == 128 and long.inputs["seq_len"] == 4096
    assert long.inputs["model_cfg"].max_seq_len == 4096 and long.total > 4 * short.total
    # Planned while the rest of the form is not valid yet (no corpus picked, a typo elsewhere).
    assert memory.plan_for("pretrain", {**v, "inputs": [], "lr": "abc"}) is not None
