"""The reward model stage: pairs, the loss, bad input, training, normalisation, resume."""
import gzip
import json
import math
import random

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import from_dict
from engine.model import ScalarModel
from engine.weights import load_model
from engine import reward
from engine.reward import NORM_FILE, RewardConfig, run
from engine.reward_data import (PreferenceDataError, collate_answers, encode_answer, ranking_loss,
                                ranking_pairs, read_rankings)
from engine.tokenizer import Tokenizer
from helpers import StopAt, losses

WORDS = "alpha beta gamma delta echo fox golf hotel india juliet kilo lima".split()


def test_pairs_k4_gives_six_and_ties_give_none():
    assert sorted(ranking_pairs([[2], [0], [3], [1]])) == sorted(
        [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)])
    tied = ranking_pairs([[0], [1, 2], [3]])
    assert sorted(tied) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert (1, 2) not in tied and (2, 1) not in tied


def test_loss_matches_a_hand_computed_case():
    r = torch.tensor([2.0, 0.5, -1.0], requires_grad=True)
    loss, margins = ranking_loss(r, ranking_pairs([[0], [1], [2]]), 3)
    sig = lambda z: 1 / (1 + math.exp(-z))
    expected = -(math.log(sig(1.5)) + math.log(sig(3.0)) + math.log(sig(1.5))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert margins.tolist() == [1.5, 3.0, 1.5]
    # With a tie between 1 and 2 the (1,2) pair is gone but the scale stays 1/C(3,2).
    loss_tie, _ = ranking_loss(r, ranking_pairs([[0], [1, 2]]), 3)
    assert loss_tie.item() == pytest.approx(-(math.log(sig(1.5)) + math.log(sig(3.0))) / 3, rel=1e-6)


def test_bad_records_are_listed_with_file_line_and_field(tmp_path):
    f = tmp_path / "prefs.jsonl"
    f.write_text("\n".join([
        json.dumps({"prompt": "p", "answers": ["a", "b"], "ranking": [[0], [1]]}),
        '{"prompt": "p", "answers": ["a", "b"], ',
        json.dumps({"answers": ["a", "b"], "ranking": [[0], [1]]}),
        json.dumps({"prompt": "p", "answers": ["a", "b", "c"], "ranking": [[0], [1], [1]]}),
        json.dumps({"prompt": "p", "chosen": "a"}),
        json.dumps({"prompt": "p", "answers": ["a", "b"], "ranking": [[0, 1]]}),
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}),
    ]) + "\n")
    with pytest.raises(PreferenceDataError) as e:
        read_rankings([f])
    msg = str(e.value)
    for line, field in [(2, "malformed JSON"), (3, "'prompt'"), (4, "'ranking'"), (5, "'rejected'"),
                        (6, "all answers tied"), (7, "the pair holds no preference")]:
        assert f"prefs.jsonl:{line}: " in msg and field in msg
    assert "prefs.jsonl:1:" not in msg


def test_copies_of_one_answer_text_count_once_where_the_best_copy_lies(tmp_path):
    # A small model samples one answer several times. Copies placed apart (an older project, an
    # imported file) gave the pair "6" > "6", copies tied gave "6" > "7" twice.
    f = tmp_path / "prefs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "p", "answers": ["6", "7", "6", "8"], "ranking": [[0], [1], [2], [3]]},
        {"prompt": "q", "answers": ["6", "6", "7"], "ranking": [[0, 1], [2]]},
        {"prompt": "r", "answers": ["a", "b"], "ranking": [[1], [0]]},
    ]) + "\n")
    apart, tied, plain = read_rankings([f])
    assert apart.answers == ["6", "7", "8"] and apart.groups == [[0], [1], [2]]
    assert sorted((apart.answers[w], apart.answers[l]) for w, l in apart.pairs()) == [
        ("6", "7"), ("6", "8"), ("7", "8")]
    assert tied.answers == ["6", "7"] and tied.pairs() == [(0, 1)]
    assert plain.answers == ["a", "b"] and plain.groups == [[1], [0]]
    # Where only copies are left apart, nothing is preferred: the file's line says so.
    f.write_text(json.dumps({"prompt": "p", "answers": ["6", "7", "6"], "ranking": [[0, 1], [2]]}) + "\n")
    with pytest.raises(PreferenceDataError, match=r"prefs.jsonl:1: field 'ranking': with copies"):
        read_rankings([f])


