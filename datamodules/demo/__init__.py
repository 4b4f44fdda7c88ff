"""The demo set: ten texture classes drawn procedurally (numpy and PIL, no downloads) and written as MDS shards.

The class is the pattern: stripes in three orientations, checkerboard, polka dots, concentric rings, grid, zigzag,
blotches, crosses. Everything else is a nuisance drawn independently of it: the two colours (any hue, saturation
and value, kept apart enough to see the pattern), the period (13-25 % of the image side), phase, a small tilt, the
duty cycle, an illumination gradient and sensor noise. Nearest neighbours in pixel space therefore match colours
rather than patterns, and a randomly initialized encoder is no better, while an encoder that learned from the images
alone what stays put under crops and colour changes (DINO) or what continues a pattern (MAE) separates the classes:
the kNN probe shows what self-supervision learned. The classes are closed under horizontal flips and the patterns
survive the recipes' crop scales, so no augmentation of a demo config turns one class into another.

    python -m lit_webssl data demo --out data/demo      # 10k train + 2k val, 64 px, about 15 s
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CLASSES = (
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "polka dots",
    "concentric rings",
    "grid",
    "zigzag",
    "blotches",
    "crosses",
)
HUE_NAMES = (
    (0.04, "red"),
    (0.11, "orange"),
    (0.19, "yellow"),
    (0.45, "green"),
    (0.53, "cyan"),
    (0.71, "blue"),
    (0.81, "purple"),
    (0.95, "pink"),
    (1.01, "red"),
)
SPLITS = (("train", 0), ("val", 1))
SHARD_BYTES = 1 << 23
NOISE_STD = (2.0, 10.0)  # range of the per-image sensor noise, in 8-bit levels


def colour_name(rgb: np.ndarray) -> str:
    """Plain-English name of an RGB colour in [0, 255] (``"dark blue"``, ``"gray"``...)."""
    hue, sat, val = colorsys.rgb_to_hsv(*(np.clip(rgb, 0, 255) / 255.0).tolist())
    if val < 0.3:
        return "black"
    if sat < 0.25:
        return "white" if val > 0.8 else "gray"
    return ("dark " if val < 0.55 else "") + next(n for edge, n in HUE_NAMES if hue < edge)


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour in [0, 255], uniform in hue and spread in saturation and value."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.1, 1.0), rng.uniform(0.15, 1.0))
    return np.array(rgb, dtype=np.float32) * 255.0


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)`` in pixels, float32."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


def _soft(v: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased step: 0 below ``-width / 2``, 1 above ``width / 2``, linear between."""
    return np.clip(0.5 + v / width, 0.0, 1.0)


def ink(kind: str, rng: np.random.Generator, size: int, period: float) -> np.ndarray:
    """Coverage ``(size, size)`` in [0, 1] of the pattern ``kind`` (1 = foreground colour), repeating every
    ``period`` pixels, with fresh phase, tilt and shape nuisances."""
    yy, xx = _grid(size)
    tilt = rng.uniform(-0.12, 0.12)  # radians
    phase_u, phase_v = rng.uniform(0, 1, size=2)
    edge = 1.5 / period  # anti-aliasing width, in periods
    duty = rng.uniform(0.35, 0.6)

    def coords(angle: float) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(angle), math.sin(angle)
        return (c * xx + s * yy) / period + phase_u, (-s * xx + c * yy) / period + phase_v

    def bands(t: np.ndarray, width: float = duty) -> np.ndarray:  # periodic bars of ``width`` periods
        return _soft(width / 2 - np.abs(t - np.floor(t) - 0.5), edge)

    u, v = coords(tilt)
    if kind == "horizontal stripes":
        return bands(v)
    if kind == "vertical stripes":
        return bands(u)
    if kind == "diagonal stripes":  # both diagonals: the class is closed under horizontal flips
        return bands(coords(tilt + math.copysign(math.pi / 4, rng.uniform(-1, 1)))[0])
    if kind == "checkerboard":
        return np.clip(0.5 + 0.5 * (2 * bands(u, 0.5) - 1) * (2 * bands(v, 0.5) - 1), 0.0, 1.0)
    if kind == "polka dots":
        radius = np.hypot(u - np.floor(u) - 0.5, v - np.floor(v) - 0.5)
        return _soft(rng.uniform(0.18, 0.3) - radius, edge)
    if kind == "concentric rings":
        cx, cy = rng.uniform(0, size, size=2)
        return bands(np.hypot(xx - cx, yy - cy) / period + phase_u)
    if kind == "grid":
        width = rng.uniform(0.12, 0.22)
        return np.maximum(bands(u, width), bands(v, width))
    if kind == "zigzag":
        return bands(v + rng.uniform(0.8, 1.4) * np.abs(u - np.floor(u) - 0.5))
    if kind == "blotches":  # thresholded smooth noise: a camouflage pattern
        noise = Image.fromarray(rng.standard_normal((6, 6)).astype(np.float32)).resize((size, size), Image.BICUBIC)
        noise = np.asarray(noise)
        return _soft(noise - np.median(noise), 0.15)
    if kind == "crosses":
        fu, fv = np.abs(u - np.floor(u) - 0.5), np.abs(v - np.floor(v) - 0.5)
        arm, thick = rng.uniform(0.25, 0.35), rng.uniform(0.07, 0.11)
        across = np.minimum(_soft(arm - fu, edge), _soft(thick - fv, edge))
        down = np.minimum(_soft(arm - fv, edge), _soft(thick - fu, edge))
        return np.maximum(across, down)
    raise KeyError(f"unknown pattern {kind!r}; choose from {CLASSES}")


