"""The app's icons (ui/icons.py over assets/icons/*.svg)."""
import re
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import QByteArray  # noqa: E402
from PySide6.QtGui import QColor, QGuiApplication, QPalette  # noqa: E402
from PySide6.QtSvg import QSvgRenderer  # noqa: E402

from ui import icons  # noqa: E402
from ui.main_window import SIDEBAR  # noqa: E402

PAGES = [key for key, _title in SIDEBAR]      # each sidebar page has an icon of its name


ROOT = Path(__file__).resolve().parents[1]


def opaque_colors(qicon, size=32) -> set[str]:
    """The colours of the fully opaque pixels (antialiased edges are blends, so left out)."""
    img = qicon.pixmap(size, size).toImage()
    found = set()
    for y in range(img.height()):
        for x in range(img.width()):
            c = img.pixelColor(x, y)
            if c.alpha() == 255:
                found.add(c.name())
    return found


@pytest.mark.parametrize("name", PAGES)
def test_every_sidebar_icon_draws_in_the_requested_colour(qapp, name):
    ic = icons.icon(name, QColor("#d9480f"))
    assert not ic.isNull()
    assert opaque_colors(ic) == {"#d9480f"}
    assert opaque_colors(icons.icon(name, "#1864ab"), size=64) == {"#1864ab"}


def test_the_default_colour_is_the_palette_text_colour(qapp):
    want = QGuiApplication.palette().color(QPalette.WindowText).name()
    assert opaque_colors(icons.icon("chat")) == {want}


def test_icons_are_cached_and_rendered_for_every_size(qapp):
    a = icons.icon("ppo", QColor("#123456"))
    assert icons.icon("ppo", "#123456").cacheKey() == a.cacheKey()
    assert icons.icon("ppo", "#654321").cacheKey() != a.cacheKey()
    sizes = {s.width() for s in a.availableSizes()}
    assert {16, 24, 32, 48, 64, 256} <= sizes


def test_status_glyphs_carry_their_meaning_in_colour(qapp):
    assert opaque_colors(icons.status_icon("failed")) == {icons.STATUS_COLORS["failed"]}
    assert opaque_colors(icons.status_icon("completed")) == {icons.STATUS_COLORS["done"]}
    idle = icons.status_icon("idle").pixmap(32, 32).toImage()
    alphas = {idle.pixelColor(x, y).alpha() for x in range(32) for y in range(32)}
    assert max(alphas) < 255 and max(alphas) > 0          # drawn, and faded
    for status in icons.STATUS:
        assert not icons.status_icon(status).isNull()
    with pytest.raises(ValueError, match="known"):
        icons.status_icon("exploded")


def test_app_icon_keeps_its_own_colours(qapp):
    ic = icons.app_icon()
    assert not ic.isNull()
    assert len(opaque_colors(ic, size=64)) > 3


def test_unknown_icon_names_the_known_ones(qapp):
    with pytest.raises(ValueError, match="tokenizer"):
        icons.icon("no-such-icon")


def test_icon_files_are_valid_recolourable_and_shipped():
    names = icons.names()
    assert set(PAGES) | set(icons.STATUS) | {"app"} <= set(names)
    for name in names:
        svg = icons.svg_source(name)
        assert QSvgRenderer(QByteArray(svg)).isValid(), name
        if name != "app":
            # A fixed colour in a glyph would not follow the theme.
            assert b"currentColor" in svg and not re.search(rb"#[0-9a-fA-F]{3,6}\b", svg), name
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "icons/*.svg" in data["assets"]


def test_a_page_without_an_icon_of_its_own_gets_the_stage_glyph(qapp):
    """A stage added to the catalogue needs no icon file: its sidebar page draws a generic one."""
    own = icons.page_icon("ppo", "#2b8a3e").pixmap(32, 32).toImage()
    assert own == icons.icon("ppo", "#2b8a3e").pixmap(32, 32).toImage()
    new = icons.page_icon("a_stage_added_later", "#2b8a3e")
    assert opaque_colors(new) == {"#2b8a3e"}
    assert new.pixmap(32, 32).toImage() == icons.icon("stage", "#2b8a3e").pixmap(32, 32).toImage()
    assert new.pixmap(32, 32).toImage() != own