def test_collate_reads_each_answer_at_its_own_end():
    x, last = collate_answers([[1, 5, 6, 2], [1, 7, 2], [1, 2]], pad_id=0)
    assert x.shape == (3, 4) and last.tolist() == [3, 2, 1]
    assert x[1].tolist() == [1, 7, 2, 0]


def packed_case(max_len=24):
    from engine.model import config_from_preset
    torch.manual_seed(0)
    model = ScalarModel(config_from_preset("tiny", 50, max_seq_len=max_len)).eval()
    for p in model.parameters():          # scrambled, so every term of the arithmetic matters
        p.data.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(3, 50, (n,), generator=g).tolist()    # noqa: E731
    groups = []
    for prompt_len, answer_lens in [(9, [3, 1, 5, 2]), (4, [2, 2]), (12, [6, 7, 5])]:
        prompt = rand(prompt_len)
        groups.append([prompt + rand(n) for n in answer_lens])
    return model, groups


def test_packed_answers_score_as_each_alone():
    # A ranking's answers packed behind one copy of their prompt (engine.reward_data.Packed):
    # each answer's reward is the one it gets as a sequence of its own. The third group's
    # answers do not fit one row of 24 tokens with their prompt: they spill into a second.
    from engine.reward_data import pack_answers
    model, groups = packed_case()
    packed = pack_answers(groups, pad_id=0, max_len=24)
    alone = torch.stack([model(torch.tensor([s]))[0, -1] for seqs in groups for s in seqs])
    with torch.no_grad():
        got = packed.rewards(model)
    assert packed.ids.shape[0] == 4 and packed.ids.shape[1] <= 24
    assert packed.tokens == (9 + 11) + (4 + 4) + (12 + 6) + (12 + 7 + 5)
    assert torch.allclose(got, alone.detach(), atol=1e-5), (got, alone)


def test_a_packed_answer_reads_none_of_its_neighbours():
    from engine.reward_data import pack_answers
    model, groups = packed_case()
    with torch.no_grad():
        before = pack_answers(groups, pad_id=0, max_len=24).rewards(model)
        groups[0][1] = groups[0][1][:-1] + [49]            # another last token for answer 1 only
        after = pack_answers(groups, pad_id=0, max_len=24).rewards(model)
    changed = torch.ne(before, after).nonzero().flatten().tolist()
    assert changed == [1]


@pytest.fixture
def sft_ckpt(tiny_lm_ckpt):
    return tiny_lm_ckpt


def write_prefs(path, n=60, seed=0):
    """The preferred answer always contains 'good'; the others 'bad'. K varies from 2 to 4."""
    rnd = random.Random(seed)
    lines = []
    for i in range(n):
        k = 2 + i % 3
        answers = [" ".join(rnd.sample(WORDS, 2)) + (" good" if j == 0 else " bad") for j in range(k)]
        order = list(range(k))
        rnd.shuffle(order)
        answers = [answers[j] for j in order]
        best = order.index(0)
        rest = [j for j in range(k) if j != best]
        lines.append(json.dumps({"prompt": f"question {rnd.choice(WORDS)} {i}", "answers": answers,
                                 "ranking": [[best], rest]}))
    path.write_text("\n".join(lines) + "\n")


def cfg(sft_ckpt, data, **kw):
    base = dict(init=str(sft_ckpt), data=[str(data)], batch_size=4, lr=3e-3, epochs=0, max_steps=40,
                warmup_steps=2, eval_every=20, checkpoint_every=20, log_every=1, device="cpu")
    base.update(kw)
    return from_dict(RewardConfig, base)


def test_reward_model_learns_the_preference_and_saves_norm_stats(sft_ckpt, tmp_path):
    write_prefs(tmp_path / "prefs.jsonl")
    events = []
    assert run(cfg(sft_ckpt, tmp_path / "prefs.jsonl"), tmp_path / "run", events.append) == "completed"
    vals = [e for e in events if e["type"] == "metrics" and "val/accuracy" in e]
    assert vals[-1]["val/accuracy"] >= 0.9 and vals[-1]["val/loss"] < vals[0]["val/loss"]
    train = [e for e in events if e["type"] == "metrics" and "train/accuracy" in e]
    assert {"train/margin", "train/reward_mean", "train/reward_std"} <= set(train[-1])
    for _s, path in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints"):
        stats = json.loads((path / NORM_FILE).read_text())
        # Every distinct answer once: one line's two "bad" answers happen to be one text.
        assert stats["n_answers"] == sum(len(set(json.loads(line)["answers"])) for line in
                                         (tmp_path / "prefs.jsonl").read_text().splitlines())
        assert stats["n_answers"] < sum(2 + i % 3 for i in range(60)) and stats["std"] > 0
        assert isinstance(load_model(path / "model.safetensors"), ScalarModel)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val/accuracy"] >= 0.9 and summary["reward_norm"]["n_answers"] > 0


