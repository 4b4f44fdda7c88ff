"""DeepSpeed ZeRO-3 (Lightning's ``DeepSpeedStrategy`` at stage 3).

Lightning builds the model inside ``deepspeed.zero.Init``, which partitions each submodule's parameters as soon as its
``__init__`` returns: code that initializes a child after that point gathers it first
(:func:`lit_webssl.models.init.init_tree`), and a partitioned module cannot be deep-copied (an EMA teacher is a twin
built from the module's ``init_kwargs``). DeepSpeed in bf16 stores every parameter in bf16 and keeps fp32 masters of
the trainable ones in its optimizer; the EMA teacher keeps its own (:class:`~lit_webssl.distributed.ema.ShardedEMA`).

A resolution stage inside one run builds the engine again around the resized position tables (:func:`regrid`):
DeepSpeed lays out flat fp32 partitions, gradients and Adam moments for the shapes it was built with and has no
public way to change one. That path uses private APIs of Lightning and DeepSpeed (:mod:`lit_webssl.compat`), guarded
by their version checks and by the tests under ``tests/compat/``; ``docs/resolution.md`` says why it is kept rather
than running one stage per launch.
"""

from __future__ import annotations

import contextlib
import gc
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lit_webssl.distributed.adapter import Sharded
from lit_webssl.distributed.ema import load_whole_masters, master_of
from lit_webssl.distributed.tensors import local_shard, outside_zero_init, partition_of, whole_fp32

if TYPE_CHECKING:
    from lit_webssl.models.vit import VisionTransformer
    from lit_webssl.training.module import LitWebSSL


class ZeRO3(Sharded):
    """DeepSpeed ZeRO-3: partitioned build, DeepSpeed's own global clip, CPU Adam with ZeRO-Offload, the fp32 masters
    of ``init_from`` restored once the optimizer exists, and resolution stages by building the engine again."""

    family = "deepspeed"

    def build(self, module: LitWebSSL) -> None:
        self.build_at_resumed_grid(module)
        super().build(module)

    def reading_files(self) -> contextlib.AbstractContextManager[None]:
        """Outside ``zero.Init``: ``torch.load`` of an fp32 file inside it would reinterpret fp32 bytes as bf16."""
        return outside_zero_init()

    def keeps_init_state(self) -> bool:
        return True  # bf16 copies rounded the file's values: on_fit_start gives the fp32 masters the exact ones

    def make_optimizer(
        self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float, fused: bool | None
    ) -> torch.optim.Optimizer:
        if offloads_optimizer(self.strategy):
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload steps the optimizer on the host

            return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
        return super().make_optimizer(groups, lr, betas, eps, fused)

    def on_fit_start(self, module: LitWebSSL, init_state: dict[str, Tensor] | None) -> None:
        """In bf16 the module stores bf16 copies, so ``init_from``'s fp32 values were rounded when loaded; give the
        optimizer's fp32 masters (and the EMA teacher's) the file's exact values. A resumed run restores its
        checkpoint over these."""
        rounded = [(n, p) for n, p in module.named_parameters() if local_shard(p).dtype != torch.float32]
        if init_state is None or not rounded:
            return
        from deepspeed.utils import safe_set_local_fp32_param

        for name, param in rounded:
            if param.requires_grad and name in init_state:
                safe_set_local_fp32_param(param, partition_of(param, init_state[name].float()))
        load_whole_masters(module, init_state)

    def clip_grad_norm_(self, params: Any, max_norm: float) -> Tensor | None:
        return None  # gradients live in DeepSpeed's partitioned buffers: its global clip (gradient_clipping) applies

    def resample_grids(self, trainer: Any, module: nn.Module, vits: dict[str, VisionTransformer], grid: int) -> None:
        regrid(trainer, module, vits, grid)


def offloads_optimizer(strategy: Any) -> bool:
    """DeepSpeed with the optimizer offloaded to the host (ZeRO-Offload needs DeepSpeed's CPU Adam)."""
    config = getattr(strategy, "config", None)
    if not isinstance(config, dict):
        return False
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device") in ("cpu", "nvme")


