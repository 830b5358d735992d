"""engine.chat (conversation state, streaming, stop, regenerate, overflow, completion) and the
`workbench chat` terminal chat, in-process and as a subprocess with piped stdin."""
import io
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine.chat import ChatSession, SamplingSettings, TextStream
from engine.config import ConfigError
from engine.model import Transformer, config_from_preset
from engine.weights import safetensors_state
from engine.tokenizer import _byte_decoder, render_chat, train_from_texts
from workbench import cli
from workbench.chat_cli import chat_loop

ROOT = Path(__file__).resolve().parents[1]
TEXT = ["the quick brown fox jumps over the lazy dog. " * 20,
        "Zürich, 東京, naïve café 🙂 and more. " * 10]


@pytest.fixture(scope="module")
def tok():
    return train_from_texts(TEXT, vocab_size=300)


def tiny(tok, max_seq_len=64, seed=0):
    torch.manual_seed(seed)
    return Transformer(config_from_preset("tiny", tok.vocab_size, d_model=32, n_layer=1, n_head=2,
                                          n_kv_head=2, d_ff=64, max_seq_len=max_seq_len))


def session(tok, model=None, **kw):
    settings = SamplingSettings(**{"max_new_tokens": 12, "seed": 0, "temperature": 1.0,
                                   "top_k": 0, "top_p": 1.0, **kw.pop("settings", {})})
    return ChatSession(model or tiny(tok), tok, settings=settings, **kw)


def endless(tok):
    """A greedy session whose replies always run to max_new_tokens: an untrained model can draw a
    special token at any step, which would end a reply before the stop under test."""
    chat = session(tok, settings={"max_new_tokens": 40, "temperature": 0.0})
    chat.stop_ids = ()
    return chat


# --- streaming text ---------------------------------------------------------------------------


def test_text_stream_never_shows_half_a_character(tok):
    text = "naïve 東京 🙂!"
    byte_id = {b: tok.token_to_id(c) for c, b in _byte_decoder().items()}
    deltas = []
    s = TextStream(tok, deltas.append)
    for b in text.encode("utf-8"):  # one token per byte: every multi-byte character is split
        s.push(byte_id[b])
    assert s.finish() == text
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert "東" in deltas and "🙂" in deltas  # each arrived whole, once its last byte did
    # an answer that ends inside a character still adds up to its final decode
    deltas.clear()
    s = TextStream(tok, deltas.append)
    for b in "ok 東".encode("utf-8")[:-1]:
        s.push(byte_id[b])
    final = s.finish()
    assert final.endswith("\ufffd") and "".join(deltas) == final


def test_streamed_deltas_add_up_to_the_reply_and_history(tok):
    chat = session(tok, settings={"max_new_tokens": 40})
    for text in ["hello there", "and again"]:
        deltas = []
        reply = chat.send(text, on_token=deltas.append)
        assert "".join(deltas) == reply and reply
        assert chat.messages[-1] == {"role": "assistant", "content": reply}
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2


# --- conversation state -----------------------------------------------------------------------


def test_history_is_rendered_through_the_chat_template(tok):
    chat = session(tok, tiny(tok, max_seq_len=256), system_prompt="be brief")
    chat.send("hi")
    chat.send("what is two plus two?")
    msgs = chat.messages
    assert msgs[0] == {"role": "system", "content": "be brief"}
    want, _ = render_chat(tok, msgs[:-1], add_generation_prompt=True)
    assert chat.last_prompt_ids == want
    assert want[:2] == [tok.bos_id, tok.system_id] and want[-1] == tok.assistant_id
    chat.set_system(None)
    assert chat.prompt_ids() == render_chat(tok, chat.messages, add_generation_prompt=True)[0]
    chat.reset()
    assert chat.messages == []
    chat.set_system("again")
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "again"}]


