"""A page follows a fast-streaming run to its end in a real X server (skipped without xvfb).

The plots once repainted each other forever there (the x axis limited to >= 0 against
autorange): the event loop never came back, in about half of the runs of this scenario.
The offscreen platform the other tests use never showed it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "stream_into_page.py"


@pytest.mark.skipif(shutil.which("xvfb-run") is None, reason="needs xvfb-run (a real X server)")
def test_a_page_follows_a_flood_of_events_to_the_end_in_a_real_window():
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}
    env["QT_QPA_PLATFORM"] = "xcb"
    try:
        done = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable, str(SCRIPT), "10"],
                              env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the window stopped processing events (a repaint loop?)")
    assert "ended after" in done.stdout, done.stdout + done.stderr[-2000:]
