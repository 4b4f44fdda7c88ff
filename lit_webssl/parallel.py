"""Sharding and memory techniques, in one place and one order (CONVENTIONS 9).

Three families of strategy carry the model:

- **replicated** (single device, DDP): every rank holds whole tensors.
- **fsdp2** (Lightning's ``ModelParallelStrategy``, or :class:`lit_webssl.strategies.FSDP2Strategy`): the model is
  built on the meta device, then :func:`apply_fsdp2` shards it per block with ``fully_shard`` (student blocks,
  teacher blocks, heads, then the root), then it is materialized on each rank's own shards and initialized there.
- **deepspeed** (Lightning's ``DeepSpeedStrategy`` at ZeRO stage 3): Lightning builds the model inside
  ``deepspeed.zero.Init``, which partitions each submodule's parameters as soon as its ``__init__`` returns. Code
  that initializes a child after that point must gather it first (:func:`gathered`), and a partitioned module
  cannot be deep-copied (its parameters are empty placeholders): :func:`copy_module` builds a fresh twin instead.

In every family a 7B model is never whole on one rank: at most one submodule's own parameters are gathered at a time
(ZeRO-3 init), and FSDP2 never allocates more than a rank's shards.

The order of application is fixed (as torchtitan's ``parallelize``): activation checkpointing (a backbone flag,
set before building), then the sharding wrap, then materialization and init, then the teacher sync.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

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


def init_module_tree(root: nn.Module, init_fn: Callable[[nn.Module], None]) -> None:
    """Apply ``init_fn`` to every submodule of ``root`` in pre-order, each with its own parameters gathered under
    ZeRO-3 (one submodule at a time). Every rank runs ``init_fn``, so random streams stay in step across ranks; rank
    0's values are kept. Under FSDP2, ``init_fn`` runs on the ``DTensor`` shards directly."""
    for module in root.modules():
        with gathered(module):
            init_fn(module)


def reset_parameters_tree(root: nn.Module) -> None:
    """Run every submodule's own ``reset_parameters()`` (PyTorch's constructor init), each gathered under ZeRO-3:
    the first step of initializing a model materialized from the meta device, whose tensors hold garbage."""
    def reset(module: nn.Module) -> None:
        if callable(getattr(module, "reset_parameters", None)) and next(module.parameters(False), None) is not None:
            module.reset_parameters()

    init_module_tree(root, reset)


def copy_module(module: nn.Module, factory: Callable[[], nn.Module] | None) -> nn.Module:
    """A copy of ``module`` with equal weights, built without materializing it whole.

    ``copy.deepcopy`` where the parameters are whole, sharded DTensors or meta tensors; a fresh ``factory()`` twin
    for ZeRO-3 partitioned modules, whose weights the caller then copies with :func:`copy_local_shards` (deepcopy
    would copy the empty placeholders and lose the partitions).
    """
    if not any(is_partitioned(p) for p in module.parameters()):
        return copy.deepcopy(module)
    if factory is None:
        raise RuntimeError(f"cannot copy the ZeRO-3 partitioned {type(module).__name__} without a factory")
    return factory()


