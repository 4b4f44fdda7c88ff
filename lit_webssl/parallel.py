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
import math
import sys
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


@contextlib.contextmanager
def outside_zero_init() -> Iterator[None]:
    """Suspend ``deepspeed.zero.Init``'s patches of tensor constructors for the block (a no-op outside one).

    Under ``zero.Init`` every new floating tensor is cast to the run's dtype, ``torch.Tensor.__new__`` included; so
    ``torch.load`` of an fp32 file inside it (``--model.init_from`` in ``configure_model``) would reinterpret fp32
    bytes as bf16 and read garbage. Module construction is not partitioned inside the block either: build nothing.
    """
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    if zero is None or getattr(zero, "top_level_context", None) is None:
        yield
        return
    zero.shutdown_init_context()
    try:
        yield
    finally:
        zero.restore_init_context()


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


FP32_MASTERS = "fp32_masters"
"""Checkpoint key of the rank-local fp32 masters of parameters stored in lower precision (:class:`ShardedEMA`)."""


def fp32_source(param: Tensor) -> Tensor:
    """This rank's part of ``param`` at full precision: DeepSpeed's fp32 master partition for a trainable ZeRO-3
    parameter (under bf16 the module holds bf16 copies; the optimizer updates the fp32 masters), else
    :func:`local_shard`. Always aligned with :func:`local_shard`."""
    if is_partitioned(param) and param.requires_grad and getattr(param, "_z3_optimizer", None) is not None:
        from deepspeed.utils import safe_get_local_fp32_param

        master = safe_get_local_fp32_param(param)
        if master is not None:
            return master.view(param.ds_tensor.shape)
    return local_shard(param)


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


def apply_fsdp2(
    blocks: Iterable[nn.Module],
    roots: Iterable[nn.Module],
    mesh: Any,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    replicate: Iterable[nn.Parameter] = (),
) -> None:
    """Shard with FSDP2: each of ``blocks`` is its own ``fully_shard`` unit (one all-gather per block), then each of
    ``roots`` (the modules holding the remaining parameters: embeddings, heads, the LightningModule itself).

    Parameters in ``replicate`` stay out of the sharding (``fully_shard(..., ignored_params=...)``): plain tensors,
    whole on every rank, which may change shape during the run (the position tables of progressive resolution).
    FSDP2 neither casts nor reduces them: :func:`average_replicated_grads` averages their gradients, and
    :func:`clip_grad_norm_` clips them together with the sharded ones.

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
    ignored = set(replicate)
    if ignored:
        kwargs["ignored_params"] = ignored
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


def replicated_params(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of an FSDP2-sharded ``module`` that FSDP2 does not manage (plain tensors among ``DTensor``
    ones: the ``replicate`` of :func:`apply_fsdp2`); none when nothing in ``module`` is a ``DTensor``."""
    params = list(module.parameters())
    if not any(is_dtensor(p) for p in params):
        return []
    return [p for p in params if not is_dtensor(p)]


@torch.no_grad()
def broadcast_replicated(module: nn.Module) -> None:
    """Give every rank rank 0's values of ``module``'s :func:`replicated_params` (after init or a load, so the
    replicated copies cannot drift apart by a different random stream)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for param in replicated_params(module):
        dist.broadcast(param.data, src=0)


@torch.no_grad()
def average_replicated_grads(module: nn.Module) -> None:
    """Average over all ranks the gradients of ``module``'s :func:`replicated_params`, which FSDP2 leaves
    unreduced; call once per optimizer step, before clipping (the sharded gradients are averaged by FSDP2's
    reduce-scatter at every backward: the same mean over ranks of the summed micro-batches)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for param in replicated_params(module):
        if param.grad is not None and world > 1:
            dist.all_reduce(param.grad)  # SUM then divide: gloo has no AVG
            param.grad.div_(world)


@torch.no_grad()
def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2) over gradients that mix FSDP2 ``DTensor`` shards and plain
    replicated tensors (torch's refuses the mix): the total norm is that of the whole gradient, counted once (the
    ``DTensor`` part through its placements, the replicated part as is); both parts are scaled by the same
    coefficient. With one kind only, torch's own function runs. Returns the total norm (a plain tensor)."""
    params = [p for p in params if p.grad is not None]
    sharded = [p for p in params if is_dtensor(p.grad)]
    plain = [p for p in params if not is_dtensor(p.grad)]
    if not sharded or not plain:
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return total.full_tensor() if is_dtensor(total) else total
    sharded_norm = torch.nn.utils.get_total_norm([p.grad for p in sharded])
    sharded_norm = sharded_norm.full_tensor() if is_dtensor(sharded_norm) else sharded_norm
    plain_norm = torch.nn.utils.get_total_norm([p.grad for p in plain])
    total = torch.linalg.vector_norm(torch.stack([sharded_norm.float(), plain_norm.float().to(sharded_norm.device)]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_([p.grad.to_local() for p in sharded], coef.to(sharded[0].grad.to_local().device))
    torch._foreach_mul_([p.grad for p in plain], coef.to(plain[0].grad.device))
    return total


def isolate_params(groups: list[dict[str, Any]], params: Iterable[Tensor]) -> list[dict[str, Any]]:
    """Optimizer parameter groups where ``params`` (the position tables) sit in groups of their own, with the settings
    of the group each came from. FSDP2: torch's foreach and fused AdamW refuse a group mixing ``DTensor`` shards with
    the plain replicated tables. ZeRO-3: a group is its own flat partition with its own Adam step count, so a table
    replaced in the middle of a run can start fresh moments while every other parameter keeps its own."""
    isolated = {id(p) for p in params}
    out = []
    for group in groups:
        members = list(group["params"])
        kept = [p for p in members if id(p) not in isolated]
        moved = [p for p in members if id(p) in isolated]
        if kept and moved:
            out += [{**group, "params": kept}, {**group, "params": moved}]
        else:
            out.append(group)
    return out


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
    own.update(
        {
            f"{prefix}.{name}" if prefix else name: buf
            for prefix, sub in module.named_modules()
            for name, buf in sub.named_buffers(recurse=False)
            if name not in sub._non_persistent_buffers_set
        }
    )
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
