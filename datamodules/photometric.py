"""Photometric view operations on float32 crops holding the integer values 0-255 of a uint8 image.

torchvision's uint8 kernels convert to float and back inside every operation, and its hue kernel leans on
``aminmax``/``where``/``remainder``, which are slow on CPU. Here a crop is converted once (after crop and flip), every
operation floors or rounds its result the way torchvision's uint8 kernel truncates or rounds it, and the crop is
converted back once at the end: the same random draws (the op classes subclass torchvision's and override only
``transform``), the same values for brightness, contrast, saturation, grayscale and solarize, and equal up to rare
rounding differences (a few levels) for hue and blur. Measured on the 2-core box: 26.3 -> 14.1 ms per image for the
Web-DINO multi-crop set, single thread (``benchmarks/bench_dino_pipeline.py``).

Written by hand rather than taken from a library: torchvision is the library, and these are its own formulas
without its per-op dtype round trips.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

__all__ = [
    "FloatColorJitter",
    "FloatGaussianBlur",
    "FloatGrayscale",
    "FloatSolarize",
    "ToFloat",
    "ToUint8",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "gaussian_blur",
]

_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)  # hsv -> rgb: channel n takes f((n + 6h) mod 6)
_TO_UINT8 = (255.0 + 1.0 - 1e-3) / 255.0  # torchvision's float -> uint8 scale (then truncation)


def _gray(x: Tensor) -> Tensor:
    """Luma as torchvision computes it for a uint8 image, floored: ``(..., 3, H, W)`` -> ``(..., 1, H, W)``."""
    r, g, b = x.unbind(-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(-3)


def _blend(x: Tensor, y: Tensor, factor: float) -> Tensor:
    return x.mul(factor).add_(y, alpha=1.0 - factor).clamp_(0.0, 255.0).floor_()


def adjust_brightness(x: Tensor, factor: float) -> Tensor:
    return x.mul(factor).clamp_(0.0, 255.0).floor_()


def adjust_contrast(x: Tensor, factor: float) -> Tensor:
    return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: float) -> Tensor:
    return _blend(x, _gray(x), factor)


def adjust_hue(x: Tensor, factor: float) -> Tensor:
    """HSV hue rotation (torchvision's hexcone model) without ``aminmax``/``where``/``remainder``, slow on CPU.

    Max and chroma of a pixel are invariant; channel n of the output is ``max - chroma * clamp(min(k, 4 - k), 0,
    1)`` with ``k = (n + 6 h') mod 6``, ``n`` = 5, 3, 1 for R, G, B (the usual closed form of hsv -> rgb).
    """
    r, g, b = x.unbind(-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    is_r = (maxc == r).float()
    is_g = (maxc == g).float().mul_(1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    hue6 = is_r * (g - b) + is_g * (b - r + 2.0 * chroma) + is_b * (r - g + 4.0 * chroma)  # 6 h * chroma
    hue6 = hue6.div_(chroma.clamp(min=1.0)).add_(6.0 * factor)  # grey pixels (chroma 0): any hue, same output
    k = hue6.unsqueeze(-3) + _HUE_OFFSETS.to(x.device)
    k = k.sub_(torch.floor(k * (1.0 / 6.0)).mul_(6.0))
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (maxc.unsqueeze(-3) - chroma.unsqueeze(-3) * ramp).mul_(_TO_UINT8).floor_()


def gaussian_taps(kernel_size: int, sigma: float) -> list[float]:
    """torchvision's 1-D Gaussian kernel (its 2-D blur kernel is the outer product of two of these)."""
    half = (kernel_size - 1) * 0.5
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, steps=kernel_size) / sigma).pow(2))
    return (pdf / pdf.sum()).tolist()


def gaussian_blur(x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Reflect-padded separable Gaussian blur as symmetric 1-D taps (= torchvision's 2-D kernel), rounded."""
    taps = gaussian_taps(kernel_size, sigma)
    r, (h, w) = kernel_size // 2, x.shape[-2:]
    padded = torch.nn.functional.pad(x.unsqueeze(0), [r, r, r, r], mode="reflect")[0]
    rows = padded[..., r : r + w] * taps[r]
    for i in range(r):
        rows.add_(padded[..., i : i + w] + padded[..., 2 * r - i : 2 * r - i + w], alpha=taps[i])
    out = rows[..., r : r + h, :] * taps[r]
    for i in range(r):
        out.add_(rows[..., i : i + h, :] + rows[..., 2 * r - i : 2 * r - i + h, :], alpha=taps[i])
    return out.round_()


class FloatColorJitter(v2.ColorJitter):
    """``v2.ColorJitter`` (same parameter draws) with the float kernels above."""

    KERNELS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)

    def transform(self, inpt: Tensor, params: dict[str, Any]) -> Tensor:
        factors = (
            params["brightness_factor"],
            params["contrast_factor"],
            params["saturation_factor"],
            params["hue_factor"],
        )
        for fn_id in params["fn_idx"].tolist():
            if factors[fn_id] is not None:
                inpt = self.KERNELS[fn_id](inpt, factors[fn_id])
        return inpt


class FloatGrayscale(v2.RandomGrayscale):
    """``v2.RandomGrayscale`` (same draw) on float crops."""

    def transform(self, inpt: Tensor, params: dict[str, Any]) -> Tensor:
        return _gray(inpt).expand_as(inpt)


class FloatGaussianBlur(v2.GaussianBlur):
    """``v2.GaussianBlur`` (same sigma draw) as a separable blur on float crops."""

    def transform(self, inpt: Tensor, params: dict[str, Any]) -> Tensor:
        return gaussian_blur(inpt, self.kernel_size[0], params["sigma"][0])


class FloatSolarize(v2.RandomSolarize):
    """``v2.RandomSolarize`` (same draw) on float crops."""

    def transform(self, inpt: Tensor, params: dict[str, Any]) -> Tensor:
        return torch.where(inpt >= self.threshold, 255.0 - inpt, inpt)


class ToFloat:
    """uint8 ``(3, H, W)`` -> float32 with the same integer values (the start of the photometric ops)."""

    def __call__(self, image: Tensor) -> Tensor:
        return image.float()

    def __repr__(self) -> str:
        return "ToFloat()"


class ToUint8:
    """float32 integer-valued ``(3, H, W)`` -> uint8 (the end of the photometric ops)."""

    def __call__(self, image: Tensor) -> Tensor:
        return image.to(torch.uint8)

    def __repr__(self) -> str:
        return "ToUint8()"
