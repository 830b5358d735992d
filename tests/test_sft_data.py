"""SFT data: the three formats, every error named by file/line/field, truncation, masks, batches."""
import json
from pathlib import Path

import pytest
import torch

from engine.sft_data import (EpochSampler, Example, Record, SFTDataError, collate, fit,
                             read_records, read_tasks, render, split_records, targets_for)
from engine.tokenizer import render_chat, train_from_texts

TEXT = ["What is 2 + 3? The answer is 5. Reverse the word cat: tac. " * 20,
        "You are a helpful assistant. Hello there, how are you today? " * 20]


@pytest.fixture(scope="module")
def tok():
    return train_from_texts(TEXT, vocab_size=300)


def write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_each_format_becomes_a_conversation(tmp_path):
    f = write(tmp_path / "d.jsonl", [
        {"prompt": "What is 2 + 3?", "response": "5"},
        {"instruction": "Reverse the word.", "input": "cat", "output": "tac"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say hi.", "output": "hi", "id": 7},          # input optional; extra keys ignored
        {"instruction": "Say hi.", "input": None, "output": "hi"},
        "",                                                          # blank lines are skipped
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}]},
    ])
    recs = read_records([f])
    assert [r.line for r in recs] == [1, 2, 3, 4, 5, 7]
    assert recs[0].messages == [{"role": "user", "content": "What is 2 + 3?"},
                                {"role": "assistant", "content": "5"}]
    # Alpaca: instruction and a non-empty input are joined by a blank line
    assert recs[1].messages[0] == {"role": "user", "content": "Reverse the word.\n\ncat"}
    assert all(r.messages[0]["content"] == "Say hi." for r in recs[2:5])
    assert [m["role"] for m in recs[5].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert recs[1].where == f"{f}:2"


def test_every_problem_is_listed_with_file_line_and_field(tmp_path):
    f = write(tmp_path / "bad.jsonl", [
        {"prompt": "a", "response": "b"},                                   # 1 fine
        {"prompt": "a"},                                                    # 2 missing
        {"prompt": "  ", "response": "b"},                                  # 3 empty
        '{"prompt": "a", "response": ',                                     # 4 malformed JSON
        {"instruction": 5, "output": "x"},                                  # 5 wrong type
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"text": "plain"},                                                  # 7 no format
        {"messages": [{"role": "user", "content": "hi"}]},                  # 8 no answer
        {"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]},
        ["not", "an", "object"],                                            # 10
        {"prompt": "a", "response": "b", "messages": []},                   # 11 two formats
        {"messages": "hello"},                                              # 12
    ])
    with pytest.raises(SFTDataError) as e:
        read_records([f])
    lines = str(e.value).splitlines()
    assert lines[0].startswith("11 problem(s) in the SFT data") and "nothing was trained" in lines[0]
    expected = [
        f"{f}:2: field 'response': missing",
        f"{f}:3: field 'prompt': is empty",
        f"{f}:4: malformed JSON at column",
        f"{f}:5: field 'instruction': expected a string, got int",
        f"{f}:6: field 'messages[0].role': unknown role 'robot'",
        f"{f}:7: matches no SFT format (fields: text)",
        f"{f}:8: field 'messages': no assistant turn",
        f"{f}:9: field 'messages[0].content': expected a string, got list",
        f"{f}:10: expected a JSON object",
        f"{f}:11: mixes the fields of two formats",
        f"{f}:12: field 'messages': expected a list, got str",
    ]
    assert len(e.value.problems) == len(expected)
    for want, got in zip(expected, e.value.problems):
        assert got.startswith(want), (want, got)
    assert lines[1:] == e.value.problems


def test_malformed_json_on_line_4_and_a_missing_file_are_reported_together(tmp_path):
    f = write(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}] * 3 + ["{oops"])
    with pytest.raises(SFTDataError) as e:
        read_records([f, tmp_path / "missing.jsonl"])
    assert e.value.problems[0].startswith(f"{f}:4: malformed JSON at column 2")
    assert e.value.problems[1].startswith(f"{tmp_path / 'missing.jsonl'}: cannot open")


