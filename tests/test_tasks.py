"""engine.tasks: the checker must be exact, the generator deterministic and balanced."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from engine import tasks as T
from engine.tasks import (KINDS, Task, answer_for, as_transcript, check, generate_tasks,
                          make_pools, make_splits, score, task_accuracy)


@pytest.fixture(scope="module")
def sample() -> list[Task]:
    return generate_tasks(660, seed=3)


def test_at_least_eight_kinds_all_generated(sample):
    assert len(KINDS) >= 8
    assert set(t.kind for t in sample) == set(KINDS)


def test_word_list_and_facts():
    assert len(T.WORDS) >= 200
    assert len(set(T.WORDS)) == len(T.WORDS)
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 8 for w in T.WORDS)
    assert sum(len(v) for v in T.LOOKUP.values()) >= 60
    # Every opposite is asked both ways and comes back to itself.
    assert all(T.OPPOSITES[T.OPPOSITES[k]] == k for k in T.OPPOSITES)


def test_canonical_answers_check_against_themselves(sample):
    for t in sample:
        assert check(t, t.answer), t
        assert score(t, t.answer) == 1.0
        assert answer_for(t.kind, t.data) == t.answer


def test_answers_recomputed_independently(sample):
    seen = Counter()
    for t in sample:
        d = t.data
        if t.kind == "add":
            assert int(t.answer) == d["a"] + d["b"]
            assert f"{d['a']}" in t.prompt and f"{d['b']}" in t.prompt
            assert 10 <= d["a"] <= 999 and 10 <= d["b"] <= 999
        elif t.kind == "sub":
            assert int(t.answer) == d["a"] - d["b"] >= 0
        elif t.kind == "mul":
            assert int(t.answer) == d["a"] * d["b"]
            assert 1 <= d["a"] <= 99 and 1 <= d["b"] <= 99
        elif t.kind == "reverse":
            assert t.answer == "".join(reversed(d["word"])) and d["word"] in t.prompt
        elif t.kind == "sort":
            nums = d["numbers"]
            assert 3 <= len(nums) <= 6
            assert [int(x) for x in t.answer.split(", ")] == sorted(nums)
            assert ", ".join(map(str, nums)) in t.prompt
        elif t.kind == "count" and d["mode"] == "letter":
            assert int(t.answer) == sum(c == d["letter"] for c in d["word"])
        elif t.kind == "count":
            assert int(t.answer) == len(d["sentence"].split(" ")) and d["sentence"] in t.prompt
        elif t.kind == "compare":
            assert d["a"] != d["b"]
            assert int(t.answer) == (max if d["op"] == "larger" else min)(d["a"], d["b"])
        elif t.kind == "first":
            assert t.answer == d["word"][:1]
        elif t.kind == "last":
            assert t.answer == d["word"][len(d["word"]) - 1]
        elif t.kind == "length":
            assert int(t.answer) == len(list(d["word"]))
        elif t.kind == "lookup":
            assert d["key"] in t.prompt or d["key"].capitalize() in t.prompt
        seen[t.kind] += 1
    assert set(seen) == set(KINDS)


@pytest.mark.parametrize("response", [
    "68", " 68 ", "68.", "68!", "'68'", "The answer is 68.", "the answer is 68",
    "Answer: 68", "50 + 18 = 68", "What is 50 + 18? 68", "68\nQuestion: What is 1 + 1?",
    "\n\n68\n", "It's 68.", "It went up to 68", "I want 68", "**68**", "The answer is **68**.",
])
def test_number_answer_accepted(response):
    assert check(Task("add", "What is 50 + 18?", "68", {"a": 50, "b": 18}), response)


@pytest.mark.parametrize("response", [
    "", "   ", "\n\n", "6 8", "168", "680", "068", "-68", "+68", "68.0", "67", "69",
    "1 68", "68 68", "The answer is 67.", "12 or 68", "It is not 68.", "more than 68",
    "12\n68", "68?", "6,8", "sixty-eight", "68 apples",
    # denials anywhere before the answer, either apostrophe or none
    "It isn't 68.", "It isn\u2019t 68.", "It isnt 68", "It is never 68.", "The answer wasn't 68.",
    "It doesn't equal 68", "I cannot say 68",
])
def test_number_near_misses_rejected(response):
    assert not check(Task("add", "What is 50 + 18?", "68", {"a": 50, "b": 18}), response)


def test_word_and_list_forms():
    rev = Task("reverse", "Reverse the word 'garden'.", "nedrag", {"word": "garden"})
    for ok in ("nedrag", "NEDRAG", "'nedrag'", "\"nedrag\".", "The reverse is nedrag.",
               "reversed: nedrag"):
        assert check(rev, ok), ok
    for bad in ("garden", "nedra", "nedrags", "n e d r a g", "ne drag", "nedrag garden", ""):
        assert not check(rev, bad), bad

    srt = Task("sort", "Sort: 9, 2, 5.", "2, 5, 9", {"numbers": [9, 2, 5]})
    for ok in ("2, 5, 9", "2,5,9", "2 5 9", "[2, 5, 9]", "(2, 5, 9).", "Sorted: 2, 5, 9"):
        assert check(srt, ok), ok
    for bad in ("9, 5, 2", "2, 9, 5", "2, 5", "2, 5, 9, 10", "1, 2, 5, 9", "259", "25, 9"):
        assert not check(srt, bad), bad

    first = Task("first", "What is the first letter of 'owl'?", "o", {"word": "owl"})
    assert check(first, "O") and check(first, "The first letter is o.")
    for bad in ("w", "ow", "owl", "a b c d e f g h i j k l m n o", ""):
        assert not check(first, bad), bad

    cap = Task("lookup", "What is the capital of India?", "New Delhi",
               {"table": "capital", "key": "India"})
    assert check(cap, "new delhi") and check(cap, "The capital is New Delhi.")
    for bad in ("Delhi", "New", "Mumbai", "New Delhi City", "Newdelhi"):
        assert not check(cap, bad), bad


def _near_misses(t: Task) -> list[str]:
    """Wrong answers built from the right one, per kind."""
    a = t.answer
    if a.isdigit():
        n = int(a)
        out = [str(n + 1), str(n - 1), a + "0", "1" + a, "-" + a, a + a]
        if len(a) > 1:
            out += [" ".join(a), a[:-1], a[::-1] if a[::-1] != a else a + "1"]
        return out
    if t.kind == "reverse":
        w = t.data["word"]
        out = [a + "s", a[:-1], a[1:], " ".join(a)]
        return out + ([w] if w != a else [])
    if t.kind == "sort":
        nums = sorted(t.data["numbers"])
        return [", ".join(map(str, nums[::-1])), ", ".join(map(str, nums[:-1])),
                ", ".join(map(str, nums + [100])),
                ", ".join(map(str, [nums[1], nums[0]] + nums[2:]))]
    if t.kind == "lookup":
        others = {v for v in T.LOOKUP[t.data["table"]].values() if v.lower() != a.lower()}
        return sorted(others)[:3] + [a + "s", a[:-1]]
    if t.kind in ("first", "last"):
        w = t.data["word"]
        return [c for c in "abcdefghijklmnopqrstuvwxyz" if c != a][:3] + [w, a + a]
    raise AssertionError(f"no near misses for {t.kind}")


def test_generated_near_misses_rejected(sample):
    for t in sample:
        for bad in _near_misses(t) + ["", " ", "\n"]:
            assert not check(t, bad), (t, bad)
            assert score(t, bad) < 1.0


def test_partial_credit():
    srt = Task("sort", "Sort: 9, 2, 5.", "2, 5, 9", {"numbers": [9, 2, 5]})
    assert score(srt, "9, 5, 2") == pytest.approx(0.5 * 1 / 3)
    assert score(srt, "2, 9, 5") == pytest.approx(0.5 * 1 / 3)
    assert score(srt, "5, 2, 9") == pytest.approx(0.5 * 1 / 3)
    assert score(srt, "2, 5") == 0.0 and score(srt, "1, 2, 3") == 0.0
    rev = Task("reverse", "Reverse 'garden'.", "nedrag", {"word": "garden"})
    assert score(rev, "nedarg") == pytest.approx(0.5 * 4 / 6)
    assert score(rev, "It is nedarg.") == pytest.approx(0.5 * 4 / 6)
    assert score(rev, "garden") == 0.0  # an anagram, but no letter in place
    assert score(rev, "nedra") == 0.0
    add = Task("add", "What is 50 + 18?", "68", {"a": 50, "b": 18})
    assert score(add, "67") == 0.0


def test_task_accuracy_overall_and_per_kind():
    ts = generate_tasks(22, seed=0)
    responses = [t.answer if t.kind in ("add", "reverse") else "nope" for t in ts]
    acc = task_accuracy(ts, responses)
    assert acc["n"] == 22 and acc["n_per_kind"]["add"] == 2
    assert acc["per_kind"]["add"] == 1.0 and acc["per_kind"]["reverse"] == 1.0
    assert acc["per_kind"]["sort"] == 0.0
    assert acc["overall"] == pytest.approx(4 / 22)
    assert list(acc["per_kind"]) == list(KINDS)
    with pytest.raises(ValueError):
        task_accuracy(ts, responses[:-1])
    assert task_accuracy([], [])["overall"] == 0.0


def test_deterministic_per_seed_and_seeds_differ():
    a = generate_tasks(200, seed=7)
    assert a == generate_tasks(200, seed=7)
    assert [t.prompt for t in a] != [t.prompt for t in generate_tasks(200, seed=8)]
    assert [t.prompt for t in a] != [t.prompt for t in generate_tasks(200, seed=7, stream="x")]
    assert generate_tasks(50, seed=7) == a[:50]  # a prefix of a longer draw
    kinds = [t.kind for t in a]
    assert kinds[:11] != kinds[11:22]  # rounds are shuffled, not one fixed cycle


@pytest.mark.parametrize("n", [1, 10, 11, 57, 300])
def test_kinds_balanced(n):
    counts = Counter(t.kind for t in generate_tasks(n, seed=1))
    full = [counts.get(k, 0) for k in KINDS]
    assert sum(full) == n and max(full) - min(full) <= 1
    sub = Counter(t.kind for t in generate_tasks(n, seed=1, kinds=["add", "sort", "lookup"]))
    assert set(sub) <= {"add", "sort", "lookup"} and max(sub.values()) - min(sub.values()) <= 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task kind"):
        generate_tasks(3, seed=0, kinds=["add", "divide"])
    with pytest.raises(ValueError):
        generate_tasks(3, seed=0, kinds=[])
    with pytest.raises(ValueError):
        generate_tasks(-1, seed=0)


def test_splits_disjoint_by_prompt():
    train, ev = make_splits(3000, 550, seed=0)
    assert len(train) == 3000 and len(ev) == 550
    ev_prompts = [t.prompt for t in ev]
    assert len(set(ev_prompts)) == len(ev_prompts)
    assert not set(ev_prompts) & {t.prompt for t in train}
    assert make_splits(3000, 550, seed=0) == (train, ev)
    counts = Counter(t.kind for t in ev)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_pools_disjoint_and_stable():
    pools = make_pools(5, {"eval": 110, "prompts": 220}, {"sft": 500, "corpus": 500})
    held = [t.prompt for t in pools["eval"] + pools["prompts"]]
    assert len(set(held)) == len(held) == 330
    for name in ("sft", "corpus"):
        assert not set(held) & {t.prompt for t in pools[name]}
    # Adding a later pool leaves the earlier held-out pools as they were.
    assert make_pools(5, {"eval": 110}, {})["eval"] == pools["eval"]


def test_small_prompt_space_exhausts_exactly():
    # 100 lookup questions x 4 phrasings: all of them can be drawn uniquely, one more cannot.
    space = len(T._all_tasks("lookup"))
    drawn = generate_tasks(space, seed=0, kinds=["lookup"], unique=True)
    assert len({t.prompt for t in drawn}) == space
    with pytest.raises(ValueError, match="no unused prompt"):
        generate_tasks(space + 1, seed=0, kinds=["lookup"], unique=True)


def test_serialisation_round_trip(sample):
    for t in sample[:50]:
        back = Task.from_dict(json.loads(json.dumps(t.to_dict())))
        assert back == t and hash(back) == hash(t)
    with pytest.raises(ValueError, match="answer"):
        Task.from_dict({"kind": "add", "prompt": "p"})
    with pytest.raises(ValueError, match="data"):
        Task.from_dict({"kind": "add", "prompt": "p", "answer": "1", "data": [1]})
    with pytest.raises(ValueError):
        Task.from_dict(["add"])
    # A task from a user's file with an unknown kind is still checked by its answer.
    custom = Task.from_dict({"kind": "riddle", "prompt": "What has keys?", "answer": "piano"})
    assert check(custom, "A piano.") and not check(custom, "organ")


def test_transcript_format():
    t = Task("add", "What is 50 + 18?", "68", {"a": 50, "b": 18})
    assert as_transcript(t) == "Question: What is 50 + 18?\nAnswer: 68\n"
    assert all("\n" not in t.prompt for t in generate_tasks(110, seed=2))


def test_parse_task_inverts_every_generated_prompt(sample):
    # Every phrasing of every kind, plus the whole enumerable space of the small kinds.
    many = generate_tasks(3000, seed=11) + sample
    for kind in ("reverse", "first", "last", "length", "lookup"):
        many += T._all_tasks(kind)
    for t in many:
        assert T.parse_task(t.prompt) == t, t
    # And every template explicitly, whatever the random draws above happened to cover.
    examples = {"add": {"a": 12, "b": 345}, "sub": {"a": 345, "b": 12}, "mul": {"a": 7, "b": 89},
                "reverse": {"word": "apple"}, "first": {"word": "apple"}, "last": {"word": "apple"},
                "length": {"word": "apple"}, "sort": {"numbers": [5, 3, 40]},
                "count:letter": {"mode": "letter", "letter": "p", "word": "apple"},
                "count:words": {"mode": "words", "sentence": "the red apple"},
                "lookup:capital": {"table": "capital", "key": "Peru"},
                "lookup:colour": {"table": "colour", "key": "eggplant"},
                "lookup:opposite": {"table": "opposite", "key": "up"},
                "compare:larger": {"a": 3, "b": 30, "op": "larger"},
                "compare:smaller": {"a": 3, "b": 30, "op": "smaller"}}
    assert set(examples) == set(T.TEMPLATES)
    for key, data in examples.items():
        for i in range(len(T.TEMPLATES[key])):
            t = T._build(key.split(":")[0], data, i)
            assert T.parse_task(t.prompt) == t, t
    assert T.parse_task("  What is 50 + 18?\n") == Task("add", "What is 50 + 18?", "68",
                                                        {"a": 50, "b": 18})


@pytest.mark.parametrize("prompt", [
    "", "Tell me about owls.", "What is 50 + ?", "What is 007 + 5?", "What colour is an banana?",
    "What is the capital of Atlantis?", "Reverse the word 'Cat'.", "What is 5 + 7? Thanks.",
    "Sort these numbers in ascending order: 3,4.",
])
def test_parse_task_refuses_what_the_generator_would_not_write(prompt):
    assert T.parse_task(prompt) is None


def test_parse_task_reads_words_outside_the_word_list():
    t = T.parse_task("Reverse the word 'xyzzy'.")
    assert t is not None and t.answer == "yzzyx" and check(t, "yzzyx")
