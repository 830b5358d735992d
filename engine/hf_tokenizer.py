"""Hugging Face tokenizers and chat templates, behind the interface of `engine.tokenizer.Tokenizer`.

An imported model (Llama, SmolLM2, TinyLlama, Llama 3.x, Qwen2/2.5, Qwen3) must see its own
tokenizer and chat template exactly as the ecosystem applies them, so every stage can take an
`HFTokenizer` wherever it takes our `Tokenizer`:

* `render_chat` renders the Jinja template as transformers' `apply_chat_template` does (same
  sandbox, filters, globals and variables) and tokenizes the text as it does, so the ids are
  equal; the mask marks what the model is trained to say.
* User text never becomes a special or added token: `encode` parses none, and in a chat a
  message that spells one ("<|im_end|>") has that spelling encoded as plain text (what
  transformers does with `sanitize_control_tokens=True`), so data cannot forge a turn boundary.
* `for_base_model` gives a base model (no template) ours, `WORKBENCH_TEMPLATE`, and its tokens.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import tokenizers
from tokenizers import AddedToken

from engine.fsutil import atomic_write_text
from engine.hf_folder import compile_template, load_parts
from engine.tokenizer import SPECIAL_TOKENS, TextCodec, TokenizerError, check_messages

# Our chat template (engine.tokenizer.render_chat) as Jinja: <|bos|>, then per message
# <|role|>content<|end|>, and <|assistant|> as the generation prompt. The role tokens are
# spelled out rather than built from the role, so no role string can make up a token.
WORKBENCH_TEMPLATE = (
    "{{- '<|bos|>' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '<|system|>' }}"
    "{%- elif message['role'] == 'user' %}{{- '<|user|>' }}"
    "{%- elif message['role'] == 'assistant' %}{{- '<|assistant|>' }}"
    "{%- else %}{{- raise_exception('role must be system, user or assistant') }}"
    "{%- endif %}"
    "{{- message['content'] + '<|end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)


# --- messages and markers -------------------------------------------------------------------
def _markers(used: str) -> str:
    """Four private-use characters absent from `used`: content start/end, literal start/end."""
    out: list[str] = []
    code = 0xF0000
    while len(out) < 4:
        if chr(code) not in used:
            out.append(chr(code))
        code += 1
    return "".join(out)


def _parse_marked(marked: str, marks: str):
    """(clean text, content spans, literal spans) of a render with markers, or None if the
    markers do not pair up (the template cut, dropped or reordered a content)."""
    starts = {marks[0]: marks[1], marks[2]: marks[3]}
    spans: dict[str, list[tuple[int, int]]] = {marks[1]: [], marks[3]: []}
    open_at: dict[str, int] = {}
    for k, m in enumerate(re.finditer(f"[{re.escape(marks)}]", marked)):
        pos = m.start() - k  # position in the text without the markers seen so far
        ch = m.group()
        if ch in starts:
            if starts[ch] in open_at:
                return None
            open_at[starts[ch]] = pos
        elif ch in open_at:
            spans[ch].append((open_at.pop(ch), pos))
        else:
            return None
    if open_at:
        return None
    return re.sub(f"[{re.escape(marks)}]", "", marked), spans[marks[1]], spans[marks[3]]


class HFTokenizer(TextCodec):
    """A Hugging Face tokenizer.json + chat template with the interface of our Tokenizer."""

    def __init__(self, tk: tokenizers.Tokenizer, chat_template: str | None = None,
                 special_tokens: Mapping[str, str] | None = None,
                 generation_eos: Sequence[int] = (), model_max_length: int | None = None,
                 source: str = "<memory>"):
        self.source = source
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.model_max_length = model_max_length
        self._generation_eos = tuple(int(i) for i in generation_eos)
        # `tk` renders chats: the template's own special tokens must be parsed there
        tk.encode_special_tokens = False
        self._tk = tk
        self._register_named_tokens()
        self._added = {i: t.content for i, t in tk.get_added_tokens_decoder().items()}
        self.special_ids = frozenset(self._added)
        self._scaffold: frozenset[int] | None = None
        self._text = self._plain_text_copy()
        self._vocab_size = max(tk.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self._newline_ids = tk.encode("\n", add_special_tokens=False).ids
        for i in self._generation_eos:
            if i >= self._vocab_size:
                raise TokenizerError(f"{source}: generation eos_token_id {i} is outside the "
                                     f"vocabulary (size {self._vocab_size})")
        # whitespace tokens (e.g. "\n\n") are ordinary text in data, not turn boundaries
        guarded = sorted((t for t in self._added.values() if t.strip()), key=len, reverse=True)
        self._literal_re = re.compile("|".join(map(re.escape, guarded))) if guarded else None
        self._template = self._compile_template()
        self.bos_id = self._named_id("bos_token")
        self.eos_id = self._named_id("eos_token")
        self.end_id = self._find_end_id()
        stops = [self.end_id, *self._generation_eos, self.eos_id]
        self.stop_ids = tuple(dict.fromkeys(i for i in stops if i is not None))
        # The model's own stop tokens end a turn too (Qwen's <|endoftext|>, Llama's <|eom_id|>):
        # generation stops there, so PPO and GRPO count such an answer as finished.
        self.turn_end_ids = self.stop_ids
        pad = self._named_id("pad_token")
        self.pad_id = self.end_id if pad is None else pad
        # Whether plain text starts with BOS, as the tokenizer's own post-processor decides:
        # SmolLM2 names <|im_start|> as its bos_token but never prepends it.
        self.adds_bos = self.bos_id is not None and self._tk.encode("a").ids[:1] == [self.bos_id]
        self._fingerprint: str | None = None

    # --- construction helpers -------------------------------------------------------------
    def _register_named_tokens(self) -> None:
        """bos/eos/pad/... must be tokens; transformers treats them as special added tokens
        even when tokenizer.json has them only in the model's vocabulary."""
        for key, token in self.special_tokens.items():
            if self._tk.token_to_id(token) is None:
                raise TokenizerError(f"{self.source}: {key} {token!r} is not in the vocabulary")
        special = {t.content for t in self._tk.get_added_tokens_decoder().values() if t.special}
        missing = [t for t in dict.fromkeys(self.special_tokens.values()) if t not in special]
        if missing:
            self._tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                         for t in missing])

    def _plain_text_copy(self) -> tokenizers.Tokenizer:
        """A copy that parses no added token in text: `encode_special_tokens` skips only the
        special ones, so every added token (Qwen's <think>, <tool_call>) is made special here."""
        text_tk = tokenizers.Tokenizer.from_str(self._tk.to_str())
        plain = [t for t in text_tk.get_added_tokens_decoder().values() if not t.special]
        if plain:
            text_tk.add_special_tokens([AddedToken(
                t.content, special=True, normalized=t.normalized, lstrip=t.lstrip,
                rstrip=t.rstrip, single_word=t.single_word) for t in plain])
        text_tk.encode_special_tokens = True
        return text_tk

    def _compile_template(self) -> jinja2.Template | None:
        if self.chat_template is None:
            return None
        if not isinstance(self.chat_template, str):
            raise TokenizerError(f"{self.source}: chat_template must be a string")
        try:
            return compile_template(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"{self.source}: chat template does not parse: "
                                 f"line {e.lineno}: {e.message}") from None

    def _named_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self._tk.token_to_id(token)

    def _find_end_id(self) -> int:
        """The first special/added token after an assistant's content closes its turn
        (<|eot_id|>, <|im_end|>, </s>); without a template (or if it fails), eos."""
        end = None
        if self._template is not None:
            probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
            try:
                text, spans, literals = self._layout(probe, False)
                ids, offsets = self._encode_rendered(text, literals)
                end = next((i for i, (a, _) in zip(ids, offsets)
                            if a >= spans[-1][1] and i in self.special_ids), None)
            except ValueError:
                pass
        end = self.eos_id if end is None else end
        if end is None:
            raise TokenizerError(f"{self.source}: no end-of-turn token: the chat template closes "
                                 f"no assistant turn with a special token and there is no eos_token")
        return end

    # --- files ----------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "HFTokenizer":
        """tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json."""
        return cls(**load_parts(folder))

    @classmethod
    def for_base_model(cls, folder: str | os.PathLike) -> tuple["HFTokenizer", int]:
        """The folder's tokenizer with OUR chat template (for a base model, which has none, or
        when the user chooses ours): our six special tokens are added at the end of the
        vocabulary where absent. Returns (tokenizer, number of new ids): the caller grows the
        model's embeddings to `tokenizer.vocab_size` rows."""
        return cls.with_workbench_template(**load_parts(folder))

    @classmethod
    def with_workbench_template(cls, tk: tokenizers.Tokenizer, **parts) -> tuple["HFTokenizer", int]:
        before = max(tk.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        added = {t.content for t in tk.get_added_tokens_decoder().values() if t.special}
        tk.add_special_tokens([AddedToken(s, special=True, normalized=False)
                               for s in SPECIAL_TOKENS if s not in added])
        special = dict(parts.pop("special_tokens", None) or {})
        special.setdefault("pad_token", "<|pad|>")  # so padding is not the end token
        parts["chat_template"] = WORKBENCH_TEMPLATE
        tok = cls(tk, special_tokens=special, **parts)
        return tok, tok.vocab_size - before

    def to_str(self) -> str:
        return self._tk.to_str(pretty=True)

    def save(self, folder: str | os.PathLike) -> Path:
        """tokenizer.json + tokenizer_config.json (+ generation_config.json with the model's extra
        stop ids, when it has any), loadable by transformers' AutoTokenizer."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "tokenizer.json", self.to_str())
        atomic_write_text(folder / "tokenizer_config.json",
                          json.dumps(self._config(), indent=2, ensure_ascii=False) + "\n")
        if self._generation_eos:
            # What generation stops at is the model's, but the fingerprint counts it: keep it beside.
            atomic_write_text(folder / "generation_config.json",
                              json.dumps({"eos_token_id": list(self._generation_eos)}, indent=2) + "\n")
        if self.chat_template is not None and (folder / "chat_template.jinja").exists():
            # transformers prefers that file over the config: it must not hold a stale template
            atomic_write_text(folder / "chat_template.jinja", self.chat_template)
        return folder

    def _config(self) -> dict[str, Any]:
        decoder = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                            "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
                   for i, t in sorted(self._tk.get_added_tokens_decoder().items())}
        config: dict[str, Any] = {"added_tokens_decoder": decoder, **self.special_tokens,
                                  "clean_up_tokenization_spaces": False,
                                  "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    def fingerprint(self) -> str:
        """sha256 over the canonical tokenizer.json, the template and the special tokens."""
        if self._fingerprint is None:
            canon = {"tokenizer": json.loads(self._tk.to_str()), "chat_template": self.chat_template,
                     "special_tokens": self.special_tokens, "stop_ids": list(self.stop_ids)}
            text = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            self._fingerprint = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return self._fingerprint

    # --- encoding -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def id_to_token(self, i: int) -> str:
        i = int(i)
        tok = self._tk.id_to_token(i) if 0 <= i < self._vocab_size else None
        if tok is None:
            raise IndexError(f"token id {i} outside the vocabulary (size {self.vocab_size})")
        return tok

    def token_spans(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, id) per token of encode(text), as character offsets that tile the text.

        Offsets can overlap (the bytes of one character split across tokens) or leave gaps
        (a space a token's offsets leave out): each span starts where the last ended, so a
        later piece of a split character gets an empty span and a gap joins the next token.
        """
        enc = self._text.encode(text, add_special_tokens=False)
        out, pos = [], 0
        for k, (i, (_, end)) in enumerate(zip(enc.ids, enc.offsets)):
            end = len(text) if k == len(enc.ids) - 1 else min(max(end, pos), len(text))
            out.append((pos, end, i))
            pos = end
        return out

    # --- chat -----------------------------------------------------------------------------
    def render_text(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = False) -> str:
        """The template's text for a conversation, as apply_chat_template(tokenize=False)."""
        return self._render(check_messages(messages), add_generation_prompt)

    @property
    def scaffold_ids(self) -> frozenset[int]:
        """The chat template's own tokens: its special tokens and the text it writes around the
        contents (role names, newlines, a default system prompt). A prompt cut down to these
        has lost every word of its messages."""
        if self._scaffold is None:
            self._scaffold = frozenset(self.special_ids | self._template_text_ids())
        return self._scaffold

    def _template_text_ids(self) -> set[int]:
        if self._template is None:
            return set()
        mark = _markers("")[0]
        turns = [{"role": r, "content": mark} for r in ("user", "assistant", "user")]
        found: set[int] = set()
        # with and without a system turn: some templates write a default one, some refuse one
        for msgs in (turns, [{"role": "system", "content": mark}] + turns):
            try:
                text = self._render(msgs, True)
            except ValueError:
                continue
            enc = self._tk.encode(text, add_special_tokens=False)
            found.update(i for i, (a, b) in zip(enc.ids, enc.offsets) if mark not in text[a:b])
        return found

    def render_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, mask) for a conversation; the mask is 1 on each assistant content's tokens
        and on the end-of-turn token right after it (so the model learns to stop)."""
        msgs = check_messages(messages)
        try:
            text, spans, literals = self._layout(msgs, add_generation_prompt)
        except ValueError:
            if not add_generation_prompt:
                raise
            # A prompt to answer needs no mask, so a template that rewrites earlier answers
            # (Qwen3 drops their reasoning) renders it as apply_chat_template does.
            text, spans, literals = self._layout(msgs, add_generation_prompt, answers=False)
        ids, offsets = self._encode_rendered(text, literals)
        return ids, self._mask(ids, offsets, spans)

    def _render(self, msgs: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self._template is None:
            raise ValueError(f"{self.source}: this tokenizer has no chat template "
                             f"(a base model: load it with HFTokenizer.for_base_model)")
        try:
            # the variables apply_chat_template passes: tools and documents are defined, None
            return self._template.render(messages=msgs, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except Exception as e:  # the template is someone else's code: any failure is its verdict
            raise ValueError(f"chat template: {type(e).__name__}: {e}") from e

    def _layout(self, msgs: list[dict[str, str]], add_generation_prompt: bool, answers: bool = True):
        """(text, assistant content spans, spans of special-token spellings in contents).

        The spans come from a second render with private-use markers around each assistant
        content (unless not `answers`) and around each special-token spelling in any content;
        it must give the same text once the markers are gone. Templates that trim contents
        (Llama 3) are tried with trimmed contents too. Without `answers`, assistant contents are
        rendered as the template writes them, unmarked.
        """
        text = self._render(msgs, add_generation_prompt)
        n_assistant = sum(m["role"] == "assistant" for m in msgs) if answers else 0
        forged = self._literal_re is not None and any(
            self._literal_re.search(m["content"]) for m in msgs if answers or m["role"] != "assistant")
        if not n_assistant and not forged:
            return text, [], []
        marks = _markers(text)
        for strip in (False, True):
            marked = [self._mark(m, marks, strip, answers) for m in msgs]
            parsed = _parse_marked(self._render(marked, add_generation_prompt), marks)
            if parsed is not None and parsed[0] == text and self._verbatim(msgs, parsed, strip, answers):
                return parsed
        raise ValueError("the chat template does not render each message's content verbatim, "
                         "so the assistant's tokens cannot be located for the mask"
                         + (" nor special-token spellings kept as text" if forged else ""))

    def _verbatim(self, msgs: list[dict[str, str]], parsed, strip: bool, answers: bool = True) -> bool:
        """Each assistant span holds its content (trimmed, if tried so), each literal span a
        token's spelling: a template that transforms contents (upper-cases, cuts) fails here."""
        text, spans, literals = parsed
        contents = [m["content"].strip() if strip else m["content"]
                    for m in msgs if answers and m["role"] == "assistant"]
        return (len(spans) == len(contents)
                and all(text[s:e] == c for (s, e), c in zip(spans, contents))
                and all(self._literal_re.fullmatch(text[s:e]) for s, e in literals))

    def _mark(self, m: dict[str, str], marks: str, strip: bool, answers: bool = True) -> dict[str, str]:
        content = m["content"].strip() if strip else m["content"]
        # Without `answers` (a prompt to answer), earlier answers are the model's own text: their
        # token spellings stay tokens, as apply_chat_template leaves them, and a template may cut
        # them (Qwen3 drops "<think>...</think>").
        if self._literal_re is not None and (answers or m["role"] != "assistant"):
            content = self._literal_re.sub(lambda t: marks[2] + t.group() + marks[3], content)
        if answers and m["role"] == "assistant":
            content = marks[0] + content + marks[1]
        return {"role": m["role"], "content": content}

    def _encode_rendered(self, text: str, literals: list[tuple[int, int]]):
        """(ids, character offsets) of a rendered chat, as transformers encodes it: template
        tokens parsed; the spans in `literals` as plain text, each piece after the first
        encoded behind a newline that is then dropped (what transformers does, so a
        SentencePiece tokenizer adds no prefix space mid-text)."""
        if not literals:
            enc = self._tk.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        cuts = [0] + [p for span in literals for p in span] + [len(text)]
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for k in range(len(cuts) - 1):
            start, end = cuts[k], cuts[k + 1]
            if start == end and k > 0:
                continue
            plain = k % 2 == 1
            piece_ids, piece_offsets = self._encode_piece(text[start:end], plain, first=k == 0)
            if plain and self._tk.token_to_id(text[start:end]) in piece_ids:
                raise ValueError(f"cannot keep {text[start:end]!r} as text: the tokenizer makes "
                                 f"that token from plain text too")
            ids += piece_ids
            offsets += [(a + start, b + start) for a, b in piece_offsets]
        return ids, offsets

    def _encode_piece(self, piece: str, plain: bool, first: bool):
        tk = self._text if plain else self._tk
        if not first:
            enc = tk.encode("\n" + piece, add_special_tokens=False)
            n = len(self._newline_ids)
            if enc.ids[:n] == self._newline_ids:
                return enc.ids[n:], [(max(a - 1, 0), max(b - 1, 0)) for a, b in enc.offsets[n:]]
        enc = tk.encode(piece, add_special_tokens=False)
        return enc.ids, enc.offsets

    def _mask(self, ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
        """1 on tokens overlapping an assistant content and on a stop token right after it."""
        mask = [0] * len(ids)
        i, n = 0, len(ids)
        for start, end in spans:
            while i < n and offsets[i][1] <= start:
                i += 1
            while i < n and offsets[i][0] < end:
                mask[i] = 1
                i += 1
            if i < n and ids[i] in self.stop_ids:
                mask[i] = 1
                i += 1
        return mask
