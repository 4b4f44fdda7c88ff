"""Progressive resolution: 224 -> 378 -> 518 px within one run.

:class:`ProgressiveResolution` runs training in stages. At a stage boundary it changes the objective's crop sizes
(:meth:`~lit_webssl.objectives.base.Objective.set_resolution`), the per-device batch size and the learning-rate
multiplier, rebuilds the training loader in the middle of the epoch (the data position carries over), and
**permanently resamples** every learned position-embedding table (student and EMA teacher) to the stage's native grid,
so a checkpoint or export taken in a stage carries that grid (27 x 27 at 378 px, 37 x 37 at 518 px with patch 14),
as the released Web-SSL checkpoints do. Why a permanent resample and not on-the-fly interpolation, what happens to
the Adam moments and how resume and sharded strategies work: ``docs/resolution.md``.

A stage as its own launch, started from the weights of a finished run at another resolution (the released
checkpoints' chain), needs no callback: ``--model.init_from`` loads them and resamples
the stored position embeddings to the run's grid (:class:`lit_webssl.training.module.LitWebSSL`,
``configs/webdino/vit_7b_{378,518}.yaml``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lit_webssl.compat.lightning import counted_epoch, invalidate_val_loader, open_ended_epoch, rebuild_train_loader
from lit_webssl.distributed import adapter_for
from lit_webssl.errors import ConfigError
from lit_webssl.models.presets import PRESETS
from lit_webssl.models.vit import VisionTransformer

FLAG = "--trainer.callbacks ProgressiveResolution"


@dataclass
class ResolutionStage:
    """One stage of a progressive-resolution run (a ``stages`` entry of :class:`ProgressiveResolution`)."""

    start: int
    """Where the stage begins, in the callback's ``unit`` (optimizer steps or samples seen); the first stage at 0."""
    global_crop_size: int
    """Side of the objective's main crops in pixels; also the native resolution: the position-embedding grid becomes
    ``global_crop_size // patch_size`` (224 -> 16 x 16, 378 -> 27 x 27, 518 -> 37 x 37 with patch 14)."""
    local_crop_size: int | None = None
    """Side of the small crops of multi-crop objectives (DINOv2); ``None`` keeps the current size."""
    batch_size: int | None = None
    """Images per device per step during the stage; ``None``: ``--data.batch_size``."""
    lr_scale: float = 1.0
    """Multiplier of the scheduled learning rate during the stage (e.g. ``sqrt(new_batch / old_batch)`` to follow
    DINOv2's square-root rule when the batch shrinks)."""


