"""NT-Xent, the normalized temperature-scaled cross-entropy of SimCLR (Chen et al., ICML 2020, eq. 1).

Shapes: B images per batch, P projection width; the 2B embeddings are the first views then the second views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_webssl.errors import ConfigError


class NTXentLoss(nn.Module):
    """NT-Xent over the two views of each image; the other 2B - 2 embeddings of the batch are the negatives.

    For embedding ``i`` with positive ``j`` (the other view of the same image), with cosine similarity ``s``::

        l(i, j) = -log( exp(s(i, j) / t) / sum_{k != i} exp(s(i, k) / t) )

    and the loss is the mean of ``l`` over all 2B embeddings (both directions of every pair). Negatives come from
    the local batch only (per device): a multi-device run sees fewer negatives than its global batch.

    Args:
        temperature: Softmax temperature ``t`` (> 0).
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"--model.objective.init_args.temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def logits_and_targets(self, z_a: Tensor, z_b: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled cosine logits ``(2B, 2B)`` (``-inf`` on the diagonal) and each row's positive column ``(2B,)``."""
        if z_a.shape != z_b.shape or z_a.ndim != 2:
            raise ValueError(
                f"expected two (B, P) embeddings of the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
            )
        b = z_a.shape[0]
        z = F.normalize(torch.cat([z_a, z_b]).float(), dim=-1)  # 2B P
        logits = z @ z.T / self.temperature  # 2B 2B
        self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        idx = torch.arange(b, device=z.device)
        return logits, torch.cat([idx + b, idx])

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """Mean NT-Xent of the ``(B, P)`` projections of the first (``z_a``) and second (``z_b``) views."""
        logits, targets = self.logits_and_targets(z_a, z_b)
        return F.cross_entropy(logits, targets)
