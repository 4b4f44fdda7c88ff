"""Tiny ``torch.distributed`` helpers shared by the losses: no-grad statistics (DINOv2's teacher sums) and the
gradient-preserving feature gather of the CLIP loss.

Every helper is a no-op (or returns the single-process answer) when no default process group is initialized, so the
losses run unchanged in a single process and under every strategy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def is_dist() -> bool:
    """True when ``torch.distributed`` is available and the default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """Global rank of this process in the default group (0 when not distributed)."""
    return dist.get_rank() if is_dist() else 0


def all_gather_with_grad(t: Tensor) -> tuple[Tensor, int]:
    """Concatenate ``t`` ``(n_r, ...)`` of every rank along dim 0, keeping the autograd graph to all of them.

    The backward pass sums the gradients that all ranks' losses send to each rank's rows
    (``torch.distributed.nn.functional.all_gather``), so a per-rank loss over the gathered rows, averaged over ranks by
    DDP, has the gradient of the loss over the whole global batch. Ranks may hold different ``n_r`` (e.g. a last
    partial validation batch): rows are padded to the largest ``n_r`` for the collective and the padding is dropped.

    Returns:
        The gathered ``(sum_r n_r, ...)`` tensor (``t`` itself when not distributed) and the row offset of this rank's
        rows in it.
    """
    if not is_dist():
        return t, 0
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.long, device=t.device))
    counts = [int(s) for s in torch.cat(sizes).tolist()]
    pad = max(counts) - t.shape[0]
    padded = torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t
    parts = dist_fn.all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)]), sum(counts[: rank()])


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks of the default group, in place; returns ``t`` (unchanged when not distributed).

    Not differentiable: use it only on no-grad statistics (teacher sums, counts).
    """
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max_(t: Tensor) -> Tensor:
    """Element-wise maximum of ``t`` over all ranks of the default group, in place; returns ``t``."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
