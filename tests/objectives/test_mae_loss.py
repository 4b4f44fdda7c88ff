"""MAE loss and patchify against hand-computed cases (reference: facebookresearch/mae ``models_mae.py``)."""

from __future__ import annotations

import pytest
import torch

from lit_webssl.objectives.losses import MAELoss, patchify
from lit_webssl.objectives.mae import random_masking


def test_patchify_order_is_rows_then_pixels_then_channels():
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    patches = patchify(img, 2)
    assert patches.shape == (2, 4, 12)
    # patch 1 is row 0, col 1: pixels (0,2),(0,3),(1,2),(1,3), channels interleaved
    expected = torch.stack([img[0, :, 0, 2], img[0, :, 0, 3], img[0, :, 1, 2], img[0, :, 1, 3]]).flatten()
    torch.testing.assert_close(patches[0, 1], expected)


def test_norm_pix_loss_hand_computed():
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]]])
    pred = torch.zeros_like(target)
    mask = torch.tensor([[1.0, 0.0]])
    # patch 0: mean 2.5, unbiased var 5/3; normalized squares average to (5/4) / (5/3 + 1e-6)
    expected = 1.25 / (5.0 / 3.0 + 1e-6)
    assert MAELoss(norm_pix_loss=True)(pred, target, mask).item() == pytest.approx(expected, rel=1e-6)


def test_plain_pixel_loss_only_counts_masked_patches():
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0]], [[0.0, 0.0, 0.0, 2.0], [1.0] * 4]])
    pred = torch.zeros_like(target)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = (30 / 4 + 4 / 4 + 1.0) / 3
    assert MAELoss(norm_pix_loss=False)(pred, target, mask).item() == pytest.approx(expected)


def test_random_masking_keeps_a_quarter_and_restores_order():
    gen = torch.Generator().manual_seed(0)
    keep, mask, restore = random_masking(3, 16, 0.75, gen)
    assert keep.shape == (3, 4)
    assert mask.sum(1).tolist() == [12.0, 12.0, 12.0]
    for b in range(3):
        assert mask[b, keep[b]].sum() == 0
    shuffled = torch.argsort(restore, dim=1)
    torch.testing.assert_close(shuffled[:, :4], keep)