class ProgressiveResolution(L.Callback):
    """Train in resolution stages: crop sizes, per-device batch, lr multiplier and native position grid per stage.

    At the first step of each stage (after the optimizer step that reaches its ``start``):

    * the objective's crops change (``set_resolution``) and the datamodule's views and ``batch_size`` follow; the
      training loader is rebuilt in place, resuming the data stream at the sample where the old one stopped, and the
      validation loader is rebuilt at its next use;
    * ``LitWebSSL.lr_scale`` becomes the stage's ``lr_scale`` (the schedule itself stays a function of the step);
    * every ViT in the module (student and EMA teacher) gets a new ``pos_embed`` resampled to the stage's grid with
      the same bicubic interpolation the forward pass used on the fly, so the network's function at the new size is
      unchanged at the boundary. The optimizer's Adam moments of the old table are dropped: the new table starts
      fresh moments (bias-corrected) while every other parameter keeps its own. Under DDP the wrapper is rebuilt
      around the new parameter.

    The first stage is applied before the model is built (its ``global_crop_size`` becomes the backbone's
    ``img_size``), so the run starts at stage 0's native grid. A resumed run restores the stage from the callback's
    state and the grid from the checkpoint (``LitWebSSL.on_load_checkpoint``) before the weights load, and continues
    as the uninterrupted run does.

    Stage starts given in samples are converted with each previous stage's global batch
    (``batch_size x devices x nodes x accumulate_grad_batches``). Schedules of the optimizer and objective keep
    counting optimizer steps with the global batch of the first stage.

    What the model and the optimizer undergo at a boundary is the strategy's business (its adapter in
    :mod:`lit_webssl.distributed`: single device, DDP and both shipped sharded strategies cross boundaries inside one
    run). Strategies whose flat buffers fix the parameter shapes refuse several stages: run each stage as its own
    launch started from the previous stage's weights (``--model.init_from``, ``configs/webdino/vit_7b_{378,518}.yaml``);
    see ``docs/resolution.md``.

    Args:
        stages: The stages, in order of ``start``; the first starts at 0.
        unit: Unit of the stages' ``start``: optimizer ``steps`` or ``samples`` seen.
    """

    def __init__(self, stages: list[ResolutionStage], unit: Literal["steps", "samples"] = "steps") -> None:
        if unit not in ("steps", "samples"):
            raise ConfigError(f"{FLAG}.unit must be 'steps' or 'samples', got {unit!r}")
        if not stages:
            raise ConfigError(f"{FLAG}.stages: give at least one stage")
        self.stages = [s if isinstance(s, ResolutionStage) else ResolutionStage(**s) for s in stages]
        self.unit = unit
        for i, stage in enumerate(self.stages):
            flag = f"{FLAG}.stages[{i}]"
            if i == 0 and stage.start != 0:
                raise ConfigError(f"{flag}.start must be 0 (the first stage starts the run), got {stage.start}")
            if i and stage.start <= self.stages[i - 1].start:
                raise ConfigError(
                    f"{flag}.start={stage.start} must be larger than stages[{i - 1}].start="
                    f"{self.stages[i - 1].start} (stages sorted by start)"
                )
            for name in ("global_crop_size", "local_crop_size", "batch_size"):
                value = getattr(stage, name)
                if value is not None and value < 1:
                    raise ConfigError(f"{flag}.{name} must be >= 1, got {value}")
            if not stage.lr_scale > 0:
                raise ConfigError(f"{flag}.lr_scale must be > 0, got {stage.lr_scale}")
        self._stage = 0
        self._starts: list[int] | None = None
        self._base_batch: int | None = None
        self._patch = 0
        self._changed_in_epoch = False
        self._fit_started = False
        self._trainer: L.Trainer | None = None

    # -- schedule of stages --------------------------------------------------------------------------------------
    @property
    def stage(self) -> int:
        """Index of the current stage."""
        return self._stage

    def step_starts(self) -> list[int]:
        """The optimizer step at which each stage starts (known once the trainer is set up)."""
        if self._starts is None:
            raise RuntimeError("ProgressiveResolution: step_starts() needs the trainer (call after setup)")
        return list(self._starts)

    def stage_at(self, step: int) -> int:
        """Index of the stage that optimizer step ``step`` belongs to."""
        return max(i for i, start in enumerate(self.step_starts()) if start <= step)

    def _compute_starts(self, trainer: L.Trainer) -> list[int]:
        if self.unit == "steps":
            return [s.start for s in self.stages]
        per_step = trainer.world_size * trainer.accumulate_grad_batches
        starts = [0]
        for prev, cur in zip(self.stages, self.stages[1:], strict=False):
            global_batch = (prev.batch_size or self._base_batch) * per_step
            starts.append(starts[-1] + math.ceil((cur.start - prev.start) / global_batch))
        return starts

    # -- hooks ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        datamodule = trainer.datamodule
        if (
            datamodule is None
            or not hasattr(datamodule, "batch_size")
            or not callable(getattr(datamodule, "set_views", None))
        ):
            raise ConfigError(
                f"{FLAG} needs a datamodule with `batch_size` and `set_views()` (--data), e.g. "
                "lit_webssl.datamodules.WebSSLDataModule"
            )
        objective = getattr(pl_module, "objective", None)
        if objective is None or not callable(getattr(objective, "set_resolution", None)):
            raise ConfigError(f"{FLAG} needs a LitWebSSL module whose objective has set_resolution()")
        refused = adapter_for(trainer.strategy).stages_refused()
        if refused and len(self.stages) > 1:
            raise ConfigError(f"{FLAG}.stages: {refused}")
        self._patch = _patch_size(pl_module)
        for i, st in enumerate(self.stages):
            for name in ("global_crop_size", "local_crop_size"):
                value = getattr(st, name)
                if value is not None and value % self._patch:
                    raise ConfigError(
                        f"{FLAG}.stages[{i}].{name}={value} is not divisible by the patch size {self._patch}"
                    )
        first = self.stages[0]
        if first.batch_size is not None:
            datamodule.batch_size = first.batch_size  # the run's base batch: the lr schedule is built from it
        self._base_batch = int(datamodule.batch_size)
        self._starts = self._compute_starts(trainer)
        objective.set_resolution(first.global_crop_size, first.local_crop_size)  # configure() checks these sizes
        datamodule.set_views(objective.views())
        overrides = getattr(pl_module, "backbone_overrides", None)
        if getattr(pl_module, "backbone", None) is None and isinstance(overrides, dict):
            # Stage 0's native grid from the start: set before configure_model, where every strategy (sharded too)
            # builds the parameters whole or on their shards at the right shape.
            overrides["img_size"] = first.global_crop_size

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_started = True
        # The model was built at the grid of the stage it starts in (setup's img_size, or the checkpoint's own grid
        # for a sharded resume, before the callback's state is restored), so no resample here: a resample to stage 0
        # would undo the latter before the checkpoint loads.
        self._enter(trainer, pl_module, self._stage, rebuild=False, resample=False)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target = self.stage_at(trainer.global_step)
        if target != self._stage:  # a checkpoint without this callback's state, or stages edited since
            self._stage = target
            self._enter(trainer, pl_module, target, rebuild=True)
        elif self._changed_in_epoch:  # resumed in the epoch where the batch changed: count it as the original run
            open_ended_epoch(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._changed_in_epoch = False
        counted_epoch(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log(
            "train/global_crop_size", float(self.stages[self._stage].global_crop_size), on_step=True, on_epoch=False
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        target = self.stage_at(trainer.global_step)
        if target == self._stage:
            return
        self._stage = target
        self._enter(trainer, pl_module, target, rebuild=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self._stage,
            "changed_in_epoch": self._changed_in_epoch,
            "unit": self.unit,
            "stages": [asdict(s) for s in self.stages],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stage = int(state_dict.get("stage", 0))
        if stage >= len(self.stages):
            raise ConfigError(
                f"{FLAG}.stages: the checkpoint is in stage {stage}, but only {len(self.stages)} "
                "stage(s) are configured"
            )
        self._stage = stage
        self._changed_in_epoch = bool(state_dict.get("changed_in_epoch", False))
        if self._fit_started and self._trainer is not None:  # sharded strategies restore after on_fit_start
            self._enter(self._trainer, self._trainer.lightning_module, stage, rebuild=False)

    # -- applying a stage ----------------------------------------------------------------------------------------
    def _enter(
        self, trainer: L.Trainer, pl_module: L.LightningModule, index: int, rebuild: bool, resample: bool = True
    ) -> None:
        st = self.stages[index]
        objective = pl_module.objective
        objective.set_resolution(st.global_crop_size, st.local_crop_size)
        datamodule = trainer.datamodule
        datamodule.batch_size = st.batch_size or self._base_batch
        datamodule.set_views(objective.views())
        pl_module.lr_scale = st.lr_scale
        grid = st.global_crop_size // self._patch
        if resample:
            resample_module_grids(trainer, pl_module, grid)
        overrides = getattr(pl_module, "backbone_overrides", None)
        if isinstance(overrides, dict):  # the saved hyperparameters name the native size of the checkpoint's grid
            overrides["img_size"] = st.global_crop_size
        if rebuild:
            rebuild_train_loader(trainer)
            invalidate_val_loader(trainer)
            self._changed_in_epoch = True
        local = f", local crops {st.local_crop_size} px" if st.local_crop_size else ""
        rank_zero_info(
            f"ProgressiveResolution: stage {index} from step {trainer.global_step}: global crops "
            f"{st.global_crop_size} px (grid {grid}x{grid}){local}, {datamodule.batch_size} images per "
            f"device, lr x {st.lr_scale:g}"
        )


# -- model surgery -------------------------------------------------------------------------------------------------
def _patch_size(pl_module: L.LightningModule) -> int:
    backbone = getattr(pl_module, "backbone", None)
    if isinstance(backbone, VisionTransformer):
        return backbone.patch_size
    config = {
        **PRESETS.get(getattr(pl_module, "backbone_name", ""), {}),
        **(getattr(pl_module, "backbone_overrides", None) or {}),
    }
    default = inspect.signature(VisionTransformer.__init__).parameters["patch_size"].default
    return int(config.get("patch_size", default))


def resample_module_grids(trainer: L.Trainer, pl_module: nn.Module, grid: int) -> list[str]:
    """Resample every ViT's ``pos_embed`` under ``pl_module`` to ``grid x grid`` and update what holds the old ones.

    The strategy's adapter does it (:meth:`lit_webssl.distributed.StrategyAdapter.resample_grids`): the optimizers
    get the new parameters in place of the old ones and drop the old ones' state (Adam moments and step count: the
    new table starts fresh, bias-corrected, moments), wrappers laid out for the old shapes are built again, and a
    strategy that shards the tables otherwise refuses with a :class:`ConfigError`. What each strategy does:
    ``docs/resolution.md``.

    Returns:
        Names of the ViTs that changed.
    """
    vits = {
        name: m for name, m in pl_module.named_modules() if isinstance(m, VisionTransformer) and m.grid_size != grid
    }
    if vits:
        adapter_for(trainer.strategy if trainer is not None else None).resample_grids(trainer, pl_module, vits, grid)
    return list(vits)
