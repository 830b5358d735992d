import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import pytest  # noqa: E402

TINY_WORDS = "alpha beta gamma delta echo fox golf hotel india juliet kilo lima".split()


SLOW_LIST = Path(__file__).with_name("slow_tests.txt")


def pytest_collection_modifyitems(config, items):
    """Mark `slow` the tests tests/slow_list.py measured as outside the fast loop's budget."""
    try:
        slow = {line.strip() for line in SLOW_LIST.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    except FileNotFoundError:
        return
    for item in items:
        if item.nodeid in slow:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def own_cache_dir(tmp_path_factory):
    """What the workbench caches per machine (the MFU ceiling) goes to a folder of the test
    session's, inherited by the stages tests start: never the user's cache."""
    os.environ["WORKBENCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_lm_ckpt(tmp_path_factory):
    """A tiny random language-model checkpoint with its tokenizer (a stand-in SFT model)."""
    import torch
    from engine import checkpoint as ckpt
    from engine.model import Transformer, config_from_preset
    from engine.weights import safetensors_state
    from engine.tokenizer import train_from_texts

    root = tmp_path_factory.mktemp("tiny_lm")
    tok = train_from_texts([" ".join(TINY_WORDS) * 30, "good bad answer question " * 40], vocab_size=300)
    tok.save(root / "tok.json")
    torch.manual_seed(0)
    model = Transformer(config_from_preset("tiny", tok.vocab_size, d_model=32, n_layer=1, n_head=2,
                                           n_kv_head=2, d_ff=64, max_seq_len=48))
    weights, meta = safetensors_state(model)
    ckpt.save_checkpoint(root / "checkpoints", 10, model=weights, model_metadata=meta,
                         state={"tokenizer_fingerprint": tok.fingerprint(), "stage": "sft"},
                         extra_files={"tokenizer.json": root / "tok.json"})
    return root


@pytest.fixture(scope="module")
def rm_ckpt(tiny_lm_ckpt, tmp_path_factory):
    """A reward model made from the tiny LM's backbone, with normalisation stats."""
    import json

    import torch
    from engine import checkpoint as ckpt
    from engine.model import ScalarModel
    from engine.weights import load_model, safetensors_state
    from engine.reward import NORM_FILE

    root = tmp_path_factory.mktemp("rm")
    lm_ckpt = ckpt.latest_checkpoint(tiny_lm_ckpt / "checkpoints")
    torch.manual_seed(1)
    rm = ScalarModel.from_lm(load_model(lm_ckpt / "model.safetensors"))
    weights, meta = safetensors_state(rm)
    state = json.loads((lm_ckpt / "state.json").read_text())
    path = ckpt.save_checkpoint(root / "checkpoints", 3, model=weights, model_metadata=meta,
                                state={"tokenizer_fingerprint": state["tokenizer_fingerprint"]},
                                extra_files={"tokenizer.json": lm_ckpt / "tokenizer.json"})
    (path / NORM_FILE).write_text(json.dumps({"mean": 0.1, "std": 0.5, "n_answers": 10}))
    return root


@pytest.fixture
def prompts(tmp_path):
    """Prompts for the RL stages (test_grpo and test_sample have their own)."""
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(f"question alpha beta {i}" for i in range(12)) + "\n")
    return p


@pytest.fixture
def one_thread():
    """Two threads spin against each other on a busy 2-core machine: tiny models and long runs
    go several times faster on one."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def gc_on_the_main_thread():
    """As in the app (ui/collector.install_gc): Python's cyclic collector, run on whichever thread
    allocates, can free Qt wrappers and sqlite connections from a worker thread; collections
    happen on the main thread, between tests, instead."""
    import gc
    gc.disable()
    yield
    gc.enable()


FULL_GC_EVERY = 25
_tests_since_full_gc = [0]


@pytest.fixture(autouse=True)
def nothing_left_running():
    """No worker thread or job process outlives a test.

    With the collector off, what a test allocated is all in the youngest generations, so
    collecting those frees its cycles; a full collection (a quarter of a second with torch, Qt
    and transformers loaded, more than most tests take) runs every FULL_GC_EVERY tests."""
    import gc
    yield
    _tests_since_full_gc[0] += 1
    if _tests_since_full_gc[0] >= FULL_GC_EVERY:
        _tests_since_full_gc[0] = 0
        gc.collect()
    else:
        gc.collect(1)
    workers = sys.modules.get("ui.workers")
    if workers is not None:
        for w in workers.running_workers():
            w.wait(10_000)
        assert workers.running_workers() == [], "a test left a worker thread running"
    process = sys.modules.get("engine.osproc")
    if process is not None:
        import subprocess
        alive = []
        for p in process.children():
            try:
                p.wait(15)          # a job that wrote its done event is still exiting
            except subprocess.TimeoutExpired:
                alive.append(p)
        for p in alive:
            p.kill()
            p.wait()
        process.reap()
        assert alive == [], f"a test left {len(alive)} job process(es) running"


@pytest.fixture(scope="session")
def demo_template(tmp_path_factory):
    """The tiny demo project, written once per test session (copy it before changing it)."""
    from workbench.demo import write_demo_project
    path = tmp_path_factory.mktemp("demo") / "project"
    write_demo_project(path, seed=0, scale="tiny")
    return path


@pytest.fixture
def demo_project(demo_template, tmp_path):
    """A fresh copy of the tiny demo project for one test."""
    import shutil
    dest = tmp_path / "project"
    shutil.copytree(demo_template, dest)
    return dest


@pytest.fixture
def make_window(qtbot, tmp_path):
    """make(project, show=False): the app's main window on a project, with its own settings
    file; at the end every job it started is killed and the project closed."""
    from PySide6.QtCore import QSettings
    from ui.main_window import MainWindow
    windows = []

    def make(path, show=False):
        w = MainWindow(QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
        qtbot.addWidget(w)
        if show:
            w.show()
        assert w.open_project(path)
        windows.append(w)
        return w

    yield make
    for w in windows:
        if w.ctx is not None:
            for job in w.ctx.jobs.values():
                job.kill()
            w.close_project()


@pytest.fixture
def fresh(tmp_path):
    """An empty annotation store to import into (preference round trips)."""
    from workbench.store import Store
    s = Store(tmp_path / "b.db")
    yield s
    s.close()

