"""MAE reconstruction loss: mean squared error on masked patches, optionally against normalized pixels.

Reference: He et al., "Masked Autoencoders Are Scalable Vision Learners" (2021); ``models_mae.py::forward_loss`` of
facebookresearch/mae. Shapes: B batch, N patches, P = patch_size**2 * 3 values per patch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``(B, 3, H, W)`` -> ``(B, N, patch_size**2 * 3)``, patches in row-major order, pixels as (p, q, c)."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, gh * gw, patch_size * patch_size * c)


class MAELoss(nn.Module):
    """Per-patch MSE averaged over masked patches (``mask`` is 1 where a patch was removed).

    Args:
        norm_pix_loss: Normalize each target patch by its own mean and variance (MAE's ``norm_pix_loss``).
        eps: Added to the per-patch variance before the square root.
    """

    def __init__(self, norm_pix_loss: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_pix_loss = norm_pix_loss
        self.eps = eps

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """``pred`` and ``target`` ``(B, N, P)``, ``mask`` ``(B, N)``: the mean loss over masked patches."""
        target = target.float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as in the reference
            target = (target - mean) / (var + self.eps) ** 0.5
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)
        mask = mask.to(per_patch.dtype)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
