"""The text-density set's pictures: no text (shapes, clutter, textures), some text (signs, labels, captions on a
background) or text-dense content, each with its truth, caption and the words drawn (for `data filter`)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lit_webssl.datamodules.demo.dense import HEAVY_KINDS
from lit_webssl.datamodules.demo.lettering import (
    ink_for,
    luma,
    paste_layer,
    pick_font,
    random_words,
    text_layer,
)
from lit_webssl.datamodules.demo.scenes import background
from lit_webssl.datamodules.demo.textures import random_colour

TEXT_TRUTHS = ("none", "light", "heavy")
"""Truth classes of the text set: no text; a few words (signs, captions, stamps); documents, charts and tables."""


def _light_text(rng: np.random.Generator, canvas: Image.Image) -> tuple[str, str]:
    """Draw a few words on ``canvas`` (a sign, a caption band, loose words or a corner stamp).

    Returns:
        The kind of text drawn and the words.
    """
    size, scale = canvas.width, canvas.width / 224
    pixels = np.asarray(canvas, dtype=np.float32)
    kind = ("sign", "caption", "words", "stamp")[int(rng.integers(4))]
    if kind == "sign":
        text = random_words(rng, int(rng.integers(1, 3))).upper() if rng.uniform() < 0.5 else random_words(rng, 1)
        font = pick_font(rng, rng.uniform(14, 28) * scale)
        plate = random_colour(rng)
        inner = text_layer(text, font, ink_for(rng, plate))
        pad = int(rng.integers(3, 9) * scale) + 1
        plate_rgba = tuple(int(v) for v in plate) + (255,)
        layer = Image.new("RGBA", (inner.width + 2 * pad, inner.height + 2 * pad), plate_rgba)
        layer.paste(inner, (pad, pad), inner)
        paste_layer(canvas, layer, rng, angle=rng.uniform(-15, 15))
    elif kind == "caption":
        text = random_words(rng, int(rng.integers(2, 5)))
        font = pick_font(rng, rng.uniform(12, 20) * scale)
        band_colour = np.array((20, 20, 20)) if rng.uniform() < 0.5 else np.array((235, 235, 230))
        inner = text_layer(text, font, ink_for(rng, band_colour))
        band = Image.new("RGBA", (size, inner.height + int(8 * scale)), tuple(int(v) for v in band_colour) + (220,))
        band.paste(inner, (int(rng.integers(2, max(size - inner.width, 2) + 1)), int(4 * scale)), inner)
        canvas.paste(band, (0, 0 if rng.uniform() < 0.3 else size - band.height), band)
    elif kind == "words":
        text = random_words(rng, int(rng.integers(1, 4)))
        for word in text.split():
            font = pick_font(rng, rng.uniform(14, 30) * scale)
            outline = int(rng.uniform() < 0.5)
            fill = ink_for(rng, pixels.mean((0, 1)))
            paste_layer(
                canvas,
                text_layer(
                    word,
                    font,
                    fill,
                    stroke=outline * max(int(scale), 1),
                    stroke_fill=(0, 0, 0) if luma(fill) > 128 else (255, 255, 255),
                ),
                rng,
                angle=rng.uniform(-25, 25),
            )
    else:
        text = (
            ("(c) " if rng.uniform() < 0.5 else "")
            + random_words(rng, int(rng.integers(1, 3)))
            + f" {int(rng.integers(1990, 2026))}"
        )
        font = pick_font(rng, rng.uniform(11, 15) * scale)
        layer = text_layer(text, font, ink_for(rng, pixels.mean((0, 1))) + (230,))
        corner = (
            int(rng.integers(2)) * max(size - layer.width - 4, 0) + 2,
            int(rng.integers(2)) * max(size - layer.height - 4, 0) + 2,
        )
        paste_layer(canvas, layer, rng, at=corner)
    return kind, text


def render_text_image(truth: str, rng: np.random.Generator, size: int = 224) -> tuple[Image.Image, str, str]:
    """Draw one image of the text set with truth ``truth`` (one of :data:`TEXT_TRUTHS`).

    ``none``: a demo texture or a scene of shapes. ``light``: the same with a few words (a sign, a caption band,
    loose rotated words or a corner stamp) in a random font, size and colour. ``heavy``: a document page, a bar or
    line chart with numeric ticks, or a table.

    Args:
        truth: ``"none"``, ``"light"`` or ``"heavy"``.
        rng: Source of all random draws.
        size: Side length in pixels (the text sizes scale with it; 224 is the reference).

    Returns:
        The RGB image, a caption, and the text drawn on it (``""`` for ``none``).
    """
    if truth == "none":
        picture, what = background(rng, size)
        caption, content = f"{what}, no text", ""
    elif truth == "light":
        picture, what = background(rng, size)
        kind, content = _light_text(rng, picture)
        caption = f"{what} with {'a ' if kind != 'words' else ''}{kind}: {content}"
    elif truth == "heavy":
        kind = list(HEAVY_KINDS)[int(rng.integers(len(HEAVY_KINDS)))]
        picture, content = HEAVY_KINDS[kind](rng, size)
        caption = f"a {kind}"
    else:
        raise KeyError(f"unknown text truth {truth!r}; choose from {TEXT_TRUTHS}")
    image = np.asarray(picture.convert("RGB"), dtype=np.float32)
    image = image + rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(1.0, 5.0)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), caption, content
