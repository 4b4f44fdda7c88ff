"""The EMA teacher update on each rank's local shards, accumulated in fp32 (:class:`ShardedEMA`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lit_webssl.compat.torch import foreach_lerp_
from lit_webssl.distributed.tensors import (
    copy_local_shards,
    copy_module,
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
    if params:
        from lit_webssl.compat.deepspeed import refresh_persistent

        refresh_persistent(params)


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
            foreach_lerp_(accumulators, sources, 1.0 - momentum)
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


class EMATeacher(nn.ModuleDict):
    """Frozen copies of student modules that follow them as an exponential moving average (DINO's teacher).

    The one call an objective makes: build it from the student's parts (``EMATeacher({"backbone": backbone,
    "dino_head": head})``), register it as a sub-module, then :meth:`follow` after every optimizer step. It works
    unchanged under every strategy: the copies are built alike (a deep copy, or under ZeRO-3 a twin built from the
    module's ``init_kwargs``; :func:`~lit_webssl.distributed.tensors.copy_module`), never trained, always in eval
    mode, and moved on each rank's local shards in fp32 (:class:`ShardedEMA`, whose rank-local fp32 masters of a
    teacher stored below fp32 the trainer saves with every checkpoint: :func:`save_masters`).

    Args:
        students: The modules to follow, by name (the copies take the same names: ``teacher.backbone.*``).
    """

    def __init__(self, students: Mapping[str, nn.Module]) -> None:
        super().__init__({name: copy_module(module) for name, module in students.items()})
        self.requires_grad_(False)
        self.eval()
        self.ema = ShardedEMA()
        if any(is_partitioned(p) for p in self.parameters()):  # a twin, built afresh: give it the student's weights
            self.sync(students)

    def train(self, mode: bool = True) -> EMATeacher:
        """Always eval mode (no drop path, no dropout), whatever the parent asks."""
        return super().train(False)

    @torch.no_grad()
    def sync(self, students: Mapping[str, nn.Module]) -> None:
        """Teacher <- student, exactly, on each rank's local shards (after an init on the shards)."""
        for name, student in students.items():
            copy_local_shards(param_pairs(self[name], student))

    @torch.no_grad()
    def follow(self, students: Mapping[str, nn.Module], momentum: float) -> None:
        """``teacher <- m * teacher + (1 - m) * student`` over every part, accumulated in fp32 (the EMA step)."""
        for name, student in students.items():
            self.ema.update(self[name], student, momentum, prefix=f"{name}.")

    @property
    def masters(self) -> dict[str, Tensor]:
        """The rank-local fp32 masters of the copies stored below fp32, keyed by parameter name (``backbone.x``)."""
        return self.ema.masters

    def load_whole(self, state: Mapping[str, Tensor]) -> None:
        """Set the fp32 masters from whole fp32 tensors keyed like this module's parameters (the values a bf16 copy
        rounded when it was loaded)."""
        for name, module in self.items():
            self.ema.load_whole(module, state, prefix=f"{name}.")


def ema_teachers(root: nn.Module) -> list[tuple[str, EMATeacher]]:
    """Every :class:`EMATeacher` under ``root``, with its name prefix (``objective.teacher.``)."""
    return [(f"{name}." if name else "", m) for name, m in root.named_modules() if isinstance(m, EMATeacher)]


def save_masters(root: nn.Module) -> dict[str, Any]:
    """The rank-local fp32 masters of every EMA teacher under ``root`` as one :meth:`ShardedEMA.state_dict` (keys
    relative to ``root``); empty when no teacher needs masters."""
    out: dict[str, Any] = {}
    for prefix, teacher in ema_teachers(root):
        state = teacher.ema.state_dict(prefix=prefix)
        if state and out:
            out["shapes"].update(state["shapes"])
            out["masters"].update(state["masters"])
        elif state:
            out = state
    return out


def load_masters(root: nn.Module, state: Mapping[str, Any]) -> None:
    """Restore what :func:`save_masters` saved (an empty ``state`` drops the masters: they start again from the
    restored teachers)."""
    for prefix, teacher in ema_teachers(root):
        teacher.ema.load_state_dict(state, prefix=prefix)


def load_whole_masters(root: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Set every EMA teacher's fp32 masters from whole fp32 tensors keyed relative to ``root``."""
    for prefix, teacher in ema_teachers(root):
        teacher.load_whole({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


def master_of(root: nn.Module, name: str) -> Tensor | None:
    """The rank-local fp32 master of parameter ``name`` (relative to ``root``) of an EMA teacher, if it has one."""
    for prefix, teacher in ema_teachers(root):
        if name.startswith(prefix):
            return teacher.masters.get(name[len(prefix) :])
    return None
