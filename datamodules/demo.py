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
from PIL import Image

CLASSES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "polka dots",
           "concentric rings", "grid", "zigzag", "blotches", "crosses")
HUE_NAMES = ((0.04, "red"), (0.11, "orange"), (0.19, "yellow"), (0.45, "green"), (0.53, "cyan"), (0.71, "blue"),
             (0.81, "purple"), (0.95, "pink"), (1.01, "red"))
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