def regrid(trainer: Any, pl_module: nn.Module, vits: dict[str, VisionTransformer], grid: int) -> None:
    """The resample of position tables under ZeRO-3: build the engine again around the new tables.

    Every rank, in step (collectives): gather each table whole in fp32 (the optimizer's fp32 masters; the EMA
    teacher's from its fp32 masters under bf16) and resample it; keep each other trainable parameter's local fp32
    partition and Adam moments and the step count; destroy the engine (its hooks go); give the ViTs the new tables;
    build a new optimizer over the same groups (``LitWebSSL.rebuild_optimizer``) and a new engine around the module
    (as Lightning's ``DeepSpeedStrategy`` builds it); put the kept partitions, moments and steps back by name and the
    new tables' exact fp32 values into their masters. The tables sit in optimizer groups of their own (each a ZeRO-3
    sub-group with its own step count), so they start fresh moments as under DDP and FSDP2.
    """
    from deepspeed.utils import (
        safe_get_local_fp32_param,
        safe_get_local_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    from lit_webssl.compat.deepspeed import adam_state, flat_groups
    from lit_webssl.compat.lightning import setup_deepspeed_engine

    strategy = trainer.strategy
    engine, zero = strategy.model, strategy.model.optimizer
    tables: dict[str, tuple[torch.Tensor, bool]] = {}
    for name, vit in vits.items():
        key = f"{name}.pos_embed"
        local = master_of(pl_module, key)  # the teacher's fp32 master partition (bf16 runs)
        tables[key] = (vit.table_at(whole_fp32(vit.pos_embed, local), grid, grid), vit.pos_embed.requires_grad)
    state = adam_state(zero)
    state_keys = sorted({k for st in state.values() for k in st if k != "step"})
    steps = [st["step"] for st in state.values() if "step" in st]
    kept = {
        name: (
            safe_get_local_fp32_param(p).clone(),
            {k: safe_get_local_optimizer_state(p, k).clone() for k in state_keys},
        )
        for name, p in pl_module.named_parameters()
        if p.requires_grad and name not in tables
    }
    counters = {
        k: getattr(engine, k)
        for k in ("global_steps", "global_samples", "micro_steps", "skipped_steps")
        if hasattr(engine, k)
    }

    engine.destroy()
    strategy.model = pl_module
    del engine, zero, state
    gc.collect()
    swaps = {}
    for name, vit in vits.items():
        old = vit.pos_embed
        table, requires_grad = tables[f"{name}.pos_embed"]
        vit.set_pos_embed(table.to(device=local_shard(old).device, dtype=old.dtype), requires_grad=requires_grad)
        swaps[id(old)] = vit.pos_embed
    optimizer = pl_module.rebuild_optimizer(swaps)
    engine, zero = setup_deepspeed_engine(strategy, pl_module, optimizer)
    strategy.model, strategy.optimizers = engine, [zero]
    for key, value in counters.items():
        setattr(engine, key, value)

    fresh = {id(p) for p in swaps.values()}
    state = adam_state(zero)
    for flat, members in flat_groups(zero):
        new = [id(p) in fresh for p in members]
        if any(new) and not all(new):
            raise RuntimeError(
                "ZeRO-3 resolution stage: a position table shares an optimizer group with other "
                "parameters; LitWebSSL.configure_optimizers gives the tables groups of their own"
            )
        if steps and not any(new):  # a new table's sub-group starts fresh
            step = steps[0].clone() if isinstance(steps[0], torch.Tensor) else steps[0]  # DeepSpeedCPUAdam: an int
            state[flat] = {"step": step, **{k: torch.zeros_like(flat) for k in state_keys}}
    params = dict(pl_module.named_parameters())
    for name, (fp32, moments) in kept.items():
        safe_set_local_fp32_param(params[name], fp32)
        for key, value in moments.items():
            safe_set_local_optimizer_state(params[name], value, key)
    for key, (table, requires_grad) in tables.items():
        if requires_grad:
            safe_set_local_fp32_param(params[key], partition_of(params[key], table))
    load_whole_masters(pl_module, {k: t for k, (t, _) in tables.items()})  # the teacher's masters of its new tables
