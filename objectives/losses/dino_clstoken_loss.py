"""DINO CLS-token loss: cross-entropy from teacher targets (Sinkhorn-Knopp or centering) to the student's softmax.

Reference: Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision" (2023);
facebookresearch/dinov2 ``dinov2/loss/dino_clstoken_loss.py``. Spec: docs/recipe.md section 3 ("DINO CLS loss").

Shapes: B samples (CLS tokens) on this rank, B_g = B summed over ranks, K prototypes (head output dim).
All teacher statistics (Sinkhorn-Knopp sums, center) are computed in fp32, without gradients, and reduced exactly over
the default process group when ``torch.distributed`` is initialized.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_webssl.objectives.losses.distributed import all_reduce_max_, all_reduce_sum_


def _check_temp(teacher_temp: float) -> None:
    if not teacher_temp > 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")


def _check_2d(name: str, t: Tensor) -> None:
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, K), got shape {tuple(t.shape)}")


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_rows: Tensor | int, n_iterations: int = 3) -> Tensor:
    """Distributed Sinkhorn-Knopp teacher targets, as in DINOv2 (shared by the DINO and iBOT losses).

    ``Q = exp(t / teacher_temp)ᵀ`` (K, B); divide Q by its global sum; then ``n_iterations`` times: divide each row by
    its all-reduced sum and by K, divide each column by its (local) sum and by B_g; finally multiply by B_g and return
    Qᵀ, whose rows sum to 1.

    Deviation from DINOv2 (numerics only): the logits are shifted by their global (all-reduced) maximum before the
    exponential. A global constant factor on Q is removed exactly by the first normalization, so the result is the same
    up to rounding, but ``exp`` can no longer overflow (DINOv2 returns NaN once ``max t / teacher_temp > ~88``).

    Args:
        teacher_logits: ``(B, K)`` teacher head outputs on this rank (any float dtype; computed in fp32).
        teacher_temp: Sharpening temperature (> 0).
        n_rows: Number of rows on this rank (must equal ``B``); summed over ranks to give B_g.
        n_iterations: Number of row/column normalization rounds (>= 1).

    Returns:
        ``(B, K)`` fp32 targets, each row a probability distribution.
    """
    _check_2d("teacher_logits", teacher_logits)
    _check_temp(teacher_temp)
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    x = teacher_logits.float() / teacher_temp  # (B, K)
    device = x.device
    if x.numel() > 0:
        shift = x.detach().amax().reshape(1)
    else:
        shift = torch.full((1,), float("-inf"), device=device)
    all_reduce_max_(shift)
    q = torch.exp(x - shift).t()  # (K, B)
    k = q.shape[0]
    count = torch.as_tensor(n_rows, dtype=torch.float32, device=device).reshape(1)
    stats = all_reduce_sum_(torch.cat([q.sum().reshape(1), count]))  # [global sum of Q, B_g]
    total, b = stats[0], stats[1]
    q = q / total
    for _ in range(n_iterations):
        rows = all_reduce_sum_(q.sum(dim=1, keepdim=True))  # (K, 1): mass per prototype, over all ranks
        q /= rows
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # (1, B): mass per sample, local
        q /= b
    q *= b
    return q.t().contiguous()


@torch.no_grad()
def ema_center_update_(center: Tensor, teacher_logits: Tensor, momentum: float) -> None:
    """``center <- momentum * center + (1 - momentum) * mean`` in place, the mean over all rows of all ranks.

    ``teacher_logits`` is ``(..., K)``; every leading index is a row. The sum and the row count are all-reduced
    together, so the mean is exact even when ranks hold different numbers of rows. If no rank has any row the center
    is unchanged.
    """
    k = center.shape[-1]
    if teacher_logits.shape[-1] != k:
        raise ValueError(f"teacher_logits last dim must be {k} (the center's), got shape {tuple(teacher_logits.shape)}")
    rows = teacher_logits.detach().reshape(-1, k).float()
    count = torch.full((1,), float(rows.shape[0]), device=rows.device)
    stats = all_reduce_sum_(torch.cat([rows.sum(dim=0), count]))  # (K + 1,)
    total, n = stats[:k], stats[k]
    mean = (total / n.clamp_min(1.0)).reshape(center.shape).to(center.dtype)
    updated = center * momentum + mean * (1.0 - momentum)
    center.copy_(torch.where(n > 0, updated, center))


class CenteredTeacherLoss(nn.Module):
    """What the DINO and iBOT losses share: the student temperature and the teacher's EMA center.

    Buffers:
        center: ``(1, K)`` fp32, zeros at init; persistent (saved in checkpoints).

    Args:
        dim: Number of prototypes K.
        student_temp: Student softmax temperature (0.1 in DINOv2).
        center_momentum: EMA momentum of the center used by :meth:`softmax_center_teacher`.
        dim_name: Name of ``dim`` in the subclass's signature, for error messages.
    """

    center: Tensor

    def __init__(self, dim: int, student_temp: float, center_momentum: float, dim_name: str) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"{dim_name} must be >= 1, got {dim}")
        if not student_temp > 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, dim), persistent=True)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """``softmax((t - center) / teacher_temp)`` over K, in fp32: ``(..., K)`` -> ``(..., K)``."""
        _check_temp(teacher_temp)
        return F.softmax((teacher_logits.float() - self.center.float()) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """``center <- m * center + (1 - m) * mean(teacher_logits)``, the exact mean over all rows of all ranks.

        ``teacher_logits`` is ``(..., K)``, every leading index a row (a CLS output or a masked token).
        """
        ema_center_update_(self.center, teacher_logits, self.center_momentum)


class DINOLoss(CenteredTeacherLoss):
    """DINO loss on CLS-token head outputs (DINOv2 ``DINOLoss``), with exact distributed teacher statistics.

    Shapes: B rows per view on this rank, K = ``out_dim`` prototypes.

    Args:
        out_dim: Number of prototypes K.
        student_temp: Student softmax temperature (0.1 in DINOv2).
        center_momentum: EMA momentum of the center used by :meth:`softmax_center_teacher`.

    Buffers:
        center: ``(1, K)`` fp32, zeros at init; persistent (saved in checkpoints).

    Unlike DINOv2, :meth:`update_center` is synchronous and applied immediately (DINOv2 launches an async all-reduce and
    applies it lazily at the next :meth:`softmax_center_teacher`); the sequence of centers is the same.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__(out_dim, student_temp, center_momentum, dim_name="out_dim")
        self.out_dim = out_dim

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Sinkhorn-Knopp targets ``(B, K)`` -> ``(B, K)`` fp32 (rows sum to 1); B_g = all-reduced B.

        See :func:`sinkhorn_knopp` (same algorithm as DINOv2, with an overflow-proof global max shift).
        """
        _check_2d("teacher_logits", teacher_logits)
        return sinkhorn_knopp(teacher_logits, teacher_temp, teacher_logits.shape[0], n_iterations)

    def forward(self, student_logits: Sequence[Tensor], teacher_probs: Sequence[Tensor]) -> Tensor:
        """Sum over all (student, teacher) pairs of the batch-mean cross-entropy ``-Σ_k p_k log_softmax(s / τ_s)_k``.

        Pairs every element of ``student_logits`` with every element of ``teacher_probs``, like DINOv2's
        ``DINOLoss.forward`` (callers build the crop pairing by choosing the lists). Computed in fp32.

        Args:
            student_logits: Sequence of ``(B, K)`` student head outputs.
            teacher_probs: Sequence of ``(B, K)`` teacher targets (from SK or centering), no gradient needed.

        Returns:
            Scalar fp32 loss.
        """
        if isinstance(student_logits, Tensor) or isinstance(teacher_probs, Tensor):
            raise ValueError("student_logits and teacher_probs must be sequences of tensors (wrap a tensor in a list)")
        if len(student_logits) == 0:
            raise ValueError("student_logits must not be empty")
        if len(teacher_probs) == 0:
            raise ValueError("teacher_probs must not be empty")
        shape = teacher_probs[0].shape
        for i, t in enumerate(teacher_probs):
            if t.shape != shape or t.ndim < 1 or t.shape[-1] != self.out_dim:
                raise ValueError(
                    f"teacher_probs[{i}] has shape {tuple(t.shape)}; expected {tuple(shape)} with K={self.out_dim}"
                )
        for i, s in enumerate(student_logits):
            if s.shape != shape:
                raise ValueError(f"student_logits[{i}] has shape {tuple(s.shape)}, teacher_probs have {tuple(shape)}")
        # Σ_s Σ_t mean(-Σ_k t·lsm(s)) = Σ_s mean(-Σ_k (Σ_t t)·lsm(s)): one product per student instead of one per pair.
        teacher_sum = teacher_probs[0].float()
        for t in teacher_probs[1:]:
            teacher_sum = teacher_sum + t.float()
        total = torch.zeros((), dtype=torch.float32, device=teacher_sum.device)
        for s in student_logits:
            lsm = F.log_softmax(s.float() / self.student_temp, dim=-1)
            total = total - (teacher_sum * lsm).sum(dim=-1).mean()
        return total
