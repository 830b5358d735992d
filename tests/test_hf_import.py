"""Start from a Hugging Face model: import a folder (or a cached name) as a run, fine-tune it with
the stages, chat with it, and export it back for transformers and llama.cpp."""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine import hf_import  # noqa: E402
from engine.artifacts import load_artifact  # noqa: E402
from engine.chat import ChatSession, SamplingSettings  # noqa: E402
from engine.config import from_dict  # noqa: E402
from engine.export import export  # noqa: E402
from tests.hf_fixtures import save_model_folder  # noqa: E402
from workbench.cli import main as workbench  # noqa: E402
from workbench.project import create_project  # noqa: E402

QA = [("What is two plus two?", "It is four."), ("Say hello.", "Hello there!"),
      ("How are you today?", "I am fine, thank you."), ("Answer briefly.", "The answer is simple.")]


def import_run(folder, run_dir, **kw):
    run_dir.mkdir(parents=True, exist_ok=True)
    events = []
    cfg = from_dict(hf_import.ImportConfig, {"source": str(folder), **kw})
    assert hf_import.run(cfg, run_dir, sink=events.append) == "completed"
    return run_dir, events


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return save_model_folder(tmp_path_factory.mktemp("qwen") / "Qwen2.5-tiny", "qwen2.5", "qwen2")


@pytest.fixture(scope="module")
def imported(qwen_folder, tmp_path_factory):
    return import_run(qwen_folder, tmp_path_factory.mktemp("runs") / "hf_import-1")[0]


def test_the_imported_run_computes_what_transformers_computes(qwen_folder, imported):
    art = load_artifact(imported)
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen_folder).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(qwen_folder)
    chat = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "It is four."}]
    ids, mask = art.tokenizer.render_chat(chat)
    assert ids == hf_tok.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert art.tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "It is four.<|im_end|>"
    with torch.no_grad():
        torch.testing.assert_close(art.model.eval()(torch.tensor([ids])), hf(torch.tensor([ids])).logits,
                                   atol=1e-4, rtol=1e-4)
    # Qwen's embedding has rows past its tokenizer: kept, so the weights stay the model's own.
    assert art.model.config.vocab_size == hf.config.vocab_size > art.tokenizer.vocab_size
    assert art.state["family"] == "qwen2" and art.state["tokenizer_fingerprint"] == art.tokenizer.fingerprint()


def test_chat_with_an_imported_model_stops_at_its_end_of_turn(imported):
    art = load_artifact(imported)
    session = ChatSession(art.model, art.tokenizer, settings=SamplingSettings(max_new_tokens=6, temperature=0.0))
    reply = session.send("Say hello.")
    assert isinstance(reply, str)
    # What it was shown is the model's own template up to the generation prompt.
    text = art.tokenizer.decode(session.last_prompt_ids)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nSay hello.<|im_end|>" in text


def sft_config(init, tmp_path, **kw):
    from engine.sft import SFTConfig
    return from_dict(SFTConfig, dict(init=str(init), data=[str(write_sft(tmp_path / "sft.jsonl"))],
                                     val_fraction=0.0, val_data=[str(write_sft(tmp_path / "val.jsonl", 4))],
                                     batch_size=8, lr=3e-3, sample_every=0, log_every=1, device="cpu", **kw))


def ppo_config(policy, rm, tmp_path, **kw):
    from engine.ppo import PPOConfig
    (tmp_path / "prompts.txt").write_text("".join(q + "\n" for q, _ in QA))
    return from_dict(PPOConfig, dict(policy=str(policy), reward_model=str(rm), prompts=[str(tmp_path / "prompts.txt")],
                                     steps=2, rollout_batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=6,
                                     lr=1e-3, value_lr=1e-3, probe_every=100, checkpoint_every=100, device="cpu", **kw))


