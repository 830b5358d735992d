"""The README against the code: its install line and demo folder against the launcher, what it
says of `workbench run --help` against the catalogue, and its pipeline table against the rows the
pipeline prints today (docs/pipeline_table.py rewrites the table)."""
import re
from pathlib import Path

import pytest

from workbench import stages

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_names_every_package_a_fresh_debian_needs_and_the_demo_folder():
    from ui import launcher
    install = re.search(r"sudo apt-get install ((?:[^\n`\\]|\\\n)+)", README).group(1)
    packages = set(install.replace("\\", " ").split())
    # The two the README named before issue 15 and the two a fresh Debian 12 also needed.
    assert {"libxcb-cursor0", "libxkbcommon-x11-0", "libxcb-icccm4", "libxcb-keysyms1"} <= packages
    assert f"~/.local/share/{launcher.APP_DIR}/{launcher.DEMO_DIR}" in README
    assert "workbench/workbench/demo-project" not in README


def test_workbench_run_help_describes_the_stage_argument_and_the_run_folder(capsys):
    from workbench import cli
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--run-dir DIR" in text and "the run folder" in text
    for spec in stages.STAGES:
        assert re.search(rf"\b{spec.name} ", text), spec.name
        assert " ".join(spec.blurb.split()[:6]) in text, spec.name


def test_the_readme_table_has_the_rows_the_pipeline_prints_today():
    block = README.split("<!-- pipeline-table -->", 1)[1].split("<!-- /pipeline-table -->", 1)[0]
    evaluate = [line for line in block.splitlines() if line.startswith("evaluate")]
    assert evaluate
    # workbench/pipeline.py: "<Method> vs SFT win rate X% (Wn/Tn/Ln); KL x.xx nats; accuracy ..."
    for line in evaluate:
        assert re.search(r"vs SFT win rate [\d.]+% \(W\d+/T\d+/L\d+\); KL [\d.]+ nats; accuracy", line), line
    # The table sets every alignment method of the catalogue beside SFT (docs/pipeline_table.py
    # runs the pipeline with all of them).
    methods = [s.name for s in stages.STAGES if s.method]
    assert [line.split()[1].rsplit("-", 2)[0] for line in evaluate] == methods


def test_the_tables_check_compares_its_rows_only():
    """docs/pipeline_table.py --check: the README's block holds a fence and a machine line beside
    the rows; a run that printed the same rows must compare equal (it never did)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs"))
    from pipeline_table import figures
    block = README.split("<!-- pipeline-table -->", 1)[1].split("<!-- /pipeline-table -->", 1)[0]
    printed = "\n".join(line for line in block.splitlines() if not line.startswith(("```", "(")))
    printed = re.sub(r"-\d{8}-\d{6}", "-20990101-000000", printed)        # other runs, other times
    printed = re.sub(r"\b\d+m\d\ds\b|\b\d+s\b", "9s", printed)
    assert figures(block) == figures(printed) and len(figures(block)) >= 10
    assert figures(block) != figures(printed.replace("18.5%", "18.6%"))
