"""The demo set: ten shape classes drawn procedurally (PIL and numpy, no downloads) and written as MDS shards.

The class is the silhouette. Everything else is a nuisance drawn independently of it: foreground and background
colours, a background gradient with low-frequency colour waves, the shape's position, size (35-80 % of the image),
rotation and aspect, shading on the shape, 0-2 distractor blobs and sensor noise. Nearest neighbours in pixel space
therefore match colours and layouts rather than shapes, while an encoder that learned shape from the images alone
(DINO, MAE) separates the classes, so the kNN probe shows what self-supervision learned.

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
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "hourglass", "arrow", "crescent", "heart")
HUE_NAMES = ((0.04, "red"), (0.11, "orange"), (0.19, "yellow"), (0.45, "green"), (0.53, "cyan"), (0.71, "blue"),
             (0.81, "purple"), (0.95, "pink"), (1.01, "red"))
SPLITS = (("train", 0), ("val", 1))
SHARD_BYTES = 1 << 23
_ANGLES = np.linspace(0.0, 2.0 * math.pi, 41)[:-1]
_HEART = np.stack([16 * np.sin(_ANGLES) ** 3, -(13 * np.cos(_ANGLES) - 5 * np.cos(2 * _ANGLES)
                   - 2 * np.cos(3 * _ANGLES) - np.cos(4 * _ANGLES)) - 2.5], axis=1) / 17.0


def _regular(n: int, radius: float = 1.0, start: float = -math.pi / 2) -> np.ndarray:
    angles = start + np.arange(n) * 2.0 * math.pi / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def outline(kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Unit-radius outline of ``kind``: a list of ``(N, 2)`` polygons, the first filled, the others cut out."""
    if kind in ("circle", "ring", "crescent"):
        outer = _regular(48)
        if kind == "circle":
            return [outer]
        if kind == "ring":
            return [outer, _regular(48, rng.uniform(0.45, 0.62))]
        bite = _regular(48, rng.uniform(0.75, 0.9)) + np.array([rng.uniform(0.35, 0.55), 0.0])
        return [outer, bite]
    if kind == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.7]
    if kind == "triangle":
        return [_regular(3)]
    if kind == "star":
        points = _regular(10)
        points[1::2] *= rng.uniform(0.38, 0.5)
        return [points]
    if kind == "cross":
        t = rng.uniform(0.26, 0.38)
        arm = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t),
               (-t, -t)]
        return [np.array(arm) * 0.95]
    if kind == "hourglass":
        w = rng.uniform(0.08, 0.16)
        return [np.array([[-0.8, -1], [0.8, -1], [w, 0], [0.8, 1], [-0.8, 1], [-w, 0]]) * 0.78]
    if kind == "arrow":
        shaft, head = rng.uniform(0.16, 0.26), rng.uniform(0.5, 0.7)
        return [np.array([[-1, -shaft], [0.15, -shaft], [0.15, -head], [1, 0], [0.15, head], [0.15, shaft],
                          [-1, shaft]])]
    if kind == "heart":
        return [_HEART]
    raise KeyError(f"unknown shape {kind!r}; choose from {CLASSES}")


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
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.15, 1.0), rng.uniform(0.15, 1.0))
    return np.array(rgb, dtype=np.float32) * 255.0


