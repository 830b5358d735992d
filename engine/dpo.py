"""Direct preference optimisation on the rankings: the policy learns the preference without a
reward model or sampling, held near the model it starts from by β.

    python -m engine.dpo --run-dir DIR

reads DIR/config.json (`DPOConfig`), loads the SFT checkpoint `init` twice (the policy, and the
frozen reference; with lora_rank > 0 once, the reference being the policy with its LoRA adapters
switched off, engine.lora), checks every preference record before any work (the reward model's
readers: K-way rankings, chosen/rejected pairs, transcripts) and holds out whole prompts for
validation as the reward model does. Each step takes `batch_size` rankings; all answers of a
ranking go through the policy and the reference in one batch, and engine.dpo_loss turns their
log-ratios into the ranking's loss (pairwise over C(K,2) pairs, or Plackett-Luce over the whole
order).

The reference's log-probs are computed alongside the policy's at every step rather than cached
for the whole data set up front: one more forward pass without gradients per step, no start-up
pass over all the data, and no cache to keep consistent across resumes.

Evaluation reports the held-out rankings' loss and reward accuracy, and the KL to the reference:
the policy answers `kl_prompts` held-out prompts (sampled at temperature 1, seeded, so steps
compare) and KL is the mean over answers of Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t)) at the states the
answers visit. Its expectation is PPO's objective/kl (Σ_t log π(a_t) - log π_ref(a_t) over a
sampled answer), so the two compare, but it is never negative and much less noisy on the few
dozen answers an evaluation can afford.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from engine import distributed
from engine.artifacts import RunInputs
from engine.chat import reply_batch, sampled_kl
from engine.config import require, resolve_path
from engine.device import describe, setup
from engine.dpo_loss import FORMS, LOSSES, AnswerTokens, ranking_loss, sequence_logps
from engine.lora import LORA_FIELDS, add_adapters, describe as describe_lora, reference_for, uses_lora
from engine.reward import RankingsConfig
from engine.reward_data import Ranking, prompt_key, ranking_pairs
from engine.runio import Emitter, NeverStop, Sink, StageError, stage_main, write_summary
from engine.sft import DEFAULT_PROMPTS
from engine.sft_data import CUT_NOTHING, EpochSampler, Example, data_fingerprint, fit
from engine.trainer import Stage, check_resume_preflight, run_summary, train, trained_fixed


@dataclass(kw_only=True)
class DPOConfig(RankingsConfig):
    init: str                             # SFT checkpoint or run folder: where the policy starts, and the frozen reference
    data: list[str]                       # JSONL rankings or chosen/rejected pairs (the reward model's formats)
    seq_len: int = 0                      # 0: the model's max_seq_len; longer conversations lose prompt tokens first
    beta: float = 0.1                     # β: how strongly the policy is held to the reference (smaller: it may move further)
    loss: str = "sigmoid"                 # sigmoid (DPO) | ipo (IPO's squared loss; pairwise only)
    form: str = "pairwise"                # pairwise: every pair of a ranking, C(K,2) | plackett_luce: the whole order at once
    kl_prompts: int = 32                  # held-out prompts answered at each evaluation to measure KL to the reference (0: off)
    kl_tokens: int = 24                   # answer length limit of those answers
    sample_prompts: list[str] = field(default_factory=DEFAULT_PROMPTS.copy)  # prompts answered at each sample step
    sample_tokens: int = 48               # answer length limit of the samples
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    eval_every: int = 25
    sample_every: int = 50
    checkpoint_every: int = 100
    log_every: int = 5

    def validate(self) -> None:
        self.validate_rankings()
        require(math.isfinite(self.beta) and self.beta > 0, "beta", "must be a positive number")
        require(self.loss in LOSSES, "loss", f"one of {', '.join(LOSSES)}")
        require(self.form in FORMS, "form", f"one of {', '.join(FORMS)}")
        require(not (self.loss == "ipo" and self.form == "plackett_luce"), "loss",
                "ipo is a pairwise loss: use form pairwise, or loss sigmoid with plackett_luce")
        require(self.kl_prompts >= 0, "kl_prompts", "must be zero (off) or positive")
        require(self.kl_tokens > 0, "kl_tokens", "must be a positive integer")
        require(self.sample_tokens > 0, "sample_tokens", "must be a positive integer")


# What the run *is*: changing any of these on resume would train a different run under its name.
FIXED_ON_RESUME = ("init", "tokenizer", "data", "val_data", "val_fraction", "seq_len", "beta", "loss", "form",
                   *LORA_FIELDS)


@dataclass
class Encoded:
    """A ranking's answers as training examples (the mask on the final answer only)."""
    ranking: Ranking
    answers: list[Example]


