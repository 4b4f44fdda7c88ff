"""What a rank holds of a parameter, however the strategy shards it: whole tensors, FSDP2 ``DTensor`` shards
or ZeRO-3 partitions; gathering, copying and loading whole values into them."""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_webssl.compat.torch import persistent_buffers
from lit_webssl.errors import ConfigError

Family = Literal["replicated", "fsdp2", "deepspeed"]


def strategy_family(strategy: Any) -> Family:
    """Which family ``strategy`` (a Lightning strategy, or ``None``) belongs to."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        return "deepspeed"
    return "replicated"


def is_partitioned(param: Tensor) -> bool:
    """A ZeRO-3 parameter (its ``data`` is an empty placeholder; the local partition is ``ds_tensor``)."""
    return hasattr(param, "ds_id")


def is_dtensor(param: Tensor) -> bool:
    """An FSDP2 parameter: a ``DTensor`` whose rank-local part is ``to_local()``."""
    return hasattr(param, "device_mesh") and hasattr(param, "to_local")


def is_sharded(param: Tensor) -> bool:
    """Split across ranks by ZeRO-3 or FSDP2: its shape cannot change in place, nor can it be read whole locally."""
    return is_partitioned(param) or is_dtensor(param)


def local_shard(param: Tensor) -> Tensor:
    """The part of ``param`` this rank stores: the ZeRO-3 partition (flat, padded on the last rank), the FSDP2
    ``DTensor``'s local shard, or the tensor itself. Two parameters of the same shape sharded by the same strategy
    have aligned local shards, so element-wise updates (the EMA teacher) run on them without communication."""
    if is_partitioned(param):
        return param.ds_tensor
    if is_dtensor(param):
        return param.to_local()
    return param


@contextlib.contextmanager
def gathered(module: nn.Module, recurse: bool = False) -> Iterator[None]:
    """Make ``module``'s own ZeRO-3 parameters (with ``recurse``, all of its subtree's) whole for the block; changes
    made on rank 0 are scattered back to every rank's partition on exit. A no-op for tensors not partitioned."""
    params = [p for p in module.parameters(recurse=recurse) if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


@contextlib.contextmanager
def outside_zero_init() -> Iterator[None]:
    """Step outside ``deepspeed.zero.Init`` for the block (read a file as stored, build nothing partitioned); a
    no-op when DeepSpeed is not in use (:func:`lit_webssl.compat.deepspeed.outside_zero_init`)."""
    if "deepspeed.runtime.zero.partition_parameters" not in sys.modules:
        yield
        return
    from lit_webssl.compat.deepspeed import outside_zero_init as outside

    with outside():
        yield


def init_module_tree(root: nn.Module, init_fn: Callable[[nn.Module], None]) -> None:
    """Apply ``init_fn`` to every submodule of ``root`` in pre-order, each with its own parameters gathered under
    ZeRO-3 (one submodule at a time). Every rank runs ``init_fn``, so random streams stay in step across ranks; rank
    0's values are kept. Under FSDP2, ``init_fn`` runs on the ``DTensor`` shards directly."""
    for module in root.modules():
        with gathered(module):
            init_fn(module)


def reset_parameters_tree(root: nn.Module) -> None:
    """Run every submodule's own constructor init (``reset_parameters()``, or ``_reset_parameters()`` as
    ``nn.MultiheadAttention`` names it), children before parents as construction does (a parent's init may
    overwrite its children's: attention zeroes its output projection's bias), each gathered under ZeRO-3: the first
    step of initializing a model materialized from the meta device, whose tensors hold garbage."""

    def post_order(module: nn.Module) -> Iterator[nn.Module]:
        for child in module.children():
            yield from post_order(child)
        yield module

    for module in post_order(root):
        reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
        if callable(reset) and next(module.parameters(), None) is not None:
            with gathered(module, recurse=True):
                reset()


def copy_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with equal weights, built without materializing it whole.

    ``copy.deepcopy`` where the parameters are whole, sharded DTensors or meta tensors. A ZeRO-3 partitioned module
    cannot be deep-copied (its parameters are empty placeholders): it is built again from its constructor arguments,
    ``type(module)(**module.init_kwargs)`` (inside ``zero.Init``, so partitioned as it is built), and the caller
    copies the weights with :func:`copy_local_shards`. Modules that may be copied so keep their constructor
    arguments in ``init_kwargs`` (:class:`~lit_webssl.models.vit.VisionTransformer`, DINOv2's heads).
    """
    if not any(is_partitioned(p) for p in module.parameters()):
        return copy.deepcopy(module)
    kwargs = getattr(module, "init_kwargs", None)
    if not isinstance(kwargs, dict):
        raise RuntimeError(f"cannot copy the partitioned {type(module).__name__}: it keeps no init_kwargs")
    return type(module)(**kwargs)


def param_pairs(target: nn.Module, source: nn.Module, named: bool = False) -> list[tuple[Any, ...]]:
    """``(target, source)`` parameter pairs of two modules of the same structure, checked by name and shape
    (``(name, target, source)`` with ``named``)."""
    tgt, src = dict(target.named_parameters()), dict(source.named_parameters())
    if tgt.keys() != src.keys():
        raise RuntimeError(
            f"{type(target).__name__} and {type(source).__name__} differ in structure: "
            f"{sorted(tgt.keys() ^ src.keys())[:5]}"
        )
    for name in tgt:
        if full_shape(tgt[name]) != full_shape(src[name]):
            raise RuntimeError(f"parameter {name}: shapes {full_shape(tgt[name])} and {full_shape(src[name])} differ")
    return [(name, tgt[name], src[name]) if named else (tgt[name], src[name]) for name in tgt]


def full_shape(param: Tensor) -> tuple[int, ...]:
    """The whole tensor's shape, also for a ZeRO-3 partition (whose ``shape`` is its empty placeholder's)."""
    return tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)


def _local_pairs(pairs: Iterable[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """The rank-local tensor pairs behind parameter pairs: the shards, plus, for ZeRO-3 parameters that DeepSpeed
    keeps whole on every rank (small "persistent" ones, below ``stage3_param_persistence_threshold``), the whole
    copies as well: forward reads those, and DeepSpeed refreshes them only for parameters its optimizer steps, so an
    EMA teacher that updated its partition alone would keep computing with its initial weights."""
    for target, source in pairs:
        yield local_shard(target), local_shard(source)
        if is_partitioned(target) and target.data.numel() == target.ds_numel:
            if source.data.numel() != source.ds_numel:
                raise RuntimeError("EMA: a persistent ZeRO-3 teacher parameter paired with a partitioned student one")
            yield target.data, source.data


@torch.no_grad()
def copy_local_shards(pairs: Iterable[tuple[Tensor, Tensor]]) -> None:
    """``target <- source`` for each pair, rank-locally (aligned shards, no communication)."""
    for target, source in _local_pairs(pairs):
        target.copy_(source)


def fp32_source(param: Tensor) -> Tensor:
    """This rank's part of ``param`` at full precision: DeepSpeed's fp32 master partition for a trainable ZeRO-3
    parameter (under bf16 the module holds bf16 copies; the optimizer updates the fp32 masters), else
    :func:`local_shard`. Always aligned with :func:`local_shard`."""
    if is_partitioned(param) and param.requires_grad and _has_fp32_master(param):
        from deepspeed.utils import safe_get_local_fp32_param

        master = safe_get_local_fp32_param(param)
        if master is not None:
            return master.view(param.ds_tensor.shape)
    return local_shard(param)


def _has_fp32_master(param: Tensor) -> bool:
    from lit_webssl.compat.deepspeed import has_fp32_master

    return has_fp32_master(param)


def partition_of(param: Tensor, whole: Tensor) -> Tensor:
    """The part of the whole tensor ``whole`` that :func:`local_shard` of ``param`` holds (a copy, in ``whole``'s
    dtype): ZeRO-3's flat partition (zero padded at the end), the DTensor's local shard, or ``whole`` itself."""
    if tuple(whole.shape) != full_shape(param):
        raise RuntimeError(f"a tensor of shape {tuple(whole.shape)} for a parameter of shape {full_shape(param)}")
    if is_partitioned(param):
        import torch.distributed as dist

        size = param.ds_tensor.ds_numel
        start = dist.get_rank(group=param.ds_process_group) * size
        flat = whole.reshape(-1)[start : start + size]
        part = torch.zeros(size, dtype=whole.dtype, device=param.ds_tensor.device)
        part[: flat.numel()] = flat
        return part.view(param.ds_tensor.shape)
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements).to_local().clone()
    return whole.detach().clone().to(param.device)


@torch.no_grad()
def copy_whole_(param: Tensor, whole: Tensor) -> None:
    """``param <- whole`` (a whole tensor of ``param``'s full shape) however ``param`` is held: a DTensor keeps its
    own shard of it (every rank must call: the value is distributed from rank 0), a plain tensor (or a ZeRO-3
    parameter inside :func:`gathered`) takes all of it."""
    if is_dtensor(param):
        param.to_local().copy_(partition_of(param, whole.to(param.dtype)))
    else:
        param.copy_(whole.to(param.dtype))


def whole_fp32(param: Tensor, local: Tensor | None = None) -> Tensor:
    """The whole value of ZeRO-3 parameter ``param`` in fp32, gathered from every rank's ``local`` part (default:
    :func:`fp32_source`, DeepSpeed's fp32 master for a trainable one). A collective: every rank calls it."""
    import torch.distributed as dist

    local = (fp32_source(param) if local is None else local).detach().reshape(-1).float()
    group = param.ds_process_group
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)[: param.ds_numel].view(full_shape(param)).cpu()


@torch.no_grad()
def load_full_state_dict(
    module: nn.Module, state: Mapping[str, Tensor], strict: bool = True, source: str = "state dict"
) -> list[str]:
    """Load a whole (unsharded) state dict into ``module`` however it is sharded, one tensor at a time.

    Every rank reads ``state`` (e.g. the same file); a DTensor keeps its own shard of each tensor, a ZeRO-3 parameter
    is gathered, overwritten on rank 0 and re-partitioned. Returns the keys of ``module`` missing from ``state``.

    Raises:
        ConfigError: naming ``source``: ``state`` has tensors ``module`` lacks, a tensor of another shape, or (with
            ``strict``) lacks some of ``module``'s.
    """
    own = dict(module.named_parameters())
    own.update(persistent_buffers(module))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if unexpected or (strict and missing):
        raise ConfigError(
            f"{source}: {len(unexpected)} tensors this model does not have ({', '.join(unexpected[:4])}"
            f"{' ...' if len(unexpected) > 4 else ''})"
            + (f" and {len(missing)} it lacks ({', '.join(missing[:4])})" if strict and missing else "")
            + ": weights of another model or objective?"
        )
    for name, tensor in own.items():
        if name in state and tuple(state[name].shape) != full_shape(tensor):
            raise ConfigError(
                f"{source}: {name} has shape {tuple(state[name].shape)}, this model's is {full_shape(tensor)}"
            )
    owner = {id(p): m for m in module.modules() for p in m.parameters(recurse=False)}
    for name, tensor in own.items():
        if name not in state:
            continue
        value = state[name]
        if is_partitioned(tensor):
            with gathered(owner[id(tensor)]):
                tensor.data.copy_(value.to(tensor.dtype))
        else:
            copy_whole_(tensor, value)
    return missing