def test_the_list_is_capped_but_counts_everything(tmp_path):
    f = write(tmp_path / "d.jsonl", [{"prompt": "a"}] * 50)
    with pytest.raises(SFTDataError) as e:
        read_records([f])
    text = str(e.value)
    assert len(e.value.problems) == 50 and "50 problem(s)" in text
    assert f"{f}:20:" in text and f"{f}:21:" not in text and text.endswith("... and 30 more")


def test_an_empty_file_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(SFTDataError, match="no records"):
        read_records([tmp_path / "e.jsonl"])


# bos <|system|> s <|end|> <|user|> a b c d <|end|> <|assistant|> X Y <|end|>
IDS = [1, 3, 50, 2, 4, 60, 61, 62, 63, 2, 5, 70, 71, 2]
MASK = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]


SPECIAL = frozenset({1, 2, 3, 4, 5})


def test_fit_leaves_a_sample_that_fits_alone():
    assert fit(IDS, MASK, 14, SPECIAL, SPECIAL) == (IDS, MASK, "")


def test_fit_cuts_the_middle_of_the_prompt_keeping_its_start_and_end():
    ids, mask, cut = fit(IDS, MASK, 10, SPECIAL, SPECIAL)
    assert cut == "prompt"
    assert ids == [1, 3, 50, 2, 63, 2, 5, 70, 71, 2]       # the system turn and "d" stay
    assert mask == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    # the words of the prompt may all go, but bos and the role token opening the answer stay
    assert fit(IDS, MASK, 6, SPECIAL, SPECIAL) == ([1, 3, 5, 70, 71, 2], [0, 0, 0, 1, 1, 1], "whole prompt")
    assert fit(IDS, MASK, 5, SPECIAL, SPECIAL) == ([1, 5, 70, 71, 2], [0, 0, 1, 1, 1], "whole prompt")


def test_fit_cuts_the_answer_tail_only_when_the_answer_alone_does_not_fit():
    assert fit(IDS, MASK, 4, SPECIAL, SPECIAL) == ([1, 5, 70, 71], [0, 0, 1, 1], "answer")
    assert fit(IDS, MASK, 3, SPECIAL, SPECIAL) == ([1, 5, 70], [0, 0, 1], "answer")


def test_fit_drops_turns_after_the_last_answer_first():
    ids, mask = IDS + [4, 80, 81, 2], MASK + [0, 0, 0, 0]
    assert fit(ids, mask, 15, SPECIAL, SPECIAL) == (IDS, MASK, "after the answer")
    assert fit(ids, mask, 12, SPECIAL, SPECIAL) == ([1, 3, 50, 2, 4, 62, 63, 2, 5, 70, 71, 2],
                                           [0] * 9 + [1, 1, 1], "prompt")


def test_fit_keeps_the_last_answer_of_a_multi_turn_conversation():
    # bos user q end asst A end user q2 end asst B C end
    ids = [1, 4, 60, 2, 5, 70, 2, 4, 61, 2, 5, 71, 72, 2]
    mask = [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1]
    assert fit(ids, mask, 9, SPECIAL, SPECIAL) == ([1, 4, 60, 61, 2, 5, 71, 72, 2],
                                          [0, 0, 0, 0, 0, 0, 1, 1, 1], "prompt")
    # an earlier answer that lost a token is context, not target
    assert fit(ids, mask, 13, SPECIAL, SPECIAL) == ([1, 4, 60, 2, 5, 2, 4, 61, 2, 5, 71, 72, 2],
                                           [0] * 10 + [1, 1, 1], "prompt")
    # ... and one that lost its role token; a whole one stays a target
    ids = [1, 4, 60, 61, 62, 63, 64, 65, 2, 5, 70, 2, 4, 66, 2, 5, 71, 2]
    mask = [0] * 10 + [1, 1] + [0] * 4 + [1, 1]
    assert fit(ids, mask, 17, SPECIAL, SPECIAL) == (ids[:8] + ids[9:], mask[:8] + mask[9:], "prompt")
    assert fit(ids, mask, 15, SPECIAL, SPECIAL) == (ids[:7] + ids[10:], [0] * 13 + [1, 1], "prompt")


