"""The embedded demo set: procedurally drawn shapes (10 classes) written as MDS shards, no downloads.

The class is the shape; colour, position, scale, rotation, background and clutter are random and independent of
it. Raw-pixel kNN therefore matches colours and layouts, not shapes, while an encoder that learned shape
(self-supervised, from the images alone) separates the classes. Captions describe label and content.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ["circle", "square", "triangle", "star", "cross", "ring", "hexagon", "arrow", "crescent", "heart"]
COLOR_NAMES = [(0, "red"), (30, "orange"), (55, "yellow"), (110, "green"), (175, "teal"), (210, "blue"),
               (270, "purple"), (320, "pink"), (360, "red")]


def _color(rng: np.random.Generator, light: bool) -> tuple[tuple[int, int, int], str]:
    hue = rng.uniform(0, 360)
    lightness = rng.uniform(0.6, 0.85) if light else rng.uniform(0.15, 0.4)
    rgb = colorsys.hls_to_rgb(hue / 360, lightness, rng.uniform(0.4, 1.0))
    name = min(COLOR_NAMES, key=lambda c: abs(c[0] - hue))[1]
    return tuple(int(255 * c) for c in rgb), ("light " if light else "dark ") + name


def _polygon(kind: str) -> list[tuple[float, float]]:
    """Unit outline (radius ~1) of a polygonal class."""
    if kind == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if kind == "triangle":
        return [(math.cos(a), math.sin(a)) for a in np.linspace(-math.pi / 2, 1.5 * math.pi, 4)[:3]]
    if kind == "hexagon":
        return [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 7)[:6]]
    if kind == "star":
        return [((1.0 if i % 2 == 0 else 0.42) * math.cos(a), (1.0 if i % 2 == 0 else 0.42) * math.sin(a))
                for i, a in enumerate(np.linspace(-math.pi / 2, 1.5 * math.pi, 11)[:10])]
    if kind == "cross":
        t = 0.3
        return [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t),
                (-t, -t)]
    if kind == "arrow":
        return [(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25), (-1, 0.25)]
    if kind == "heart":
        ts = np.linspace(0, 2 * math.pi, 40)
        return [(0.06 * 16 * math.sin(t) ** 3,
                 -0.06 * (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
                for t in ts]
    raise KeyError(kind)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float,
                fg: tuple[int, int, int], bg_hint: tuple[int, int, int]) -> None:
    if kind in ("circle", "ring", "crescent"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        if kind == "ring":
            inner = 0.55 * r
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=bg_hint)
        elif kind == "crescent":
            ox, oy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
            draw.ellipse([cx + ox - 0.85 * r, cy + oy - 0.85 * r, cx + ox + 0.85 * r, cy + oy + 0.85 * r],
                         fill=bg_hint)
        return
    c, s = math.cos(angle), math.sin(angle)
    pts = [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in _polygon(kind)]
    draw.polygon(pts, fill=fg)


def render(label: int, rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, str]:
    """One image of class ``label`` with random nuisances, and its caption."""
    scale = 2  # draw at 2x, then downsample: anti-aliased edges
    big = size * scale
    fg_light = bool(rng.integers(2))
    fg, fg_name = _color(rng, fg_light)
    bg_a, bg_name = _color(rng, not fg_light)
    bg_b, _ = _color(rng, not fg_light)
    angle_g = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:big, 0:big] / big
    t = (np.cos(angle_g) * xx + np.sin(angle_g) * yy)[..., None]
    t = (t - t.min()) / (np.ptp(t) + 1e-9)
    background = (1 - t) * np.array(bg_a) + t * np.array(bg_b)
    img = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 3)):  # clutter: small blobs of random colour
        col, _ = _color(rng, bool(rng.integers(2)))
        x, y, rr = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(0.04, 0.09) * big
        draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=col)
    r = rng.uniform(0.18, 0.4) * big
    cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
    bg_here = tuple(int(v) for v in background[int(cy), int(cx)])
    _draw_shape(draw, CLASSES[label], cx, cy, r, rng.uniform(0, 2 * math.pi), fg, bg_here)
    img = img.resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6)))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(2, 10), (size, size, 3))
    img = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    where = ("upper " if cy < big / 2 else "lower ") + ("left" if cx < big / 2 else "right")
    size_word = "large" if r > 0.3 * big else "small"
    caption = f"a {size_word} {fg_name} {CLASSES[label]} on a {bg_name} background, {where}"
    return img, caption


def _write_split(path: Path, n: int, size: int, rng: np.random.Generator) -> None:
    from streaming import MDSWriter

    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    columns = {"image": "bytes", "label": "int", "caption": "str"}
    with MDSWriter(out=str(path), columns=columns, size_limit=1 << 25, progress_bar=False) as writer:
        for label in labels:
            img, caption = render(int(label), rng, size)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            writer.write({"image": buf.getvalue(), "label": int(label), "caption": caption})


def build_demo_dataset(out: str | Path = "data/demo", n_train: int = 10000, n_val: int = 2000,
                       image_size: int = 64, seed: int = 0, overwrite: bool = False) -> Path:
    """Write ``<out>/train``, ``<out>/val`` (MDS) and ``<out>/classes.json``; skip if already complete."""
    out = Path(out)
    meta = {"classes": CLASSES, "n_train": n_train, "n_val": n_val, "image_size": image_size, "seed": seed}
    marker = out / "classes.json"
    if marker.is_file() and not overwrite and json.loads(marker.read_text()) == meta:
        print(f"demo dataset already at {out} (use --overwrite to rebuild)")
        return out
    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        _write_split(out / split, n, image_size, rng)
    marker.write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks a complete build
    print(f"demo dataset: {n_train} train + {n_val} val images of {len(CLASSES)} classes at {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m lit_webssl data demo``."""
    parser = argparse.ArgumentParser(prog="python -m lit_webssl data demo", description=build_demo_dataset.__doc__)
    parser.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
    parser.add_argument("--train", type=int, default=10000, help="training images")
    parser.add_argument("--val", type=int, default=2000, help="validation images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    build_demo_dataset(args.out, args.train, args.val, args.size, args.seed, args.overwrite)
