"""``LitWebSSL``: the one LightningModule; an interchangeable objective over the shared ViT."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lit_webssl.checkpoint import read_state_dict
from lit_webssl.compat.lightning import attached_trainer
from lit_webssl.distributed import (
    FP32_MASTERS,
    StrategyAdapter,
    adapter_for,
    load_full_state_dict,
    load_masters,
    save_masters,
)
from lit_webssl.errors import ConfigError
from lit_webssl.models.presets import PRESETS, build_backbone
from lit_webssl.models.vit import VisionTransformer, fit_pos_embed_grids, match_pos_embed_grids
from lit_webssl.objectives.base import Objective, StepContext, normalize_uint8
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
        """The checkpoint ``fit`` will resume (``--ckpt_path``; the CLI sets it). Under a sharded strategy the model is
        then built at the position grid stored there, since a sharded checkpoint loads into tensors of its own shapes
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
        """Build backbone and objective for the strategy in use (its adapter, :mod:`lit_webssl.distributed`).

        Replicated strategies build them whole; sharded ones build them directly on their shards (partitioned as
        they are built, or on the meta device and then materialized per rank). No strategy holds the whole model on
        a rank.
        """
        if self.backbone is not None:
            return
        self.adapter.build(self)

    def load_init_weights(self) -> None:
        """Load ``init_from`` into the built model (memory-mapped: ranks on a node share the pages)."""
        if self.init_from is None:
            return
        with self.adapter.reading_files():
            state = read_state_dict(self.init_from)
            resampled = fit_pos_embed_grids(self, state)
            missing = load_full_state_dict(self, state, strict=False, source=f"--model.init_from {self.init_from}")
        if self.adapter.keeps_init_state():
            self._init_state = state  # for on_fit_start, once the optimizer exists (memory-mapped)
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
    def adapter(self) -> StrategyAdapter:
        """The adapter of the strategy in use (:func:`lit_webssl.distributed.adapter_for`; replicated when the module
        is not attached to a trainer): everything that differs between strategies is asked of it."""
        strategy = getattr(attached_trainer(self), "strategy", None)
        cached = self.__dict__.get("_adapter")
        if cached is None or cached.strategy is not strategy:
            cached = self.__dict__["_adapter"] = adapter_for(strategy)
        return cached

    def step_context(self, step: int | None = None) -> StepContext:
        """What the objective is told about the step it computes (``step``: optimizer steps done; default now)."""
        trainer = attached_trainer(self)
        return StepContext(
            step=self.global_step if step is None else step,
            rank=self.global_rank,
            world_size=trainer.world_size if trainer is not None else 1,
            clip_grad_norm_=self.adapter.clip_grad_norm_,
        )

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
        groups = self.adapter.param_groups(groups, self.position_tables())
        self._optimizer_groups = [{**g, "params": list(g["params"])} for g in groups]  # the optimizer owns `groups`
        return self._make_optimizer(groups)

    def position_tables(self) -> list[nn.Parameter]:
        """Every ViT's ``pos_embed`` (student, EMA teacher): the tensors resolution stages replace."""
        return list({id(m.pos_embed): m.pos_embed for m in self.modules() if isinstance(m, VisionTransformer)}.values())

    def rebuild_optimizer(self, swaps: dict[int, nn.Parameter]) -> torch.optim.Optimizer:
        """A fresh optimizer (no state) over :meth:`configure_optimizers`' groups, with the parameters whose ``id``
        is in ``swaps`` replaced: for a strategy that must build its engine again around a resized table at a
        resolution stage (:mod:`lit_webssl.distributed`); the schedule and the groups' settings are kept."""
        if self._optimizer_groups is None:
            raise RuntimeError("rebuild_optimizer() needs configure_optimizers() first")
        self._optimizer_groups = [
            {**g, "params": [swaps.get(id(p), p) for p in g["params"]]} for g in self._optimizer_groups
        ]
        return self._make_optimizer([{**g, "params": list(g["params"])} for g in self._optimizer_groups])

    def _make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        fused = self.optim.fused if self.optim.fused is not None else self.device.type == "cuda"
        return self.adapter.make_optimizer(groups, self.schedule.peak_lr, self.optim.betas, self.optim.eps, fused)

    def on_fit_start(self) -> None:
        """Hand the strategy what it needs once the optimizer exists (the ``init_from`` weights it rounded)."""
        state, self._init_state = self._init_state, None
        self.adapter.on_fit_start(self, state)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the EMA teachers' rank-local fp32 masters (every rank's checkpoint file where the strategy shards)."""
        state = save_masters(self)
        if state:
            checkpoint[FP32_MASTERS] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before Lightning loads the weights, give every ViT the position-embedding grid the checkpoint stores (a
        checkpoint taken in a high-resolution stage carries 27 x 27 positions at 378 px, 37 x 37 at 518 px); restore
        the EMA teachers' fp32 masters (each rank its own)."""
        state = checkpoint.get("state_dict")
        if state:
            match_pos_embed_grids(self, state)
        load_masters(self, checkpoint.get(FP32_MASTERS, {}))

    # -- steps ------------------------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Normalize uint8 views on the device (the loaders ship uint8 to save host memory and bandwidth), then give
        them the dtype the precision plugin feeds the model: Lightning converts inputs before this hook, while they
        are still uint8, so a model stored in bf16 (``*-true``, some sharded strategies) would get fp32 images."""
        if "views" in batch:
            batch["views"] = {k: self.model_input(v) for k, v in batch["views"].items()}
        return batch

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> what the backbone takes: normalized with the objective's pixel statistics, in the dtype
        the precision plugin feeds the model (bf16 for a model stored in bf16, unchanged under autocast)."""
        images = normalize_uint8(images, self.objective.pixel_mean, self.objective.pixel_std)
        precision = getattr(attached_trainer(self), "precision_plugin", None)
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
        out = self.objective.compute(batch, self.backbone, self.step_context())
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
        self.adapter.before_optimizer_step(self)
        self.objective.on_before_optimizer_step(self.backbone, self.step_context())

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping (``--trainer.gradient_clip_val``); by norm through the strategy's adapter where
        Lightning's own cannot (gradients that mix shards with replicated position tables)."""
        trainer = attached_trainer(self)
        value = gradient_clip_val if gradient_clip_val is not None else getattr(trainer, "gradient_clip_val", None)
        algorithm = gradient_clip_algorithm or getattr(trainer, "gradient_clip_algorithm", None) or "norm"
        if value and algorithm.lower() == "norm" and self.adapter.clip_gradients(optimizer, float(value)):
            return
        super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.objective.on_after_optimizer_step(self.backbone, self.step_context(self.global_step + 1))

    def eval_backbone(self) -> nn.Module:
        """The backbone probes should read (the objective decides: the EMA teacher's for DINO)."""
        return self.objective.eval_backbone(self.backbone)
