"""The GRPO stage: group advantages, the exact first ratio, the reward functions, resume, refusals."""
import json

import pytest
import torch

from engine.config import ConfigError, from_dict
from engine.grpo import GRPOConfig, main, run
from engine.grpo_core import group_advantages, grpo_losses, kl_k3, uniform_groups
from engine.grpo_rewards import Answers, FormatReward, LengthReward, TaskReward
from engine.runio import StageError
from engine.trainer import COLLAPSE_STEPS
from helpers import StopAt, metrics


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(f"What is {10 + i} + {3 * i}?" for i in range(8)) + "\n")
    return p


@pytest.fixture
def chars(tmp_path):
    """A user reward that tells the tiny random model's answers apart (none ends, none is right)."""
    (tmp_path / "chars.py").write_text("def chars(prompt, answer):\n    return len(answer.strip()) / 10\n")
    return f"{tmp_path / 'chars.py'}:chars"


def cfg(lm, prompts, **kw):
    base = dict(policy=str(lm), prompts=[str(prompts)], steps=3, prompts_per_step=2, group_size=4,
                minibatch_size=4, max_new_tokens=8, lr=1e-3, task_weight=1.0, length_weight=1.0,
                probe_every=100, probe_tokens=8, checkpoint_every=100, eval_every=100, device="cpu")
    base.update(kw)
    return from_dict(GRPOConfig, base)


def test_advantages_are_zero_for_a_group_whose_rewards_are_equal():
    for scale in (True, False):
        for same in (0.1, 0.3, 1 / 3, -2.7, 0.0):
            rewards = torch.tensor([same] * 3 + [1.0, 0.0, 0.5])
            adv = group_advantages(rewards, 3, scale=scale)
            assert adv[:3].tolist() == [0.0, 0.0, 0.0]
            assert adv[3] > adv[5] > adv[4] and abs(float(adv[3:].sum())) < 1e-6
    assert uniform_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2).tolist() == [True, False]
    # Scaled: the group's std divides; unscaled (Dr. GRPO): the mean is only subtracted.
    assert group_advantages(torch.tensor([0.0, 2.0]), 2, scale=False).tolist() == [-1.0, 1.0]
    assert group_advantages(torch.tensor([0.0, 2.0]), 2).tolist() == pytest.approx([-0.7071, 0.7071], abs=1e-3)


def test_the_loss_is_a_token_average_and_k3_is_zero_at_the_reference():
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.float)
    logp = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, -0.3, 5.0, 99.0]])
    # A pad position with a huge log-ratio must not reach the mean (exp would overflow).
    ref = logp.clone()
    ref[1, 3] = -99.0
    L = grpo_losses(logp, logp, ref, torch.tensor([1.0, -2.0]), mask, 0.2, beta=0.1)
    assert float(L.ratio) == 1.0 and float(L.kl) == 0.0 and float(L.clipfrac) == 0.0
    assert float(L.policy) == pytest.approx((-1.0 * 3 + 2.0 * 1) / 4)      # every answer token weighs the same
    assert kl_k3(logp, logp - 0.5, mask)[0, 1] == pytest.approx(float(torch.exp(torch.tensor(-0.5)) + 0.5 - 1))


def test_reward_functions_score_each_answer():
    prompts = ["What is 2 + 3?", "What is 2 + 3?", "What is 2 + 3?", "Tell me a story."]
    texts = ["5", "The answer is 5.", "6", "5"]
    a = Answers(prompts, texts, [True, True, False, True], [2, 6, 12, 2], torch.zeros(4, 1), torch.zeros(4, 1))
    checker = TaskReward(1.0)
    assert checker(a).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert checker.judged(prompts).tolist() == [True, True, True, False]
    assert LengthReward(1.0, 4, 8)(a).tolist() == [0.0, -0.25, -1.0, 0.0]
    assert FormatReward(1.0, r"\d+")(a).tolist() == [1.0, 0.0, 0.0, 1.0]    # and only answers that ended


