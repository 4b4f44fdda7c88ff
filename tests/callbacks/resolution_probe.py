"""Test helpers of the resolution tests: a callback recording what each step saw (view shapes, learning rates) and
each rank's final state, a tiny DINOv2 module and weights to start it from, and a 2-rank FSDP2 worker (importable by
spawned processes)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lit_webssl.objectives import DINOv2
from lit_webssl.training.module import LitWebSSL


class StepRecorder(L.Callback):
    """Writes ``<out>/steps_rank<r>.json`` (per training step: step, view shapes, lr / scheduled lr) and
    ``<out>/state_rank<r>.pt`` (the module's state dict and the optimizer's state at the end of fit).

    Args:
        out: Directory to write to.
    """

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.steps: list[dict[str, Any]] = []
        self.val: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        group = next(g for g in optimizer.param_groups if not g.get("frozen_until", 0) > step)
        scheduled = pl_module.schedule.lr(step) * group.get("lr_mult", 1.0)
        self.steps[-1]["lr_ratio"] = group["lr"] / scheduled if scheduled else None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.steps.append(
            {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "views": {k: list(v.shape) for k, v in batch["views"].items()},
                "index": batch["index"].tolist(),
            }
        )

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking:
            self.val.append(
                {"step": trainer.global_step, "views": {k: list(v.shape) for k, v in batch["views"].items()}}
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        (self.out / f"steps_rank{rank}.json").write_text(json.dumps({"train": self.steps, "val": self.val}))
        partitioned = [p for p in pl_module.parameters() if hasattr(p, "ds_id")]  # ZeRO-3
        if partitioned:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(partitioned)
        else:
            gather = contextlib.nullcontext()
        with gather:  # whole tensors on every rank, whatever the strategy (FSDP2 DTensors are gathered one by one)
            state = {
                k: v.full_tensor() if hasattr(v, "full_tensor") else v.detach().clone()
                for k, v in pl_module.state_dict().items()
            }
        moments = {}
        if not partitioned and not any(hasattr(p, "device_mesh") for p in pl_module.parameters()):
            names = {id(p): n for n, p in pl_module.named_parameters()}
            optimizer = trainer.optimizers[0]
            moments = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        torch.save({"state_dict": state, "moments": moments}, self.out / f"state_rank{rank}.pt")


class Zero3BoundaryProbe(L.Callback):
    """Under ZeRO-3: each rank's optimizer partitions (fp32 master, Adam moments) of every trainable parameter and
    the whole fp32 position tables (from the fp32 masters: the optimizer's, and the EMA teacher's under bf16), at
    the end of optimizer step ``step`` (listed before ``ProgressiveResolution``, so before a boundary there rebuilds
    the engine) and at the start of the next (after it); written to ``<out>/boundary_rank<r>.pt`` as
    ``{"before": ..., "after": ...}``."""

    def __init__(self, out: str, step: int) -> None:
        self.out, self.step = Path(out), step
        self.before: dict[str, Any] | None = None

    @staticmethod
    def _capture(pl_module: L.LightningModule) -> dict[str, Any]:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        from lit_webssl.distributed import master_of, whole_fp32

        def moment(param: torch.Tensor, key: str) -> torch.Tensor | None:
            try:
                return safe_get_local_optimizer_state(param, key).clone()
            except KeyError:  # no state yet: a fresh sub-group
                return None

        partitions = {
            name: {
                "fp32": safe_get_local_fp32_param(p).clone(),
                "exp_avg": moment(p, "exp_avg"),
                "exp_avg_sq": moment(p, "exp_avg_sq"),
            }
            for name, p in pl_module.named_parameters()
            if p.requires_grad
        }
        tables = {  # the teacher's from its fp32 masters, under bf16
            name: whole_fp32(p, master_of(pl_module, name))
            for name, p in pl_module.named_parameters()
            if name.endswith("pos_embed")
        }
        return {"partitions": partitions, "tables": tables}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            self.before = self._capture(pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and self.before is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"before": self.before, "after": self._capture(pl_module)},
                self.out / f"boundary_rank{trainer.global_rank}.pt",
            )


def tiny_dino_module(init_from: str | None = None, **objective_args: Any) -> LitWebSSL:
    """``vit_debug`` (32 px, patch 4: an 8 x 8 grid, width 32) with a tiny DINOv2 (16 prototypes); not yet built."""
    objective = DINOv2(
        head_prototypes=16,
        head_hidden_dim=16,
        head_bottleneck_dim=8,
        ibot_prototypes=16,
        ibot_hidden_dim=16,
        ibot_bottleneck_dim=8,
        global_crop_size=32,
        local_crop_size=16,
        **objective_args,
    )
    return LitWebSSL(objective, backbone="vit_debug", init_from=init_from)


def write_source_weights(path: Path, img_size: int = 32, source: LitWebSSL | None = None) -> dict[str, Tensor]:
    """Save the weights of a finished tiny run at ``img_size`` px to ``path`` as ``{"state_dict": ...}`` and return
    them. Every tensor (parameters, DINO and iBOT centers) is offset by noise of std 1e-2, so none equals what a fresh
    build draws or sets (LayerNorm ones, zero biases and centers): whatever matches it after a load came from the
    file. ``source``: the module to build (not yet built), :func:`tiny_dino_module` by default."""
    generator = torch.Generator().manual_seed(1)
    source = source or tiny_dino_module()
    source.backbone_overrides["img_size"] = img_size
    source.configure_model()
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    for value in state.values():
        if value.is_floating_point():
            value.add_(1e-2 * torch.randn(value.shape, generator=generator))
    torch.save({"state_dict": state}, path)
    return state


def fsdp2_warm_start_worker(rank: int, port: int, root: str) -> None:
    """One rank of a 2-rank gloo group: build a tiny DINOv2 module at a 12 x 12 grid with ``init_from`` =
    ``<root>/source.ckpt`` (8 x 8 grid) through ``LitWebSSL.configure_model``'s FSDP2 path (meta build, per-block
    ``fully_shard``, materialized on the shards, then the load), and save the gathered state to
    ``<root>/loaded<rank>.pt``. The trainer is a stand-in holding a real ``ModelParallelStrategy``."""
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        strategy = ModelParallelStrategy()
        strategy.parallel_devices = [torch.device("cpu")] * 2
        target = tiny_dino_module(init_from=str(Path(root) / "source.ckpt"))
        target.backbone_overrides["img_size"] = 48  # the new stage's 12 x 12 grid
        target._trainer = SimpleNamespace(strategy=strategy, precision="32-true")
        target._device_mesh = init_device_mesh("cpu", (2,))
        target.configure_model()
        target._trainer = None
        assert hasattr(target.backbone.blocks[0].attn.qkv.weight, "device_mesh")  # sharded blocks, but the
        assert not hasattr(target.backbone.pos_embed, "device_mesh")  # position table whole on every rank
        loaded = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in target.state_dict().items()}
        torch.save(loaded, Path(root) / f"loaded{rank}.pt")
    finally:
        dist.destroy_process_group()


def mixed_clip_worker(rank: int, port: int, root: str) -> None:
    """One rank of a 2-rank gloo group: a module with FSDP2-sharded layers and a replicated plain parameter (the
    ``replicate`` of ``apply_fsdp2``) gets rank-dependent gradients, which are averaged, clipped to a norm below
    theirs, and stepped by AdamW over the split groups; saves the whole gradients and parameters to
    ``<root>/clip<rank>.pt``."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from lit_webssl.distributed.fsdp2 import (
        apply_fsdp2,
        average_replicated_grads,
        broadcast_replicated,
        clip_grad_norm_,
        isolate_params,
        replicated_params,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(rank)  # different inits per rank: the broadcast must make the replicated one agree
        model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
        model.register_parameter("table", nn.Parameter(torch.randn(1, 7, 3)))
        start = {k: v.detach().clone() for k, v in torch.load(Path(root) / "start.pt").items()}
        apply_fsdp2([model[0], model[1]], [model], init_device_mesh("cpu", (2,)), replicate=[model.table])
        for name, param in model.named_parameters():
            value = start[name]
            if hasattr(param, "device_mesh"):
                value = distribute_tensor(value, param.device_mesh, param.placements).to_local()
                param.to_local().data.copy_(value)
            elif rank == 0:
                param.data.copy_(value)
        broadcast_replicated(model)
        assert replicated_params(model) == [model.table]
        grads = torch.load(Path(root) / f"grads{rank}.pt")
        for name, param in model.named_parameters():
            param.grad = (
                distribute_tensor(grads[name], param.device_mesh, param.placements)
                if hasattr(param, "device_mesh")
                else grads[name].clone()
            )
        average_replicated_grads(model)  # the sharded ones: averaged here by hand, as a reduce-scatter would
        for name, param in model.named_parameters():
            if hasattr(param, "device_mesh"):
                mean = (torch.load(Path(root) / "grads0.pt")[name] + torch.load(Path(root) / "grads1.pt")[name]) / 2
                param.grad = distribute_tensor(mean, param.device_mesh, param.placements)
        total = clip_grad_norm_(model.parameters(), 0.5)
        whole_grads = {
            n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters()
        }
        groups = isolate_params([{"params": list(model.parameters()), "weight_decay": 0.1}], replicated_params(model))
        optimizer = torch.optim.AdamW(groups, lr=0.1)
        optimizer.step()
        params = {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()
        }
        torch.save(
            {"total": total, "grads": whole_grads, "params": params, "groups": len(groups)},
            Path(root) / f"clip{rank}.pt",
        )
    finally:
        dist.destroy_process_group()