def _caption(rng: np.random.Generator, kind: str, fg: str, bg: str, coarse: bool) -> str:
    scale = "coarse" if coarse else "fine"
    templates = (
        f"{fg} {kind} on a {bg} background",
        f"a {scale} pattern of {fg} {kind} over {bg}",
        f"{kind} in {fg} and {bg}",
        f"a photo of {scale} {kind}, {fg} on {bg}",
    )
    return templates[int(rng.integers(len(templates)))]


def render(label: int, rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, str]:
    """Draw one image of class ``label`` with fresh nuisances.

    Args:
        label: Class index into :data:`CLASSES`.
        rng: Source of all random draws (the image is a pure function of its state).
        size: Side length in pixels.

    Returns:
        The RGB image and a caption describing it (pattern, colours, scale).
    """
    kind = CLASSES[label]
    relative_period = rng.uniform(0.13, 0.25)
    coverage = ink(kind, rng, size, relative_period * size)[..., None]
    fg = _colour(rng)
    for _ in range(100):  # a background colour that differs enough to show the pattern
        bg = _colour(rng)
        if np.linalg.norm(fg - bg) > 80:
            break
    image = bg + (fg - bg) * coverage
    yy, xx = _grid(size)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(direction) * (xx - size / 2) + math.sin(direction) * (yy - size / 2)) / size  # in [-0.71, 0.71]
    image = image * (1 + rng.uniform(-0.35, 0.35) * ramp)[..., None]  # illumination gradient
    image = image + rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(*NOISE_STD)
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return picture, _caption(rng, kind, colour_name(fg), colour_name(bg), relative_period > 0.19)


