"""The sampling job: K answers per prompt, reproducible, batch-independent, resumable."""
import dataclasses
import json

import pytest

from engine.config import ConfigError, from_dict
from engine.sample import PromptFileError, SampleConfig, read_prompts, run


def cfg(ckpt, prompts, **kw):
    base = dict(checkpoint=str(ckpt), prompts=[str(prompts)], k=3, max_new_tokens=6, batch_size=6,
                temperature=1.0, device="cpu")
    base.update(kw)
    return from_dict(SampleConfig, base)


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(f"question alpha {i}" for i in range(5)) + "\n\n")
    return p


def rows(run_dir):
    return [json.loads(l) for l in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_k_answers_per_prompt_with_provenance(tiny_lm_ckpt, prompts, tmp_path):
    events = []
    assert run(cfg(tiny_lm_ckpt, prompts), tmp_path / "a", events.append) == "completed"
    out = rows(tmp_path / "a")
    assert [r["prompt_index"] for r in out] == [0, 1, 2, 3, 4]
    assert all(len(r["answers"]) == 3 for r in out)
    for r in out:
        for a in r["answers"]:
            assert 1 <= a["n_tokens"] <= 6 and isinstance(a["finished"], bool) and isinstance(a["seed"], int)
    # K samples of one prompt differ from each other (distinct seeds).
    assert len({a["text"] for a in out[0]["answers"]}) > 1
    prov = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert prov["k"] == 3 and prov["settings"]["temperature"] == 1.0 and prov["step"] == 10
    assert any(e["type"] == "progress" and e["unit"] == "prompts" for e in events)


def test_answers_do_not_depend_on_batching_and_resume_is_exact(tiny_lm_ckpt, prompts, tmp_path):
    run(cfg(tiny_lm_ckpt, prompts), tmp_path / "a", None)
    run(cfg(tiny_lm_ckpt, prompts, batch_size=3), tmp_path / "b", None)
    assert rows(tmp_path / "a") == rows(tmp_path / "b")

    class StopAfterFirstBatch:
        def __init__(self):
            self.calls = 0

        def should_stop(self):
            self.calls += 1
            return self.calls > 1

    assert run(cfg(tiny_lm_ckpt, prompts), tmp_path / "c", None, StopAfterFirstBatch()) == "stopped"
    assert len(rows(tmp_path / "c")) == 2
    with open(tmp_path / "c" / "samples.jsonl", "a") as f:
        f.write('{"prompt": "torn')  # killed mid-write
    assert run(cfg(tiny_lm_ckpt, prompts), tmp_path / "c", None) == "completed"
    assert rows(tmp_path / "c") == rows(tmp_path / "a")
    with pytest.raises(ConfigError, match="cannot change on resume .*k: 3 -> 2"):
        run(cfg(tiny_lm_ckpt, prompts, k=2), tmp_path / "c", None)


def test_a_resume_refuses_settings_that_would_change_its_answers(tiny_lm_ckpt, prompts, tmp_path):
    class StopAtOnce:
        def should_stop(self):
            return True

    folder = tmp_path / "run"
    assert run(cfg(tiny_lm_ckpt, prompts), folder, None, StopAtOnce()) == "stopped"
    for change, said in [(dict(temperature=0.5), "temperature: 1.0 -> 0.5"), (dict(top_p=0.5), "top_p"),
                         (dict(max_new_tokens=3), "max_new_tokens"), (dict(top_k=5), "top_k"),
                         (dict(repetition_penalty=1.3), "repetition_penalty")]:
        with pytest.raises(ConfigError, match=said) as e:
            run(cfg(tiny_lm_ckpt, prompts, **change), folder, None)
        assert e.value.field == next(iter(change))
    other = tmp_path / "other.txt"
    other.write_text("\n".join(p + " again" for p in prompts.read_text().splitlines() if p) + "\n")
    with pytest.raises(ConfigError, match="the prompts' texts") as e:
        run(cfg(tiny_lm_ckpt, other), folder, None)
    assert e.value.field == "prompts"
    # what does not change an answer may: the batch size, the prompts file's name
    same = tmp_path / "same.txt"
    same.write_text(prompts.read_text())
    assert run(cfg(tiny_lm_ckpt, same, batch_size=3), folder, None) == "completed"


def test_bad_prompts_and_settings_are_named(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\nnot json\n')
    with pytest.raises(PromptFileError) as e:
        read_prompts([bad])
    assert "p.jsonl:2: field 'prompt'" in str(e.value) and "p.jsonl:3: malformed JSON" in str(e.value)
    for bad_cfg, field in [({"k": 1}, "k"), ({"k": 10}, "k"), ({"temperature": 0.0}, "temperature")]:
        with pytest.raises(ConfigError) as e:
            from_dict(SampleConfig, {"checkpoint": "c", "prompts": ["p.txt"], **bad_cfg})
        assert e.value.field == field


def test_no_prompt_file_is_said_in_words():
    from engine.sample import PromptFileError, read_prompts
    with pytest.raises(PromptFileError) as e:
        read_prompts([])
    assert e.value.problems == ["no prompt file given: choose a .txt (one prompt a line) or .jsonl of prompts"]


def test_the_preflight_takes_n_prompts_as_the_run_does(tmp_path, tiny_lm_ckpt):
    """All of a 500-prompt file asked as 0 then as 500 is the same run: not refused."""
    from engine.sample import preflight
    (tmp_path / "provenance.json").write_text(json.dumps({"settings": {
        **dataclasses.asdict(from_dict(SampleConfig, {"checkpoint": str(tiny_lm_ckpt), "prompts": ["p.txt"]})),
        "n_prompts": 0}}))
    preflight(from_dict(SampleConfig, {"checkpoint": str(tiny_lm_ckpt), "prompts": ["p.txt"], "n_prompts": 500}),
              tmp_path)
    with pytest.raises(ConfigError, match="temperature"):
        preflight(from_dict(SampleConfig, {"checkpoint": str(tiny_lm_ckpt), "prompts": ["p.txt"],
                                           "temperature": 0.5}), tmp_path)
