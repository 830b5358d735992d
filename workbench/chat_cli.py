"""`workbench chat --checkpoint PATH`: talk to a checkpoint in the terminal.

The answer streams as it is generated. Ctrl-C while it streams stops that answer (what was
said so far stays in the conversation); Ctrl-C or Ctrl-D at the prompt leaves.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from workbench import stages

if TYPE_CHECKING:
    from engine.chat import ChatSession

def typed_line(prompt: str) -> str:
    """input(), asking again for a line that is not UTF-8 text (a terminal or a pipe in another
    encoding): its undecodable bytes would reach the tokenizer or the store and fail there,
    losing the session's last line."""
    while True:
        try:
            line = input(prompt)
            line.encode("utf-8")        # Python keeps undecodable bytes as lone surrogates
            return line
        except UnicodeError:
            print("  (that line is not UTF-8 text and was not taken: type it again)", flush=True)


COMMANDS = """\
  /regen          another answer to your last message (replaces it)
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt; /system alone removes it
  /settings       show the sampling settings in use
  /help           this list
  /quit           leave (also Ctrl-D, or Ctrl-C at the prompt)
  Ctrl-C while an answer streams stops that answer."""
COMPLETION_COMMANDS = """\
  Each line you type is continued as plain text (no chat template).
  /settings, /help, /quit as in chat; Ctrl-C while text streams stops it."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Sampling defaults stay None here and come from engine.chat.SamplingSettings, which is only
    # imported when the chat runs: building the parser must not pull in torch for every command.
    p.add_argument("--checkpoint", required=True, type=Path, metavar="PATH",
                   help="a checkpoint folder, or a run folder (its best checkpoint, else newest)")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="PATH",
                   help="tokenizer.json to use instead of the checkpoint's own (must match it)")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-k", type=int, help="0 = off")
    p.add_argument("--top-p", type=float, help="1 = off")
    p.add_argument("--max-new-tokens", type=int, help="longest answer, in tokens")
    p.add_argument("--repetition-penalty", type=float, help="1 = off; 1.1-1.3 discourages repeats")
    p.add_argument("--seed", type=int, help="make the replies reproducible (default: random each reply)")
    p.add_argument("--completion", action="store_true",
                   help="plain text completion, no chat template: for base (pretrained) models")
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda or mps (default auto)")


class _StopOnCtrlC:
    """While an answer streams, SIGINT asks the session to stop instead of raising
    KeyboardInterrupt out of the middle of generation (which would lose the partial answer)."""

    def __init__(self, session: "ChatSession"):
        self.session, self.previous = session, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, lambda *_: self.session.stop())
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def chat_loop(session: "ChatSession", *, completion: bool = False,
              read: Callable[[str], str] = typed_line, out=None) -> int:
    """The read-reply loop; `read` and `out` are parameters so tests can drive it in-process."""
    from engine.chat import cut_note      # torch: this module is also imported without it
    out = out or sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    def stream(fn, *args) -> None:
        write("... " if completion else "bot> ")
        with _StopOnCtrlC(session):
            fn(*args, on_token=write)
        cut = cut_note(session.cut, session.model.config.max_seq_len)
        write(" [stopped]\n" if session.stopped else f" [{cut}]\n" if cut else "\n")
        if not completion and session.dropped_turns:
            write(f"  (the {session.dropped_turns} oldest turn(s) no longer fit the context "
                  f"and were left out)\n")

    while True:
        try:
            line = read("text> " if completion else "you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        cmd, _, rest = line.strip().partition(" ")
        if cmd in ("/quit", "/exit"):
            return 0
        if cmd == "/help":
            write((COMPLETION_COMMANDS if completion else COMMANDS) + "\n")
        elif cmd == "/settings":
            s = session.settings
            write(f"  temperature {s.temperature}, top_k {s.top_k}, top_p {s.top_p}, "
                  f"max_new_tokens {s.max_new_tokens}, repetition_penalty {s.repetition_penalty}, "
                  f"seed {s.seed}\n")
        elif completion:
            if line.strip():
                stream(session.complete, line)
        elif cmd == "/reset":
            session.reset()
            write("  (conversation cleared)\n")
        elif cmd == "/system":
            session.set_system(rest.strip() or None)
            write(f"  (system prompt {'set' if session.system_prompt else 'removed'})\n")
        elif cmd == "/regen":
            if session.can_regenerate:
                stream(session.regenerate)
            else:
                write("  (no answer to regenerate yet)\n")
        elif cmd.startswith("/"):
            write(f"  unknown command {cmd}; /help lists them\n")
        elif line.strip():
            stream(session.send, line)


def run_from_args(args: argparse.Namespace) -> int:
    from engine.artifacts import load_artifact
    from engine.chat import ChatSession, SamplingSettings
    from engine.config import ConfigError
    from engine.device import resolve_device
    from engine.runio import StageError

    given = {f: getattr(args, f) for f in ("temperature", "top_k", "top_p", "max_new_tokens",
                                           "repetition_penalty", "seed")}
    settings = SamplingSettings(**{k: v for k, v in given.items() if v is not None})
    try:
        settings.validate()
        loaded = load_artifact(args.checkpoint, tokenizer=args.tokenizer,
                               device=resolve_device(args.device), kind="lm")
    except ConfigError as e:      # a bad option, a missing or broken checkpoint: named as typed
        option = {"checkpoint": "--checkpoint", "tokenizer": "--tokenizer"}.get(
            e.field, f"--{e.field.replace('_', '-')}")
        print(f"workbench chat: {option}: {e.message}", file=sys.stderr)
        return 2
    except StageError as e:
        print(f"workbench chat: {e}", file=sys.stderr)
        return 2
    session = ChatSession(loaded.model, loaded.tokenizer, system_prompt=args.system, settings=settings)
    stage = loaded.state.get("stage", "unknown stage")
    cfg = loaded.model.config
    print(f"{loaded.checkpoint} ({stage}, step {loaded.state.get('step', '?')}, "
          f"{loaded.model.num_params():,} params, context {cfg.max_seq_len} tokens)")
    if stage in stages.NAMES and not stages.fine_tunes(stage) and not args.completion:
        print("  note: a pretrained base model has not learned the chat format; "
              "--completion continues plain text instead")
    print("/help lists the commands.")
    return chat_loop(session, completion=args.completion)
