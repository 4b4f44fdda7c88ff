"""uint8 image transforms: decoding, the augmented views an objective declares, and the deterministic probe view.

Images are uint8 ``(3, H, W)`` tensors with ``torchvision.transforms.v2`` (no PIL): the crop is cut first and only
the crop is resized, operations whose probability is 0 are never built, the colour ops run on one float copy of the
crop (:mod:`lit_webssl.datamodules.photometric`), and the result is uint8 again (four times less host memory and
host-to-device traffic than float). Normalization happens on the device.

Randomness comes from torch's global generator only, so ``torch.manual_seed`` (or a ``torch.random.fork_rng``
block, as the datasets use per sample) makes every view reproducible.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as _tv_decode_image
from torchvision.transforms import v2

from lit_webssl.datamodules import photometric as photo
from lit_webssl.objectives.base import ViewSpec

BICUBIC = v2.InterpolationMode.BICUBIC
BLUR_KERNEL = 9
SOLARIZE_THRESHOLD = 128

__all__ = ["EvalTransform", "MultiViewTransform", "ViewTransform", "decode", "decode_image"]


def decode_image(data: bytes) -> Tensor:
    """Decode encoded image bytes (JPEG, PNG, WebP, GIF, ...) to RGB.

    Args:
        data: The encoded file's bytes.

    Returns:
        uint8 tensor ``(3, H, W)``; grayscale and alpha images are converted to 3-channel RGB.

    Raises:
        ValueError: The bytes are empty, truncated beyond repair or not an image; the message gives their length
            and first bytes.
    """
    if len(data) == 0:
        raise ValueError("undecodable image (0 bytes): empty")
    try:
        image = _tv_decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, TypeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        message = re.sub(r"^.*?\.cpp:\d+,\s*", "", message)  # drop torchvision's C++ source location
        raise ValueError(f"undecodable image ({len(data)} bytes, starting {bytes(data[:8])!r}): {message}") from err
    if image.ndim == 4:  # an animated GIF: its frames; keep the first
        image = image[0]
    if image.dtype == torch.uint16:  # a 16-bit PNG: keep the 8 most significant bits
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"undecodable image ({len(data)} bytes): decoded to {image.dtype} {tuple(image.shape)}, not 8-bit RGB"
        )
    return image


decode = decode_image
"""Alias of :func:`decode_image`."""


def _maybe(op: nn.Module, p: float) -> nn.Module:
    """``op`` applied with probability ``p`` (no coin flip at all when ``p == 1``)."""
    return op if p >= 1.0 else v2.RandomApply([op], p=p)


def _blur_kernel(size: int) -> int:
    """Kernel 9, shrunk to the largest odd size that reflect-padding allows on very small crops."""
    largest = size if size % 2 else size - 1
    return max(1, min(BLUR_KERNEL, largest))


class ViewTransform:
    """One :class:`ViewSpec` applied to a uint8 image.

    RandomResizedCrop (bicubic, antialiased), then horizontal flip, colour jitter, grayscale, Gaussian blur and
    solarization, each with the spec's probability. Operations with probability 0 are left out of the pipeline.

    Args:
        spec: The view to produce.
        photometric: ``"float"`` (default) runs the colour ops on one float32 copy of the crop
            (:mod:`lit_webssl.datamodules.photometric`: same draws, same values up to rare rounding, about twice as
            fast); ``"uint8"`` uses torchvision's uint8 kernels op by op.
    """

    def __init__(self, spec: ViewSpec, photometric: Literal["float", "uint8"] = "float") -> None:
        if photometric not in ("float", "uint8"):
            raise ValueError(f"photometric must be 'float' or 'uint8', got {photometric!r}")
        self.spec = spec
        fast = photometric == "float"
        ops: list[nn.Module] = [
            v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, interpolation=BICUBIC, antialias=True)
        ]
        if spec.hflip_p > 0:
            ops.append(v2.RandomHorizontalFlip(p=spec.hflip_p))
        colour: list = []
        if spec.color_jitter_p > 0 and any(spec.color_jitter):
            jitter = photo.FloatColorJitter if fast else v2.ColorJitter
            colour.append(_maybe(jitter(*spec.color_jitter), spec.color_jitter_p))
        if spec.grayscale_p > 0:
            colour.append((photo.FloatGrayscale if fast else v2.RandomGrayscale)(p=spec.grayscale_p))
        if spec.blur_p > 0:
            blur = photo.FloatGaussianBlur if fast else v2.GaussianBlur
            colour.append(_maybe(blur(_blur_kernel(spec.size), sigma=spec.blur_sigma), spec.blur_p))
        if spec.solarize_p > 0:
            solarize = photo.FloatSolarize if fast else v2.RandomSolarize
            colour.append(solarize(threshold=SOLARIZE_THRESHOLD, p=spec.solarize_p))
        if colour and fast:
            colour = [photo.ToFloat(), *colour, photo.ToUint8()]
        self.ops = ops + colour

    def __call__(self, image: Tensor) -> Tensor:
        """uint8 ``(3, H, W)`` -> uint8 ``(3, size, size)``."""
        for op in self.ops:
            image = op(image)
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name!r}: {', '.join(type(op).__name__ for op in self.ops)})"


class MultiViewTransform:
    """Every view an objective declares, from one image.

    Args:
        specs: The views, with distinct names.
        photometric: Kernels of the colour ops (see :class:`ViewTransform`).

    Raises:
        ValueError: No views, or two views with the same name.
    """

    def __init__(self, specs: Sequence[ViewSpec], photometric: Literal["float", "uint8"] = "float") -> None:
        names = [s.name for s in specs]
        if not names:
            raise ValueError("no views declared: the objective's views() returned nothing")
        if len(set(names)) != len(names):
            raise ValueError(f"view names must be distinct, got {names}")
        self.specs = list(specs)
        self.transforms = [(s, ViewTransform(s, photometric)) for s in self.specs]

    def __call__(self, image: Tensor) -> dict[str, Tensor]:
        """uint8 ``(3, H, W)`` -> ``{name: uint8 (count, 3, size, size)}``."""
        return {
            spec.name: torch.stack([transform(image) for _ in range(spec.count)]) for spec, transform in self.transforms
        }


class EvalTransform:
    """Deterministic probe view: resize the shorter side to ``size`` (bicubic, antialiased), then center-crop.

    Args:
        size: Output side length in pixels.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.resize = v2.Resize(size, interpolation=BICUBIC, antialias=True)
        self.crop = v2.CenterCrop(size)

    def __call__(self, image: Tensor) -> Tensor:
        """uint8 ``(3, H, W)`` -> uint8 ``(3, size, size)``."""
        return self.crop(self.resize(image))
