"""`python -m engine.<stage>`: --help documents every setting, --write-config writes one to edit,
every float setting refuses inf and NaN by name, and the terminal lines show each stage's key
figures."""
import contextlib
import dataclasses
import io
import json
import math
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.config import ConfigError, default_config, field_docs, field_help, from_dict, load_config
from engine.ppo import PPOConfig
from engine.runio import HumanPrinter, stage_main
from workbench.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {s.name: s.config_class() for s in STAGES}


def cli(stage: str, *args: str) -> tuple[int, str, str]:
    """stage_main in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = stage_main(stage, CONFIGS[stage], lambda *a: "completed", list(args))
        except SystemExit as e:     # argparse's --help
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("stage", list(CONFIGS))
def test_help_lists_every_setting_with_its_type_default_and_meaning(stage):
    code, text, _ = cli(stage, "--help")
    assert code == 0
    lines = text.splitlines()
    docs = field_docs(CONFIGS[stage])
    headings = [i for i, line in enumerate(lines) if line and not line.startswith(" ") and line.endswith(":")]
    for d in docs:
        assert d.help, f"{stage}: setting '{d.name}' has no comment on its line to explain it"
        i = next(i for i, line in enumerate(lines) if line.startswith(f"  {d.name} "))
        entry = " ".join(lines[i:i + 4])
        assert f" {d.type} " in lines[i] + " "
        assert " ".join(d.help.split()[:4]) in " ".join(entry.split())
        heading = lines[max(h for h in headings if h < i)]
        if d.required:
            assert heading.startswith("required") and "  null" not in lines[i]
        else:
            assert not heading.startswith("required") and json.dumps(d.default, ensure_ascii=False) in lines[i]


def test_help_of_the_real_module_groups_shared_settings_apart():
    out = subprocess.run([sys.executable, "-m", "engine.reward", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == ""
    text = out.stdout
    required, own, shared = (text.index(h) for h in ("required (", "reward settings:",
                                                     "settings common to every training stage:"))
    assert required < own < shared
    assert text.index("\n  init ") < own and own < text.index("\n  val_fraction ") < shared
    assert text.index("\n  lr ") > shared and "peak learning rate" in text
    assert "--write-config DIR" in text


def test_write_config_writes_the_defaults_to_edit_and_never_overwrites(tmp_path):
    folder = tmp_path / "new" / "ppo-run"
    code, out, _ = cli("ppo", "--write-config", str(folder))
    assert code == 0 and "fill in policy, reward_model, prompts" in out
    written = json.loads((folder / "config.json").read_text())
    assert written == default_config(PPOConfig)
    assert written["kl_coef"] == PPOConfig.kl_coef and written["probe_prompts"] == []
    assert [k for k, v in written.items() if v is None] == ["policy", "reward_model", "prompts", "value_model",
                                                            "target_kl", "kl_horizon", "kl_budget"]
    # As written, it is refused naming the first setting to fill in ...
    with pytest.raises(ConfigError) as e:
        load_config(PPOConfig, folder / "config.json")
    assert e.value.field == "policy" and "required" in e.value.message
    # ... and once they are filled in, it is the stage's defaults.
    filled = {**written, "policy": "sft", "reward_model": "rm", "prompts": ["p.txt"]}
    assert from_dict(PPOConfig, filled) == PPOConfig(policy="sft", reward_model="rm", prompts=["p.txt"])

    (folder / "config.json").write_text('{"policy": "mine"}\n')
    code, out, err = cli("ppo", "--write-config", str(folder))
    assert code == 2 and "exists" in err and str(folder / "config.json") in err
    assert (folder / "config.json").read_text() == '{"policy": "mine"}\n'


def _floats(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if float in (hints[f.name], *typing.get_args(hints[f.name]))]


@pytest.mark.parametrize("stage", [s for s in CONFIGS if s != "hf_import"])   # it has no float
def test_every_float_setting_refuses_infinity_and_nan_by_name(stage):
    cls = CONFIGS[stage]
    fill = {"str": "x", "list of str": ["x"]}
    required = {d.name: fill[d.type] for d in field_docs(cls) if d.required}
    names = _floats(cls)
    assert names, f"{stage} has no float setting"
    for name in names:
        for bad in (math.inf, -math.inf, math.nan):
            with pytest.raises(ConfigError, match="must be a finite number") as e:
                from_dict(cls, {**required, name: bad})
            assert e.value.field == name


def test_infinity_in_a_config_file_is_named(tmp_path):
    # JSON as Python writes and reads it spells them Infinity and NaN.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"policy": "a", "reward_model": "b", "prompts": ["p"], "missing_end_penalty": math.inf}))
    with pytest.raises(ConfigError) as e:
        load_config(PPOConfig, path)
    assert e.value.field == "missing_end_penalty" and str(path) in str(e.value)


@dataclass
class _Base:
    a: int = 1                       # the a
    b: str = "x # not a comment"
    c: float = 0.5                   # the c


@dataclass
class _Child(_Base):
    a: int = 2
    c: float = 0.25                  # the child's c
    d: list[str] = field(
        default_factory=list)        # ends its statement


def test_field_help_reads_the_comment_that_ends_each_fields_statement():
    assert field_help(_Child) == {"a": "the a", "c": "the child's c", "d": "ends its statement"}


def test_a_ppo_run_on_a_terminal_shows_score_and_kl():
    out = io.StringIO()
    show = HumanPrinter("ppo", out)
    show({"type": "metrics", "step": 3, "objective/score": 0.6421, "objective/kl": 2.1864, "loss/policy": 0.1})
    show({"type": "progress", "step": 3, "total": 40, "unit": "steps", "tokens_per_s": None, "eta_s": 60})
    show({"type": "sample", "step": 3, "prompt": "2+2?", "text": "4", "score": -0.25})
    show({"type": "sample", "step": 4, "prompt": "a\\nb?", "text": "4\n5"})   # a typed \\n, a newline
    assert out.getvalue().splitlines() == ["[ppo] step 3/40  score +0.642  KL 2.186  ETA 1m00s",
                                           "[ppo] sample @ 3: '2+2?' -> '4'  (score -0.250)",
                                           "[ppo] sample @ 4: 'a\\\\nb?' -> '4\\n5'"]


def test_reward_and_sft_lines_show_their_accuracy():
    out = io.StringIO()
    show = HumanPrinter("reward", out)
    show({"type": "metrics", "step": 5, "train/loss": 0.5, "train/accuracy": 0.75, "train/lr": 1e-4})
    show({"type": "progress", "step": 5, "total": 10, "unit": "steps", "tokens_per_s": 2000, "eta_s": 5})
    show({"type": "metrics", "step": 5, "val/loss": 0.61, "val/accuracy": 0.8125})
    sft = HumanPrinter("sft", out)
    sft({"type": "metrics", "step": 50, "val/loss": 1.25, "eval/task_accuracy": 0.4})
    assert out.getvalue().splitlines() == [
        "[reward] step 5/10  loss 0.5  acc 75.0%  lr 0.0001  2.0k tok/s  ETA 5s",
        "[reward] step 5  val loss 0.61  val acc 81.2%",
        "[sft] step 50  val loss 1.25  task acc 40.0%"]


def test_a_refusal_in_the_json_format_is_said_on_stderr_too(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    out = subprocess.run([sys.executable, "-m", "engine.sft", "--run-dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)       # stdout a pipe: JSON events
    done = json.loads(out.stdout.splitlines()[-1])
    assert out.returncode == 2 and done["status"] == "failed"
    assert out.stderr == f"[sft] failed: {done['error']}\n" and "config field 'init'" in out.stderr