def test_first_minibatch_ratio_is_exactly_one_and_kl_is_exactly_zero(tiny_lm_ckpt, rm_ckpt, prompts, tmp_path):
    events = []
    c = cfg(tiny_lm_ckpt, prompts, reward_model=str(rm_ckpt), rm_weight=0.5, format_weight=0.2, probe_every=3)
    assert run(c, tmp_path, events.append) == "completed"
    m = metrics(events)
    assert m[1]["val/ratio_first"] == 1.0           # exactly: same weights, same inputs, same shapes
    assert m[1]["objective/kl"] == 0.0 and m[1]["objective/kl_k3"] == 0.0    # policy == reference
    assert m[2]["objective/kl"] != 0.0 and m[3]["val/ratio_first"] == 1.0
    for key in ("reward/total", "reward/task", "reward/task_std", "reward/rm", "reward/length", "reward/format",
                "task/accuracy", "groups/uniform_fraction", "objective/entropy", "policy/clipfrac",
                "rollout/length", "rollout/eos_fraction", "loss/policy"):
        assert key in m[3], key
    assert m[1]["task/accuracy"] == 0.0 and m[1]["task/judged_fraction"] == 1.0
    probes = [e for e in events if e["type"] == "sample"]
    assert {e["step"] for e in probes} == {0, 3} and all("score" in e for e in probes)
    assert (tmp_path / "checkpoints" / "step-000003" / "model.safetensors").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stage"] == "grpo" and summary["step"] == 3


def test_a_user_reward_that_raises_is_reported_with_the_prompt(tiny_lm_ckpt, prompts, tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text(
        "def score(prompt, answer):\n"
        "    if '13' in prompt:\n"
        "        raise ValueError('cannot judge\\nthis one')\n"
        "    return 1.0\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = dict(policy=str(tiny_lm_ckpt), prompts=[str(prompts)], steps=4, prompts_per_step=4, group_size=2,
                  minibatch_size=4, max_new_tokens=4, task_weight=0.0, user_reward="../my_reward.py:score",
                  probe_every=100, device="cpu")
    (run_dir / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)             # the run folder named relative to here, as a user may
    assert main(["--run-dir", "run", "--log-format", "json"]) == 1
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    done = events[-1]
    assert done["type"] == "done" and done["status"] == "failed"
    assert "\n" not in done["error"]
    assert done["error"].startswith("user_reward ../my_reward.py:score raised ValueError: cannot judge this one "
                                    "at my_reward.py:3 on the prompt 'What is 13 + 9?' (answer ")
    assert not any("Traceback" in json.dumps(e) for e in events)


def test_a_finished_run_started_again_keeps_its_summary(tiny_lm_ckpt, prompts, tmp_path):
    # As `workbench pipeline --resume` does after a kill between the final checkpoint and the
    # journal: the run has nothing left to train, and its figures stay in its summary.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = dict(policy=str(tiny_lm_ckpt), prompts=[str(prompts)], steps=2, prompts_per_step=2,
                  group_size=2, minibatch_size=4, max_new_tokens=4, probe_every=100, device="cpu")
    (run_dir / "config.json").write_text(json.dumps(config))
    assert main(["--run-dir", str(run_dir), "--log-format", "json"]) == 0
    first = json.loads((run_dir / "summary.json").read_text())
    assert main(["--run-dir", str(run_dir), "--log-format", "json"]) == 0
    again = json.loads((run_dir / "summary.json").read_text())
    assert "reward/total" in first, sorted(first)
    drop = lambda d: {k: v for k, v in d.items() if k not in ("peak_rss_mb", "seconds")}  # noqa: E731
    assert drop(again) == drop(first)


