"""CLIP's symmetric InfoNCE over image-text pairs, with MetaCLIP's local loss over features gathered from all ranks.

Reference: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (2021); the
``ClipLoss`` of mlfoundations/open_clip ``src/open_clip/loss.py`` that MetaCLIP trains with (``local_loss=True``,
``gather_with_grad=True``). Spec: docs/recipe.md section 5.

Shapes: b pairs on this rank, n = sum of every rank's b (the global batch), E embedding width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_webssl.objectives.losses.distributed import all_gather_with_grad


class CLIPLoss(nn.Module):
    """``(CE(s·I·T_allᵀ, y) + CE(s·T·I_allᵀ, y)) / 2`` on L2-normalized features, in fp32.

    Each rank scores its own b images against the n texts of all ranks (and its b texts against the n images), the
    gathered features keeping their gradients; the label of local pair i is its row in the gathered batch,
    ``offset + i``. Averaging the per-rank losses and gradients over ranks (DDP) gives the loss and gradient of one
    process holding the whole batch, at ``b x n`` instead of ``n x n`` logits per rank. In a single process this is the
    plain CLIP loss over the batch.
    """

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
        """Loss of b matching pairs.

        Args:
            image_features: ``(b, E)`` image embeddings (normalized here; any float dtype).
            text_features: ``(b, E)`` text embeddings of the same pairs, in the same order.
            logit_scale: The multiplier s of the cosine similarities (``exp`` of the learnable log scale), a scalar.

        Returns:
            Scalar fp32 loss (autocast is disabled inside).
        """
        if image_features.ndim != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                f"image and text features must both be (b, E), got {tuple(image_features.shape)} "
                f"and {tuple(text_features.shape)}"
            )
        b, dim = image_features.shape
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            image = F.normalize(image_features.float(), dim=-1)  # b E
            text = F.normalize(text_features.float(), dim=-1)  # b E
            gathered, offset = all_gather_with_grad(torch.cat([image, text], dim=1))  # n 2E: one collective
            all_image, all_text = gathered[:, :dim], gathered[:, dim:]  # n E each
            scale = torch.as_tensor(logit_scale, device=image.device).float()
            logits_per_image = scale * image @ all_text.t()  # b n
            logits_per_text = scale * text @ all_image.t()  # b n
            labels = torch.arange(b, device=image.device) + offset
            return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
