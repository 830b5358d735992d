"""The UI thread's garbage collection: off Python's automatic schedule, on a UI-thread timer.

Kept apart from ui/app.py (which builds the window) so the window can settle the collector
after opening a project without importing the module that imports it.
"""
from __future__ import annotations

import gc


_collector = None


def install_gc() -> None:
    """Python's cyclic garbage collector runs in whichever thread allocates when it triggers;
    run from a worker thread it can free Qt wrappers the UI thread is using (seen as a crash
    about once in 20 data previews). So automatic collection is off and a UI-thread timer
    collects instead, as pyqtgraph's GarbageCollector does."""
    global _collector
    if _collector is None:
        from pyqtgraph.util.garbage_collector import GarbageCollector
        _collector = GarbageCollector(interval=1.0, debug=False)


def settle_gc() -> None:
    """Collect once and freeze what survives (modules, classes, torch, the window and its
    pages). The timer's full collections then walk only what was made since, a few thousand
    objects instead of ~350,000: unfrozen, each one held the UI thread for 250-300 ms."""
    gc.collect()
    gc.freeze()


def thaw_gc() -> None:
    """Before a project's pages are dropped: let the collector see them again."""
    gc.unfreeze()