def test_regenerate_replaces_the_last_answer(tok):
    chat = session(tok, settings={"max_new_tokens": 20})
    with pytest.raises(ValueError, match="no answer"):
        chat.regenerate()
    first = chat.send("hello")
    prompt = chat.last_prompt_ids
    deltas = []
    second = chat.regenerate(on_token=deltas.append)
    assert chat.last_prompt_ids == prompt  # the same conversation, answered again
    assert second != first and "".join(deltas) == second
    assert chat.messages == [{"role": "user", "content": "hello"},
                             {"role": "assistant", "content": second}]


def test_truncate_drops_an_edited_message_and_what_follows(tok):
    chat = session(tok, settings={"max_new_tokens": 4})
    chat.send("one")
    first_answer = chat.messages[1]
    chat.send("two")
    chat.truncate(2)
    assert chat.messages == [{"role": "user", "content": "one"}, first_answer]
    chat.send("two, edited")
    assert [m["content"] for m in chat.messages[::2]] == ["one", "two, edited"]
    with pytest.raises(ValueError, match="even"):
        chat.truncate(1)


def test_a_failed_reply_leaves_the_conversation_as_it_was(tok):
    chat = session(tok, settings={"max_new_tokens": 40})
    chat.stop_ids = ()
    chat.send("hello")
    before = chat.messages

    def boom(delta):
        raise RuntimeError("the view went away")

    for call in (lambda: chat.send("more", on_token=boom), lambda: chat.regenerate(on_token=boom)):
        with pytest.raises(RuntimeError, match="went away"):
            call()
        assert chat.messages == before
    # one reply at a time: a second send while the first streams is refused, the first goes on
    refused = []

    def reenter(delta):
        if not refused:
            with pytest.raises(RuntimeError, match="already"):
                chat.send("meanwhile")
            refused.append(True)

    assert chat.regenerate(on_token=reenter) and refused
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]


def test_a_fixed_seed_replays_the_session_and_greedy_regenerates_the_same(tok):
    m = tiny(tok)
    a, b = session(tok, m), session(tok, m)
    assert [a.send("x"), a.send("y"), a.regenerate()] == [b.send("x"), b.send("y"), b.regenerate()]
    g = session(tok, m, settings={"temperature": 0.0})
    assert g.send("x") == g.regenerate()
    r = session(tok, m, settings={"seed": None, "max_new_tokens": 30})
    r.send("x")
    seed = r.last_seed
    r.regenerate()
    assert None is not seed != r.last_seed  # unseeded: a fresh seed per reply, recorded


def test_overflow_drops_the_oldest_turns_and_keeps_the_system_prompt(tok):
    chat = session(tok, system_prompt="sys", settings={"max_new_tokens": 8, "temperature": 0.0})
    limit = chat.model.config.max_seq_len
    for i in range(6):
        chat.send(f"the quick brown fox number {i} jumps")
        assert len(chat.last_prompt_ids) + 8 <= limit
    assert chat.dropped_turns > 0 and len(chat.messages) == 1 + 12  # the transcript keeps all
    kept = [chat.messages[0]] + chat.messages[1 + 2 * chat.dropped_turns:-1]
    assert chat.last_prompt_ids == render_chat(tok, kept, add_generation_prompt=True)[0]
    assert kept[1]["role"] == "user"
    # one message longer than the whole context: its start is cut, nothing crashes
    chat.send("the lazy dog " * 100)
    assert chat.messages[-1]["role"] == "assistant"


def test_completion_mode_uses_no_template(tok):
    chat = session(tok, system_prompt="sys")
    deltas = []
    text = chat.complete("the quick brown", on_token=deltas.append)
    assert chat.last_prompt_ids == [tok.bos_id] + tok.encode("the quick brown")
    assert not set(chat.last_prompt_ids[1:]) & {tok.system_id, tok.user_id, tok.assistant_id, tok.end_id}
    assert "".join(deltas) == text
    assert chat.messages == [{"role": "system", "content": "sys"}]  # no history


def test_settings_validation_names_the_field(tok):
    for field, value in [("temperature", -1.0), ("top_k", -2), ("top_p", 0.0), ("top_p", 1.5),
                         ("max_new_tokens", 0), ("repetition_penalty", 0.0), ("seed", -1)]:
        with pytest.raises(ConfigError) as e:
            SamplingSettings(**{field: value}).validate()
        assert e.value.field == field
    with pytest.raises(ConfigError):
        session(tok, settings={"top_p": 2.0})


