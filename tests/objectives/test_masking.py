"""iBOT block masks and stratified mask ratios (reference: DINOv2 ``data/masking.py``, ``data/collate.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_webssl.objectives.masking import BlockMaskGenerator, sample_ibot_masks, stratified_ratios

GRID = (16, 16)
N = GRID[0] * GRID[1]


def _bbox(mask: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


@pytest.mark.parametrize("n_images,p", [(128, 0.5), (10, 0.35), (7, 1.0), (5, 0.0), (0, 0.5)])
def test_shapes_dtype_and_number_of_masked_images(n_images, p):
    masks = sample_ibot_masks(n_images, GRID, mask_probability=p, rng=np.random.default_rng(0))
    assert masks.shape == (n_images, N) and masks.dtype == torch.bool
    counts = masks.sum(1)
    assert int((counts > 0).sum()) == int(n_images * p)
    assert int((counts == 0).sum()) == n_images - int(n_images * p)


def test_rectangular_grid_shape():
    masks = sample_ibot_masks(8, (12, 20), rng=np.random.default_rng(0))
    assert masks.shape == (8, 240)


def test_masked_images_are_shuffled():
    # 64 masked out of 128: the masked ones must not always be the first half
    masks = sample_ibot_masks(128, GRID, rng=np.random.default_rng(0))
    assert not masks[:64].any(1).all()


def test_stratified_ratios_fall_one_per_stratum():
    rng = np.random.default_rng(0)
    for n in (1, 7, 64):
        ratios = stratified_ratios(n, (0.1, 0.5), rng)
        edges = np.linspace(0.1, 0.5, n + 1)
        assert ratios.shape == (n,)
        assert np.all(ratios >= edges[:-1]) and np.all(ratios <= edges[1:])
    assert stratified_ratios(0, (0.1, 0.5), rng).shape == (0,)


def test_targets_follow_the_stratified_ratios():
    # sample_ibot_masks draws the ratios first from rng: realized counts never exceed int(N * ratio)
    for seed in range(20):
        targets = (N * stratified_ratios(32, (0.1, 0.5), np.random.default_rng(seed))).astype(int)
        counts = sample_ibot_masks(64, GRID, rng=np.random.default_rng(seed)).sum(1).numpy()
        realized = np.sort(counts[counts > 0])
        assert realized.shape == (32,)
        assert np.all(realized <= np.sort(targets))
        assert (np.sort(targets) - realized).sum() <= 16


def test_ratio_statistics_over_many_batches():
    rng = np.random.default_rng(1234)
    fractions = []
    for _ in range(300):
        counts = sample_ibot_masks(64, GRID, rng=rng).sum(1).numpy()
        assert (counts > 0).sum() == 32
        fractions.append(counts[counts > 0] / N)
    frac = np.concatenate(fractions)
    # never above the top of the range; below the bottom only by the block-placement shortfall (a few patches)
    assert frac.max() <= 0.5
    assert frac.min() >= (int(0.1 * N) - 12) / N
    assert np.mean(frac >= int(0.1 * N) / N) > 0.99
    # mean target is 0.3; int() truncation costs ~0.5 patch and the shortfall ~0.1 patch per mask (≈ -0.0023)
    assert abs(frac.mean() - 0.3) < 0.005
    # strata are filled evenly: each fifth of [0.1, 0.5] holds about a fifth of the masks
    hist, _ = np.histogram(frac, bins=np.linspace(0.1, 0.5, 6))
    assert np.all(np.abs(hist / frac.size - 0.2) < 0.02)


def test_generator_hits_target_or_falls_short_slightly():
    gen = BlockMaskGenerator(GRID)
    rng = np.random.default_rng(0)
    for target in (4, 10, 25, 50, 77, 100, 128):
        masks = gen.batch(np.full(400, target), rng)
        assert masks.shape == (400, *GRID) and masks.dtype == bool
        shortfall = target - masks.reshape(400, -1).sum(1)
        assert shortfall.min() >= 0  # never above the target
        assert np.mean(shortfall == 0) > 0.8  # exact in the common case
        assert shortfall.mean() < 0.5
        assert shortfall.max() <= 12


def test_single_call_and_zero_target():
    gen = BlockMaskGenerator(GRID)
    rng = np.random.default_rng(0)
    mask = gen(40, rng)
    assert mask.shape == GRID and mask.dtype == bool and mask.sum() <= 40
    assert not gen(0, rng).any()


def test_single_block_is_a_filled_rectangle():
    gen = BlockMaskGenerator(GRID, max_num_patches=N)
    rng = np.random.default_rng(0)
    masks = gen.batch(np.full(200, 100), rng, max_blocks=1)
    for mask in masks:
        assert mask.any()
        rows, cols = _bbox(mask)
        assert mask[rows, cols].all() and mask.sum() == mask[rows, cols].size
        # strict fit as in the reference: a block never spans the whole grid side
        assert mask.any(1).sum() < GRID[0] and mask.any(0).sum() < GRID[1]


def test_masks_are_unions_of_rectangles():
    # the first k rounds use the same random draws, so round k+1 adds one rectangle to the round-k mask:
    # the bounding box of the newly masked patches lies inside that rectangle, hence is fully masked
    gen = BlockMaskGenerator(GRID)
    targets = np.random.default_rng(5).integers(20, 129, size=32)
    prev = np.zeros((32, *GRID), dtype=bool)
    for k in range(1, 16):
        cur = gen.batch(targets, np.random.default_rng(7), max_blocks=k)
        assert np.all(cur >= prev)
        for before, after in zip(prev, cur, strict=True):
            added = after & ~before
            if added.any():
                rows, cols = _bbox(added)
                assert after[rows, cols].all()
        prev = cur
    np.testing.assert_array_equal(prev, gen.batch(targets, np.random.default_rng(7)))


def test_determinism_and_seed_dependence():
    a = sample_ibot_masks(64, GRID, rng=np.random.default_rng(42))
    b = sample_ibot_masks(64, GRID, rng=np.random.default_rng(42))
    c = sample_ibot_masks(64, GRID, rng=np.random.default_rng(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    gen = BlockMaskGenerator(GRID)
    np.testing.assert_array_equal(gen(60, np.random.default_rng(1)), gen(60, np.random.default_rng(1)))


def test_custom_generator_is_used():
    gen = BlockMaskGenerator(GRID, max_num_patches=4)  # small blocks: many of them
    masks = sample_ibot_masks(16, GRID, mask_probability=1.0, rng=np.random.default_rng(0), generator=gen)
    assert int((masks.sum(1) > 0).sum()) == 16


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"mask_probability": 1.5}, "mask_probability"),
        ({"mask_probability": -0.1}, "mask_probability"),
        ({"ratio_range": (0.5, 0.1)}, "ratio_range"),
        ({"ratio_range": (-0.1, 0.5)}, "ratio_range"),
        ({"ratio_range": (0.1, 1.5)}, "ratio_range"),
        ({"ratio_range": (0.1,)}, "ratio_range"),
        ({"grid": (0, 16)}, "grid"),
        ({"grid": (16, -1)}, "grid"),
        ({"grid": (16,)}, "grid"),
        ({"n_images": -1}, "n_images"),
        ({"generator": BlockMaskGenerator((8, 8))}, "generator"),
    ],
)
def test_sample_ibot_masks_argument_errors(kwargs, name):
    args = {"n_images": 4, "grid": GRID, **kwargs}
    with pytest.raises(ValueError, match=name):
        sample_ibot_masks(**args)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"grid": (0, 4)}, "grid"),
        ({"min_num_patches": -1}, "min_num_patches"),
        ({"max_num_patches": 0}, "max_num_patches"),
        ({"min_aspect": 0.0}, "min_aspect"),
        ({"min_aspect": 0.5, "max_aspect": 0.4}, "max_aspect"),
    ],
)
def test_generator_argument_errors(kwargs, name):
    args = {"grid": GRID, **kwargs}
    with pytest.raises(ValueError, match=name):
        BlockMaskGenerator(**args)


def test_negative_target_is_rejected():
    with pytest.raises(ValueError, match="num_masking_patches"):
        BlockMaskGenerator(GRID)(-1, np.random.default_rng(0))


def test_defaults_follow_dinov2():
    gen = BlockMaskGenerator(GRID)
    assert gen.max_num_patches == 128 and gen.min_num_patches == 4
    assert gen.min_aspect == pytest.approx(0.3) and gen.max_aspect == pytest.approx(1 / 0.3)
