"""iBOT mask sampling for Web-DINO: BEiT-style block masks with stratified per-image ratios (docs/recipe.md section 3).

References:
    * BEiT (Bao et al., 2022), "BEiT: BERT Pre-Training of Image Transformers": blockwise masking of patch grids
      (``masking_generator.py`` in microsoft/unilm).
    * DINOv2 (Oquab et al., 2024), facebookresearch/dinov2 ``dinov2/data/masking.py`` (``MaskingGenerator``),
      ``dinov2/data/collate.py`` (``collate_data_and_cast``: which crops are masked and with which ratio) and
      ``dinov2/train/train.py`` (the generator is built with ``max_num_patches = 0.5 * N``).

This is an independent NumPy implementation that follows the same sampling rules; it places the blocks of all
images of a batch at once (one vectorised round per block instead of a Python loop per image), so its random
stream differs from the reference while the distribution of masks is the same.

Shapes legend:
    B   number of images (crops) in the batch, e.g. 2 x per-GPU batch for the stacked global crops
    H,W patch grid (rows, columns), e.g. 16 x 16 for a 224-px crop and patch size 14
    N   H * W patches per image
    M   number of images that carry a mask, ``int(B * mask_probability)``
    A   placement attempts per block (10)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["BlockMaskGenerator", "sample_ibot_masks", "stratified_ratios"]

_ATTEMPTS = 10  # placement attempts per block, as in BEiT / DINOv2


def _check_grid(grid: Sequence[int], name: str = "grid") -> tuple[int, int]:
    try:
        h, w = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of positive ints (H, W), got {grid!r}") from None
    if h <= 0 or w <= 0 or (h, w) != tuple(grid):
        raise ValueError(f"{name} must be a pair of positive ints (H, W), got {grid!r}")
    return h, w


class BlockMaskGenerator:
    """BEiT-style block masking over an ``(H, W)`` patch grid.

    A mask is built by repeatedly adding rectangles until ``num_masking_patches`` patches are masked. For each
    rectangle, with ``budget = min(target - masked, max_num_patches)``, up to 10 attempts are made; an attempt draws
    an area ``~ U(min_num_patches, budget)`` and a log-uniform aspect ratio ``r`` in ``[min_aspect, max_aspect]``,
    sets ``h = round(sqrt(area * r))``, ``w = round(sqrt(area / r))`` and, if ``h < H`` and ``w < W`` (strict, as
    in the reference), a uniform top-left corner. The attempt is accepted when the number of *newly* masked patches
    is in ``(0, budget]``. Masking stops when the target is reached or when all 10 attempts of a block fail, so a
    mask never exceeds its target but can fall short of it.

    Args:
        grid: ``(H, W)`` patch grid.
        min_num_patches: lower end of the area draw of one rectangle.
        max_num_patches: most patches one rectangle may add; default ``N // 2`` (DINOv2 uses ``0.5 * N``).
        min_aspect: smallest aspect ratio ``h / w``.
        max_aspect: largest aspect ratio; default ``1 / min_aspect``.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = _check_grid(grid)
        self.num_patches = self.height * self.width
        if min_num_patches < 0:
            raise ValueError(f"min_num_patches must be >= 0, got {min_num_patches}")
        if max_num_patches is None:
            max_num_patches = self.num_patches // 2
        if max_num_patches < 1:
            raise ValueError(f"max_num_patches must be >= 1, got {max_num_patches}")
        if not min_aspect > 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        if max_aspect is None:
            max_aspect = 1.0 / min_aspect
        if not max_aspect >= min_aspect:
            raise ValueError(f"max_aspect must be >= min_aspect ({min_aspect}), got {max_aspect}")
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(max_num_patches)
        self.min_aspect = float(min_aspect)
        self.max_aspect = float(max_aspect)
        self._log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))

    @property
    def grid(self) -> tuple[int, int]:
        return self.height, self.width

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(grid=({self.height}, {self.width}), min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches}, aspect=[{self.min_aspect:.3f}, {self.max_aspect:.3f}])"
        )

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """One mask with (at most) ``num_masking_patches`` patches: bool array ``(H, W)``."""
        return self.batch(np.asarray([num_masking_patches]), rng)[0]

    def batch(
        self, num_masking_patches: Sequence[int] | np.ndarray, rng: np.random.Generator, max_blocks: int | None = None
    ) -> np.ndarray:
        """Masks for several images at once: ``num_masking_patches`` ``(B,)`` targets -> bool array ``(B, H, W)``.

        All images still below their target get one more rectangle per round, so the cost is a few NumPy calls per
        round (about as many rounds as the most fragmented mask has blocks), not per image. ``max_blocks`` caps the
        number of rounds (``None``: until done; ``1`` gives single rectangles, used by the tests).
        """
        targets = np.asarray(num_masking_patches, dtype=np.int64).reshape(-1)
        if targets.size and targets.min() < 0:
            raise ValueError(f"num_masking_patches must be >= 0, got {targets.min()}")
        H, W = self.height, self.width
        B = targets.shape[0]
        masks = np.zeros((B, H, W), dtype=bool)
        remaining = targets.copy()
        active = np.flatnonzero(remaining > 0)
        rows, cols = np.arange(H), np.arange(W)
        lo_log, hi_log = self._log_aspect
        rounds = 0
        while active.size and (max_blocks is None or rounds < max_blocks):
            rounds += 1
            k = active.size
            budget = np.minimum(remaining[active], self.max_num_patches)  # (k,)
            u = rng.random((k, _ATTEMPTS, 4))  # area, aspect, top, left draws for each attempt
            area = self.min_num_patches + (budget[:, None] - self.min_num_patches) * u[..., 0]  # (k, A)
            aspect = np.exp(lo_log + (hi_log - lo_log) * u[..., 1])
            h = np.rint(np.sqrt(area * aspect)).astype(np.int64)
            w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
            fits = (h < H) & (w < W)
            h = np.where(fits, h, 0)
            w = np.where(fits, w, 0)
            top = (u[..., 2] * (H - h + 1)).astype(np.int64)
            left = (u[..., 3] * (W - w + 1)).astype(np.int64)
            # already-masked patches inside each candidate rectangle, via a summed-area table (k, H+1, W+1)
            sat = np.zeros((k, H + 1, W + 1), dtype=np.int32)
            np.cumsum(np.cumsum(masks[active], axis=1, dtype=np.int32), axis=2, out=sat[:, 1:, 1:])
            b = np.arange(k)[:, None]
            bottom, right = top + h, left + w
            covered = sat[b, bottom, right] - sat[b, top, right] - sat[b, bottom, left] + sat[b, top, left]
            new = h * w - covered  # (k, A) newly masked patches
            ok = fits & (new > 0) & (new <= budget[:, None])
            placed = ok.any(axis=1)
            first = ok.argmax(axis=1)
            sel = np.arange(k)
            t, le = top[sel, first], left[sel, first]
            rect = ((rows >= t[:, None]) & (rows < (t + h[sel, first])[:, None]))[:, :, None] & (
                (cols >= le[:, None]) & (cols < (le + w[sel, first])[:, None])
            )[:, None, :]
            rect &= placed[:, None, None]
            masks[active] |= rect
            remaining[active] -= np.where(placed, new[sel, first], 0)
            active = active[placed & (remaining[active] > 0)]
        return masks