# --- stop ------------------------------------------------------------------------------------


def test_stop_from_on_token_keeps_the_partial_answer(tok):
    chat = endless(tok)
    full = chat.send("tell me")
    chat.reset()
    deltas = []

    def on_text(d):
        deltas.append(d)
        if len(deltas) == 3:
            chat.stop()

    partial = chat.send("tell me", on_token=on_text)
    assert chat.stopped and partial == "".join(deltas) and full.startswith(partial)
    assert len(partial) < len(full)
    assert chat.messages[-1] == {"role": "assistant", "content": partial}
    # the stop does not leak into the next reply, nor does a stop() while idle
    chat.stop()
    chat.reset()
    assert chat.send("tell me") == full and not chat.stopped


def test_stop_from_another_thread(tok):
    chat = endless(tok)
    full = chat.send("go")
    chat.reset()
    first, proceed, result = threading.Event(), threading.Event(), {}

    def on_text(d):
        first.set()
        proceed.wait(10)

    worker = threading.Thread(target=lambda: result.setdefault("reply", chat.send("go", on_text)))
    worker.start()
    assert first.wait(10)
    chat.stop()
    proceed.set()
    worker.join(10)
    assert not worker.is_alive()
    assert chat.stopped and result["reply"] and full.startswith(result["reply"])
    assert len(result["reply"]) < len(full) and chat.messages[-1]["content"] == result["reply"]


# --- the terminal chat ------------------------------------------------------------------------


def scripted(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_chat_loop_commands(tok):
    chat = session(tok)
    out = io.StringIO()
    rc = chat_loop(chat, read=scripted(["hello", "/regen", "/system be kind", "/settings", "/bogus",
                                        "", "/reset", "/regen", "/help", "again", "/quit", "never"]),
                   out=out)
    text = out.getvalue()
    assert rc == 0
    assert text.count("bot> ") == 3 and "(system prompt set)" in text and "(conversation cleared)" in text
    assert "unknown command /bogus" in text and "no answer to regenerate" in text and "/regen" in text
    assert "temperature 1.0" in text
    assert chat.messages[0] == {"role": "system", "content": "be kind"}
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["again"]


def test_ctrl_c_stops_the_reply_then_the_prompt_exits(tok):
    chat = endless(tok)
    full = chat.send("hi")
    chat.reset()

    class Out(io.StringIO):
        pressed = False

        def write(self, s):
            if not self.pressed and self.getvalue().endswith("bot> "):
                self.pressed = True
                signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C mid-answer
            return super().write(s)

    def read(prompt):
        if chat.messages:
            raise KeyboardInterrupt  # Ctrl-C at the prompt leaves
        return "hi"

    before = signal.getsignal(signal.SIGINT)
    out = Out()
    assert chat_loop(chat, read=read, out=out) == 0
    assert signal.getsignal(signal.SIGINT) is before
    assert "[stopped]" in out.getvalue() and chat.stopped
    partial = chat.messages[-1]["content"]
    assert partial and len(partial) < len(full) and full.startswith(partial)


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("chatrun")
    tok.save(root / "tok.json")
    weights, meta = safetensors_state(tiny(tok))
    return ckpt.save_checkpoint(root / "checkpoints", 3, model=weights, model_metadata=meta,
                                state={"stage": "pretrain", "tokenizer_fingerprint": tok.fingerprint()},
                                extra_files={"tokenizer.json": root / "tok.json"}).parent.parent


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "workbench.cli", "chat", *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_workbench_chat_subprocess(checkpoint):
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "chat", "--checkpoint", str(checkpoint),
                        "--seed", "1", "--max-new-tokens", "6", "--system", "be brief"],
                       input="hello\n/regen\nbye\n", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "step 3" in r.stdout and "--completion" in r.stdout  # a base model: the hint shows
    assert r.stdout.count("bot> ") == 3 and r.stderr == ""


