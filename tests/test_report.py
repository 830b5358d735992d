"""`workbench report RUN`: one self-contained HTML page of a real finished run, with its config,
metrics as SVG plots, escaped samples, lineage and hardware; a missing or broken run refused in
one line."""
import json
import random
import re
import shutil
import struct
import subprocess
from html import escape

import numpy as np
import pytest

from engine import pretrain, sft, tokenizer
from workbench import cli
from workbench.plot_specs import PLOT_SPECS
from workbench.report import fmt, read_run, write_report
from workbench.svg_plot import Line, downsample, line_chart, nice_ticks

WORDS = "cat dog sun red big box hat pen cup map".split()
SCRIPT = "<script>alert('x')</script> & more"
MODEL = {"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 2, "d_ff": 64, "max_seq_len": 48}


def stage_run(module, run_dir, config: dict) -> None:
    """A run as the app makes one: config.json in its folder, the stage's own entry point."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    assert module.main(["--run-dir", str(run_dir), "--log-format", "json"]) == 0


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """tokenizer -> pretrain -> SFT, a few seconds on one thread; SFT samples a prompt that
    holds markup."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    rng = random.Random(0)
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(300)))
    records = [{"prompt": f"Repeat: {w}", "response": w} for w in (rng.choice(WORDS) for _ in range(60))]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = root / "runs"
    try:
        stage_run(tokenizer, runs / "tokenizer-20250101-000000",
                  {"inputs": [str(root / "text.txt")], "vocab_size": 300})
        stage_run(pretrain, runs / "pretrain-20250101-000100", dict(
            tokenizer="../tokenizer-20250101-000000", inputs=[str(root / "text.txt")], preset="tiny",
            model=MODEL, seq_len=32, batch_size=4, max_steps=12, warmup_steps=1, eval_every=6,
            eval_batches=1, sample_every=0, checkpoint_every=12, log_every=2, device="cpu"))
        stage_run(sft, runs / "sft-20250101-000200", dict(
            init="../pretrain-20250101-000100", data=[str(root / "sft.jsonl")], val_fraction=0.1,
            batch_size=8, max_steps=8, lr=3e-3, warmup_steps=1, eval_every=4, eval_batches=1,
            sample_every=4, sample_tokens=6, sample_prompts=["Repeat: cat", SCRIPT],
            checkpoint_every=8, log_every=1, device="cpu"))
    finally:
        torch.set_num_threads(threads)
    return root