def stratified_ratios(n: int, ratio_range: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Stratified target ratios ``(n,)``: with ``p = linspace(lo, hi, n + 1)``, entry ``i ~ U(p[i], p[i+1])``.

    Returned in stratum order (sorted up to ties at the stratum edges); the caller shuffles.
    """
    lo, hi = _check_ratio_range(ratio_range)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    probs = np.linspace(lo, hi, n + 1)
    return probs[:-1] + (probs[1:] - probs[:-1]) * rng.random(n)


def _check_ratio_range(ratio_range: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in ratio_range)
    except (TypeError, ValueError):
        raise ValueError(f"ratio_range must be a pair (ratio_min, ratio_max), got {ratio_range!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"ratio_range must satisfy 0 <= ratio_min <= ratio_max <= 1, got {ratio_range!r}")
    return lo, hi


def sample_ibot_masks(
    n_images: int,
    grid: tuple[int, int],
    mask_probability: float = 0.5,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    rng: np.random.Generator | None = None,
    generator: BlockMaskGenerator | None = None,
) -> torch.Tensor:
    """iBOT masks for a batch of ``B = n_images`` crops: bool tensor ``(B, N)``, True = masked patch.

    As in DINOv2's collate: ``M = int(B * mask_probability)`` images get a block mask of ``int(N * r_i)`` patches
    with stratified ratios ``r_i`` (:func:`stratified_ratios`), the other ``B - M`` images get an empty mask, and
    the order of the images is shuffled. ``rng`` defaults to a fresh unseeded generator; ``generator`` defaults to
    ``BlockMaskGenerator(grid)`` and must use the same grid.
    """
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 0:
        raise ValueError(f"n_images must be an int >= 0, got {n_images!r}")
    H, W = _check_grid(grid)
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    _check_ratio_range(ratio_range)
    if generator is None:
        generator = BlockMaskGenerator((H, W))
    elif generator.grid != (H, W):
        raise ValueError(f"generator grid {generator.grid} does not match grid {(H, W)}")
    if rng is None:
        rng = np.random.default_rng()
    n = H * W
    n_masked = int(n_images * mask_probability)
    targets = np.zeros(n_images, dtype=np.int64)
    targets[:n_masked] = (n * stratified_ratios(n_masked, ratio_range, rng)).astype(np.int64)
    masks = generator.batch(targets, rng).reshape(n_images, n)
    return torch.from_numpy(masks[rng.permutation(n_images)])