def write_sft(path, n=24):
    path.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in QA * (n // len(QA))))
    return path


def test_sft_from_an_import_learns_and_exports_for_transformers(imported, tmp_path):
    from engine.sft import run as sft_run
    run_dir = tmp_path / "sft"
    run_dir.mkdir()
    cfg = sft_config(imported, tmp_path, max_steps=30, warmup_steps=2, eval_every=30, checkpoint_every=30)
    events = []
    assert sft_run(cfg, run_dir, sink=events.append) == "completed"
    loss = [e["train/loss"] for e in events if e.get("type") == "metrics" and "train/loss" in e]
    assert loss[-1] < loss[0] * 0.7
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert (ckpt / "tokenizer_config.json").is_file()       # the template travels with the checkpoint

    out = export(run_dir, "hf", tmp_path / "hf")
    art = load_artifact(run_dir, prefer="latest")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "Say hello."}]
    ids = back_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == art.tokenizer.render_chat(chat, add_generation_prompt=True)[0]
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(art.model.eval()(x), back(x).logits, atol=1e-4, rtol=1e-4)
    greedy = back.generate(x, max_new_tokens=6, do_sample=False, eos_token_id=None)
    ours = ChatSession(art.model, art.tokenizer, settings=SamplingSettings(max_new_tokens=6, temperature=0.0))
    ours.stop_ids = ()
    ours.send("Say hello.")
    assert back_tok.decode(greedy[0, len(ids):]).startswith(ours.messages[-1]["content"])


