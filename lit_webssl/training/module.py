"""``LitWebSSL``: the one LightningModule; an interchangeable objective over the shared ViT."""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lit_webssl.checkpoint import read_state_dict, stored_grid
from lit_webssl.distributed import (
    FP32_MASTERS,
    apply_fsdp2,
    average_replicated_grads,
    broadcast_replicated,
    clip_grad_norm_,
    fsdp2_mesh,
    init_adam_state,
    isolate_params,
    load_full_state_dict,
    local_shard,
    outside_zero_init,
    partition_of,
    strategy_family,
)
from lit_webssl.errors import ConfigError
from lit_webssl.models.presets import PRESETS, build_backbone
from lit_webssl.models.vit import VisionTransformer, fit_pos_embed_grids, match_pos_embed_grids
from lit_webssl.objectives.base import Objective, normalize_uint8
from lit_webssl.training.optim import OptimConfig, StepSchedule

log = logging.getLogger(__name__)


class LitWebSSL(L.LightningModule):
    """Trains ``objective`` over a backbone from :mod:`lit_webssl.models.presets`.

    The backbone and the objective's heads are built in :meth:`configure_model`, not in ``__init__``, so sharded
    strategies can build them directly on their shards and ``plan`` can build them on the meta device.

    Args:
        objective: The training objective (``class_path: lit_webssl.objectives.MAE``, a DINOv2, CLIP, or a
            user's own :class:`~lit_webssl.objectives.base.Objective` subclass).
        backbone: Backbone preset name (``vit_debug``, ``vit_small``..., ``webdino_1b``..., ``webmae_300m``...).
        backbone_overrides: Backbone constructor arguments that replace the preset's (e.g. ``drop_path_rate``,
            ``img_size``, ``grad_checkpointing``).
        optim: Optimizer and learning-rate / weight-decay schedule.
        activation_checkpointing: Recompute each backbone block in the backward pass (saves activation memory for
            about a third more compute); the switch that strategy configs set (``configs/strategy/``).
        init_from: Start from these weights instead of a random init: a whole-model file (``checkpoint convert``'s
            output, or a single-file Lightning ``.ckpt``). Loaded tensor by tensor into the freshly built model under
            any strategy; position embeddings stored at another grid are resampled to this run's (a 378 px stage
            from a 224 px run). Keys of this model missing from the file keep their init (and are listed); a
            resumed run (``--ckpt_path``) restores its checkpoint over them.
        init_required: This config continues from earlier weights (a high-resolution stage): ``fit`` without
            ``init_from`` (and without ``--ckpt_path``) stops instead of training from a random init.
    """

    def __init__(
        self,
        objective: Objective,
        backbone: str = "vit_debug",
        backbone_overrides: dict[str, Any] | None = None,
        optim: OptimConfig = OptimConfig(),  # noqa: B008 - a nested config group for jsonargparse
        activation_checkpointing: bool = False,
        init_from: str | None = None,
        init_required: bool = False,
    ) -> None:
        super().__init__()
        if backbone not in PRESETS:
            raise ConfigError(f"--model.backbone: unknown preset {backbone!r}; choose one of {', '.join(PRESETS)}")
        self.objective = objective
        self.backbone_name = backbone
        self.backbone_overrides = dict(backbone_overrides or {})
        if activation_checkpointing:
            self.backbone_overrides["grad_checkpointing"] = True
        if init_from is not None and not Path(init_from).is_file():
            raise ConfigError(f"--model.init_from: no file at {init_from}")
        self.init_from = init_from
        self.init_required = init_required
        self.optim = optim or OptimConfig()
        self.backbone: VisionTransformer | None = None
        self.schedule: StepSchedule | None = None
        self.lr_scale = 1.0  # multiplies the scheduled lr (a resolution stage's lr_scale)
        self._init_state: dict[str, torch.Tensor] | None = None  # init_from's weights, kept to on_fit_start
        self._optimizer_groups: list[dict[str, Any]] | None = None  # configure_optimizers' groups (rebuild_optimizer)
        self.resume_from: str | None = None
        """The checkpoint ``fit`` will resume (``--ckpt_path``; the CLI sets it). Under FSDP2 the model is then built
        at the position grid stored there, since the distributed checkpoint loads into tensors of its own shapes
        (a run resumed in a later resolution stage). Lightning's ``trainer.ckpt_path``, when set before ``fit``,
        counts too."""
        self.save_hyperparameters(
            {
                "backbone": backbone,
                "backbone_overrides": self.backbone_overrides,
                "optim": asdict(self.optim),
                "objective": type(objective).__name__,
            }
        )

    # -- building ---------------------------------------------------------------------------------------------
    def build_backbone(self, device: torch.device | str | None = None) -> VisionTransformer:
        """A freshly initialized backbone of this run's preset and overrides."""
        return build_backbone(self.backbone_name, self.backbone_overrides, device=device)

    def configure_model(self) -> None:
        """Build backbone and objective for the strategy in use (:mod:`lit_webssl.distributed`).

        Replicated strategies build them whole. Under ZeRO-3 Lightning calls this inside ``deepspeed.zero.Init``, so
        every submodule is partitioned as it is built. Under FSDP2 they are built on the meta device, sharded per
        block, then materialized and initialized on each rank's shards. No strategy holds the whole model on a rank.
        """
        if self.backbone is not None:
            return
        self.objective.backbone_factory = partial(build_backbone, self.backbone_name, self.backbone_overrides)
        if self._family != "replicated":
            self._build_at_resumed_grid()
        if self._family != "fsdp2":
            self.backbone = self.build_backbone()
            self.objective.configure(self.backbone)
            self._load_init_weights()
            return
        with torch.device("meta"):
            self.backbone = self.build_backbone()
            self.objective.configure(self.backbone)
        compute = torch.bfloat16 if "bf16" in str(self.trainer.precision) else None
        backbones = [self.backbone, *(m for m in self.objective.modules() if isinstance(m, VisionTransformer))]
        blocks = [block for bb in backbones for block in bb.blocks]
        # The position tables stay whole on every rank, out of the sharding, so a resolution stage can change
        # their shape in the middle of the run (callbacks/resolution.py); they are 0.1% of a ViT-7B at 518 px.
        apply_fsdp2(
            blocks,
            [*backbones, self.objective],
            fsdp2_mesh(self.device_mesh),
            param_dtype=compute,
            replicate=[bb.pos_embed for bb in backbones],
        )
        self.to_empty(device=self.trainer.strategy.root_device)
        self.backbone.init_weights(materialize=True)
        self.objective.init_weights(self.backbone)
        self._load_init_weights()
        broadcast_replicated(self)

    def _build_at_resumed_grid(self) -> None:
        """Resuming under a sharded strategy: build the backbone at the native size of the position grid the
        checkpoint stores (it may be a later resolution stage's), so its tensors load into the same shapes."""
        path = self.resume_from or getattr(self._trainer, "ckpt_path", None)
        if not path:
            return
        from lightning.pytorch.trainer.states import TrainerFn

        if str(path) in ("last", "hpc", "best", "registry"):  # resolved exactly as fit will resolve it
            path = self.trainer._checkpoint_connector._parse_ckpt_path(
                TrainerFn.FITTING, str(path), model_provided=True, model_connected=True
            )
        with outside_zero_init():  # nothing partitioned, files read as stored
            probe = self.build_backbone(device="meta")  # shapes only
            grid = stored_grid(path, num_prefix_tokens=probe.num_prefix_tokens) if path else None
        if grid is not None and grid != probe.grid_size:
            self.backbone_overrides["img_size"] = grid * probe.patch_size

    def _load_init_weights(self) -> None:
        """Load ``init_from`` into the built model (memory-mapped: ranks on a node share the pages)."""
        if self.init_from is None:
            return
        with outside_zero_init():  # read fp32 as fp32 under ZeRO-3 in bf16
            state = read_state_dict(self.init_from)
            resampled = fit_pos_embed_grids(self, state)
            missing = load_full_state_dict(self, state, strict=False, source=f"--model.init_from {self.init_from}")
        if self._family == "deepspeed":
            self._init_state = state  # for on_fit_start, once the optimizer's fp32 masters exist (memory-mapped)
        if resampled:
            log.info("init_from %s: position embeddings resampled to this run's grid: %s", self.init_from, resampled)
        if missing:
            log.warning(
                "init_from %s: %d tensors not in the file keep their init: %s",
                self.init_from,
                len(missing),
                ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""),
            )

    @property
    def _family(self) -> str:
        """The strategy family in use (:func:`lit_webssl.distributed.strategy_family`; ``replicated`` unattached)."""
        return strategy_family(getattr(self._trainer, "strategy", None))

    def global_batch_size(self) -> int:
        """Images per optimizer step over all ranks (per-device batch x world size x accumulation)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        per_device = getattr(datamodule, "batch_size", None)
        if per_device is None:
            raise ConfigError("--data: the datamodule must expose `batch_size` to scale the learning rate")
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self) -> torch.optim.Optimizer:
        global_batch = self.global_batch_size()
        self.schedule = StepSchedule(self.optim, global_batch, max(self.trainer.max_steps, 0))
        self.objective.bind_schedule(global_batch, self.schedule.total, self.optim.unit)
        groups = self.objective.param_groups(self.backbone, self.optim.weight_decay)
        if self._family != "replicated":
            groups = isolate_params(groups, self.position_tables())  # groups of their own: resolution stages
        self._optimizer_groups = [{**g, "params": list(g["params"])} for g in groups]  # the optimizer owns `groups`
        return self._make_optimizer(groups)

    def position_tables(self) -> list[nn.Parameter]:
        """Every ViT's ``pos_embed`` (student, EMA teacher): the tensors resolution stages replace."""
        return list({id(m.pos_embed): m.pos_embed for m in self.modules() if isinstance(m, VisionTransformer)}.values())

    def rebuild_optimizer(self, swaps: dict[int, nn.Parameter]) -> torch.optim.Optimizer:
        """A fresh optimizer (no state) over :meth:`configure_optimizers`' groups, with the parameters whose ``id``
        is in ``swaps`` replaced: for a strategy that must build its engine again around a resized table (DeepSpeed
        ZeRO-3, ``callbacks/resolution.py``); the schedule and the groups' settings are kept."""
        if self._optimizer_groups is None:
            raise RuntimeError("rebuild_optimizer() needs configure_optimizers() first")
        self._optimizer_groups = [
            {**g, "params": [swaps.get(id(p), p) for p in g["params"]]} for g in self._optimizer_groups
        ]
        return self._make_optimizer([{**g, "params": list(g["params"])} for g in self._optimizer_groups])

    def _make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if _offloads_optimizer(getattr(self._trainer, "strategy", None)):
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload steps the optimizer on the host

            return DeepSpeedCPUAdam(
                groups, lr=self.schedule.peak_lr, betas=self.optim.betas, eps=self.optim.eps, adamw_mode=True
            )
        fused = self.optim.fused if self.optim.fused is not None else self.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            groups, lr=self.schedule.peak_lr, betas=self.optim.betas, eps=self.optim.eps, fused=fused or None
        )
        if self._family == "fsdp2":
            init_adam_state(optimizer)
        return optimizer

    def on_fit_start(self) -> None:
        """Under DeepSpeed in bf16 the module stores bf16 copies, so ``init_from``'s fp32 values were rounded when
        loaded in :meth:`configure_model`; now that the optimizer exists, give its fp32 masters (and the objective's,
        e.g. the EMA teacher's) the file's exact values. A resumed run restores its checkpoint over these."""
        state, self._init_state = self._init_state, None  # what configure_model read and resampled (DeepSpeed only)
        rounded = [(n, p) for n, p in self.named_parameters() if local_shard(p).dtype != torch.float32]
        if state is None or not rounded:
            return
        from deepspeed.utils import safe_set_local_fp32_param

        for name, param in rounded:
            if param.requires_grad and name in state:
                safe_set_local_fp32_param(param, partition_of(param, state[name].float()))
        self.objective.load_fp32_weights(
            {k[len("objective.") :]: v for k, v in state.items() if k.startswith("objective.")}
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the objective's rank-local fp32 masters (every rank's checkpoint file under DeepSpeed)."""
        masters = self.objective.fp32_masters()
        state = masters.state_dict(prefix="objective.") if masters is not None else {}
        if state:
            checkpoint[FP32_MASTERS] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before Lightning loads the weights, give every ViT the position-embedding grid the checkpoint stores (a
        checkpoint taken in a high-resolution stage carries 27 x 27 positions at 378 px, 37 x 37 at 518 px); restore
        the objective's fp32 masters (each rank its own)."""
        state = checkpoint.get("state_dict")
        if state:
            match_pos_embed_grids(self, state)
        masters = self.objective.fp32_masters()
        if masters is not None:
            masters.load_state_dict(checkpoint.get(FP32_MASTERS, {}), prefix="objective.")

    # -- steps ------------------------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Normalize uint8 views on the device (the loaders ship uint8 to save host memory and bandwidth), then give
        them the dtype the precision plugin feeds the model: Lightning converts inputs before this hook, while they
        are still uint8, so a model stored in bf16 (DeepSpeed bf16, ``*-true``) would otherwise get fp32 images."""
        if "views" in batch:
            batch["views"] = {k: self.model_input(v) for k, v in batch["views"].items()}
        return batch

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> what the backbone takes: normalized with the objective's pixel statistics, in the dtype
        the precision plugin feeds the model (bf16 for a model stored in bf16, unchanged under autocast)."""
        images = normalize_uint8(images, self.objective.pixel_mean, self.objective.pixel_std)
        precision = getattr(self._trainer, "precision_plugin", None)
        return precision.convert_input(images) if precision is not None else images

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        lr, wd = self.schedule.lr(step) * self.lr_scale, self.schedule.weight_decay(step)
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = 0.0 if step < group.get("frozen_until", 0) else lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)
        self.log("train/lr", lr, on_step=True, on_epoch=False)
        if self.optim.weight_decay_end is not None:
            self.log("train/wd", wd, on_step=True, on_epoch=False)

    def _shared_step(self, batch: dict[str, Any], prefix: str) -> torch.Tensor:
        self.objective.current_step = self.global_step
        self.objective.rank = self.global_rank
        out = self.objective(batch, self.backbone)
        batch_size = len(batch["label"]) if "label" in batch else None
        on_step = prefix == "train"
        self.log(
            f"{prefix}/loss",
            out.loss,
            prog_bar=True,
            on_step=on_step,
            on_epoch=not on_step,
            batch_size=batch_size,
            sync_dist=not on_step,
        )
        metrics = {f"{prefix}/{k}": v for k, v in out.metrics.items()}
        self.log_dict(metrics, on_step=on_step, on_epoch=not on_step, batch_size=batch_size, sync_dist=not on_step)
        if "corrupt" in batch:
            corrupt = batch["corrupt"].sum().float()
            self.log(
                f"{prefix}/corrupt_samples",
                corrupt,
                on_step=False,
                on_epoch=True,
                reduce_fx="sum",
                batch_size=batch_size,
                sync_dist=True,
            )
            if on_step:  # a live signal on this rank (an MC-2B epoch is the whole run); no collective
                self.log(f"{prefix}/corrupt_in_step", corrupt, on_step=True, on_epoch=False, batch_size=batch_size)
        return out.loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._family == "fsdp2":
            average_replicated_grads(self)  # the position tables, which FSDP2 leaves unreduced
        self.objective.on_before_optimizer_step(self.backbone, self.global_step)

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping (``--trainer.gradient_clip_val``); by norm under FSDP2 through
        :func:`lit_webssl.distributed.clip_grad_norm_`, since the gradients there mix ``DTensor`` shards with the
        replicated position tables, which torch's own function refuses."""
        trainer = self._trainer
        value = gradient_clip_val if gradient_clip_val is not None else getattr(trainer, "gradient_clip_val", None)
        algorithm = gradient_clip_algorithm or getattr(trainer, "gradient_clip_algorithm", None) or "norm"
        if value and algorithm.lower() == "norm" and self._family == "fsdp2":
            clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], float(value))
            return
        super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.objective.on_after_optimizer_step(self.backbone, self.global_step + 1)

    def eval_backbone(self) -> nn.Module:
        """The backbone probes should read (the objective decides: the EMA teacher's for DINO)."""
        return self.objective.eval_backbone(self.backbone)


def _offloads_optimizer(strategy: Any) -> bool:
    """DeepSpeed with the optimizer offloaded to the host (ZeRO-Offload needs DeepSpeed's CPU Adam)."""
    config = getattr(strategy, "config", None)
    if strategy_family(strategy) != "deepspeed" or not isinstance(config, dict):
        return False
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device") in ("cpu", "nvme")
