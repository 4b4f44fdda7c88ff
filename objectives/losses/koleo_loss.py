"""KoLeo regularizer: spread L2-normalized features by penalizing small nearest-neighbour distances.

Reference: Sablayrolles et al., "Spreading vectors for similarity search" (2019), as used in DINOv2;
facebookresearch/dinov2 ``dinov2/loss/koleo_loss.py``. Spec: docs/recipe.md section 3 ("KoLeo").

Shapes: n vectors (the per-rank batch of one crop's backbone CLS tokens), D feature dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator ``-(1/n) Σ_i log(min_{j≠i} ‖x̂_i - x̂_j‖₂ + eps)``, in fp32.

    Deviation from DINOv2 (edge case only): the diagonal of the similarity matrix is set to ``-inf`` instead of ``-1``
    before the arg-max, so a point can never be its own neighbour (with ``-1`` an antipodal pair ties with the diagonal
    and ``torch.max`` may pick the point itself, giving a distance of ~0 and a huge loss).
    """

    def forward(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        """``(n, D)`` features (any float dtype) -> scalar fp32 loss. Autocast is disabled inside; needs n >= 2."""
        if x.ndim != 2:
            raise ValueError(f"x must be 2-D (n, D), got shape {tuple(x.shape)}")
        if x.shape[0] < 2:
            raise ValueError(f"x must hold at least 2 vectors to have a nearest neighbour, got n={x.shape[0]}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            xn = F.normalize(x.float(), p=2, dim=-1, eps=1e-8)  # (n, D)
            with torch.no_grad():
                dots = xn @ xn.t()  # (n, n): max dot product = min distance on the sphere
                dots.fill_diagonal_(float("-inf"))
                nn_idx = dots.argmax(dim=1)  # (n,)
            dist = F.pairwise_distance(xn, xn[nn_idx], p=2, eps=1e-8)  # (n,), ‖a - b + eps‖₂ like nn.PairwiseDistance
            return -torch.log(dist + eps).mean()
