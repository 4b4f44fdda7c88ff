"""The ten texture classes of the demo set, drawn procedurally with their nuisances (colours, period, phase,
tilt, duty cycle, lighting, noise), and their captions."""

from __future__ import annotations

import colorsys
import math
from functools import lru_cache

import numpy as np
from PIL import Image

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

NOISE_STD = (2.0, 10.0)  # range of the per-image sensor noise, in 8-bit levels


def colour_name(rgb: np.ndarray) -> str:
    """Plain-English name of an RGB colour in [0, 255] (``"dark blue"``, ``"gray"``...)."""
    hue, sat, val = colorsys.rgb_to_hsv(*(np.clip(rgb, 0, 255) / 255.0).tolist())
    if val < 0.3:
        return "black"
    if sat < 0.25:
        return "white" if val > 0.8 else "gray"
    return ("dark " if val < 0.55 else "") + next(n for edge, n in HUE_NAMES if hue < edge)


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour in [0, 255], uniform in hue and spread in saturation and value."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.1, 1.0), rng.uniform(0.15, 1.0))
    return np.array(rgb, dtype=np.float32) * 255.0


@lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)`` in pixels, float32."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


def _soft(v: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased step: 0 below ``-width / 2``, 1 above ``width / 2``, linear between."""
    return np.clip(0.5 + v / width, 0.0, 1.0)


def ink(kind: str, rng: np.random.Generator, size: int, period: float) -> np.ndarray:
    """Coverage ``(size, size)`` in [0, 1] of the pattern ``kind`` (1 = foreground colour), repeating every
    ``period`` pixels, with fresh phase, tilt and shape nuisances."""
    yy, xx = pixel_grid(size)
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
    fg = random_colour(rng)
    for _ in range(100):  # a background colour that differs enough to show the pattern
        bg = random_colour(rng)
        if np.linalg.norm(fg - bg) > 80:
            break
    image = bg + (fg - bg) * coverage
    yy, xx = pixel_grid(size)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(direction) * (xx - size / 2) + math.sin(direction) * (yy - size / 2)) / size  # in [-0.71, 0.71]
    image = image * (1 + rng.uniform(-0.35, 0.35) * ramp)[..., None]  # illumination gradient
    image = image + rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(*NOISE_STD)
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return picture, _caption(rng, kind, colour_name(fg), colour_name(bg), relative_period > 0.19)
