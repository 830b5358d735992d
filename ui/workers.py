"""Short in-process work off the UI thread: a worker object on a QThread, with signals.

The pattern of superqt's `thread_worker`, reduced to what the app needs:

    worker = Worker(fn, *args, **kwargs)        # fn(*args, emit=..., cancelled=..., **kwargs)
    worker.progress.connect(...)                # whatever fn passes to emit(...)
    worker.finished.connect(...)                # fn's return value
    worker.errored.connect(...)                 # the exception's text
    worker.start()
    worker.cancel()                             # sets the flag fn polls with cancelled()

Signals cross threads as queued connections, so slots run on the UI thread. `emit` from the
worker thread is cheap (a queued signal), and fn may call it per token. A Worker keeps itself
alive until its thread ends, so callers may drop their reference; `wait()` is for tests and
for shutting the app down cleanly.
"""
from __future__ import annotations

import threading
import traceback
from typing import Any, Callable

from PySide6.QtCore import QObject, QThread, Signal, Slot

_alive: set["Worker"] = set()       # workers whose thread is running: not garbage-collected


class _Runner(QObject):
    progress = Signal(object)
    finished = Signal(object)
    errored = Signal(str)

    def __init__(self, fn: Callable, args, kwargs, cancel_flag: threading.Event):
        super().__init__()
        self.fn, self.args, self.kwargs, self.cancel_flag = fn, args, kwargs, cancel_flag

    @Slot()
    def run(self) -> None:
        try:
            result = self.fn(*self.args, emit=self.progress.emit, cancelled=self.cancel_flag.is_set,
                             **self.kwargs)
        except Exception as e:  # noqa: BLE001 - every failure must reach the UI as a message
            detail = traceback.format_exc(limit=4)
            self.errored.emit(f"{type(e).__name__}: {e}" if str(e) else detail)
        else:
            self.finished.emit(result)
        # Quit from here, not from a slot on the UI thread: a UI thread blocked in wait()
        # (shutdown, tests) processes no events, so a quit queued to it would never run. The
        # queued finished/errored still arrive before done: events keep their posting order.
        QThread.currentThread().quit()


class Worker(QObject):
    started = Signal()
    progress = Signal(object)
    finished = Signal(object)
    errored = Signal(str)
    done = Signal()          # after finished or errored, when the thread has ended

    def __init__(self, fn: Callable, *args: Any, **kwargs: Any):
        super().__init__()
        self._cancel = threading.Event()
        self._thread = QThread()
        self._runner = _Runner(fn, args, kwargs, self._cancel)
        self._runner.moveToThread(self._thread)
        self._thread.started.connect(self._runner.run)
        self._runner.progress.connect(self.progress)
        self._runner.finished.connect(self._on_finished)
        self._runner.errored.connect(self._on_errored)
        self._thread.finished.connect(self._on_thread_finished)
        self.result: Any = None
        self.error: str | None = None

    def start(self) -> "Worker":
        _alive.add(self)
        self._thread.start()
        self.started.emit()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def running(self) -> bool:
        return self._thread.isRunning()

    def wait(self, timeout_ms: int = 30_000) -> bool:
        return self._thread.wait(timeout_ms)

    def _on_finished(self, result) -> None:
        self.result = result
        self.finished.emit(result)

    def _on_errored(self, text: str) -> None:
        self.error = text
        self.errored.emit(text)

    def _on_thread_finished(self) -> None:
        _alive.discard(self)
        self.done.emit()


def running_workers() -> list[Worker]:
    return [w for w in _alive if w.running]