def report(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = cli.main(["report", *map(str, argv)])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_report_holds_config_metrics_plots_samples_lineage_and_hardware(project, tmp_path, capsys):
    import torch
    run_dir = project / "runs" / "sft-20250101-000200"
    rc, out, err = report(capsys, run_dir, "--out", tmp_path / "sft.html")
    assert rc == 0 and err == "" and str(tmp_path / "sft.html") in out
    page = (tmp_path / "sft.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")

    # Every setting of config.json, as the table shows it.
    config = json.loads((run_dir / "config.json").read_text())
    for key, value in config.items():
        assert f">{key}<" in page and escape(fmt(value)) in page, key

    # Every metric the run logged is named, and every plot is an SVG with ticks and a line.
    run = read_run(run_dir)
    keys = run.fold.history.keys()
    assert {"train/loss", "val/loss", "train/lr"} <= set(keys)
    for key in keys:
        assert escape(key) in page, key
    figures = re.findall(r"<figure><figcaption>(.*?)</figcaption>(<svg.*?</svg>)</figure>", page, re.S)
    titles = [t for t, _ in figures]
    # The app's plots of the stage first, in its order; then the metrics no plot of it names.
    expected = [t for t, ks in PLOT_SPECS["sft"] if set(ks) & set(keys)]
    assert titles[:len(expected)] == expected and {"Loss", "Learning rate", "Gradient norm"} <= set(expected)
    assert "val/best_loss" in titles[len(expected):]
    assert page.count("<svg") == len(figures) >= 5
    for _title, svg in figures:
        assert "<polyline" in svg and 'class="tick"' in svg and ">step</text>" in svg

    # Samples are there, and their markup is text, not markup.
    assert escape(SCRIPT) in page and "<script" not in page.lower()
    # Self-contained: no address of anything outside the page.
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", page)

    # Summary, lineage back to the tokenizer, and what it ran on.
    assert "completed" in page and "val loss" in page
    lineage = page[page.index('id="lineage"'):page.index('id="hardware"')]
    assert "tokenizer-20250101-000000" in lineage and "pretrain-20250101-000100" in lineage
    assert "init of sft-20250101-000200" in lineage and "tokenizer of pretrain-20250101-000100" in lineage
    hardware = page[page.index('id="hardware"'):]
    assert torch.__version__ in hardware and "cpu (1 threads)" in hardware


def test_the_default_place_is_the_run_folder_and_a_tokenizer_shows_its_figures(project, capsys):
    run_dir = project / "runs" / "tokenizer-20250101-000000"
    rc, out, _err = report(capsys, run_dir)
    assert rc == 0 and (run_dir / "report.html").exists()
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    # One-off figures as a table, as the app shows them, and the tokenized examples as pieces.
    assert "Vocabulary size" in page and "Characters per token" in page and "<svg" not in page
    assert "Tokenized examples" in page and page.count('<span class="piece">') > 50
    assert '<span class="piece">\u2423</span>' in page          # a space token, made visible


@pytest.mark.parametrize("make, reason", [
    (lambda tmp: tmp / "nowhere", "no run folder at"),
    (lambda tmp: tmp, "is not a run folder"),
    (lambda tmp: (tmp / "config.json").write_text('{"max_steps": 3,,}') and tmp, "invalid JSON at line 1"),
])
def test_a_missing_or_broken_run_is_one_line_and_exit_2(tmp_path, capsys, make, reason):
    rc, out, err = report(capsys, make(tmp_path))
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and reason in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_place_it_cannot_write_is_one_line_and_exit_1(project, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    rc, out, err = report(capsys, project / "runs" / "pretrain-20250101-000100", "--out", tmp_path / "file" / "r.html")
    assert rc == 1 and out == "" and err.startswith("error: cannot write") and err.count("\n") == 1
    # a folder given for the page is the user's mistake, said before anything is read: exit 2
    rc, out, err = report(capsys, project / "runs" / "pretrain-20250101-000100", "--out", tmp_path)
    assert rc == 2 and err == f"error: --out {tmp_path} is a folder; give the .html file to write\n"


def test_a_report_never_writes_over_a_project_or_a_run(project, capsys):
    # The page goes anywhere a person asks but onto what a project or a run holds.
    run_dir = project / "runs" / "pretrain-20250101-000100"
    (project / "workbench.db").write_bytes(b"not yours to replace")
    for out, why in ((project / "workbench.db", "is a project's own file"),
                     (run_dir / "events.jsonl", f"is inside the run folder {run_dir}")):
        before = out.read_bytes()
        rc, _, err = report(capsys, run_dir, "--out", out)
        assert rc == 2 and err == f"error: {out} {why}: write the report elsewhere\n"
        assert out.read_bytes() == before
    rc, _, _ = report(capsys, run_dir, "--out", run_dir / "mine.html")
    assert rc == 0 and (run_dir / "mine.html").is_file()
    (project / "workbench.db").unlink()


def test_chart_ticks_gaps_and_downsampling():
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(3, 97) == [20, 40, 60, 80]
    x = np.arange(10_000, dtype=float)
    y = np.sin(x / 300)
    y[5000] = 40.0                                  # one spike among 10,000 points
    xs, ys = downsample(x, y, 100)
    assert len(xs) <= 200 and ys.max() == 40.0 and np.all(np.diff(xs) > 0)
    # A non-finite value breaks the line into two instead of ending the chart.
    svg = line_chart("t", [Line("a/b", np.arange(5.0), np.array([1, 2, np.nan, 3, 4.0]))])
    assert svg.count("<polyline") == 2 and "nan" not in svg.lower()


BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.mark.skipif(not any(shutil.which(b) for b in BROWSERS), reason="no headless Chromium on this machine")
def test_a_real_browser_renders_the_page(project, tmp_path):
    """The page opens in Chromium with nothing from outside (it has no network to reach here
    anyway) and draws: a screenshot of the right size with ink on it."""
    browser = next(shutil.which(b) for b in BROWSERS if shutil.which(b))
    page, shot = tmp_path / "r.html", tmp_path / "r.png"
    write_report(project / "runs" / "sft-20250101-000200", page)
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    page.as_uri()], capture_output=True, timeout=120, check=False)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1200, 2000)
    assert len(data) > 50_000          # a blank page compresses to about 12 kB
