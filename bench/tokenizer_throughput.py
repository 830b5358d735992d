"""Tokenizer training and encoding throughput: our stage against the `tokenizers` library itself.

    python bench/tokenizer_throughput.py [--mb 20] [--vocab-size 4096] [--repeats 3] [--out docs/PERFORMANCE.md]

Corpus: the demo project's (scale small: Python documentation plus task transcripts), copied
into as many files as it takes to reach `--mb` megabytes, so the timing is not dominated by
start-up. Replicating text multiplies the word counts but adds no new words, so the merge phase
costs what it costs on the original; the counting phase, which reads every byte, grows with
the size. Every variant trains the same vocabulary size on the same files in this process,
interleaved, `--repeats` times each; the table gives each one's median.

Training:
  stage         engine.tokenizer.run: what `python -m engine.tokenizer` and the app run (reads
                files in 64k-char chunks, holds 1% out, trains, saves, measures chars/token)
  library       tokenizers.Tokenizer.train(files): the library reads the files itself (Rust)
  library, iter tokenizers.Tokenizer.train_from_iterator over the same chunks, read up front
All three build the same model: byte-level BPE, no normalizer, ByteLevel pre-tokenizer (GPT-2
regex, no prefix space), ByteLevel alphabet, the six special tokens, min_frequency 2.

Encoding (the trained tokenizer, the whole corpus):
  engine.data.encode_corpus  files to train.bin/val.bin, as pretraining does
  Tokenizer.encode_batch     our wrapper, on the corpus chunks held in memory, in batches of
                             engine.data.BATCH_CHARS as encode_corpus sends them
  library encode_batch_fast  tokenizers.Tokenizer.encode_batch_fast on the same batches, ids read
                             out: what the wrapper calls, and the base of the ratios
  library encode_batch       the same with character offsets computed, which ids do not need
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tokenizers  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from bench.report import markdown_table, publish  # noqa: E402
from engine.corpus import iter_chunks, list_corpus_files  # noqa: E402
from engine.data import BATCH_CHARS, encode_corpus  # noqa: E402
from engine.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerConfig, run as run_stage  # noqa: E402
from workbench.demo import write_demo_project  # noqa: E402

MARKER = "## Tokenizer training and encoding throughput"


def build_corpus(work: Path, mb: float) -> tuple[Path, int]:
    write_demo_project(work / "demo", scale="small")
    src = list_corpus_files([work / "demo" / "data" / "corpus"])
    corpus = work / "corpus"
    corpus.mkdir()
    size, copy = 0, 0
    while size < mb * 1e6:
        for f in src:
            dst = corpus / f"{copy:02d}-{f.name}"
            shutil.copyfile(f, dst)
            size += dst.stat().st_size
        copy += 1
    return corpus, size


def library_tokenizer(vocab_size: int) -> tuple[tokenizers.Tokenizer, trainers.BpeTrainer]:
    # engine/tokenizer.py's _new_hf_tokenizer and train_from_texts, written out with the
    # library's own names, so this stands for what a user would write without our wrapper.
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tk, trainer


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB (the demo corpus, copied)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = ap.parse_args()

    train_t: dict[str, list[float]] = {"stage": [], "library": [], "library, iter": []}
    enc_t: dict[str, list[float]] = {"encode_corpus": [], "Tokenizer.encode_batch": [],
                                     "library encode_batch_fast": [], "library encode_batch": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus, size = build_corpus(work, args.mb)
        files = [str(f) for f in list_corpus_files([corpus])]
        chunks = [c.text for c in iter_chunks(files)]
        n_chars = sum(map(len, chunks))
        batches, size_now = [[]], 0
        for text in chunks:
            if size_now >= BATCH_CHARS:
                batches.append([])
                size_now = 0
            batches[-1].append(text)
            size_now += len(text)
        print(f"corpus: {len(files)} files, {size / 1e6:.1f} MB, {len(chunks)} chunks", flush=True)

        def stage(i: int) -> Tokenizer:
            run_dir = work / f"stage-{i}"
            run_dir.mkdir()
            status = run_stage(TokenizerConfig(inputs=[str(corpus)], vocab_size=args.vocab_size), run_dir,
                               sink=lambda ev: None)
            assert status == "completed", status
            return Tokenizer.from_file(run_dir)

        def library() -> tokenizers.Tokenizer:
            tk, trainer = library_tokenizer(args.vocab_size)
            tk.train(files, trainer)
            return tk

        def library_iter() -> tokenizers.Tokenizer:
            tk, trainer = library_tokenizer(args.vocab_size)
            tk.train_from_iterator(chunks, trainer)
            return tk

        ours = lib = None
        for i in range(args.repeats):
            for name, fn in (("stage", lambda: stage(i)), ("library", library), ("library, iter", library_iter)):
                dt, tk = timed(fn)
                train_t[name].append(dt)
                if name == "stage":
                    ours = tk
                elif name == "library":
                    lib = tk
                print(f"train {name}: {dt:.2f} s", flush=True)
        # Same settings should give (nearly) the same merges; the 1% the stage holds out and the
        # files' line breaks versus our chunk cuts move a few counts, hence a few merges.
        shared = len(set(ours._tk.get_vocab()) & set(lib.get_vocab())) / lib.get_vocab_size()

        plain = tokenizers.Tokenizer.from_str(ours.to_str())   # library defaults, no wrapper
        n_tokens = sum(len(ids) for ids in ours.encode_batch(chunks[:50]))  # warm-up
        for i in range(args.repeats):
            for name, fn in (
                    ("encode_corpus", lambda: encode_corpus(ours, files, work / f"shards-{i}")["n_tokens"]),
                    ("Tokenizer.encode_batch", lambda: sum(len(ids) for b in batches for ids in ours.encode_batch(b))),
                    ("library encode_batch_fast", lambda: sum(len(e.ids) for b in batches for e in plain.encode_batch_fast(
                        b, add_special_tokens=False))),
                    ("library encode_batch", lambda: sum(len(e.ids) for b in batches for e in plain.encode_batch(
                        b, add_special_tokens=False)))):
                dt, n = timed(fn)
                n = sum(n.values()) if isinstance(n, dict) else n
                enc_t[name].append(dt)
                if name == "library encode_batch_fast":
                    n_tokens = n
                print(f"encode {name}: {dt:.2f} s, {n:,} tokens", flush=True)

    times = {**train_t, **enc_t}
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for name, base in (("stage", "library"), ("library", "library"), ("library, iter", "library"),
                       *((name, "library encode_batch_fast") for name in enc_t)):
        kind = "train" if name in train_t else "encode"
        extra = f"{n_tokens / med[name] / 1e6:.2f} M tokens/s" if kind == "encode" else ""
        rows.append((kind, name, f"{med[name]:.2f}", f"{min(times[name]):.2f}", f"{size / 1e6 / med[name]:.2f}",
                     extra, f"{med[base] / med[name]:.2f}x"))
    header = ("phase", "variant", "seconds (median)", "best s", "MB/s", "tokens/s", "speed vs library")
    table = markdown_table(header, rows)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, tokenizers "
               f"{tokenizers.__version__}, Python {platform.python_version()}")
    cmd = f"python bench/tokenizer_throughput.py --mb {args.mb:g} --vocab-size {args.vocab_size} --repeats {args.repeats}"
    section = (f"{MARKER}\n\n"
               f"`{cmd}` on {machine}. Corpus: the demo project's (scale small) copied to {len(files)} files, "
               f"{size / 1e6:.1f} MB, {n_chars / 1e6:.1f} M characters, {n_tokens / 1e6:.2f} M tokens; vocab "
               f"{args.vocab_size}. Each variant ran {args.repeats} times, interleaved, in one process; "
               f"medians. Training: *stage* is engine.tokenizer.run, the whole stage as `python -m engine.tokenizer` "
               f"runs it (chunked reading, 1% held out, save, chars/token on the held-out text); *library* is "
               f"`tokenizers.Tokenizer.train(files)` with the same model, pre-tokenizer, alphabet, special tokens "
               f"and min_frequency; *library, iter* is `train_from_iterator` over the same 64k-char chunks held in "
               f"memory. The stage's and the library's vocabularies share {shared:.1%} of their tokens. Encoding: "
               f"*encode_corpus* writes the pretraining shards from the files; *Tokenizer.encode_batch* is our "
               f"wrapper and *library encode_batch_fast* / *encode_batch* the library's (without / with character "
               f"offsets), all three on the chunks in memory, {len(batches)} batches of about {BATCH_CHARS:,} "
               f"characters as encode_corpus sends them. MB/s and tokens/s are of the median. "
               f"Speed vs library > 1 is faster than calling the library directly.\n\n"
               f"{table}\n")
    publish(args.out, MARKER, section, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
