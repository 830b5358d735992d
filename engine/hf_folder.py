"""A Hugging Face model folder's tokenizer, read as transformers reads it: tokenizer.json,
tokenizer_config.json (added tokens, named special tokens, model_max_length), the chat template
(from the config or a chat_template.jinja/.json beside it, compiled in transformers' Jinja
environment) and generation_config.json's end tokens. engine.hf_tokenizer.HFTokenizer is built
from what `load_parts` gives."""
from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken

from engine.tokenizer import TokenizerError, read_tokenizer_json

# The special-token attributes transformers passes to a template (its special_tokens_map).
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")
# model_max_length above this is transformers' "unknown" placeholder (int(1e30)).
_MAX_KNOWN_LENGTH = 1 << 40

# --- the Jinja environment, as transformers builds it ---------------------------------------
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' marker of assistant text.

    Our mask comes from the content spans, so the tag only renders its body; templates that
    use it must still parse.
    """
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers' does not
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


# --- reading a model folder -----------------------------------------------------------------
def _read_json(path: Path, required: bool = False) -> Any:
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path}: file not found")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read JSON: {str(e).splitlines()[0]}") from None


def _token_string(value: Any, path: Path, key: str) -> str | None:
    """A special token given as "<s>", as {"content": "<s>", ...}, or absent."""
    if isinstance(value, Mapping):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value or None
    raise TokenizerError(f"{path}: {key} must be a string or {{\"content\": ...}}, "
                         f"got {type(value).__name__}")


def _template_from(folder: Path, config: Mapping[str, Any], path: Path) -> str | None:
    """The chat template, checked to parse. chat_template.jinja wins over the config's, as in
    transformers; a list of named templates gives its "default"."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            template, path = jinja_file.read_text(encoding="utf-8"), jinja_file
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_file}: cannot read: {e}") from None
    else:
        template = _template_value(config.get("chat_template"), path)
    if template is not None:
        try:
            compile_template(template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"{path}: chat template does not parse: "
                                 f"line {e.lineno}: {e.message}") from None
    return template


def _template_value(value: Any, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TokenizerError(f"{path}: chat_template lists templates {sorted(map(str, named))} "
                             f"but none named 'default'")
    raise TokenizerError(f"{path}: chat_template must be a string or a list of "
                         f"{{name, template}}, got {type(value).__name__}")


def _generation_eos(folder: Path) -> tuple[int, ...]:
    """The ids generation stops at, from the model's generation_config.json (an int or a list)."""
    path = folder / "generation_config.json"
    config = _read_json(path)
    if config is not None and not isinstance(config, Mapping):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(config).__name__}")
    value = None if config is None else config.get("eos_token_id")
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TokenizerError(f"{path}: eos_token_id must be a token id or a list of them, "
                             f"got {value!r}")
    return tuple(values)


def _apply_added_tokens_decoder(tk: tokenizers.Tokenizer, config: Mapping[str, Any],
                                path: Path) -> None:
    """Register the config's added tokens with their flags, as transformers does on load;
    one that tokenizer.json gives another id means the two files disagree."""
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, Mapping):
        raise TokenizerError(f"{path}: added_tokens_decoder must be an object of id -> token")
    known = tk.get_added_tokens_decoder()
    for key, entry in decoder.items():
        content = _token_string(entry, path, f"added_tokens_decoder[{key}]")
        if not str(key).isdigit() or content is None:
            raise TokenizerError(f"{path}: added_tokens_decoder[{key}] is not an id with a content")
        actual = tk.token_to_id(content)
        if actual != int(key):
            where = "is not in" if actual is None else f"has id {actual} in"
            raise TokenizerError(f"{path}: added token {content!r} has id {key} here but "
                                 f"{where} tokenizer.json")
        flags = entry if isinstance(entry, Mapping) else {}
        special = bool(flags.get("special", True))
        old = known.get(int(key))
        if old is None or old.special != special:
            tk.add_tokens([AddedToken(
                content, special=special, normalized=bool(flags.get("normalized", not special)),
                lstrip=bool(flags.get("lstrip", False)), rstrip=bool(flags.get("rstrip", False)),
                single_word=bool(flags.get("single_word", False)))])


def load_parts(folder: str | os.PathLike) -> dict[str, Any]:
    """The constructor's arguments from a model folder (or the path of its tokenizer.json)."""
    folder = Path(folder)
    if folder.name == "tokenizer.json" and folder.is_file():
        folder = folder.parent
    tk = read_tokenizer_json(folder / "tokenizer.json")
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path)
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise TokenizerError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    _apply_added_tokens_decoder(tk, config, config_path)
    named = {k: _token_string(config.get(k), config_path, k) for k in NAMED_TOKENS}
    max_len = config.get("model_max_length")
    known = isinstance(max_len, int) and 0 < max_len < _MAX_KNOWN_LENGTH
    return dict(tk=tk, chat_template=_template_from(folder, config, config_path),
                special_tokens={k: v for k, v in named.items() if v is not None},
                generation_eos=_generation_eos(folder), model_max_length=max_len if known else None,
                source=str(config_path))
