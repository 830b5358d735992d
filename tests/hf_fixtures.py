"""Hugging Face tokenizer folders built here, no download: a tiny BPE trained on a few sentences with
each family's special tokens and its real chat template (tests/data/chat_templates), saved by
transformers; and, beside it, a random model of the family (tests of the tokenizer, import, export)."""
from __future__ import annotations

import json
from pathlib import Path

import tokenizers
import torch
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
CORPUS = [
    "Hello there! How are you today? I am fine, thank you.",
    "What is two plus two? It is four. The answer is simple.",
    "You are a helpful assistant. Answer the question briefly.",
    "Zürich, naïve café, 東京 and 🙂 are words too.",
    "The user asks and the assistant answers with care.",
] * 20

# name: template file, tokenizer kind, special tokens (ids 0..), non-special added tokens,
# named tokens, the expected end-of-turn token, generation_config eos tokens
FAMILIES = {
    "smollm2": dict(template="smollm2-135m-instruct.jinja", kind="bytelevel",
                    specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], added=[],
                    named=dict(bos_token="<|im_start|>", eos_token="<|im_end|>",
                               pad_token="<|im_end|>", unk_token="<|endoftext|>"),
                    end="<|im_end|>", gen_eos=None),
    "qwen2.5": dict(template="qwen2.5-0.5b-instruct.jinja", kind="bytelevel",
                    specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    added=["<tool_call>", "</tool_call>"],
                    named=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                    end="<|im_end|>", gen_eos=["<|im_end|>", "<|endoftext|>"]),
    "qwen3": dict(template="qwen3-0.6b.jinja", kind="bytelevel",
                  specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  added=["<tool_call>", "</tool_call>", "<think>", "</think>"],
                  named=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                  end="<|im_end|>", gen_eos=["<|im_end|>", "<|endoftext|>"]),
    "llama3.2": dict(template="llama-3.2-1b-instruct.jinja", kind="bytelevel",
                     specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                               "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"], added=[],
                     named=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
                     end="<|eot_id|>", gen_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
    "tinyllama": dict(template="tinyllama-1.1b-chat.jinja", kind="metaspace",
                      specials=["<unk>", "<s>", "</s>"], added=[],
                      named=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="</s>"),
                      end="</s>", gen_eos=["</s>"]),
}

def train(spec) -> tokenizers.Tokenizer:
    if spec["kind"] == "bytelevel":
        tk = tokenizers.Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # Llama 2 / TinyLlama style: SentencePiece-like "▁" for spaces, no pre-tokenizer
        tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                        decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        alphabet = sorted(set("".join(CORPUS)) | set("\n<>|/!?.,'0123456789"))
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=spec["specials"],
                                  initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    if spec["added"]:
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["added"]])
    return tk


def save_tokenizer(folder: Path, spec, template: str | None = None, **extra) -> Path:
    tk = train(spec)
    if template is None:
        template = (TEMPLATES / spec["template"]).read_text(encoding="utf-8")
    import transformers
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=template,
                                                **spec["named"], **extra)
    fast.save_pretrained(str(folder))
    if spec["gen_eos"]:
        ids = [tk.token_to_id(t) for t in spec["gen_eos"]]
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return folder




MODEL_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                 "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def save_model_folder(folder: Path, family: str = "qwen2.5", model_type: str = "qwen2", spare_rows: int = 12,
                      template: str | None = None, **config) -> Path:
    """A whole model folder as the Hub has them: the family's tokenizer and chat template, and a
    random `model_type` model whose embedding has `spare_rows` rows past the tokenizer (as Qwen's)."""
    import transformers
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder, FAMILIES[family], template)
    tk = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    cfg_name, model_name = MODEL_CLASSES[model_type]
    cfg = getattr(transformers, cfg_name)(**{**dict(
        vocab_size=tk.get_vocab_size() + spare_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128), **config})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).eval()
    model.save_pretrained(folder)
    return folder
