"""Text-free scenes of the text-density set: shapes on a gradient, clutter, or a texture of the demo set."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from lit_webssl.datamodules.demo.textures import CLASSES, pixel_grid, random_colour, render


def shapes(rng: np.random.Generator, size: int) -> Image.Image:
    """A text-free scene: a colour gradient with random ellipses, boxes, polygons and lines."""
    yy, xx = pixel_grid(size)
    a, b = random_colour(rng), random_colour(rng)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / size
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    canvas = Image.fromarray(np.clip(a + (b - a) * t[..., None], 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 11))):
        x0, y0 = rng.uniform(-0.1, 0.9, size=2) * size
        w, h = rng.uniform(0.08, 0.5, size=2) * size
        fill = tuple(int(v) for v in random_colour(rng))
        kind = int(rng.integers(4))
        if kind == 0:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=fill)
        elif kind == 2:
            points = [tuple(p) for p in (rng.uniform(0, 1, size=(int(rng.integers(3, 7)), 2)) * size).tolist()]
            draw.polygon(points, fill=fill)
        else:
            draw.line((x0, y0, x0 + w, y0 + h), fill=fill, width=int(rng.integers(1, max(size // 40, 2) + 1)))
    return canvas


def clutter(rng: np.random.Generator, size: int) -> Image.Image:
    """A text-free busy scene (foliage, gravel, a crowd from afar): hundreds of small blobs, strokes and arcs, the
    hard case for text detectors that look for small high-contrast marks."""
    canvas = shapes(rng, size)
    draw = ImageDraw.Draw(canvas)
    palette = [tuple(int(v) for v in random_colour(rng)) for _ in range(int(rng.integers(2, 6)))]
    for _ in range(int(rng.integers(80, 300))):
        x, y = rng.uniform(0, size, size=2)
        w, h = rng.uniform(0.015, 0.08, size=2) * size
        fill = palette[int(rng.integers(len(palette)))]
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((x, y, x + w, y + h), fill=fill)
        elif kind == 1:
            draw.line((x, y, x + w * rng.uniform(-1, 1), y + h), fill=fill, width=int(rng.integers(1, 3)))
        else:
            start = float(rng.uniform(0, 360))
            draw.arc(
                (x, y, x + w, y + h),
                start,
                start + float(rng.uniform(90, 300)),
                fill=fill,
                width=int(rng.integers(1, 3)),
            )
    return canvas


def background(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """A text-free picture and its description: a demo texture (:func:`render`), a scene of shapes or clutter."""
    pick = rng.uniform()
    if pick < 0.4:
        label = int(rng.integers(len(CLASSES)))
        return render(label, rng, size)[0], CLASSES[label]
    if pick < 0.7:
        return shapes(rng, size), "abstract shapes"
    return clutter(rng, size), "clutter"
