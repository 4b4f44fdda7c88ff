"""iBOT masked-patch loss: cross-entropy from teacher patch targets to the student's masked patch predictions.

Reference: Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (2022) and DINOv2;
facebookresearch/dinov2 ``dinov2/loss/ibot_patch_loss.py``. Spec: docs/recipe.md section 3 ("iBOT patch loss").

Shapes: n_images global-crop images on this rank, N patches per image, M masked tokens on this rank (image-major, in
``masks.flatten()`` order), M_g = M summed over ranks, K prototypes (iBOT head output dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_webssl.objectives.losses.dino_clstoken_loss import CenteredTeacherLoss, _check_2d, sinkhorn_knopp


class iBOTPatchLoss(CenteredTeacherLoss):  # lowercase i: DINOv2's name
    """iBOT patch loss on masked tokens (DINOv2 ``iBOTPatchLoss``), with exact distributed teacher statistics.

    Args:
        patch_out_dim: Number of prototypes K of the iBOT head.
        student_temp: Student softmax temperature (0.1 in DINOv2).
        center_momentum: EMA momentum of the center used by :meth:`softmax_center_teacher`.

    Buffers:
        center: ``(1, K)`` fp32, zeros at init; persistent. DINOv2 uses ``(1, 1, K)`` for ``(n_images, N, K)`` inputs;
            here the teacher inputs are ``(M, K)`` masked tokens, and ``(1, K)`` broadcasts against those without adding
            a dimension (it also broadcasts against ``(..., K)``). Load a DINOv2 center with ``center.reshape(1, -1)``.

    Unlike DINOv2, :meth:`update_center` uses the exact global mean over masked tokens (DINOv2 averages the per-rank
    means, which differs when ranks hold different numbers of masked tokens) and is applied immediately.
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__(patch_out_dim, student_temp, center_momentum, dim_name="patch_out_dim")
        self.patch_out_dim = patch_out_dim

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: Tensor, teacher_temp: float, n_masked_patches: Tensor | int, n_iterations: int = 3
    ) -> Tensor:
        """Sinkhorn-Knopp targets ``(M, K)`` -> ``(M, K)`` fp32 (rows sum to 1), with B = M_g.

        Args:
            teacher_logits: ``(M, K)`` teacher iBOT-head outputs at this rank's masked positions.
            teacher_temp: Sharpening temperature (> 0).
            n_masked_patches: This rank's masked-token count M (int or one-element tensor, on any device); it must equal
                ``teacher_logits.shape[0]`` (checked for ints; tensors are not read back, to avoid a device sync).
                It is all-reduced (on a copy; the argument is not modified, unlike DINOv2) to give M_g.
            n_iterations: Row/column normalization rounds (>= 1).

        See :func:`lit_webssl.objectives.losses.dino_clstoken_loss.sinkhorn_knopp`.
        """
        _check_2d("teacher_logits", teacher_logits)
        if isinstance(n_masked_patches, Tensor):
            if n_masked_patches.numel() != 1:
                raise ValueError(f"n_masked_patches must have one element, got shape {tuple(n_masked_patches.shape)}")
        elif int(n_masked_patches) != teacher_logits.shape[0]:
            raise ValueError(
                f"n_masked_patches ({n_masked_patches}) must equal teacher_logits.shape[0] ({teacher_logits.shape[0]})"
            )
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_masked_patches, n_iterations)

    def forward_masked(
        self,
        student_patch_logits: Tensor,
        teacher_probs: Tensor,
        masks: Tensor,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """Per-image-weighted cross-entropy over masked tokens, divided by the number of images.

        ``loss = (1 / n_images) Σ_i w_i · (-Σ_k p_ik log_softmax(s_i / τ_s)_k)`` with ``w_i = 1 / (masked tokens of the
        image of token i)``, so every masked image weighs the same whatever its mask ratio, and images without a mask
        still count in ``n_images = masks.shape[0]``. This equals DINOv2's ``forward_masked`` (which returns the same
        value) multiplied by ``loss_scales = 2`` and ``ibot_loss_scale = 1 / 2`` in ``ssl_meta_arch.py``: net scale 1.

        Args:
            student_patch_logits: ``(M, K)`` student iBOT-head outputs at the masked positions.
            teacher_probs: ``(M, K)`` teacher targets for the same tokens (SK or centering).
            masks: ``(n_images, N)`` bool, True where a patch is masked; the M tokens follow ``masks.flatten()`` order.
            masks_weight: Optional ``(M,)`` per-token weights; default ``1 / masks.sum(-1)`` of each token's image.

        Returns:
            Scalar fp32 loss.
        """
        _check_2d("student_patch_logits", student_patch_logits)
        if teacher_probs.shape != student_patch_logits.shape:
            raise ValueError(
                f"teacher_probs shape {tuple(teacher_probs.shape)} != student_patch_logits shape "
                f"{tuple(student_patch_logits.shape)}"
            )
        if masks.ndim != 2 or masks.dtype != torch.bool:
            raise ValueError(f"masks must be a 2-D bool tensor (n_images, N), got {masks.dtype} {tuple(masks.shape)}")
        if masks.shape[0] == 0:
            raise ValueError("masks must have at least one image (masks.shape[0] == 0)")
        m = student_patch_logits.shape[0]
        if masks_weight is None:
            per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()  # (n_images,)
            masks_weight = per_image.unsqueeze(-1).expand_as(masks)[masks]  # (M,)
            if masks_weight.shape[0] != m:
                raise ValueError(
                    f"masks has {masks_weight.shape[0]} masked tokens but student_patch_logits has {m} rows"
                )
        elif masks_weight.shape != (m,):
            raise ValueError(f"masks_weight must have shape ({m},), got {tuple(masks_weight.shape)}")
        lsm = F.log_softmax(student_patch_logits.float() / self.student_temp, dim=-1)
        ce = -(teacher_probs.float() * lsm).sum(dim=-1)  # (M,)
        return (ce * masks_weight.to(device=ce.device, dtype=torch.float32)).sum() / masks.shape[0]
