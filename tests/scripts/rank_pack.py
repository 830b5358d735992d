"""Rank an annotation pack through the real ranking view, as a person would by keyboard, and
say so on stdout after each ranking the view has stored: `ACK <position>`. With a stop count,
after that many rankings it types the first key of the next one, prints `TYPING` and waits
to be killed (tests/test_packs.py kills it there).

    python tests/scripts/rank_pack.py PACK PLAN.json [STOP_AFTER]

PLAN maps an item's position in the project batch to its ordering in answer indexes, best
first: {"0": [[0], [1], [2]], ...}.
"""
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402


def keys_for(view, groups) -> list:
    """The keys that rank the item on screen as `groups` of answer indexes."""
    item = view.store.item(view.current.item_id)
    idx = {a.id: a.idx for a in item.answers}
    number = {idx[a.answer_id]: a.number for a in view.current.answers}
    keys = []
    for group in groups:
        for j, i in enumerate(group):
            keys += (["="] if j else []) + [str(number[i])]
    return keys + [Qt.Key_Return]


def main() -> None:
    app = QApplication([])
    from ui.pack_window import open_pack_window
    window = open_pack_window(Path(sys.argv[1]))
    plan = json.loads(Path(sys.argv[2]).read_text())
    stop_after = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    view = window.view
    if view.stack.currentWidget() is view.guide:
        QTest.keyClick(view, Qt.Key_Return)
    done = 0
    while view.current is not None:
        position = view.store.item(view.current.item_id).meta["position"]
        keys = keys_for(view, plan[str(position)])
        if done == stop_after:
            QTest.keyClicks(view, keys[0])
            print("TYPING", position, flush=True)
            while True:
                time.sleep(1)
        before = view.current.item_id
        for key in keys:
            if isinstance(key, str):
                QTest.keyClicks(view, key)
            else:
                QTest.keyClick(view, key)
        if view.current is not None and view.current.item_id == before:
            sys.exit(f"the view did not take the ranking of item {position}")
        print("ACK", position, flush=True)
        done += 1
    window.close()
    app.processEvents()


if __name__ == "__main__":
    main()