def test_one_epoch_by_default_sets_the_steps(sft_ckpt, tmp_path):
    write_prefs(tmp_path / "prefs.jsonl", n=30)
    events = []
    run(cfg(sft_ckpt, tmp_path / "prefs.jsonl", epochs=1.0, eval_every=100), tmp_path / "run", events.append)
    progress = [e for e in events if e["type"] == "progress" and e["unit"] == "steps"]
    # 30 rankings, 3 prompts held out (val_fraction 0.1) -> 27 train -> ceil(27 / 4) = 7 steps.
    # The final accuracy's log line says how few held-out rankings it rests on.
    assert any("rests on 3 ranking(s)" in e["message"] for e in events if e["type"] == "log")
    assert progress[-1]["total"] == 7 and progress[-1]["step"] == 7
    # max_steps (40 here) is not what decides: the log says so, rather than ignore it silently.
    assert any(e.get("level") == "warning" and e["message"].startswith("max_steps 40 is not used: epochs 1 "
                                                                         "sets the steps (7)")
               for e in events if e["type"] == "log")


def test_resume_is_exact(sft_ckpt, tmp_path):
    write_prefs(tmp_path / "prefs.jsonl", n=24)
    c = cfg(sft_ckpt, tmp_path / "prefs.jsonl", max_steps=10, eval_every=5, checkpoint_every=100)
    full = []
    run(c, tmp_path / "full", full.append)
    part, rest = [], []
    assert run(c, tmp_path / "res", part.append, StopAt(part, 4)) == "stopped"
    assert run(c, tmp_path / "res", rest.append) == "completed"
    assert min(losses(rest)) == 5
    assert {**losses(part), **losses(rest)} == losses(full)


def test_trains_the_same_way_on_imported_pairs(sft_ckpt, tmp_path):
    write_prefs(tmp_path / "kway.jsonl", n=60)
    pairs = []
    for line in (tmp_path / "kway.jsonl").read_text().splitlines():
        r = json.loads(line)
        best = r["ranking"][0][0]
        for worse in r["ranking"][1]:
            pairs.append(json.dumps({"prompt": r["prompt"], "chosen": r["answers"][best],
                                     "rejected": r["answers"][worse]}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    events = []
    assert run(cfg(sft_ckpt, tmp_path / "pairs.jsonl"), tmp_path / "run", events.append) == "completed"
    vals = [e for e in events if e["type"] == "metrics" and "val/accuracy" in e]
    assert vals[-1]["val/accuracy"] >= 0.9 and vals[-1]["val/loss"] < vals[0]["val/loss"]


HH_SINGLE = {"chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: 4",
             "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: 22"}
HH_MULTI = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Add 2 and 3.\n\nAssistant: 5",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Add 2 and 3.\n\nAssistant: 23"}


def test_gzipped_preferences_read_as_the_plain_file(tmp_path):
    write_prefs(tmp_path / "prefs.jsonl", n=20)
    gz = tmp_path / "prefs.jsonl.gz"
    gz.write_bytes(gzip.compress((tmp_path / "prefs.jsonl").read_bytes()))
    plain, packed = read_rankings([tmp_path / "prefs.jsonl"]), read_rankings([gz])
    assert [(r.prompt, r.answers, r.groups) for r in packed] == \
        [(r.prompt, r.answers, r.groups) for r in plain]
    assert packed[3].where == f"{gz}:4"
    gz.write_bytes(gzip.compress((tmp_path / "prefs.jsonl").read_bytes())[:-30])   # cut short
    with pytest.raises(PreferenceDataError, match="gzip stream ends early"):
        read_rankings([gz])


def test_transcripts_are_accepted_as_the_import_reads_them(tmp_path, tiny_lm_ckpt):
    f = tmp_path / "hh.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (HH_SINGLE, HH_MULTI,
                                                   {"chosen": "no turns", "rejected": "x"})) + "\n")
    with pytest.raises(PreferenceDataError) as e:
        read_rankings([f])
    assert e.value.problems == [f"{f}:3: field 'chosen' has no '\\n\\nAssistant:' turn; "
                                f"field 'rejected' has no '\\n\\nAssistant:' turn"]
    f.write_text("\n".join(json.dumps(r) for r in (HH_SINGLE, HH_MULTI)) + "\n")
    single, multi = read_rankings([f])
    assert (single.prompt, single.answers, single.groups) == ("What is 2 + 2?", ["4", "22"], [[0], [1]])
    assert multi.prompt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": "Add 2 and 3."}]
    # The same conversation as the K-way record an import of the file exports encodes the same.
    kway = tmp_path / "kway.jsonl"
    kway.write_text(json.dumps({"prompt": "Human: Hi ...", "messages": multi.prompt,
                                "answers": ["5", "23"], "ranking": [[0], [1]]}) + "\n")
    [exported] = read_rankings([kway])
    tok = Tokenizer.from_file(tiny_lm_ckpt / "tok.json")
    assert [encode_answer(tok, exported.prompt, a, 64) for a in exported.answers] == \
        [encode_answer(tok, multi.prompt, a, 64) for a in multi.answers]


