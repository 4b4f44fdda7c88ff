"""Words, fonts and ink of the text-density set: the font files looked for, the word list, and text layers pasted
with a contrasting ink."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lit_webssl.datamodules.demo.textures import random_colour

TEXT_FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)
"""The TrueType fonts of Debian's ``fonts-dejavu-core``; Pillow's built-in font stands in when none is installed."""

TEXT_FONT_DIRS = (
    "/usr/share/fonts/truetype/dejavu",
    "/usr/share/fonts/dejavu",
    "/usr/share/fonts/TTF",
    "/Library/Fonts",
    "C:/Windows/Fonts",
)

WORDS = (
    "open",
    "sale",
    "coffee",
    "hotel",
    "market",
    "station",
    "north",
    "exit",
    "welcome",
    "garden",
    "river",
    "summer",
    "winter",
    "city",
    "museum",
    "bakery",
    "pizza",
    "books",
    "music",
    "street",
    "park",
    "school",
    "library",
    "office",
    "parking",
    "only",
    "free",
    "new",
    "fresh",
    "daily",
    "special",
    "menu",
    "price",
    "total",
    "report",
    "annual",
    "growth",
    "revenue",
    "sales",
    "model",
    "data",
    "results",
    "table",
    "figure",
    "value",
    "error",
    "mean",
    "score",
    "method",
    "system",
    "energy",
    "water",
    "health",
    "travel",
    "design",
    "light",
    "house",
    "green",
    "blue",
    "red",
    "great",
    "happy",
    "love",
    "home",
    "team",
    "world",
    "night",
    "morning",
    "village",
    "bridge",
    "harbor",
    "island",
    "forest",
    "mountain",
    "valley",
    "road",
    "avenue",
    "square",
    "center",
    "public",
    "service",
    "police",
    "airport",
    "train",
    "ticket",
    "gate",
    "platform",
    "departure",
    "arrival",
    "delay",
    "closed",
    "caution",
    "danger",
    "stop",
    "slow",
    "left",
    "right",
    "beach",
    "festival",
    "concert",
    "theatre",
    "cinema",
    "shop",
    "store",
    "bank",
    "post",
    "pharmacy",
    "doctor",
    "clinic",
    "kitchen",
    "recipe",
    "sugar",
    "flour",
    "butter",
    "salt",
    "apple",
    "orange",
    "lemon",
    "bread",
    "cheese",
    "wine",
    "beer",
    "tea",
    "lunch",
    "dinner",
    "breakfast",
    "monday",
    "friday",
    "sunday",
    "january",
    "april",
    "october",
    "quarter",
    "budget",
    "profit",
    "cost",
    "index",
    "region",
    "country",
    "number",
    "section",
    "chapter",
    "page",
    "summary",
    "analysis",
    "study",
    "sample",
    "group",
    "control",
    "effect",
    "change",
)
"""English words drawn on the text set's images."""


@lru_cache(maxsize=1)
def text_fonts() -> tuple[str, ...]:
    """Paths of the DejaVu TrueType fonts found on this machine (empty: Pillow's built-in font is used)."""
    found = []
    for name in TEXT_FONT_FILES:
        path = next((Path(d) / name for d in TEXT_FONT_DIRS if (Path(d) / name).is_file()), None)
        if path is not None:
            found.append(str(path))
    return tuple(found)


@lru_cache(maxsize=512)
def load_font(path: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, px) if path else ImageFont.load_default(size=px)


def pick_font(rng: np.random.Generator, px: float, bold: bool | None = None) -> ImageFont.FreeTypeFont:
    """A font of ``px`` pixels, drawn from :func:`text_fonts` (``bold``: only bold / only regular faces)."""
    fonts = [f for f in text_fonts() if bold is None or ("Bold" in Path(f).name) == bold] or [""]
    return load_font(fonts[int(rng.integers(len(fonts)))], max(int(round(px)), 6))


def luma(rgb: np.ndarray | tuple) -> float:
    r, g, b = (float(v) for v in np.asarray(rgb, dtype=np.float32)[:3])
    return 0.299 * r + 0.587 * g + 0.114 * b


def ink_for(rng: np.random.Generator, behind: np.ndarray) -> tuple[int, int, int]:
    """A text colour that stands out from the mean colour ``behind`` it (random if it contrasts enough)."""
    colour = random_colour(rng)
    if abs(luma(colour) - luma(behind)) < 110:
        colour = np.full(3, 15.0 if luma(behind) > 128 else 240.0) + rng.uniform(-10, 10, size=3)
    return tuple(int(v) for v in np.clip(colour, 0, 255))


def random_words(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(len(WORDS), size=n))


def text_layer(
    text: str, font: ImageFont.FreeTypeFont, fill: tuple, stroke: int = 0, stroke_fill: tuple = (0, 0, 0)
) -> Image.Image:
    """``text`` drawn on a transparent RGBA layer just large enough to hold it."""
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    layer = Image.new("RGBA", (right - left + 4, bottom - top + 4), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text(
        (2 - left, 2 - top), text, font=font, fill=fill, stroke_width=stroke, stroke_fill=stroke_fill
    )
    return layer


def paste_layer(
    canvas: Image.Image,
    layer: Image.Image,
    rng: np.random.Generator,
    angle: float = 0.0,
    at: tuple[int, int] | None = None,
) -> None:
    """Paste an RGBA ``layer`` (rotated by ``angle`` degrees) at ``at`` or at a random place that keeps it inside."""
    if angle:
        layer = layer.rotate(angle, resample=Image.BICUBIC, expand=True)
    if at is None:
        at = (
            int(rng.integers(0, max(canvas.width - layer.width, 0) + 1)),
            int(rng.integers(0, max(canvas.height - layer.height, 0) + 1)),
        )
    canvas.paste(layer, at, layer)