def _encode(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_split(path: Path, n: int, size: int, rng: np.random.Generator) -> None:
    from streaming import MDSWriter

    labels = rng.permutation(np.arange(n) % len(CLASSES))
    columns = {"image": "bytes", "label": "int", "caption": "str"}
    with MDSWriter(out=str(path), columns=columns, size_limit=SHARD_BYTES, progress_bar=False) as writer:
        for label in labels.tolist():
            picture, caption = render(label, rng, size)
            writer.write({"image": _encode(picture), "label": label, "caption": caption})


def _is_complete(out: Path, meta: dict) -> bool:
    marker = out / "classes.json"
    if not marker.is_file() or any(not (out / s / "index.json").is_file() for s, _ in SPLITS):
        return False
    try:
        return json.loads(marker.read_text()) == meta
    except json.JSONDecodeError:
        return False


def build_demo_dataset(
    out: str | Path = "data/demo",
    n_train: int = 10000,
    n_val: int = 2000,
    image_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the demo set: ``<out>/train`` and ``<out>/val`` (MDS shards) and ``<out>/classes.json``.

    Balanced classes, deterministic given the arguments. A complete build with the same arguments is kept
    (unless ``overwrite``); the build goes to ``<out>.partial`` and is renamed when done.

    Args:
        out: Output directory.
        n_train: Training images.
        n_val: Validation images.
        image_size: Side length of the images in pixels.
        seed: Random seed.
        overwrite: Rebuild even when a complete build exists, and replace a directory that is not one.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        FileExistsError: ``out`` holds something other than a demo build and ``overwrite`` is false.
    """
    out = Path(out)
    meta = {"classes": list(CLASSES), "n_train": n_train, "n_val": n_val, "image_size": image_size, "seed": seed}
    if not overwrite and _is_complete(out, meta):
        print(f"demo dataset already complete at {out} (pass --overwrite to rebuild)")
        return out
    if out.exists() and any(out.iterdir()) and not overwrite and not (out / "classes.json").is_file():
        raise FileExistsError(f"--out: {out} exists and is not a demo dataset; pass --overwrite to replace it")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for split, stream in SPLITS:
        _write_split(
            partial / split, n_train if split == "train" else n_val, image_size, np.random.default_rng([seed, stream])
        )
    (partial / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    print(f"demo dataset: {n_train} train + {n_val} val images ({image_size} px, {len(CLASSES)} classes) at {out}")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The text-density set: images with no text, some text, or text-dense content, with their truth (for `data filter`).

TEXT_TRUTHS = ("none", "light", "heavy")
"""Truth classes of the text set: no text; a few words (signs, captions, stamps); documents, charts and tables."""
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
def _load_font(path: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, px) if path else ImageFont.load_default(size=px)


def _font(rng: np.random.Generator, px: float, bold: bool | None = None) -> ImageFont.FreeTypeFont:
    """A font of ``px`` pixels, drawn from :func:`text_fonts` (``bold``: only bold / only regular faces)."""
    fonts = [f for f in text_fonts() if bold is None or ("Bold" in Path(f).name) == bold] or [""]
    return _load_font(fonts[int(rng.integers(len(fonts)))], max(int(round(px)), 6))


def _luma(rgb: np.ndarray | tuple) -> float:
    r, g, b = (float(v) for v in np.asarray(rgb, dtype=np.float32)[:3])
    return 0.299 * r + 0.587 * g + 0.114 * b


def _ink_for(rng: np.random.Generator, behind: np.ndarray) -> tuple[int, int, int]:
    """A text colour that stands out from the mean colour ``behind`` it (random if it contrasts enough)."""
    colour = _colour(rng)
    if abs(_luma(colour) - _luma(behind)) < 110:
        colour = np.full(3, 15.0 if _luma(behind) > 128 else 240.0) + rng.uniform(-10, 10, size=3)
    return tuple(int(v) for v in np.clip(colour, 0, 255))


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(len(WORDS), size=n))


def _text_layer(
    text: str, font: ImageFont.FreeTypeFont, fill: tuple, stroke: int = 0, stroke_fill: tuple = (0, 0, 0)
) -> Image.Image:
    """``text`` drawn on a transparent RGBA layer just large enough to hold it."""
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    layer = Image.new("RGBA", (right - left + 4, bottom - top + 4), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text(
        (2 - left, 2 - top), text, font=font, fill=fill, stroke_width=stroke, stroke_fill=stroke_fill
    )
    return layer


def _paste(
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


def _shapes(rng: np.random.Generator, size: int) -> Image.Image:
    """A text-free scene: a colour gradient with random ellipses, boxes, polygons and lines."""
    yy, xx = _grid(size)
    a, b = _colour(rng), _colour(rng)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / size
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    canvas = Image.fromarray(np.clip(a + (b - a) * t[..., None], 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 11))):
        x0, y0 = rng.uniform(-0.1, 0.9, size=2) * size
        w, h = rng.uniform(0.08, 0.5, size=2) * size
        fill = tuple(int(v) for v in _colour(rng))
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


def _clutter(rng: np.random.Generator, size: int) -> Image.Image:
    """A text-free busy scene (foliage, gravel, a crowd from afar): hundreds of small blobs, strokes and arcs, the
    hard case for text detectors that look for small high-contrast marks."""
    canvas = _shapes(rng, size)
    draw = ImageDraw.Draw(canvas)
    palette = [tuple(int(v) for v in _colour(rng)) for _ in range(int(rng.integers(2, 6)))]
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


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """A text-free picture and its description: a demo texture (:func:`render`), a scene of shapes or clutter."""
    pick = rng.uniform()
    if pick < 0.4:
        label = int(rng.integers(len(CLASSES)))
        return render(label, rng, size)[0], CLASSES[label]
    if pick < 0.7:
        return _shapes(rng, size), "abstract shapes"
    return _clutter(rng, size), "clutter"


def _light_text(rng: np.random.Generator, canvas: Image.Image) -> tuple[str, str]:
    """Draw a few words on ``canvas`` (a sign, a caption band, loose words or a corner stamp).

    Returns:
        The kind of text drawn and the words.
    """
    size, scale = canvas.width, canvas.width / 224
    pixels = np.asarray(canvas, dtype=np.float32)
    kind = ("sign", "caption", "words", "stamp")[int(rng.integers(4))]
    if kind == "sign":
        text = _words(rng, int(rng.integers(1, 3))).upper() if rng.uniform() < 0.5 else _words(rng, 1)
        font = _font(rng, rng.uniform(14, 28) * scale)
        plate = _colour(rng)
        inner = _text_layer(text, font, _ink_for(rng, plate))
        pad = int(rng.integers(3, 9) * scale) + 1
        plate_rgba = tuple(int(v) for v in plate) + (255,)
        layer = Image.new("RGBA", (inner.width + 2 * pad, inner.height + 2 * pad), plate_rgba)
        layer.paste(inner, (pad, pad), inner)
        _paste(canvas, layer, rng, angle=rng.uniform(-15, 15))
    elif kind == "caption":
        text = _words(rng, int(rng.integers(2, 5)))
        font = _font(rng, rng.uniform(12, 20) * scale)
        band_colour = np.array((20, 20, 20)) if rng.uniform() < 0.5 else np.array((235, 235, 230))
        inner = _text_layer(text, font, _ink_for(rng, band_colour))
        band = Image.new("RGBA", (size, inner.height + int(8 * scale)), tuple(int(v) for v in band_colour) + (220,))
        band.paste(inner, (int(rng.integers(2, max(size - inner.width, 2) + 1)), int(4 * scale)), inner)
        canvas.paste(band, (0, 0 if rng.uniform() < 0.3 else size - band.height), band)
    elif kind == "words":
        text = _words(rng, int(rng.integers(1, 4)))
        for word in text.split():
            font = _font(rng, rng.uniform(14, 30) * scale)
            outline = int(rng.uniform() < 0.5)
            fill = _ink_for(rng, pixels.mean((0, 1)))
            _paste(
                canvas,
                _text_layer(
                    word,
                    font,
                    fill,
                    stroke=outline * max(int(scale), 1),
                    stroke_fill=(0, 0, 0) if _luma(fill) > 128 else (255, 255, 255),
                ),
                rng,
                angle=rng.uniform(-25, 25),
            )
    else:
        text = (
            ("(c) " if rng.uniform() < 0.5 else "")
            + _words(rng, int(rng.integers(1, 3)))
            + f" {int(rng.integers(1990, 2026))}"
        )
        font = _font(rng, rng.uniform(11, 15) * scale)
        layer = _text_layer(text, font, _ink_for(rng, pixels.mean((0, 1))) + (230,))
        corner = (
            int(rng.integers(2)) * max(size - layer.width - 4, 0) + 2,
            int(rng.integers(2)) * max(size - layer.height - 4, 0) + 2,
        )
        _paste(canvas, layer, rng, at=corner)
    return kind, text


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
    title = _words(rng, int(rng.integers(2, 5))).title()
    font = _font(rng, rng.uniform(13, 19) * scale, bold=True)
    draw.text((margin, y), title, font=font, fill=ink)
    lines.append(title)
    y += int(font.size * 1.6)
    body = _font(rng, rng.uniform(9, 13) * scale, bold=False)
    columns = 2 if rng.uniform() < 0.3 else 1
    width = (size - 2 * margin - (columns - 1) * margin) // columns
    step = int(body.size * rng.uniform(1.25, 1.6))
    for col in range(columns):
        x, row = margin + col * (width + margin), y
        while row + step < size - margin:
            line = ""
            while True:
                candidate = (line + " " + _words(rng, 1)).strip()
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
        back = _background(rng, size)[0]
        shrink = rng.uniform(0.75, 0.95)
        small = page.resize((int(size * shrink), int(size * shrink)), Image.BICUBIC).convert("RGBA")
        _paste(back, small, rng, angle=rng.uniform(-6, 6))
        page = back
    return page, " ".join(lines)


def _axes(rng: np.random.Generator, size: int) -> tuple[Image.Image, ImageDraw.ImageDraw, tuple, tuple, list[str]]:
    """A chart frame: paper, title, y axis with numeric ticks; returns the plot box ``(x0, y0, x1, y1)``."""
    scale = size / 224
    canvas = Image.new("RGB", (size, size), _paper(rng))
    draw = ImageDraw.Draw(canvas)
    ink = tuple(int(v) for v in rng.uniform(0, 70, size=3))
    font = _font(rng, rng.uniform(9, 13) * scale, bold=False)
    title = _words(rng, int(rng.integers(2, 4))).title()
    title_font = _font(rng, rng.uniform(11, 15) * scale, bold=True)
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
    colour = tuple(int(v) for v in _colour(rng))
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
        colour = tuple(int(v) for v in _colour(rng))
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
    font = _font(rng, rng.uniform(9, 12) * scale, bold=False)
    head = _font(rng, font.size, bold=True)
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
        picture, what = _background(rng, size)
        caption, content = f"{what}, no text", ""
    elif truth == "light":
        picture, what = _background(rng, size)
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


def _write_text_split(path: Path, n: int, size: int, rng: np.random.Generator) -> None:
    from streaming import MDSWriter

    truths = rng.permutation(np.arange(n) % len(TEXT_TRUTHS))
    columns = {"image": "bytes", "label": "int", "caption": "str", "text_truth": "str", "text_content": "str"}
    with MDSWriter(out=str(path), columns=columns, size_limit=SHARD_BYTES, progress_bar=False) as writer:
        for label in truths.tolist():
            picture, caption, content = render_text_image(TEXT_TRUTHS[label], rng, size)
            writer.write(
                {
                    "image": _encode(picture),
                    "label": label,
                    "caption": caption,
                    "text_truth": TEXT_TRUTHS[label],
                    "text_content": content,
                }
            )


def build_text_dataset(
    out: str | Path = "data/demo_text",
    n_train: int = 300,
    n_val: int = 300,
    image_size: int = 224,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the text-density demo set: ``<out>/{train,val}`` (MDS) and ``<out>/classes.json``.

    Columns: ``image``, ``label`` (index into :data:`TEXT_TRUTHS`), ``caption``, ``text_truth`` (``none``,
    ``light``, ``heavy``) and ``text_content`` (the words drawn). Balanced truths, deterministic given the arguments
    and the fonts installed (DejaVu from ``fonts-dejavu-core``, else Pillow's built-in font; recorded in
    ``classes.json``). Rebuild rules as :func:`build_demo_dataset`.

    Args:
        out: Output directory.
        n_train: Images of the ``train`` split (used to choose thresholds).
        n_val: Images of the ``val`` split (used to report).
        image_size: Side length of the images in pixels.
        seed: Random seed.
        overwrite: Rebuild even when a complete build exists, and replace a directory that is not one.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        FileExistsError: ``out`` holds something other than a demo build and ``overwrite`` is false.
    """
    out = Path(out)
    meta = {
        "classes": list(TEXT_TRUTHS),
        "kind": "text",
        "n_train": n_train,
        "n_val": n_val,
        "image_size": image_size,
        "seed": seed,
        "fonts": [Path(f).name for f in text_fonts()] or ["pillow"],
    }
    if not overwrite and _is_complete(out, meta):
        print(f"demo text set already complete at {out} (pass --overwrite to rebuild)")
        return out
    if out.exists() and any(out.iterdir()) and not overwrite and not (out / "classes.json").is_file():
        raise FileExistsError(f"--out: {out} exists and is not a demo dataset; pass --overwrite to replace it")
    if not text_fonts():
        print("demo text set: no DejaVu fonts found (apt-get install fonts-dejavu-core); using Pillow's built-in font")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for split, stream in SPLITS:
        _write_text_split(
            partial / split,
            n_train if split == "train" else n_val,
            image_size,
            np.random.default_rng([seed, stream, 1]),
        )
    (partial / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    print(f"demo text set: {n_train} train + {n_val} val images ({image_size} px; none/light/heavy text) at {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    """``python -m lit_webssl data demo [--out DIR] [--train N] [--val N] [--size PX] [--seed S] [--overwrite]
    [--text-set]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lit_webssl data demo", description="Build the procedurally drawn demo dataset as MDS shards."
    )
    parser.add_argument(
        "--out", default=None, help="output directory (default: data/demo; data/demo_text with --text-set)"
    )
    parser.add_argument("--train", type=int, default=None, help="training images (default: 10000; 300 with --text-set)")
    parser.add_argument("--val", type=int, default=None, help="validation images (default: 2000; 300 with --text-set)")
    parser.add_argument(
        "--size", type=int, default=None, help="image side in pixels (default: 64; 224 with --text-set)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if a complete build exists")
    parser.add_argument(
        "--text-set",
        action="store_true",
        help="build the text-density set instead (no text / some text / documents, charts, tables, "
        "with a text_truth column), for `data filter`",
    )
    args = parser.parse_args(argv)
    if args.text_set:
        return build_text_dataset(
            args.out or "data/demo_text",
            300 if args.train is None else args.train,
            300 if args.val is None else args.val,
            args.size or 224,
            args.seed,
            args.overwrite,
        )
    return build_demo_dataset(
        args.out or "data/demo",
        10000 if args.train is None else args.train,
        2000 if args.val is None else args.val,
        args.size or 64,
        args.seed,
        args.overwrite,
    )
