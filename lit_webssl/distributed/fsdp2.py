"""FSDP2 (``fully_shard``): the wrap per block, the mesh, and the replicated position tables beside the shards."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lit_webssl.compat.torch import foreach_mul_
from lit_webssl.distributed.adapter import Sharded
from lit_webssl.distributed.tensors import is_dtensor

if TYPE_CHECKING:
    from lit_webssl.training.module import LitWebSSL


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
    foreach_mul_([p.grad.to_local() for p in sharded], coef.to(sharded[0].grad.to_local().device))
    foreach_mul_([p.grad for p in plain], coef.to(plain[0].grad.device))
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


class FSDP2(Sharded):
    """Lightning's ``ModelParallelStrategy`` with FSDP2's ``fully_shard`` per block.

    The model is built on the meta device, sharded (student and teacher blocks, then the backbones, heads and the
    module itself), materialized on each rank's own shards and initialized there. The position tables stay out of the
    sharding, whole on every rank (so a resolution stage can change their shape in the middle of the run; 0.1% of a
    ViT-7B at 518 px): their gradients are averaged here, clipping counts them with the shards, and they sit in
    optimizer groups of their own (foreach and fused AdamW refuse a group mixing ``DTensor`` and plain tensors).
    """

    family = "fsdp2"

    def build(self, module: LitWebSSL) -> None:
        from lit_webssl.models.vit import VisionTransformer

        self.build_at_resumed_grid(module)
        with torch.device("meta"):
            module.backbone = module.build_backbone()
            module.objective.configure(module.backbone)
        compute = torch.bfloat16 if "bf16" in str(module.trainer.precision) else None
        backbones = [module.backbone, *(m for m in module.objective.modules() if isinstance(m, VisionTransformer))]
        blocks = [block for bb in backbones for block in bb.blocks]
        apply_fsdp2(
            blocks,
            [*backbones, module.objective],
            fsdp2_mesh(module.device_mesh),
            param_dtype=compute,
            replicate=[bb.pos_embed for bb in backbones],
        )
        module.to_empty(device=self.strategy.root_device)
        module.backbone.init_weights(materialize=True)
        module.objective.init_weights(module.backbone)
        module.load_init_weights()
        broadcast_replicated(module)

    def make_optimizer(
        self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float, fused: bool | None
    ) -> torch.optim.Optimizer:
        optimizer = super().make_optimizer(groups, lr, betas, eps, fused)
        init_adam_state(optimizer)
        return optimizer

    def after_param_swap(self, optimizer: torch.optim.Optimizer) -> None:
        init_adam_state(optimizer)  # the new table's zero state at once: a checkpoint saved before its step loads

    def before_optimizer_step(self, module: LitWebSSL) -> None:
        average_replicated_grads(module)  # the position tables, which FSDP2 leaves unreduced

    def clip_grad_norm_(self, params: Iterable[Tensor], max_norm: float) -> Tensor | None:
        return clip_grad_norm_(params, max_norm)

    def clip_gradients(self, optimizer: torch.optim.Optimizer, max_norm: float) -> bool:
        clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_norm)
        return True