def test_targets_are_exactly_the_assistant_tokens_shifted_by_one(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "2 + 3?"},
            {"role": "assistant", "content": "5"}]
    ids, mask = render_chat(tok, msgs)
    y = targets_for(ids, mask)
    assert len(y) == len(ids) - 1
    trained = {t for t, v in enumerate(y) if v != -100}
    assistant = {p for p, m in enumerate(mask) if m}
    assert trained == {p - 1 for p in assistant}
    assert all(y[p - 1] == ids[p] for p in assistant)
    # the answer tokens and each closing <|end|>, nothing else
    n_answer = len(tok.encode("Hello there")) + 1 + len(tok.encode("5")) + 1
    assert len(trained) == n_answer and sum(ids[p] == tok.end_id for p in assistant) == 2


def test_truncation_keeps_the_start_and_end_of_the_prompt_end_to_end(tok):
    rec = Record(Path("d.jsonl"), 3, [{"role": "user", "content": "Add these: " + "2 + 3 " * 9},
                                      {"role": "assistant", "content": "5"}])
    full_ids, full_mask = render_chat(tok, rec.messages)
    answer = [tok.assistant_id] + tok.encode("5") + [tok.end_id]
    (ex,), report = render([rec], tok, len(answer) + 6)
    assert report.truncated == ["d.jsonl:3"] and not report.damaged and ex.truncated
    # bos, <|user|> and the first two tokens of the instruction; the last prompt token, <|end|>
    assert ex.ids == [tok.bos_id] + full_ids[1:4] + full_ids[-(len(answer) + 2):]
    assert ex.ids[2:4] == tok.encode("Add these: ")[:2]
    assert ex.mask == [0] * 7 + [1] * (len(answer) - 1)
    assert {t for t, v in enumerate(targets_for(ex.ids, ex.mask)) if v != -100} == \
        set(range(6, len(ex.ids) - 1))


def test_samples_that_lose_the_whole_prompt_or_answer_are_dropped_refused_or_kept(tok):
    q = [{"role": "user", "content": "What is 2 + 3? " * 5}]
    fits = Record(Path("d.jsonl"), 1, q + [{"role": "assistant", "content": "5"}])
    no_prompt = Record(Path("d.jsonl"), 2, q + [{"role": "assistant", "content": "five " * 3}])
    half = Record(Path("d.jsonl"), 3, q + [{"role": "assistant", "content": "five " * 12}])
    max_len = len(tok.encode("five " * 3)) + 5       # bos, user, end, asst ... end: no words left
    kept, report = render([fits, no_prompt, half], tok, max_len)
    assert [e.where for e in kept] == ["d.jsonl:1"]
    assert (report.prompt_lost, report.answer_cut, report.dropped) == (["d.jsonl:2"], ["d.jsonl:3"], 2)
    assert "2 that lost all of the prompt or part of the answer are left out" in \
        report.message(max_len, "train")
    kept, report = render([fits, no_prompt, half], tok, max_len, too_long="keep")
    assert [e.where for e in kept] == ["d.jsonl:1", "d.jsonl:2", "d.jsonl:3"] and report.dropped == 0
    with pytest.raises(SFTDataError) as e:
        render([fits, no_prompt, half], tok, max_len, too_long="refuse")
    assert [p.split(" (")[0] for p in e.value.problems] == [
        "d.jsonl:2: loses all of its prompt to the context", "d.jsonl:3: loses part of its answer to the context"]


