import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from engine.config import ConfigError, from_dict
from engine.corpus import CorpusError, split_draw
from engine.runio import StageError, read_events
from engine.tokenizer import (MIN_VOCAB, SPECIAL_TOKENS, Tokenizer, TokenizerConfig, TokenizerError,
                              _byte_decoder, render_chat, run, train_tokenizer)

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = """The cat sat on the mat. The dog sat on the log.
Once upon a time there was a small robot who liked to count: one, two, three, four.
Zürich und München sind Städte. 東京は日本の首都です。 Emoji: 🙂🚀 and café, naïve, coöperate.
def add(a, b):
    return a + b
"""


def make_corpus(tmp_path: Path, copies: int = 40) -> Path:
    rng = random.Random(0)
    lines = SAMPLE.splitlines()
    text = "\n".join(rng.choice(lines) for _ in range(copies * len(lines)))
    f = tmp_path / "corpus.txt"
    f.write_text(text, encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_tokenizer([make_corpus(tmp_path_factory.mktemp("c"))], vocab_size=400)


class StopAfter:
    def __init__(self, n):
        self.n = n

    def should_stop(self):
        self.n -= 1
        return self.n < 0


class Never:
    def should_stop(self):
        return False


# --- vocabulary ----------------------------------------------------------------------------
def test_special_tokens_come_first(tok):
    assert SPECIAL_TOKENS == ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>",
                              "<|assistant|>"]
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i and tok.id_to_token(i) == s
    assert (tok.pad_id, tok.bos_id, tok.end_id, tok.system_id, tok.user_id, tok.assistant_id) == \
        (0, 1, 2, 3, 4, 5)
    assert MIN_VOCAB < tok.vocab_size <= 400
    # all 256 bytes are in the vocabulary, so nothing is ever unknown
    for ch in pre_tokenizers.ByteLevel.alphabet():
        assert tok.token_to_id(ch) is not None


