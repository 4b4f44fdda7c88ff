"""Tiny ``torch.distributed`` helpers shared by the DINOv2 losses (teacher statistics only, never gradients).

Every helper is a no-op (or returns the single-process answer) when no default process group is initialized, so the
losses run unchanged in a single process, under Lightning's DDP/FSDP strategies, or under DeepSpeed.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_dist() -> bool:
    """True when ``torch.distributed`` is available and the default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_dist() else 1


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