def test_workbench_chat_completion_and_errors(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the quick\n/quit\n"))
    assert cli.main(["chat", "--checkpoint", str(checkpoint), "--completion", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("... ") == 1 and "--completion continues" not in out
    assert cli.main(["chat", "--checkpoint", str(checkpoint / "nowhere")]) == 2
    assert "workbench chat: --checkpoint: " in capsys.readouterr().err
    assert cli.main(["chat", "--checkpoint", str(checkpoint), "--top-p", "0"]) == 2
    err = capsys.readouterr().err     # the option as typed, not the setting's name inside
    assert "workbench chat: --top-p: " in err and "config field" not in err


def test_the_terminal_chat_picks_the_device_as_every_other_command_does():
    import argparse
    from workbench import chat_cli
    p = argparse.ArgumentParser()
    chat_cli.add_arguments(p)
    assert p.parse_args(["--checkpoint", "x"]).device == "auto"


def test_a_typed_line_that_is_not_utf8_is_asked_for_again(monkeypatch, capsys):
    # Python keeps a pipe's undecodable bytes as lone surrogates; the tokenizer and the store
    # cannot take them, and the session would end on the error.
    from workbench.chat_cli import typed_line
    lines = iter(["hi caf\udce9", "hi café"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    assert typed_line("you> ") == "hi café"
    assert "not UTF-8 text and was not taken" in capsys.readouterr().out


def test_evaluation_replies_end_where_chat_replies_end():
    # A model that writes "12<|user|>0<|end|>": in chat the reply is "12" (the model began the
    # next turn); evaluation (reply_batch) used to score "120", read on to <|end|>.
    from engine.chat import reply_batch
    from engine.model import ModelConfig
    tok = train_from_texts(["What is 5 + 7? 12 and 0 and 120."] * 50, vocab_size=300)
    one, two, zero = (tok.encode(c)[0] for c in "120")
    chain = [(tok.assistant_id, one), (one, two), (two, tok.user_id), (tok.user_id, zero), (zero, tok.end_id)]
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layer=1, n_head=2, n_kv_head=2,
                                d_ff=32, max_seq_len=64)).eval()
    with torch.no_grad():    # a bigram model: the layers add nothing, the head reads the token itself
        for p in m.parameters():
            p.zero_()
        for norm in [m.model.norm] + [n for b in m.model.layers for n in (b.input_layernorm, b.post_attention_layernorm)]:
            norm.weight.fill_(1.0)
        for k, (a, b) in enumerate(chain):
            m.model.embed_tokens.weight[a, k] = 1.0
            m.lm_head.weight[b, k] = 10.0
    chat = ChatSession(m, tok, settings=SamplingSettings(temperature=0.0, max_new_tokens=8)).send("What is 5 + 7?")
    assert chat == "12"
    assert reply_batch(m, tok, ["What is 5 + 7?"], 8) == [("12", True)]


def test_a_reply_says_why_it_ended_without_its_end_token(tok):
    # A reply that runs to max_new_tokens is cut by length...
    chat = endless(tok)
    chat.settings.max_new_tokens = 5
    chat.send("the quick brown fox")
    assert chat.cut == "length"
    # ...one with room left in max_new_tokens but none in the context, by the context...
    chat = endless(tok)
    chat.settings.max_new_tokens = 200
    chat.complete("the lazy dog " * 8)
    assert chat.cut == "context" and len(chat.last_prompt_ids) < chat.model.config.max_seq_len
    # ...and one that ends with its end token, or is stopped, is not cut.
    from engine.generate import generate
    chat = endless(tok)
    prompt = [tok.bos_id] + tok.encode("the quick brown fox jumps over")
    chat.stop_ids = (generate(chat.model, prompt, 3, temperature=0.0)[2],)   # its third token
    chat.complete("the quick brown fox jumps over")
    assert chat.cut is None


def test_the_terminal_chat_says_a_reply_was_cut_off(tok):
    chat = endless(tok)
    chat.settings.max_new_tokens = 3
    out = io.StringIO()
    assert chat_loop(chat, read=scripted(["hello", "/quit"]), out=out) == 0
    assert "[cut off at max new tokens]" in out.getvalue()
