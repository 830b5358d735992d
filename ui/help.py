"""Help ▸ Keyboard shortcuts and Help ▸ the README's sections, readable offline in the app.

The shortcuts are read from where each view defines them (the page keys from the sidebar, the
ranking keys from ui/ranking_keys.py, the vote keys from ui/compare_view.py), so this list
cannot drift from what the keys do. The guide is the README that ships beside the package,
rendered as Markdown and opened at the chosen section.
"""
from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import QTimer, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QTextBrowser, QVBoxLayout, QWidget

from ui.app import fit_to_screen

README = Path(__file__).resolve().parents[1] / "README.md"
# Help menu entries: (menu text, the README heading it opens at); most are the heading itself.
SECTIONS = [("Quick start", "Quick start"), ("The app, page by page", "The app")] + [
    (heading, heading) for heading in (
        "The command line", "Ranking from the command line", "The stages", "Data the workbench accepts",
        "Ranking as a class", "Agreement that informs training", "Preference data in other formats",
        "Start from a Hugging Face model", "Your runs elsewhere")]


def page_key(i: int) -> str | None:
    """The shortcut of the i-th page (0-based): Ctrl+1 .. Ctrl+9, then Ctrl+0, then none."""
    return f"Ctrl+{(i + 1) % 10}" if i < 10 else None


def shortcuts_html(pages: list[tuple[str, str]]) -> str:
    from ui.compare_view import VOTES
    from ui.ranking_keys import LEGEND

    def table(title: str, rows) -> str:
        body = "".join(f"<tr><td style='padding-right:18px'><b>{html.escape(k)}</b></td>"
                       f"<td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<h3>{html.escape(title)}</h3><table>{body}</table>"

    return "".join([
        table("Pages", [(page_key(i), title) for i, (_k, title) in enumerate(pages[:10])]),
        table("Projects", [("Ctrl+N", "new project"), ("Ctrl+O", "open a project"), ("Ctrl+Q", "quit (jobs keep running)")]),
        table("Ranking a batch", [(k.format(k="K"), v) for k, v in LEGEND]),
        table("Chat and Compare", [("Enter", "send"), ("Shift+Enter", "new line"), ("Esc", "stop the reply"),
                                   *[(key, text.strip("◀▶ ")) for text, key in VOTES.values()]]),
    ])


class HelpDialog(QDialog):
    def __init__(self, title: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle(title)
        fit_to_screen(self, 760, 640)
        self.text = QTextBrowser()
        # The README's links go to files beside it (docs/…) and to the web: each opens where it
        # can be read. Followed inside the browser, a file link blanked the guide for good.
        self.text.setOpenLinks(False)
        self.text.setSearchPaths([str(README.parent)])      # its images, drawn in place
        self.text.anchorClicked.connect(self._follow)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(self.text)
        lay.addWidget(buttons)


    def _follow(self, url: QUrl) -> None:
        if url.scheme() in ("http", "https", "mailto", "file"):
            QDesktopServices.openUrl(url)
        elif not url.path() and url.fragment():
            self.text.scrollToAnchor(url.fragment())
        else:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(README.parent / url.path())))


def shortcuts_dialog(pages: list[tuple[str, str]], parent: QWidget | None = None) -> HelpDialog:
    d = HelpDialog("Keyboard shortcuts", parent)
    d.text.setHtml(shortcuts_html(pages))
    return d


def guide_dialog(heading: str, parent: QWidget | None = None) -> HelpDialog:
    """The README rendered, scrolled to `heading`."""
    d = HelpDialog("The workbench: guide", parent)
    try:
        d.text.setMarkdown(README.read_text(encoding="utf-8"))
    except OSError:
        d.text.setPlainText(f"The guide is the README.md of the workbench; it is not beside this "
                            f"installation ({README}).")
        return d
    block = d.text.document().begin()
    while block.isValid():
        if block.blockFormat().headingLevel() > 0 and block.text().strip() == heading:
            # Once the dialog is shown and laid out (the scroll range is known only then), the
            # heading goes to the top of the view.
            QTimer.singleShot(0, lambda b=block: _scroll_to_top(d.text, b))
            break
        block = block.next()
    return d


def _scroll_to_top(text: QTextBrowser, block) -> None:
    y = text.document().documentLayout().blockBoundingRect(block).top()
    text.verticalScrollBar().setValue(int(y))