def test_normalisation_scores_each_kept_checkpoint_once_and_shows_progress(sft_ckpt, tmp_path,
                                                                            monkeypatch):
    write_prefs(tmp_path / "prefs.jsonl", n=24)
    n_answers = sum(2 + i % 3 for i in range(24))
    passes = []
    score_items = reward.score_items

    def counted(model, scorer, items, batch_size, on_batch=None):
        passes.append(len(items))
        return score_items(model, scorer, items, batch_size, on_batch)

    monkeypatch.setattr(reward, "score_items", counted)
    events = []
    c = cfg(sft_ckpt, tmp_path / "prefs.jsonl", max_steps=12, eval_every=100, checkpoint_every=4,
            keep_last=2, seq_len=12)
    assert run(c, tmp_path / "run", events.append) == "completed"
    kept = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    done = next(i for i, e in enumerate(events) if e["type"] == "progress" and e["unit"] == "steps"
                and e["step"] == e["total"])
    after = [e for e in events[done + 1:] if e["type"] == "progress"]
    assert {e["unit"] for e in after} == {"answers"}
    assert after[-1]["step"] == after[-1]["total"] == len(kept) * n_answers
    # One pass over all answers per kept checkpoint, and nothing after it: the final
    # checkpoint's validation figures come from its normalisation pass.
    assert passes[len(passes) - len(kept):] == [24] * len(kept)
    assert 24 not in passes[:len(passes) - len(kept)]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    final = ckpt.resolve_checkpoint(tmp_path / "run")
    model = load_model(final / "model.safetensors").eval()
    again = reward.evaluate_rankings(model, reward.Scorer(Tokenizer.from_file(final / "tokenizer.json"),
                                                          12, torch.device("cpu")),
                                     _val_items(tmp_path / "prefs.jsonl", c), c.batch_size)
    assert summary["val/accuracy"] == again["val/accuracy"]
    assert summary["val/loss"] == pytest.approx(again["val/loss"], rel=1e-5)
    # Every answer is cut to 12 tokens; the warning counts each once, not once per pass.
    [warning] = [e["message"] for e in events if e["type"] == "log" and "longer than" in e["message"]]
    assert warning.startswith(f"{n_answers} of {n_answers} answer sequences were longer")


def _val_items(path, c):
    from engine.reward_data import split_by_prompt
    return split_by_prompt(read_rankings([path]), c.val_fraction, c.seed)[1]


def test_one_prompt_written_two_ways_falls_on_one_side_of_the_split():
    # "prompt": "X" in one file, "messages": [{"role": "user", "content": "X"}] in another: the
    # same conversation, so never in train and validation both.
    from engine.reward_data import Ranking, split_by_prompt
    items = []
    for i in range(20):
        text = f"question {i}"
        items.append(Ranking(text, ["a", "b"], [[0], [1]], f"a.jsonl:{i}"))
        items.append(Ranking([{"role": "user", "content": text, "name": "x"}], ["c", "d"], [[0], [1]], f"b.jsonl:{i}"))
    train, val = split_by_prompt(items, 0.3, seed=0)
    def text(r):
        return r.prompt if isinstance(r.prompt, str) else r.prompt[0]["content"]
    assert val and not {text(r) for r in train} & {text(r) for r in val}
