"""Text-dense pictures of the text-density set (the ``heavy`` truth): documents, bar and line charts, tables."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from lit_webssl.datamodules.demo.lettering import (
    WORDS,
    paste_layer,
    pick_font,
    random_words,
)
from lit_webssl.datamodules.demo.scenes import background
from lit_webssl.datamodules.demo.textures import random_colour


def _paper(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.uniform(225, 255, size=3))


def _document(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """A page of text: a bold title and paragraphs of small type in one or two columns."""
    scale = size / 224
    page = Image.new("RGB", (size, size), _paper(rng))
    draw = ImageDraw.Draw(page)
    ink = tuple(int(v) for v in rng.uniform(0, 60, size=3))
    margin = int(rng.uniform(6, 16) * scale)
    lines, y = [], margin
    title = random_words(rng, int(rng.integers(2, 5))).title()
    font = pick_font(rng, rng.uniform(13, 19) * scale, bold=True)
    draw.text((margin, y), title, font=font, fill=ink)
    lines.append(title)
    y += int(font.size * 1.6)
    body = pick_font(rng, rng.uniform(9, 13) * scale, bold=False)
    columns = 2 if rng.uniform() < 0.3 else 1
    width = (size - 2 * margin - (columns - 1) * margin) // columns
    step = int(body.size * rng.uniform(1.25, 1.6))
    for col in range(columns):
        x, row = margin + col * (width + margin), y
        while row + step < size - margin:
            line = ""
            while True:
                candidate = (line + " " + random_words(rng, 1)).strip()
                if body.getlength(candidate) > width * rng.uniform(0.85, 1.0):
                    break
                line = candidate
            if rng.uniform() < 0.12:  # end of a paragraph: a short line, then a gap
                line = " ".join(line.split()[: max(len(line.split()) // 2, 1)])
                draw.text((x, row), line, font=body, fill=ink)
                row += step
            else:
                draw.text((x, row), line, font=body, fill=ink)
            lines.append(line)
            row += step
    if rng.uniform() < 0.5:  # a photographed page: smaller, tilted, on a background
        back = background(rng, size)[0]
        shrink = rng.uniform(0.75, 0.95)
        small = page.resize((int(size * shrink), int(size * shrink)), Image.BICUBIC).convert("RGBA")
        paste_layer(back, small, rng, angle=rng.uniform(-6, 6))
        page = back
    return page, " ".join(lines)


def _axes(rng: np.random.Generator, size: int) -> tuple[Image.Image, ImageDraw.ImageDraw, tuple, tuple, list[str]]:
    """A chart frame: paper, title, y axis with numeric ticks; returns the plot box ``(x0, y0, x1, y1)``."""
    scale = size / 224
    canvas = Image.new("RGB", (size, size), _paper(rng))
    draw = ImageDraw.Draw(canvas)
    ink = tuple(int(v) for v in rng.uniform(0, 70, size=3))
    font = pick_font(rng, rng.uniform(9, 13) * scale, bold=False)
    title = random_words(rng, int(rng.integers(2, 4))).title()
    title_font = pick_font(rng, rng.uniform(11, 15) * scale, bold=True)
    draw.text((int(size * 0.18), int(4 * scale)), title, font=title_font, fill=ink)
    top = int(title_font.size * 1.8 + 4 * scale)
    step = float(rng.choice([0.5, 1, 2, 5, 10, 20, 25, 50, 100, 250, 1000]))
    n_ticks = int(rng.integers(4, 7))
    top_value = step * (n_ticks - 1)
    labels = [f"{step * k:g}" for k in range(n_ticks)]
    left = int(max(font.getlength(t) for t in labels) + 8 * scale)
    box = (left, top, size - int(8 * scale), size - int(font.size * 2.4))
    draw.line((box[0], box[1], box[0], box[3], box[2], box[3]), fill=ink, width=max(int(scale), 1))
    for k, text in enumerate(labels):
        y = box[3] - (box[3] - box[1]) * k / (n_ticks - 1)
        draw.line((box[0] - 3 * scale, y, box[0], y), fill=ink)
        if rng.uniform() < 0.5 and k:
            draw.line((box[0] + 1, y, box[2], y), fill=(200, 200, 200))
        draw.text((box[0] - 5 * scale - font.getlength(text), y - font.size / 2), text, font=font, fill=ink)
    return canvas, draw, box, (ink, font, top_value), [title, *labels]


def _bar_chart(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """Bars with a title, numeric y ticks and a word under each bar."""
    canvas, draw, box, (ink, font, top_value), texts = _axes(rng, size)
    n = int(rng.integers(3, 7))
    slot = (box[2] - box[0]) / n
    colour = tuple(int(v) for v in random_colour(rng))
    for i in range(n):
        height = (box[3] - box[1]) * rng.uniform(0.1, 1.0)
        x0 = box[0] + slot * (i + 0.2)
        draw.rectangle((x0, box[3] - height, x0 + slot * 0.6, box[3] - 1), fill=colour)
        word = WORDS[int(rng.integers(len(WORDS)))][:6]
        draw.text((x0 + slot * 0.3 - font.getlength(word) / 2, box[3] + 3), word, font=font, fill=ink)
        texts.append(word)
    return canvas, " ".join(texts)


def _line_chart(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """One to three series over years, with numeric ticks on both axes and a legend."""
    canvas, draw, box, (ink, font, top_value), texts = _axes(rng, size)
    fits = int((box[2] - box[0]) // (font.getlength("2000") + 6 * size / 224))
    n_years = max(min(int(rng.integers(3, 7)), fits), 2)  # as many year labels as fit side by side
    years = int(rng.integers(1990, 2016)) + np.arange(0, n_years) * int(rng.integers(1, 4))
    xs = box[0] + (box[2] - box[0]) * (np.arange(len(years)) + 0.5) / len(years)
    for x, year in zip(xs.tolist(), years.tolist(), strict=True):
        draw.text((x - font.getlength(str(year)) / 2, box[3] + 3), str(year), font=font, fill=ink)
        texts.append(str(year))
    for s in range(int(rng.integers(1, 4))):
        colour = tuple(int(v) for v in random_colour(rng))
        ys = box[3] - (box[3] - box[1]) * np.clip(np.cumsum(rng.normal(0.15, 0.2, len(years))), 0.05, 1.0)
        draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=colour, width=max(int(2 * size / 224), 1))
        name = WORDS[int(rng.integers(len(WORDS)))]
        y = box[1] + 2 + s * font.size * 1.3
        draw.line(
            (box[2] - 60 * size / 224, y + font.size / 2, box[2] - 50 * size / 224, y + font.size / 2),
            fill=colour,
            width=2,
        )
        draw.text((box[2] - 46 * size / 224, y), name, font=font, fill=ink)
        texts.append(name)
    return canvas, " ".join(texts)


def _table(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """A table: a bold header row and rows of words and numbers, with rules or a full grid."""
    scale = size / 224
    canvas = Image.new("RGB", (size, size), _paper(rng))
    draw = ImageDraw.Draw(canvas)
    ink = tuple(int(v) for v in rng.uniform(0, 60, size=3))
    n_cols = int(rng.integers(3, 5))
    font = pick_font(rng, rng.uniform(9, 12) * scale, bold=False)
    head = pick_font(rng, font.size, bold=True)
    row_h = int(font.size * rng.uniform(1.5, 1.9))
    margin = int(6 * scale)
    col_w = (size - 2 * margin) / n_cols
    grid = rng.uniform() < 0.5
    shade = tuple(int(v) for v in rng.uniform(205, 235, size=3))
    texts, y, r = [], margin, 0
    while y + row_h < size - margin:
        if r % 2 == 1 and rng.uniform() < 0.5:
            draw.rectangle((margin, y, size - margin, y + row_h), fill=shade)
        for c in range(n_cols):
            if r == 0:
                cell = WORDS[int(rng.integers(len(WORDS)))].title()
            elif c == 0:
                cell = WORDS[int(rng.integers(len(WORDS)))]
            else:
                cell = f"{rng.uniform(0, 1000):.{int(rng.integers(0, 3))}f}"
            while font.getlength(cell) > col_w - 4 and len(cell) > 2:
                cell = cell[:-1]
            draw.text(
                (margin + c * col_w + 3, y + (row_h - font.size) / 2), cell, font=head if r == 0 else font, fill=ink
            )
            texts.append(cell)
        if grid or r == 0:
            draw.line((margin, y + row_h, size - margin, y + row_h), fill=ink, width=1)
        y, r = y + row_h, r + 1
    if grid:
        for c in range(n_cols + 1):
            draw.line((margin + c * col_w, margin, margin + c * col_w, y), fill=ink, width=1)
    return canvas, " ".join(texts)


HEAVY_KINDS = {"document": _document, "bar chart": _bar_chart, "line chart": _line_chart, "table": _table}
"""Text-dense picture makers of the text set, by name."""