def test_byte_table_matches_the_library():
    assert sorted(_byte_decoder()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(_byte_decoder().values()) == list(range(256))


HARD = ["", "hello", " leading and trailing ", "tabs\tand\nnewlines\r\nand lone \r here",
        "\x00nul\x00", "e\u0301 combining a\u0308\u0308", "東京 日本語の文章", "🙂🚀👩‍👩‍👧",
        "\u200b zero width \ufeff bom", "   \n\n\t  ", "<|end|><|bos|>", "\U0010ffff\x7f"]


def test_round_trip_hard_strings(tok):
    for text in HARD:
        assert tok.decode(tok.encode(text)) == text


def test_round_trip_random_code_points(tok):
    rng = random.Random(1234)

    def cp():
        while True:
            c = rng.choice([rng.randrange(0, 0x80), rng.randrange(0, 0x800),
                            rng.randrange(0, 0x10000), rng.randrange(0, 0x110000)])
            if not 0xD800 <= c <= 0xDFFF:
                return chr(c)
    texts = ["".join(cp() for _ in range(rng.randrange(1, 60))) for _ in range(300)]
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert ids == tok.encode(text)
        assert tok.decode(ids) == text


def test_text_cannot_inject_special_tokens(tok):
    for s in SPECIAL_TOKENS:
        text = f"before {s} after{s}"
        ids = tok.encode(text)
        assert all(i >= len(SPECIAL_TOKENS) for i in ids), s
        assert tok.decode(ids) == text
    assert all(i >= len(SPECIAL_TOKENS) for ids in tok.encode_batch(SPECIAL_TOKENS) for i in ids)
    # after a save/load the protection is still on (it is not stored in the JSON)
    again = Tokenizer.from_str(tok.to_str())
    assert tok.end_id not in again.encode("<|end|>")


def test_decode_specials(tok):
    ids = [tok.bos_id] + tok.encode("hi") + [tok.end_id]
    assert tok.decode(ids) == "<|bos|>hi<|end|>"
    assert tok.decode(ids, skip_special=True) == "hi"


def test_token_spans_are_character_offsets(tok):
    for text in ["plain ascii text, with punctuation!", "naïve café 東京 🙂🚀 e\u0301", HARD[3]]:
        spans = tok.token_spans(text)
        assert [i for _, _, i in spans] == tok.encode(text)
        # spans tile the text
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        for (s0, e0, _), (s1, _, _) in zip(spans, spans[1:]):
            assert s0 <= e0 == s1
        # each character belongs to the token holding its first byte
        tok_ranges, pos = [], 0
        for _, _, i in spans:
            n = len(tok.token_bytes(i))
            tok_ranges.append((pos, pos + n))
            pos += n
        assert pos == len(text.encode("utf-8"))
        for c in range(len(text)):
            b = len(text[:c].encode("utf-8"))
            k = next(k for k, (b0, b1) in enumerate(tok_ranges) if b0 <= b < b1)
            assert spans[k][0] <= c < spans[k][1]


def test_token_spans_agree_with_library_on_ascii(tok):
    text = "The robot sat on the mat; it counted: one, two."
    lib = tok._tk.encode(text, add_special_tokens=False).offsets
    assert [(s, e) for s, e, _ in tok.token_spans(text)] == list(lib)


# --- files ---------------------------------------------------------------------------------
def test_save_load_and_fingerprint(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    assert os.listdir(tmp_path) == ["tokenizer.json"]  # no temporary left behind
    for where in (path, tmp_path):
        again = Tokenizer.from_file(where)
        assert again.fingerprint() == tok.fingerprint()
        assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    assert len(tok.fingerprint()) == 64
    other = train_tokenizer([make_corpus(tmp_path, copies=5)], vocab_size=300)
    assert other.fingerprint() != tok.fingerprint()


def test_from_file_refuses_foreign_or_missing(tmp_path):
    assert issubclass(TokenizerError, StageError) and issubclass(TokenizerError, ValueError)
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.from_file(tmp_path)
    from tokenizers import Tokenizer as HF, models
    foreign = HF(models.BPE())
    foreign.add_special_tokens(["<s>"] + SPECIAL_TOKENS)
    (tmp_path / "tokenizer.json").write_text(foreign.to_str(), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"<\|pad\|> should have id 0"):
        Tokenizer.from_file(tmp_path)


# --- chat template -------------------------------------------------------------------------
def test_render_chat_exact_layout_and_mask(tok):
    msgs = [{"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And <|end|> three?"},
            {"role": "assistant", "content": "Six, naïvely 🙂"}]
    u1, a1, u2, a2 = (tok.encode(m["content"]) for m in msgs)
    ids, mask = render_chat(tok, msgs)
    expected = [1, 4, *u1, 2, 5, *a1, 2, 4, *u2, 2, 5, *a2, 2]
    assert ids == expected
    # assistant content + its closing end are targets, by position
    a1_start = 1 + 1 + len(u1) + 1 + 1
    a2_start = a1_start + len(a1) + 1 + 1 + len(u2) + 1 + 1
    want = set(range(a1_start, a1_start + len(a1) + 1)) | set(range(a2_start, a2_start + len(a2) + 1))
    assert [i for i, m in enumerate(mask) if m] == sorted(want)
    assert len(mask) == len(ids)
    assert ids[a1_start + len(a1)] == tok.end_id and ids[-1] == tok.end_id
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "Four.<|end|>Six, naïvely 🙂<|end|>"
    assert tok.render_chat(msgs) == (ids, mask)


def test_render_chat_system_and_generation_prompt(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids, mask = render_chat(tok, msgs, add_generation_prompt=True)
    assert ids == [1, 3, *tok.encode("Be brief."), 2, 4, *tok.encode("Hi"), 2, 5]
    assert mask == [0] * len(ids)
    assert render_chat(tok, []) == ([1], [0])


@pytest.mark.parametrize("msgs,match", [
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], r"message 1: field 'role'"),
    ([{"role": "user", "content": 5}], r"message 0: field 'content' must be a string, got int"),
    ([{"role": "user"}], r"message 0: field 'content'"),
    (["hello"], r"message 0: expected an object"),
    ("hello", r"messages must be a list"),
])
def test_render_chat_errors(tok, msgs, match):
    with pytest.raises(ValueError, match=match):
        render_chat(tok, msgs)


# --- training ------------------------------------------------------------------------------
def test_train_refuses_empty_and_tiny_vocab(tmp_path):
    (tmp_path / "ws.txt").write_text(" \n\t \n", encoding="utf-8")
    with pytest.raises(CorpusError, match="empty or whitespace-only corpus"):
        train_tokenizer([tmp_path / "ws.txt"], vocab_size=300)
    f = make_corpus(tmp_path, copies=2)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([f], vocab_size=256 + len(SPECIAL_TOKENS))


def test_train_memory_is_bounded_on_a_single_line_file(tmp_path):
    # 20 MB without a newline: reading it whole would cost the trainer over a GB
    script = textwrap.dedent("""
        import random, resource, sys
        from engine.tokenizer import train_tokenizer
        rng = random.Random(0)
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                 for _ in range(3000)]
        path = sys.argv[1]
        with open(path, "w") as f:
            n = 0
            while n < 20_000_000:
                s = " ".join(rng.choices(words, k=20000)) + " "
                f.write(s)
                n += len(s)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tok = train_tokenizer([path], vocab_size=1000)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        print(grown // 1024, tok.vocab_size)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.txt")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grown_mb, vocab = map(int, out.stdout.split())
    assert vocab == 1000
    assert grown_mb < 300, f"peak RSS grew by {grown_mb} MB"


# --- the stage -----------------------------------------------------------------------------
def test_config_validation_names_fields():
    ok = {"inputs": ["corpus.txt"]}
    assert from_dict(TokenizerConfig, ok).vocab_size == 4096
    for bad, field in [({"vocab_size": 100}, "vocab_size"), ({"inputs": []}, "inputs"),
                       ({"holdout_fraction": 0.9}, "holdout_fraction"),
                       ({"min_frequency": 0}, "min_frequency"),
                       ({"max_train_chars": -1}, "max_train_chars"),
                       ({"vocab_size": "big"}, "vocab_size")]:
        with pytest.raises(ConfigError) as e:
            from_dict(TokenizerConfig, {**ok, **bad})
        assert e.value.field == field


def held_out_corpus(tmp_path, seed, frac, chunk_chars=1024):
    """JSONL where each record is one chunk; held-out chunks carry a word seen nowhere else."""
    rng = random.Random(3)
    lines = SAMPLE.splitlines()
    recs, n_held = [], 0
    for i in range(60):
        if i > 0 and split_draw(seed, i) < frac:
            recs.append({"text": " zyxwvut" * 100})
            n_held += 1
        else:
            recs.append({"text": " ".join(rng.choice(lines) for _ in range(8))[:chunk_chars]})
    f = tmp_path / "corpus.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    assert 0 < n_held < 60
    held = [r["text"] for i, r in enumerate(recs) if i > 0 and split_draw(seed, i) < frac]
    return f, sum(len(r["text"]) for r in recs), held


@pytest.mark.parametrize("frac", [0.3, 0.0])
def test_run_holds_out_chunks_and_reports(tmp_path, frac):
    corpus, total_chars, held = held_out_corpus(tmp_path, seed=5, frac=0.3)
    cfg = TokenizerConfig(inputs=["corpus.jsonl"], vocab_size=500, holdout_fraction=frac, seed=5,
                          chunk_chars=1024, examples=["naïve café 🙂", "<|end|> text"])
    events = []
    assert run(cfg, tmp_path, events.append, Never()) == "completed"
    tok = Tokenizer.from_file(tmp_path)
    (m,) = [e for e in events if e["type"] == "metrics"]
    assert m["step"] == 0 and m["tokenizer/vocab_size"] == tok.vocab_size
    assert m["tokenizer/train_chars"] + m["tokenizer/heldout_chars"] == total_chars
    merged = tok.token_to_id("Ġzyxwvut") is not None
    if frac:
        # the held-out word was never trained on, so BPE cannot have merged it
        assert m["tokenizer/heldout_chars"] > 0 and not merged
        n_tok = sum(len(tok.encode(t)) for t in held)
        assert m["tokenizer/chars_per_token"] == pytest.approx(sum(map(len, held)) / n_tok)
    else:
        assert m["tokenizer/heldout_chars"] == 0 and merged
        assert any(e["type"] == "log" and e["level"] == "warning" for e in events)
    ex = [e for e in events if e["type"] == "example"]
    assert [e["text"] for e in ex] == cfg.examples
    for e in ex:
        assert tok.decode(e["ids"]) == e["text"] and "".join(e["pieces"]) == e["text"]
        assert e["tokens"] == [tok.id_to_token(i) for i in e["ids"]]
    assert all(i >= 6 for i in ex[1]["ids"])


def test_run_caps_training_chars(tmp_path):
    make_corpus(tmp_path)
    cfg = TokenizerConfig(inputs=["corpus.txt"], vocab_size=300, holdout_fraction=0.0,
                          max_train_chars=3000, chunk_chars=1024)
    events = []
    assert run(cfg, tmp_path, events.append, Never()) == "completed"
    (m,) = [e for e in events if e["type"] == "metrics"]
    assert m["tokenizer/train_chars"] == 3000


def test_run_stops_between_chunks_and_saves_nothing(tmp_path):
    make_corpus(tmp_path)
    cfg = TokenizerConfig(inputs=["corpus.txt"], vocab_size=300, chunk_chars=1024)
    assert run(cfg, tmp_path, [].append, StopAfter(2)) == "stopped"
    assert not (tmp_path / "tokenizer.json").exists()


def run_cli(run_dir: Path, config: dict) -> subprocess.CompletedProcess:
    (run_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "engine.tokenizer", "--run-dir", str(run_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_cli_completes(tmp_path):
    make_corpus(tmp_path, copies=5)
    out = run_cli(tmp_path, {"inputs": ["corpus.txt"], "vocab_size": 300})
    assert out.returncode == 0, out.stderr
    ev = read_events(tmp_path)
    assert ev[0]["type"] == "start" and ev[-1]["type"] == "done"
    assert ev[-1]["status"] == "completed"
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").vocab_size == 300
    # stdout is not a terminal here, so it carries the same events as JSON lines
    assert json.loads(out.stdout.splitlines()[-1])["status"] == "completed"


def test_cli_empty_corpus_fails(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n ", encoding="utf-8")
    out = run_cli(tmp_path, {"inputs": ["empty.txt"], "vocab_size": 300})
    assert out.returncode == 2      # bad input: refused
    done = read_events(tmp_path)[-1]
    assert done["type"] == "done" and done["status"] == "failed"
    assert "empty or whitespace-only corpus" in done["error"] and "empty.txt" in done["error"]
    assert not (tmp_path / "tokenizer.json").exists()


def test_cli_bad_config_is_refused(tmp_path):
    out = run_cli(tmp_path, {"inputs": ["corpus.txt"], "vocab_size": "big"})
    assert out.returncode == 2
    done = read_events(tmp_path)[-1]
    assert done["status"] == "failed" and "vocab_size" in done["error"]