def test_samples_without_answer_tokens_are_reported_and_all_empty_is_visible(tok):
    rec = Record(Path("d.jsonl"), 1,
                 [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    # Room for bos and the role token only: dropped as having lost their answer, or, kept,
    # dropped after all for having nothing to learn.
    assert render([rec, rec], tok, 2)[1].answer_cut == ["d.jsonl:1", "d.jsonl:1"]
    examples, report = render([rec, rec], tok, 2, too_long="keep")
    assert examples == [] and report.empty == ["d.jsonl:1", "d.jsonl:1"]
    assert "no answer token left" in report.message(2, "train")


def test_collate_right_pads_inputs_and_ignores_their_targets(tok):
    a = Example([1, 4, 60, 2, 5, 70, 2], [0, 0, 0, 0, 0, 1, 1], "a")
    b = Example([1, 4, 61, 62, 63, 2, 5, 71, 72, 2], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1], "b")
    x, y, n, lengths = collate([a, b], tok.pad_id)
    assert x.shape == y.shape == (2, 9) and n == 6 + 9 and lengths.tolist() == [6, 9]
    assert x[0].tolist() == [1, 4, 60, 2, 5, 70, tok.pad_id, tok.pad_id, tok.pad_id]
    assert y[0].tolist() == [-100, -100, -100, -100, 70, 2, -100, -100, -100]
    assert y[1].tolist() == [-100] * 6 + [71, 72, 2]


def test_right_padding_does_not_change_the_real_tokens_logits(tok):
    from engine.model import Transformer, config_from_preset
    torch.manual_seed(0)
    model = Transformer(config_from_preset("tiny", tok.vocab_size, d_model=32, n_layer=1, n_head=2,
                                           n_kv_head=2, d_ff=64, max_seq_len=32)).eval()
    a = Example([1, 4, 60, 2, 5, 70, 2], [0, 0, 0, 0, 0, 1, 1], "a")
    b = Example([1, 4, 61, 62, 63, 64, 65, 2, 5, 71, 72, 2], [0] * 9 + [1, 1, 1], "b")
    x, _, _, lengths = collate([a, b], tok.pad_id)
    alone, _, _, _ = collate([a], tok.pad_id)
    with torch.no_grad():
        assert torch.allclose(model(x)[0, :6], model(alone)[0], atol=1e-6)
        # Given the rows' lengths the model runs the real tokens alone: the same logits, and
        # zeros (not the pads' own logits) where no token is.
        ragged = model(x, lengths=lengths)
        assert torch.allclose(ragged[0, :6], model(alone)[0], atol=1e-6)
        assert torch.allclose(ragged[1], model(x)[1], atol=1e-6) and (ragged[0, 6:] == 0).all()


def test_split_is_by_record_deterministic_and_disjoint():
    recs = [Record(Path("d"), i, []) for i in range(1, 101)]
    train, val = split_records(recs, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert {r.line for r in train}.isdisjoint({r.line for r in val})
    assert split_records(recs, 0.1, seed=3) == (train, val)
    assert split_records(recs, 0.1, seed=4)[1] != val
    assert len(split_records(recs[:3], 0.01, seed=0)[1]) == 1
    with pytest.raises(SFTDataError):
        split_records(recs[:1], 0.1, seed=0)


def test_epoch_sampler_permutes_each_epoch_and_resumes_exactly():
    s = EpochSampler(10, seed=1)
    first = s.take(10)
    second = s.take(10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    s = EpochSampler(10, seed=1)
    s.take(13)
    state = json.loads(json.dumps(s.state()))
    expected = s.take(25)
    t = EpochSampler(10, seed=1)
    t.load(state)
    assert t.take(25) == expected
    with pytest.raises(Exception, match="10 samples"):
        EpochSampler(11, seed=1).load(state)


def test_eval_tasks_are_read_with_file_and_line(tmp_path):
    good = {"kind": "add", "prompt": "What is 1 + 2?", "answer": "3", "data": {"a": 1, "b": 2}}
    f = write(tmp_path / "t.jsonl", [good, good, {"kind": "add", "prompt": ""}, "{"])
    with pytest.raises(SFTDataError) as e:
        read_tasks(f)
    assert e.value.problems[0].startswith(f"{f}:3: task field 'prompt'")
    assert e.value.problems[1].startswith(f"{f}:4: malformed JSON")
    f = write(tmp_path / "t.jsonl", [good] * 5)
    assert len(read_tasks(f, limit=3)) == 3 and len(read_tasks(f)) == 5
