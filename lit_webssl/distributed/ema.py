"""The EMA teacher update on each rank's local shards, accumulated in fp32 (:class:`ShardedEMA`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lit_webssl.distributed.tensors import (
    fp32_source,
    full_shape,
    is_dtensor,
    is_partitioned,
    local_shard,
    param_pairs,
    partition_of,
)
from lit_webssl.errors import ConfigError

FP32_MASTERS = "fp32_masters"
"""Checkpoint key of the rank-local fp32 masters of parameters stored in lower precision (:class:`ShardedEMA`)."""


def _fp32_on(tensor: Tensor, device: torch.device) -> Tensor:
    return tensor.detach().to(device=device, dtype=torch.float32)


def _persistent_whole(param: Tensor) -> bool:
    """A ZeRO-3 parameter that DeepSpeed keeps whole on every rank besides its partition (below
    ``stage3_param_persistence_threshold``): forward reads the whole copy."""
    return is_partitioned(param) and param.data.numel() == param.ds_numel


def _refresh_persistent(params: list[Tensor]) -> None:
    """Rebuild the whole copies of persistent ZeRO-3 parameters from their (updated) partitions (a collective:
    every rank calls it with the same parameters), as DeepSpeed does for the ones its optimizer steps."""
    if params:
        params[0].partition(param_list=params)
        params[0].all_gather(param_list=params)


class ShardedEMA:
    """``target <- m * target + (1 - m) * source`` on each rank's local shards, accumulated in fp32.

    Works on whatever a rank holds (whole tensors, FSDP2 DTensor shards, ZeRO-3 partitions), never reads an empty
    placeholder, and needs no communication except under ZeRO-3 with a low-precision target (below).

    The source is read at full precision (:func:`fp32_source`). A target stored in fp32 receives the update in
    place. A target stored in lower precision (DeepSpeed in bf16 stores every parameter in bf16, the frozen EMA
    teacher's included) gets an fp32 master of its local shards, kept here (:attr:`masters`): the update accumulates
    there and the target receives its rounding. Without it an update of ``(1 - m) * (s - t)`` below bf16's relative
    step of 2**-8 (most of them, at ``m`` = 0.994..1) would be lost and the teacher would stop following the student.
    The masters are rank-local state: they go into every rank's checkpoint (:meth:`state_dict`), and
    :func:`assemble_masters` rebuilds whole fp32 tensors from the ranks' states. Masters are keyed by the target's
    parameter names with the ``prefix`` given to :meth:`update` (``teacher.backbone.``).
    """

    def __init__(self) -> None:
        self.masters: dict[str, Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.partitioned = False

    @staticmethod
    def needs_master(param: Tensor) -> bool:
        return local_shard(param).dtype != torch.float32 and param.is_floating_point()

    def _set_master(self, name: str, param: Tensor, value: Tensor) -> Tensor:
        """Make ``value`` (fp32, aligned with ``param``'s local shard) the master of ``param``."""
        self.masters[name], self.shapes[name] = value, full_shape(param)
        self.partitioned = self.partitioned or is_partitioned(param)
        return value

    def _master(self, name: str, param: Tensor) -> Tensor:
        master = self.masters.get(name)
        if master is None:  # first update: the target's current values (the student's init, or a loaded teacher)
            if is_dtensor(param):
                raise ConfigError(
                    "an EMA target stored below fp32 under FSDP2 (--trainer.precision bf16-true?): use "
                    "bf16-mixed, whose sharded parameters stay fp32"
                )
            master = self._set_master(name, param, local_shard(param).detach().float().clone())
        elif master.device != local_shard(param).device:  # restored from a checkpoint, on the CPU
            master = self.masters[name] = master.to(local_shard(param).device)
        return master

    @torch.no_grad()
    def update(self, target: nn.Module, source: nn.Module, momentum: float, prefix: str = "") -> None:
        """One EMA step of ``target`` towards ``source`` (modules of the same structure, sharded alike)."""
        accumulators, sources, rounded, persistent = [], [], [], []
        for name, t, s in param_pairs(target, source, named=True):
            local, src = local_shard(t), fp32_source(s)
            if not local.numel():  # a rank holding no part of a small tensor
                continue
            if local.shape != src.shape:
                raise RuntimeError(
                    f"EMA: local shards of {prefix}{name} differ in shape ({tuple(local.shape)} vs "
                    f"{tuple(src.shape)}); teacher and student must be sharded alike"
                )
            if self.needs_master(t):
                master = self._master(prefix + name, t)
                accumulators.append(master)
                rounded.append((local, master))
                if _persistent_whole(t):
                    persistent.append(t)
            else:
                accumulators.append(local)
                if _persistent_whole(t):  # fp32 whole copies: updated in place like the partitions, no collective
                    if not _persistent_whole(s):
                        raise RuntimeError(
                            f"EMA: {prefix}{name} is a persistent ZeRO-3 parameter paired with a partitioned one"
                        )
                    accumulators.append(t.data)
                    sources.append(_fp32_on(src, local.device))
                    src = s.data
            # DeepSpeed hands its fp32 masters over on the accelerator, also when they (and, with parameter offload,
            # the teacher's partitions and masters) live on the host
            sources.append(_fp32_on(src, local.device))
        if accumulators:
            torch._foreach_lerp_(accumulators, sources, 1.0 - momentum)
        for local, master in rounded:
            local.copy_(master)
        _refresh_persistent(persistent)

    @torch.no_grad()
    def load_whole(self, target: nn.Module, state: Mapping[str, Tensor], prefix: str = "") -> None:
        """Set the masters of ``target``'s low-precision parameters from whole fp32 tensors (``--model.init_from``:
        the file's values, before the bf16 target rounded them). Keys missing from ``state`` are left alone."""
        for name, param in target.named_parameters():
            if self.needs_master(param) and prefix + name in state:
                self._set_master(prefix + name, param, partition_of(param, state[prefix + name].float()))

    def state_dict(self, prefix: str = "") -> dict[str, Any]:
        """This rank's masters (empty where none is needed), keyed ``prefix + name``, with what
        :func:`assemble_masters` needs to rebuild whole tensors."""
        if not self.masters:
            return {}
        import torch.distributed as dist

        distributed = self.partitioned and dist.is_available() and dist.is_initialized()
        return {
            "layout": "zero3" if self.partitioned else "whole",
            "rank": dist.get_rank() if distributed else 0,
            "world_size": dist.get_world_size() if distributed else 1,
            "shapes": {prefix + k: v for k, v in self.shapes.items()},
            "masters": {prefix + k: v.detach().cpu().clone() for k, v in self.masters.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any], prefix: str = "") -> None:
        """Restore this rank's masters from :meth:`state_dict` (a resumed run; an empty ``state`` drops them, so they
        start again from the restored target's values). Raises ``ConfigError`` if the
        checkpoint was written by another number of ranks (ZeRO-3 partitions depend on it)."""
        if not state:  # a checkpoint without masters (an fp32 target): start them from the restored target
            self.masters, self.shapes, self.partitioned = {}, {}, False
            return
        if state["layout"] == "zero3":
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_initialized() else 1
            if state["world_size"] != world:
                raise ConfigError(
                    f"--ckpt_path: the EMA teacher's fp32 partitions were saved by {state['world_size']}"
                    f" ranks, this run has {world}; resume with as many ranks, or start from "
                    "`checkpoint convert`'s file with --model.init_from"
                )
        self.masters = {k[len(prefix) :]: v for k, v in state["masters"].items() if k.startswith(prefix)}
        self.shapes = {k[len(prefix) :]: tuple(v) for k, v in state["shapes"].items() if k.startswith(prefix)}
        self.partitioned = state["layout"] == "zero3"


def assemble_masters(states: Iterable[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Whole fp32 tensors from the :meth:`ShardedEMA.state_dict` of every rank (one rank's for ``whole`` layout):
    ZeRO-3 partitions are concatenated in rank order, the padding cut and the shape restored."""
    states = [s for s in states if s]
    if not states:
        return {}
    if states[0]["layout"] == "whole":
        return {k: v.float() for k, v in states[0]["masters"].items()}
    world = states[0]["world_size"]
    by_rank = {s["rank"]: s for s in states}
    if sorted(by_rank) != list(range(world)):
        raise ConfigError(
            f"the EMA teacher's fp32 partitions of ranks {sorted(set(range(world)) - set(by_rank))} "
            f"are missing (a checkpoint of {world} ranks)"
        )
    whole = {}
    for name, shape in states[0]["shapes"].items():
        flat = torch.cat([by_rank[r]["masters"][name].reshape(-1) for r in range(world)])
        whole[name] = flat[: math.prod(shape)].view(shape).float()
    return whole