def _mask(polygons: list[np.ndarray], size: int, ss: int, cx: float, cy: float, radius: float, angle: float,
          aspect: float) -> np.ndarray:
    """Anti-aliased float mask ``(size, size)`` of the polygons placed at (cx, cy), drawn at ``ss`` x supersampling."""
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for i, poly in enumerate(polygons):
        pts = (poly * np.array([aspect, 1.0 / aspect])) @ rot.T * radius + np.array([cx, cy])
        draw.polygon([tuple(p) for p in (pts * ss).tolist()], fill=0 if i else 255)
    return np.asarray(canvas.reduce(ss), dtype=np.float32)[..., None] * np.float32(1 / 255)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)`` in [0, 1), float32."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    return yy, xx


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two-colour linear gradient along a random direction plus low-frequency colour waves."""
    c0, c1 = _colour(rng), _colour(rng)
    yy, xx = _grid(size)
    angle = rng.uniform(0, 2 * math.pi)
    t = (math.cos(angle) * xx + math.sin(angle) * yy)[..., None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    mix = rng.uniform(0.2, 1.0)
    image = c0 + mix * (c1 - c0) * t
    for _ in range(rng.integers(1, 4)):
        freq, phase, direction = rng.uniform(0.5, 2.5), rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * freq * (math.cos(direction) * xx + math.sin(direction) * yy) + phase)
        image = image + wave[..., None] * rng.uniform(-35, 35, size=3).astype(np.float32)
    return image


def _where(cx: float, cy: float, size: int) -> str:
    row = "top" if cy < 0.42 * size else "bottom" if cy > 0.58 * size else None
    col = "left" if cx < 0.42 * size else "right" if cx > 0.58 * size else None
    if row is None:
        return f"on the {col}" if col else "in the center"
    return f"at the {row} {col}" if col else f"at the {row}"


def _caption(rng: np.random.Generator, kind: str, fg: str, bg: str, extent: float, where: str) -> str:
    size_word = "large" if extent > 0.6 else "small" if extent < 0.47 else "medium"
    article = "an" if kind[0] in "aeiou" else "a"
    templates = (
        f"a {size_word} {fg} {kind} on a {bg} background, {where}",
        f"{where}: one {fg} {kind} over {bg}",
        f"a picture of {article} {kind} in {fg}, {size_word}, {where}",
        f"{size_word} {fg} {kind} against {bg}, {where}",
    )
    return templates[int(rng.integers(len(templates)))]


def _foreground(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    """A colour drawn independently of the class, redrawn until it stands out from the background."""
    for _ in range(100):
        fg = _colour(rng)
        if np.linalg.norm(fg - background_mean) > 90:
            break
    return fg


def render(label: int, rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, str]:
    """Draw one image of class ``label`` with fresh nuisances.

    Args:
        label: Class index into :data:`CLASSES`.
        rng: Source of all random draws (the image is a pure function of its state).
        size: Side length in pixels.

    Returns:
        The RGB image and a caption describing it.
    """
    ss = max(1, min(4, 256 // size))  # supersampling of the masks: anti-aliased edges
    image = _background(rng, size)
    bg_mean = image.reshape(-1, 3).mean(0)
    for _ in range(rng.integers(0, 3)):  # distractor blobs (discs or rectangles), behind the shape
        r = rng.uniform(0.06, 0.13) * size
        blob = _mask([_regular(16 if rng.integers(2) else 4)], size, ss, rng.uniform(0, size), rng.uniform(0, size),
                     r, rng.uniform(0, math.pi), rng.uniform(0.7, 1.4))
        image = image * (1 - blob) + _colour(rng) * blob
    fg = _foreground(rng, bg_mean)
    extent = rng.uniform(0.35, 0.8)
    radius = extent * size / 2
    cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
    mask = _mask(outline(CLASSES[label], rng), size, ss, cx, cy, radius, rng.uniform(0, 2 * math.pi),
                 rng.uniform(0.85, 1.15))
    yy, xx = _grid(size)
    direction, strength = rng.uniform(0, 2 * math.pi), np.float32(rng.uniform(-0.3, 0.3))
    shade = 1 + strength * (math.cos(direction) * (xx - 0.5) + math.sin(direction) * (yy - 0.5))
    image = image * (1 - mask) + (fg * shade[..., None]) * mask
    image = image + rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(2, 8)
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    caption = _caption(rng, CLASSES[label], colour_name(fg), colour_name(bg_mean), extent, _where(cx, cy, size))
    return picture, caption


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


def build_demo_dataset(out: str | Path = "data/demo", n_train: int = 10000, n_val: int = 2000,
                       image_size: int = 64, seed: int = 0, overwrite: bool = False) -> Path:
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
        _write_split(partial / split, n_train if split == "train" else n_val, image_size,
                     np.random.default_rng([seed, stream]))
    (partial / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    print(f"demo dataset: {n_train} train + {n_val} val images ({image_size} px, {len(CLASSES)} classes) at {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    """``python -m lit_webssl data demo [--out DIR] [--train N] [--val N] [--size PX] [--seed S] [--overwrite]``."""
    parser = argparse.ArgumentParser(prog="python -m lit_webssl data demo",
                                     description="Build the procedurally drawn demo dataset as MDS shards.")
    parser.add_argument("--out", default="data/demo", help="output directory (default: %(default)s)")
    parser.add_argument("--train", type=int, default=10000, help="training images (default: %(default)s)")
    parser.add_argument("--val", type=int, default=2000, help="validation images (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if a complete build exists")
    args = parser.parse_args(argv)
    return build_demo_dataset(args.out, args.train, args.val, args.size, args.seed, args.overwrite)
