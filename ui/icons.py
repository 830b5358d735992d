"""The app's icons: hand-written SVGs in assets/icons/, drawn in the palette's colours.

The sidebar and status glyphs are single-colour line drawings whose colour is `currentColor`.
They are recoloured here before rendering (the palette's text colour unless told otherwise),
so one file serves light and dark themes, and a status glyph can carry its meaning in colour.
Each icon is rendered once per size into a QIcon, so it stays crisp from 16 px up and on
high-DPI screens, where Qt asks for the doubled size.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Optional

from PySide6.QtCore import QByteArray, Qt
from PySide6.QtGui import QColor, QGuiApplication, QIcon, QImage, QPainter, QPalette, QPixmap
from PySide6.QtSvg import QSvgRenderer

STATUS = ("running", "done", "failed", "stopped", "idle")
# Run states as the engine and the runner spell them, onto the glyph that shows them.
STATUS_ALIASES = {"completed": "done", "queued": "idle", "pending": "idle", "not started": "idle"}
STATUS_COLORS = {"running": "#1c7ed6", "done": "#2f9e44", "failed": "#e03131", "stopped": "#e8590c"}
SIZES = (16, 20, 24, 32, 40, 48, 64, 96, 128, 256)
PLACEHOLDER = b"currentColor"

_cache: dict[tuple[str, int], QIcon] = {}


def names() -> list[str]:
    """Every icon shipped, app icon included."""
    return sorted(p.name[:-4] for p in _icons_dir().iterdir() if p.name.endswith(".svg"))


def icon(name: str, color: Optional[QColor | str] = None) -> QIcon:
    """A single-colour icon in `color` (default: the application palette's text colour)."""
    c = QColor(color) if color is not None else _text_color()
    key = (name, c.rgba())
    cached = _cache.get(key)
    if cached is None:
        svg = svg_source(name).replace(PLACEHOLDER, c.name().encode())
        cached = _cache[key] = _render(svg, c.alphaF())
    return cached


def page_icon(name: str, color: Optional[QColor | str] = None) -> QIcon:
    """A sidebar page's icon: the one named after it, or a generic stage glyph, so a stage
    added to the catalogue without an icon of its own still gets a page."""
    return icon(_page_glyph(name), color)


@lru_cache(maxsize=None)
def _page_glyph(name: str) -> str:
    # Looked up once per page: the sidebar sets its icons again on every refresh.
    return name if (_icons_dir() / f"{name}.svg").is_file() else "stage"


def status_color(status: str) -> Optional[str]:
    """The colour that marks a run status ("completed" is "done"), or None for idle ones."""
    return STATUS_COLORS.get(STATUS_ALIASES.get(status, status))


def status_icon(status: str, color: Optional[QColor | str] = None) -> QIcon:
    """The glyph for a run's state, in its own colour: blue running, green done, red failed…
    Idle takes the palette's text colour at half strength, so it recedes."""
    status = STATUS_ALIASES.get(status, status)
    if status not in STATUS:
        raise ValueError(f"no status glyph for {status!r}; known: {', '.join(STATUS)}")
    if color is None and status in STATUS_COLORS:
        color = STATUS_COLORS[status]
    elif color is None:
        color = _text_color()
        color.setAlphaF(0.55)
    return icon(status, color)


def app_icon() -> QIcon:
    """The application icon, in its own colours."""
    cached = _cache.get(("app", 0))
    if cached is None:
        cached = _cache[("app", 0)] = _render(svg_source("app"), 1.0)
    return cached


@lru_cache(maxsize=None)
def svg_source(name: str) -> bytes:
    path = _icons_dir() / f"{name}.svg"
    if not path.is_file():
        raise ValueError(f"no icon named {name!r}; known: {', '.join(names())}")
    return path.read_bytes()


def _icons_dir():
    # importlib.resources finds the files both in a checkout and in an installed wheel.
    return resources.files("assets") / "icons"


def _text_color() -> QColor:
    return QGuiApplication.palette().color(QPalette.WindowText)


def _render(svg: bytes, opacity: float) -> QIcon:
    renderer = QSvgRenderer(QByteArray(svg))
    if not renderer.isValid():
        raise ValueError("an icon's SVG could not be parsed")
    out = QIcon()
    for size in SIZES:
        img = QImage(size, size, QImage.Format_ARGB32_Premultiplied)
        img.fill(Qt.transparent)
        p = QPainter(img)
        p.setRenderHint(QPainter.Antialiasing)
        p.setOpacity(opacity)
        renderer.render(p)
        p.end()
        out.addPixmap(QPixmap.fromImage(img))
    return out