def test_a_base_model_without_a_template_gets_ours_and_room_for_its_tokens(tmp_path):
    folder = save_model_folder(tmp_path / "base", "smollm2", "llama", spare_rows=0, tie_word_embeddings=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    run_dir, events = import_run(folder, tmp_path / "run")
    art = load_artifact(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    old = hf.config.vocab_size
    assert art.model.config.vocab_size == art.tokenizer.vocab_size == old + 6
    emb = art.model.model.embed_tokens.weight
    torch.testing.assert_close(emb[old:], emb[:old].mean(0, keepdim=True).expand(6, -1))
    assert art.model.lm_head.weight is emb              # still tied
    ids, mask = art.tokenizer.render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    assert art.tokenizer.decode(ids) == "<|bos|><|user|>Hi<|end|><|assistant|>Yo<|end|>"
    assert any("no chat template" in e.get("message", "") for e in events)


def test_import_by_name_from_the_local_cache_and_refusals(qwen_folder, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--Qwen2.5-tiny" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(qwen_folder, target_is_directory=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert hf_import.cached_models() == ["tiny-org/Qwen2.5-tiny"]
    project = create_project(tmp_path / "proj", "p")
    assert workbench(["import-model", "tiny-org/Qwen2.5-tiny", "--project", str(project.path),
                      "--log-format", "json"]) == 0
    runs = sorted((project.path / "runs").glob("hf_import-*"))
    assert len(runs) == 1 and load_artifact(runs[0]).state["family"] == "qwen2"
    capsys.readouterr()
    # An unknown name and an unsupported family: one line each, exit code 2, no traceback.
    assert workbench(["import-model", "nobody/nothing", "--project", str(project.path), "--log-format", "json"]) == 2
    assert "no model of that name in the local Hugging Face cache" in capsys.readouterr().err
    assert len(list((project.path / "runs").glob("hf_import-*"))) == 1     # no run folder for it
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert workbench(["import-model", str(bad), "--project", str(project.path), "--log-format", "json"]) == 2
    out = capsys.readouterr()
    assert "model_type 'gpt2' (GPT2LMHeadModel) is not supported; supported: Llama" in out.out
    assert "Traceback" not in out.out + out.err
    # A folder without config.json is named by its file, not as a setting of the stage.
    (bad / "config.json").unlink()
    assert workbench(["import-model", str(bad), "--project", str(project.path)]) == 2
    out = capsys.readouterr()
    said = out.out + out.err
    assert f"failed: {bad / 'config.json'}: missing" in said and "config field" not in said


def test_gguf_export_of_an_imported_model_carries_its_tokenizer(imported, tmp_path):
    from engine.gguf_export import read_gguf_fields, read_gguf_tensors
    out = export(imported, "gguf", tmp_path / "m.gguf", "q8_0")
    fields = read_gguf_fields(out)
    tok = load_artifact(imported).tokenizer
    assert fields["general.architecture"] == "qwen2"
    assert fields["tokenizer.ggml.eos_token_id"] == tok.end_id
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert len(fields["tokenizer.ggml.tokens"]) == load_artifact(imported).model.config.vocab_size
    assert "blk.1.attn_q.bias" in read_gguf_tensors(out)


def test_an_export_never_writes_over_a_run_a_checkpoint_a_project_or_another_file(tiny_lm_ckpt, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_lm_ckpt, run)
    (run / "config.json").write_text("{}")
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    project = tmp_path / "project"
    project.mkdir()
    (project / "workbench.toml").write_text("name = 'x'\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    hub = tmp_path / "downloaded"       # a model in shards, as the Hub lays a large one out
    hub.mkdir()
    (hub / "config.json").write_text('{"model_type": "llama"}')
    (hub / "model.safetensors.index.json").write_text("{}")
    (hub / "model-00001-of-00002.safetensors").write_bytes(b"x")
    before.update({p: p.read_bytes() for p in hub.iterdir()})
    for fmt, out, said in [("hf", run, "not a model folder"), ("hf", ckpt, "not a model folder"),
                           ("hf", hub, "not a model folder"),
                           ("hf", project, "not a model folder"), ("hf", notes, "is a file"),
                           ("gguf", run, "is a folder"), ("gguf", run / "config.json", "not a GGUF file")]:
        with pytest.raises(ValueError, match=said):
            export(run, fmt, out)
        assert workbench(["export", str(run), "--format", fmt, "--out", str(out)]) == 2
    assert {p: p.read_bytes() for p in [*run.rglob("*"), *hub.iterdir()] if p.is_file()} == before
    assert notes.read_text() == "mine"
    # an earlier export is replaced: the same command twice
    for fmt, out in [("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf")]:
        assert export(run, fmt, out) == export(run, fmt, out)


def test_an_export_refused_names_the_run_not_a_config_field(rm_ckpt, tmp_path, capsys):
    tok_run = tmp_path / "tokenizer-x"
    tok_run.mkdir()
    assert workbench(["export", str(tok_run), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: no checkpoint found in {tok_run}\n"
    assert workbench(["export", str(rm_ckpt), "--format", "gguf", "--out", str(tmp_path / "rm.gguf")]) == 2
    assert capsys.readouterr().err == ("error: a reward model has no GGUF form that llama.cpp runs: "
                                       "export it as hf\n")


def test_a_reward_model_exports_as_a_sequence_classifier(rm_ckpt, tmp_path):
    out = export(rm_ckpt, "hf", tmp_path / "rm")
    art = load_artifact(rm_ckpt)
    back = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    x = torch.tensor([[1, 5, 9, 12, 2]])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits[0, 0], art.model.eval()(x)[0, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="^a reward model has no GGUF form"):
        export(rm_ckpt, "gguf", tmp_path / "rm.gguf")


@pytest.mark.parametrize("family", ["llama3.2", "smollm2"])
def test_a_reward_model_that_pads_with_its_end_token_exports_scored_where_ours_is(family, tmp_path):
    """Llama 3 pads with its end-of-turn token, SmolLM2 names it as pad: transformers reads a
    sequence classifier's score at the last token that is not padding, so the export pads with
    another special token and the score is read at the end token, as ours is."""
    from types import SimpleNamespace
    from engine.export import export_hf
    from engine.hf_model import load_hf_model
    from engine.hf_tokenizer import HFTokenizer
    from engine.model import ScalarModel
    from engine.reward_data import encode_answer
    src = save_model_folder(tmp_path / "src", family=family, model_type="llama")
    tok = HFTokenizer.from_folder(src)
    assert tok.pad_id == tok.end_id
    torch.manual_seed(0)
    rm = ScalarModel.from_lm(load_hf_model(src)).eval()
    torch.nn.init.normal_(rm.score.weight)
    out = export_hf(SimpleNamespace(model=rm, tokenizer=tok), tmp_path / "rm")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids, _ = encode_answer(tok, "What is two plus two?", "It is four.", 64)
    x = torch.tensor([ids])
    assert ids[-1] == tok.end_id and back.config.pad_token_id not in tok.turn_end_ids
    assert transformers.AutoTokenizer.from_pretrained(out).pad_token_id == back.config.pad_token_id
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x).logits[0, 0], rm(x)[0, -1], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def rm_from_import(imported, tmp_path_factory):
    """A reward model trained from the import on a few rankings."""
    from engine.reward import RewardConfig, run as rm_run
    from test_reward import write_prefs
    root = tmp_path_factory.mktemp("rm-import")
    write_prefs(root / "prefs.jsonl", n=24)
    rm_dir = root / "rm"
    rm_dir.mkdir()
    rm_cfg = from_dict(RewardConfig, dict(init=str(imported), data=[str(root / "prefs.jsonl")], batch_size=4,
                                          lr=3e-3, max_steps=6, warmup_steps=1, eval_every=6, checkpoint_every=6,
                                          log_every=1, device="cpu"))
    assert rm_run(rm_cfg, rm_dir, sink=lambda e: None) == "completed"
    return rm_dir


def test_reward_model_and_ppo_start_from_an_import_and_export(imported, rm_from_import, tmp_path):
    """InstructGPT's loop on an imported chat model: its reward model, PPO against it, the result
    back in transformers."""
    from engine.ppo import run as ppo_run
    ppo_dir = tmp_path / "ppo"
    ppo_dir.mkdir()
    ppo_cfg = ppo_config(imported, rm_from_import, tmp_path)
    events = []
    assert ppo_run(ppo_cfg, ppo_dir, sink=events.append) == "completed"
    kl = [e["objective/kl"] for e in events if e.get("type") == "metrics" and "objective/kl" in e]
    assert kl and kl[0] == pytest.approx(0.0, abs=1e-6)     # the first rollout is the imported policy's own
    out = export(ppo_dir, "hf", tmp_path / "ppo-hf")
    assert_transformers_reads_it(ppo_dir, out)


def assert_transformers_reads_it(run_dir, out) -> None:
    """The exported folder, loaded by transformers, gives the run's own logits on a chat prompt."""
    art = load_artifact(run_dir, prefer="latest")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.tensor([art.tokenizer.render_chat([{"role": "user", "content": "Say hello."}],
                                                add_generation_prompt=True)[0]])
    with torch.no_grad():
        torch.testing.assert_close(art.model.eval()(x), back(x).logits, atol=1e-4, rtol=1e-4)


def test_lora_sft_then_lora_ppo_from_an_import_exports_for_transformers(imported, rm_from_import, tmp_path):
    """The chain with adapters: LoRA SFT on the import, LoRA PPO on that, the result merged on
    export and loaded by transformers with the run's own logits."""
    from engine.ppo import run as ppo_run
    from engine.sft import run as sft_run
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    cfg = sft_config(imported, tmp_path, max_steps=12, warmup_steps=1, eval_every=12, checkpoint_every=12,
                     lora_rank=4)
    assert sft_run(cfg, sft_dir, sink=lambda e: None) == "completed"
    ckpt = sorted((sft_dir / "checkpoints").glob("step-*"))[-1]
    assert (ckpt / "adapter_model.safetensors").is_file()
    ppo_dir = tmp_path / "ppo"
    ppo_dir.mkdir()
    ppo_cfg = ppo_config(sft_dir, rm_from_import, tmp_path, lora_rank=4)
    assert ppo_run(ppo_cfg, ppo_dir, sink=lambda e: None) == "completed"
    out = export(ppo_dir, "hf", tmp_path / "hf")
    assert_transformers_reads_it(ppo_dir, out)


def test_a_model_trained_here_exports_with_our_template_for_transformers(tiny_lm_ckpt, tmp_path):
    """Ours -> Hugging Face: the tokenizer and its chat template as AutoTokenizer reads them, the
    same logits and the same greedy tokens in AutoModelForCausalLM."""
    out = export(tiny_lm_ckpt, "hf", tmp_path / "hf")
    art = load_artifact(tiny_lm_ckpt)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    chat = [{"role": "user", "content": "alpha beta?"}, {"role": "assistant", "content": "gamma delta"}]
    assert hf_tok.apply_chat_template(chat, tokenize=True, return_dict=False) == art.tokenizer.render_chat(chat)[0]
    ids = art.tokenizer.render_chat(chat[:1], add_generation_prompt=True)[0]
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(art.model.eval()(x), back(x).logits, atol=1e-4, rtol=1e-4)
    greedy = back.generate(x, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    from engine.generate import generate
    assert greedy[0, len(ids):].tolist() == generate(art.model, ids, 8, temperature=0.0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_an_export_in_half_precision_is_half_the_size_and_loads_as_such(tiny_lm_ckpt, tmp_path, capsys, dtype):
    """--dtype: the weights stored in it (config.json says which, so dtype="auto" picks it), the
    file about half the float32 one's size, and transformers' logits those of our weights
    rounded to it."""
    from safetensors import safe_open
    full = export(tiny_lm_ckpt, "hf", tmp_path / "f32")
    assert workbench(["export", str(tiny_lm_ckpt), "--out", str(tmp_path / "half"), "--dtype", dtype]) == 0
    half = tmp_path / "half"
    with safe_open(half / "model.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {f"torch.{dtype}"}
    ratio = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    assert json.loads((half / "config.json").read_text())["dtype"] == dtype
    back = transformers.AutoModelForCausalLM.from_pretrained(half, dtype="auto").eval()
    assert back.dtype == getattr(torch, dtype)
    art = load_artifact(tiny_lm_ckpt)
    x = torch.tensor([art.tokenizer.render_chat([{"role": "user", "content": "alpha beta?"}],
                                                add_generation_prompt=True)[0]])
    rounded = art.model.eval().to(getattr(torch, dtype)).float()
    with torch.no_grad():
        torch.testing.assert_close(rounded(x), back.float()(x).logits, atol=1e-4, rtol=1e-4)
    # A GGUF file has its own weight type: --dtype is refused there by name, before any work.
    assert workbench(["export", str(tiny_lm_ckpt), "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
                      "--dtype", dtype]) == 2
    assert "--gguf-type" in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()


def test_an_export_that_runs_out_of_disk_leaves_no_folder_and_says_so(tiny_lm_ckpt, tmp_path, monkeypatch, capsys):
    import errno

    from engine import export as export_mod

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(export_mod, "save_hf_weights", full)
    rc = export_mod.main([str(tiny_lm_ckpt), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert rc == 1 and "disk full:" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()      # not a folder of tokenizer files without weights


def test_gguf_says_bos_is_prepended_only_where_the_tokenizer_prepends_it(tmp_path):
    # SmolLM2 names <|im_start|> as its bos_token but never prepends it: llama.cpp must not either.
    from engine.gguf_export import read_gguf_fields
    run_dir, _ = import_run(save_model_folder(tmp_path / "smol", "smollm2", "llama", spare_rows=0), tmp_path / "run")
    fields = read_gguf_fields(export(run_dir, "gguf", tmp_path / "m.gguf", "f32"))
    assert fields["tokenizer.ggml.bos_token_id"] == load_artifact(run_dir).tokenizer.bos_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