def encode_ranking(tok, r: Ranking, max_len: int) -> Encoded:
    context = [{"role": "user", "content": r.prompt}] if isinstance(r.prompt, str) else list(r.prompt)
    start = len(tok.render_chat(context, add_generation_prompt=True)[0])
    out = []
    for j, a in enumerate(r.answers):
        ids, mask = tok.render_chat(context + [{"role": "assistant", "content": a}])
        mask = [0] * start + mask[start:]       # earlier assistant turns are context here
        ids, mask, cut = fit(ids, mask, max_len, tok.scaffold_ids, tok.stop_ids)
        out.append(Example(ids, mask, f"{r.where} answer {j}", truncated=cut != CUT_NOTHING))
    return Encoded(r, out)


class Hooks:
    """What the DPO stage hands the trainer: batches, the loss, evaluation, samples, resume state."""

    def __init__(self, cfg: DPOConfig, art, ref, train_items: list[Encoded], val_items: list[Encoded],
                 ev: Emitter, device, fingerprint: str, max_len: int, sources: dict):
        self.cfg, self.tok, self.ref, self.ev, self.device = cfg, art.tokenizer, ref, ev, device
        self.max_len = max_len      # a packed row's most tokens, as an answer's
        self.train_items, self.val_items = train_items, val_items
        self.sampler = EpochSampler(len(train_items), cfg.seed)
        self.fingerprint = fingerprint
        self.sources = sources       # RunInputs.state(): the checkpoints this run reads
        self._stats: list[dict[str, torch.Tensor]] = []
        self.last_eval: dict = {}
        seen, self.kl_prompts = set(), []
        for e in val_items:               # distinct held-out prompts, in file order
            key = prompt_key(e.ranking.prompt)
            if key not in seen and len(self.kl_prompts) < cfg.kl_prompts:
                seen.add(key)
                self.kl_prompts.append(e.ranking.prompt)

    def batch(self, items: list[Encoded]):
        """(the answers packed behind their prompts, each ranking's (first answer, K, groups),
        tokens run)."""
        spans, start = [], 0
        for e in items:
            spans.append((start, len(e.answers), e.ranking.groups))
            start += len(e.answers)
        tokens = AnswerTokens.of([[(a.ids, a.mask) for a in e.answers] for e in items], self.tok.pad_id,
                                 self.max_len)
        return tokens.to(self.device), spans, tokens.packed.tokens

    def next_batch(self, _gen):
        return self.batch([self.train_items[i] for i in self.sampler.take(self.cfg.batch_size)])

    def skip_batch(self, _gen) -> None:
        self.sampler.take(self.cfg.batch_size)

    def ranking_losses(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss over the batch's rankings, and per-pair figures for the metrics."""
        tokens, spans, _n = batch
        # The reference first: a LoRA reference switches the policy's adapters off and on, which
        # must not happen while the policy's graph for this batch is being built.
        with torch.no_grad():
            ref_logp = sequence_logps(self.ref, tokens)
        logp = sequence_logps(model, tokens)
        logratio = logp - ref_logp
        if self.cfg.loss == "ipo":     # per token (engine.dpo_loss): so are its reward figures
            logratio = logratio / tokens.lengths().to(logratio)
        losses, figs = [], {"margin": [], "chosen": [], "rejected": [], "logp_chosen": [], "logp_rejected": []}
        for start, k, groups in spans:
            value, margin, chosen, rejected = ranking_loss(logratio[start:start + k], groups, self.cfg.beta,
                                                           self.cfg.loss, self.cfg.form)
            losses.append(value)
            figs["margin"].append(margin)
            figs["chosen"].append(chosen)
            figs["rejected"].append(rejected)
            lp = logp.detach()[start:start + k]
            figs["logp_chosen"].append(lp[[w for w, _ in ranking_pairs(groups)]])
            figs["logp_rejected"].append(lp[[l for _, l in ranking_pairs(groups)]])
        return torch.stack(losses).mean(), {k: torch.cat(v).float().cpu() for k, v in figs.items()}

    def loss(self, model, batch):
        value, figs = self.ranking_losses(model, batch)
        self._stats.append(figs)
        return value, batch[2]

    def take_stats(self) -> dict:
        figs = _merge(self._stats)
        self._stats = []
        return _figures("train", figs) if figs else {}

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        losses, figs = [], []
        for i in range(0, len(self.val_items), self.cfg.batch_size):
            batch = self.batch(self.val_items[i:i + self.cfg.batch_size])
            value, f = self.ranking_losses(model, batch)
            losses.append(float(value) * len(batch[1]))
            figs.append(f)
        values = {"val/loss": sum(losses) / len(self.val_items), **_figures("val", _merge(figs))}
        if self.kl_prompts:
            values.update(self.kl_to_reference(model))
        self.last_eval = dict(values)
        return values

    def kl_to_reference(self, model) -> dict[str, float]:
        kl, lengths = sampled_kl(model, self.ref, self.tok, self.kl_prompts, self.cfg.kl_tokens, seed=self.cfg.seed)
        return {"val/kl": float(kl.mean()), "val/answer_tokens": float(lengths.mean())}

    def sample(self, model, step: int) -> None:
        cfg = self.cfg
        for prompt, (text, finished) in zip(cfg.sample_prompts,
                                            reply_batch(model, self.tok, cfg.sample_prompts, cfg.sample_tokens)):
            self.ev.emit("sample", step=step, prompt=prompt, text=text, finished=finished)

    def state(self) -> dict:
        return {"sampler": self.sampler.state(), "data_fingerprint": self.fingerprint,
                "tokenizer_fingerprint": self.tok.fingerprint(), **self.sources}

    def restore(self, saved: dict) -> None:
        if saved.get("data_fingerprint") != self.fingerprint:
            raise StageError("the preference data changed since this run started; resuming would "
                             "train a different run under the old name: start a new run")
        self.sampler.load(saved["sampler"])


def _merge(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


# Each metric's full name spelled out (TRL's, under our split prefix), so a search for a name
# the plots show finds where it is made.
_FIGURE_NAMES = {
    "train": ("train/reward_accuracy", "train/reward_margin", "train/reward_chosen", "train/reward_rejected",
              "train/logp_chosen", "train/logp_rejected"),
    "val": ("val/reward_accuracy", "val/reward_margin", "val/reward_chosen", "val/reward_rejected",
            "val/logp_chosen", "val/logp_rejected")}


def _figures(split: str, f: dict[str, torch.Tensor]) -> dict[str, float]:
    """Rewards are β·log-ratios, averaged over pairs; accuracy is the share with chosen above rejected."""
    values = ((f["margin"] > 0).float().mean(), f["margin"].mean(), f["chosen"].mean(), f["rejected"].mean(),
              f["logp_chosen"].mean(), f["logp_rejected"].mean())
    return {name: float(v) for name, v in zip(_FIGURE_NAMES[split], values)}


def load_rankings(cfg: DPOConfig, run_dir: Path, tok, max_len: int,
                  ev: Emitter) -> tuple[list[Encoded], list[Encoded], list[Path]]:
    """Read, split and encode the rankings, every problem in every file before any work."""
    train_items, val_items, files = cfg.read_data(run_dir)
    # read_rankings refuses a ranking that ties every answer: each one here implies a pair.
    train_enc = [encode_ranking(tok, r, max_len) for r in train_items]
    val_enc = [encode_ranking(tok, r, max_len) for r in val_items]
    cut = sum(a.truncated for e in train_enc + val_enc for a in e.answers)
    if cut:
        ev.log(f"{cut} answer sequence(s) were longer than the context ({max_len}) and lost prompt "
               "tokens first", level="warning")
    return train_enc, val_enc, files


def preflight(cfg: DPOConfig, run_dir: Path) -> None:
    """What would end a run of `cfg` at once, found without loading a model (see engine.sft)."""
    inputs = RunInputs(run_dir, cfg)
    inputs.peek("init", resolve_path(run_dir, cfg.init), kind="lm").config.check_fits("seq_len", cfg.seq_len)
    check_resume_preflight(run_dir, cfg, trained_fixed(FIXED_ON_RESUME))


def run(cfg: DPOConfig, run_dir: Path, sink: Optional[Sink] = None, control=None) -> str:
    ev = Emitter(sink)
    control = control or NeverStop()
    run_dir = Path(run_dir)
    device, dtype = setup(cfg.device, cfg.dtype)
    tok_arg = resolve_path(run_dir, cfg.tokenizer) if cfg.tokenizer else None
    inputs = RunInputs(run_dir, cfg, ev.log)      # init is also the reference: required on a resume
    art = inputs.load("init", resolve_path(run_dir, cfg.init), tokenizer=tok_arg, device=device, kind="lm")
    model = art.model
    if uses_lora(cfg):
        add_adapters(model, cfg, cfg.seed)
        ev.log(describe_lora(model))
    ref = reference_for(model, art.checkpoint, device)
    model.config.check_fits("seq_len", cfg.seq_len)
    max_len = cfg.seq_len or model.config.max_seq_len
    train_items, val_items, files = load_rankings(cfg, run_dir, art.tokenizer, max_len, ev)

    tcfg = cfg.with_steps_for(len(train_items))
    if note := cfg.unused_max_steps(tcfg):
        ev.log(note, level="warning")
    n_pairs = sum(len(e.ranking.pairs()) for e in train_items)
    ev.log(f"device {describe(device, dtype)}; policy and reference from {art.checkpoint.resolve()} "
           f"({model.num_params():,} params); {len(train_items)} train rankings ({n_pairs} pairs), "
           f"{len(val_items)} validation rankings on held-out prompts; {cfg.loss} loss, {cfg.form}, "
           f"beta {cfg.beta}; {tcfg.max_steps} steps")

    hooks = Hooks(cfg, art, ref, train_items, val_items, ev, device, data_fingerprint(files), max_len,
                  inputs.state())
    stage = Stage("dpo", hooks.next_batch, hooks.loss, hooks.evaluate, hooks.sample,
                  fixed_on_resume=FIXED_ON_RESUME, state=hooks.state, restore=hooks.restore,
                  train_metrics=hooks.take_stats, extra_files=art.tokenizer_files,
                  flops_per_token=model.flops_per_token(max_len), skip_batch=hooks.skip_batch)
    status = train(tcfg, run_dir, model, stage, device=device, dtype=dtype, sink=sink, control=control)
    if status != "completed" or not distributed.is_main():
        return status
    if not hooks.last_eval:   # resumed at max_steps: nothing was left to train or evaluate
        model.eval()
        hooks.evaluate(model)
    summary = {"stage": "dpo", **run_summary(run_dir, tcfg), "init": str(art.checkpoint.resolve()),
               "beta": cfg.beta, "loss": cfg.loss, "form": cfg.form,
               "train_rankings": len(train_items), "val_rankings": len(val_items), "train_pairs": n_pairs,
               **hooks.last_eval}
    write_summary(run_dir, summary)
    return status


def main(argv: list[str] | None = None) -> int:
    return stage_main("dpo", DPOConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
