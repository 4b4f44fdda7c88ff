"""uint8 view transforms: decode, RandomResizedCrop and photometric ops on tensors, following a ``ViewSpec``.

Everything stays uint8 ``(3, H, W)`` on the CPU (less host memory and transfer); normalization happens on the device.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from lit_webssl.objectives.base import ViewSpec
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image


def decode(data: bytes) -> Tensor:
    """Encoded JPEG/PNG/... bytes -> uint8 RGB ``(3, H, W)``; ``ValueError`` when the bytes do not decode."""
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"undecodable image ({len(data)} bytes): {err}") from err


def _rrc_params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box sampling (10 tries, then a central crop)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * random.uniform(scale[0], scale[1])
        aspect = math.exp(random.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ViewTransform:
    """One ``ViewSpec`` applied to a uint8 image: crop, resize (bicubic, antialiased), flip, colour operations.

    Randomness comes from Python's ``random`` and torch's global generator, which the dataset seeds per sample.
    """

    def __init__(self, spec: ViewSpec) -> None:
        self.spec = spec
        self.jitter = v2.ColorJitter(*spec.color_jitter) if spec.color_jitter_p > 0 else None

    def __call__(self, image: Tensor) -> Tensor:
        s = self.spec
        top, left, h, w = _rrc_params(image.shape[-2], image.shape[-1], s.scale, s.ratio)
        out = TF.resized_crop(image, top, left, h, w, [s.size, s.size],
                              interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        if s.hflip_p and random.random() < s.hflip_p:
            out = TF.horizontal_flip(out)
        if self.jitter is not None and random.random() < s.color_jitter_p:
            out = self.jitter(out)
        if s.grayscale_p and random.random() < s.grayscale_p:
            out = TF.rgb_to_grayscale(out, num_output_channels=3)
        if s.blur_p and random.random() < s.blur_p:
            out = TF.gaussian_blur(out, [9, 9], [random.uniform(*s.blur_sigma)] * 2)
        if s.solarize_p and random.random() < s.solarize_p:
            out = TF.solarize(out, 128)
        return out


class MultiViewTransform:
    """Every declared view of one image: ``{name: uint8 (count, 3, size, size)}``."""

    def __init__(self, specs: Sequence[ViewSpec]) -> None:
        if not specs:
            raise ValueError("the objective declared no views")
        self.transforms = [(s.name, s.count, ViewTransform(s)) for s in specs]

    def __call__(self, image: Tensor) -> dict[str, Tensor]:
        return {name: torch.stack([t(image) for _ in range(count)]) for name, count, t in self.transforms}


class EvalTransform:
    """Deterministic probe view: resize the short side to ``size`` (bicubic, antialiased), then center-crop."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Tensor) -> Tensor:
        out = TF.resize(image, [self.size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(out, [self.size, self.size])