def param_pairs(target: nn.Module, source: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """``(target, source)`` parameter pairs of two modules of the same structure, checked by name and shape."""
    tgt, src = dict(target.named_parameters()), dict(source.named_parameters())
    if tgt.keys() != src.keys():
        raise RuntimeError(f"{type(target).__name__} and {type(source).__name__} differ in structure: "
                           f"{sorted(tgt.keys() ^ src.keys())[:5]}")
    for name in tgt:
        if full_shape(tgt[name]) != full_shape(src[name]):
            raise RuntimeError(f"parameter {name}: shapes {full_shape(tgt[name])} and {full_shape(src[name])} differ")
    return [(tgt[name], src[name]) for name in tgt]


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


@torch.no_grad()
def ema_local_shards(pairs: Iterable[tuple[Tensor, Tensor]], momentum: float) -> None:
    """``target <- m * target + (1 - m) * source`` on each rank's local shards, in the target's dtype (the source is
    up-cast first, so an update below bf16 resolution still lands in an fp32 target). Empty shards (a rank that holds
    no part of a small tensor) are skipped: nothing is read from a partitioned-away placeholder."""
    targets, sources = [], []
    for t, s in _local_pairs(pairs):
        if t.numel() and s.numel():
            if t.shape != s.shape:
                raise RuntimeError(f"EMA: local shards differ in shape ({tuple(t.shape)} vs {tuple(s.shape)}); "
                                   "teacher and student must be sharded alike")
            targets.append(t)
            sources.append(s.detach().to(t.dtype))
    if targets:
        torch._foreach_lerp_(targets, sources, 1.0 - momentum)


def apply_fsdp2(blocks: Iterable[nn.Module], roots: Iterable[nn.Module], mesh: Any,
                param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> None:
    """Shard with FSDP2: each of ``blocks`` is its own ``fully_shard`` unit (one all-gather per block), then each of
    ``roots`` (the modules holding the remaining parameters: embeddings, heads, the LightningModule itself).

    Args:
        blocks: Transformer blocks (student and teacher) and other large leaves, in forward order.
        roots: Parents to wrap after their blocks, innermost first.
        mesh: A 1-D device mesh (fully sharded) or 2-D ``(replicate, shard)`` mesh (HSDP).
        param_dtype: Dtype of the all-gathered parameters for compute (``bf16`` for ``bf16-mixed``); the sharded
            parameters, gradients' reduction and optimizer states stay fp32.
        reshard_after_forward: Free the gathered parameters after forward (ZeRO-3 like) instead of keeping them to
            backward (ZeRO-2 like).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if policy is not None:
        kwargs["mp_policy"] = policy
    for block in blocks:
        fully_shard(block, **kwargs)
    for root in roots:
        fully_shard(root, **kwargs)


def fsdp2_mesh(device_mesh: Any) -> Any:
    """The FSDP2 mesh from ``ModelParallelStrategy``'s ``(data_parallel, tensor_parallel)`` mesh: we do no tensor
    parallelism, so the second dimension (ranks of a node by default) is the shard group and the first (nodes) is
    replicated, i.e. HSDP across nodes; a single group shards over every rank."""
    if device_mesh.ndim == 1:
        return device_mesh
    replicate, shard = device_mesh.shape
    if replicate == 1:
        return device_mesh[device_mesh.mesh_dim_names[1]]
    if shard == 1:
        return device_mesh[device_mesh.mesh_dim_names[0]]
    return device_mesh


@torch.no_grad()
def load_full_state_dict(module: nn.Module, state: Mapping[str, Tensor], strict: bool = True,
                         source: str = "state dict") -> list[str]:
    """Load a whole (unsharded) state dict into ``module`` however it is sharded, one tensor at a time.

    Every rank reads ``state`` (e.g. the same file); a DTensor keeps its own shard of each tensor, a ZeRO-3 parameter
    is gathered, overwritten on rank 0 and re-partitioned. Returns the keys of ``module`` missing from ``state``.

    Raises:
        ConfigError: naming ``source``: ``state`` has tensors ``module`` lacks, a tensor of another shape, or (with
            ``strict``) lacks some of ``module``'s.
    """
    own = dict(module.named_parameters())
    own.update({f"{prefix}.{name}" if prefix else name: buf for prefix, sub in module.named_modules()
                for name, buf in sub.named_buffers(recurse=False) if name not in sub._non_persistent_buffers_set})
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if unexpected or (strict and missing):
        raise ConfigError(f"{source}: {len(unexpected)} tensors this model does not have ({', '.join(unexpected[:4])}"
                          f"{' ...' if len(unexpected) > 4 else ''})"
                          + (f" and {len(missing)} it lacks ({', '.join(missing[:4])})" if strict and missing else "")
                          + ": weights of another model or objective?")
    for name, tensor in own.items():
        if name in state and tuple(state[name].shape) != full_shape(tensor):
            raise ConfigError(f"{source}: {name} has shape {tuple(state[name].shape)}, this model's is "
                              f"{full_shape(tensor)}")
    owner = {id(p): m for m in module.modules() for p in m.parameters(recurse=False)}
    for name, tensor in own.items():
        if name not in state:
            continue
        value = state[name]
        if is_partitioned(tensor):
            with gathered(owner[id(tensor)]):
                tensor.data.copy_(value.to(tensor.dtype))
        elif is_dtensor(tensor):  # distribute the value with the same layout, keep the local part
            from torch.distributed.tensor import distribute_tensor

            tensor.to_local().copy_(
                distribute_tensor(value.to(tensor.dtype), tensor.device_mesh, tensor.placements).to_local())
        else:
            tensor.copy_(value.to(tensor.dtype))
    return missing


def init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of an Adam(W) optimizer its zero state (step 0, zero moments) up front.

    A parameter that never gets a gradient (the iBOT mask token when iBOT is off, or under MAE) otherwise has no
    state, and a distributed checkpoint saved without it cannot be loaded: the loading side initializes every
    parameter's state and then looks for all of it in the checkpoint. Zero state is what Adam starts from anyway, so
    the updates are unchanged.
    """
    for group in optimizer.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            if param in optimizer.state and optimizer.state[param]:
                continue
            step = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
            state = {"step": step, "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(param)
            optimizer.state[param] = state