def test_a_user_reward_that_cannot_be_loaded_is_refused_before_any_work(tiny_lm_ckpt, prompts, tmp_path):
    (tmp_path / "r.py").write_text("def other(prompt, answer):\n    return 0.0\n")
    for spec, says in (("r.py:score", "defines no function 'score'"), ("nothere.py:f", "no such file"),
                       ("r.py", "expected 'path/to/file.py:function'")):
        with pytest.raises(ConfigError, match=says) as e:
            run(cfg(tiny_lm_ckpt, prompts, user_reward=str(tmp_path / spec) if ":" in spec else spec),
                tmp_path / "run", None)
        assert e.value.field == "user_reward"
    # A relative path is read from the run's folder: the message says so (an app user typed one).
    with pytest.raises(ConfigError, match=r"run\W+nothere.py: no such file \(a relative path is read from the run's folder"):
        run(cfg(tiny_lm_ckpt, prompts, user_reward="nothere.py:f"), tmp_path / "run", None)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_user_reward_file_is_read_not_run_when_the_settings_are_checked(tmp_path):
    from engine.grpo_rewards import check_user_file
    ran = tmp_path / "ran"
    bound = {"def reward(p, a): return 1.0": True, "reward = lambda p, a: 1.0": True,
             "from math import fsum as reward": True, "from math import *": True,
             "globals()['reward'] = len": True, "def score(p, a): return 1.0": False,
             "class Reward: pass": False, "if True:\n    reward = len": True}
    for n, (source, ok) in enumerate(bound.items()):
        path = tmp_path / f"r{n}.py"
        path.write_text(f"open({str(ran)!r}, 'w')\n{source}\n")
        if ok:
            check_user_file(f"{path}:reward")
        else:
            with pytest.raises(ConfigError, match="defines no function 'reward'"):
                check_user_file(f"{path}:reward")
    check_user_file("relative/later.py:reward")       # read from the run's folder, when there is one
    assert not ran.exists()                            # the user's code did not run


def test_resume_is_exact(tiny_lm_ckpt, prompts, chars, tmp_path):
    c = cfg(tiny_lm_ckpt, prompts, steps=4, kl_coef=0.1, grpo_epochs=2, minibatch_size=3, user_reward=chars)
    full = []
    run(c, tmp_path / "full", full.append)

    part, rest = [], []
    assert run(c, tmp_path / "res", part.append, StopAt(part, 2)) == "stopped"
    assert run(c, tmp_path / "res", rest.append) == "completed"
    keys = ("reward/total", "reward/user", "objective/kl", "loss/policy", "loss/kl", "val/ratio")
    pick = lambda evs: {s: tuple(e[k] for k in keys) for s, e in metrics(evs).items()}  # noqa: E731
    assert min(metrics(rest)) == 3
    assert {**pick(part), **pick(rest)} == pick(full)
    assert len(set(pick(full).values())) == 4        # the steps differ: something was learned and compared


def test_a_bad_setting_is_refused_by_name(tiny_lm_ckpt, prompts, tmp_path):
    cases = {"group_size": dict(group_size=1), "minibatch_size": dict(minibatch_size=64),
             "reward_model": dict(rm_weight=1.0), "format_regex": dict(format_regex="(unclosed"),
             "task_weight": dict(task_weight=0.0, length_weight=0.0), "cliprange": dict(cliprange=1.5),
             "user_reward": dict(user_reward="reward.txt:f"), "temperature": dict(temperature=0.0)}
    for name, bad in cases.items():
        with pytest.raises(ConfigError) as e:
            cfg(tiny_lm_ckpt, prompts, **bad)
        assert e.value.field == name
    with pytest.raises(ConfigError) as e:
        cfg(tiny_lm_ckpt, prompts, groupsize=4)
    assert e.value.field == "groupsize"
    # The checker needs prompts it can score; a language model is needed as the policy.
    other = tmp_path / "chat.txt"
    other.write_text("Tell me a story.\nHow are you?\n")
    with pytest.raises(ConfigError, match="none of the 2 prompts is a task") as e:
        run(cfg(tiny_lm_ckpt, other), tmp_path / "a", None)
    assert e.value.field == "prompts"


def test_groups_that_all_scored_alike_teach_nothing_and_a_run_of_them_stops(tiny_lm_ckpt, prompts, tmp_path):
    # The tiny random model never answers a task right: every group scores 0 on the checker alone.
    events = []
    c = cfg(tiny_lm_ckpt, prompts, length_weight=0.0, steps=COLLAPSE_STEPS + 2, prompts_per_step=1, group_size=2,
            minibatch_size=2, max_new_tokens=2)
    with pytest.raises(StageError, match=rf"every group's answers have scored alike for {COLLAPSE_STEPS} steps "
                                         rf"in a row \(to step {COLLAPSE_STEPS}\): nothing to learn"):
        run(c, tmp_path, events.append)
    m = metrics(events)
    assert m[1]["groups/uniform_fraction"] == 1.0 and m[1]["policy/trained_fraction"] == 0.0
    assert m[3]["objective/kl"] == 0.0 and m[3]["val/ratio_first"] == 1.0      # no update: still the reference
