"""One adapter per strategy family, behind one small interface: the only code that branches on the strategy.

``LitWebSSL`` and the callbacks ask the adapter of the strategy in use (:func:`adapter_for`) to build the model, make
the optimizer, act around the optimizer step, clip gradients and change the position grid at a resolution stage;
they never look at the strategy themselves. The families:

========================  ===================================================================================
:class:`StrategyAdapter`  replicated: single device, DDP; the model is whole on every rank
:class:`FixedShapes`      DeepSpeed ZeRO-1/2 and FSDP1: built whole, wrapped after; flat buffers fix the shapes
``FSDP2``                 Lightning's ``ModelParallelStrategy`` (:mod:`lit_webssl.distributed.fsdp2`)
``ZeRO3``                 Lightning's ``DeepSpeedStrategy`` at stage 3 (:mod:`lit_webssl.distributed.zero3`)
========================  ===================================================================================
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from lit_webssl.compat.torch import drop_ddp_hooks
from lit_webssl.distributed.tensors import Family, is_sharded, strategy_family
from lit_webssl.errors import ConfigError

if TYPE_CHECKING:
    from lit_webssl.models.vit import VisionTransformer
    from lit_webssl.training.module import LitWebSSL

STAGES_FLAG = "--trainer.callbacks ProgressiveResolution"


class StrategyAdapter:
    """What training asks of the strategy that carries the model; as is, the replicated family (single device,
    DDP), where every rank holds whole tensors. Subclasses change what their strategy does differently.

    Args:
        strategy: The Lightning strategy (``None``: a module not attached to a trainer).
    """

    family: ClassVar[Family] = "replicated"
    sharded: ClassVar[bool] = False
    """Parameters are split across ranks: a forward gathers them with collectives, so every rank must run it, and
    nothing may hold a whole copy of the model (a probe's random-init baseline)."""

    def __init__(self, strategy: Any = None) -> None:
        self.strategy = strategy

    # -- building --------------------------------------------------------------------------------------------------
    def build(self, module: LitWebSSL) -> None:
        """Build ``module.backbone`` and the objective's modules, initialized, with ``init_from`` loaded."""
        module.backbone = module.build_backbone()
        module.objective.configure(module.backbone)
        module.load_init_weights()

    def reading_files(self) -> contextlib.AbstractContextManager[None]:
        """A context in which weight files read as stored (see :class:`~lit_webssl.distributed.zero3.ZeRO3`)."""
        return contextlib.nullcontext()

    def keeps_init_state(self) -> bool:
        """The ``init_from`` weights are needed again at ``on_fit_start`` (the strategy rounded them on load)."""
        return False

    # -- optimizer ---------------------------------------------------------------------------------------------------
    def param_groups(self, groups: list[dict[str, Any]], tables: Iterable[Tensor]) -> list[dict[str, Any]]:
        """The optimizer groups for this strategy, given the objective's and the position tables."""
        return groups

    def make_optimizer(
        self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float, fused: bool | None
    ) -> torch.optim.Optimizer:
        """AdamW over ``groups`` (``fused``: ``None`` picks the fused kernel on CUDA)."""
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)

    def on_fit_start(self, module: LitWebSSL, init_state: dict[str, Tensor] | None) -> None:
        """Once the optimizer exists (``init_state``: the ``init_from`` weights where :meth:`keeps_init_state`)."""

    # -- steps -------------------------------------------------------------------------------------------------------
    def before_optimizer_step(self, module: LitWebSSL) -> None:
        """After backward (all micro-batches), before clipping and the optimizer step."""

    def clip_grad_norm_(self, params: Iterable[Tensor], max_norm: float) -> Tensor | None:
        """Clip the gradients of ``params`` to total L2 norm ``max_norm``; the norm, or ``None`` where the strategy
        clips by itself (its own global clip applies instead)."""
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)

    def clip_gradients(self, optimizer: torch.optim.Optimizer, max_norm: float) -> bool:
        """Lightning's ``--trainer.gradient_clip_val`` by norm; ``False``: let Lightning clip as it does."""
        return False

    # -- resolution stages -------------------------------------------------------------------------------------------
    def stages_refused(self) -> str | None:
        """Why the position grid cannot change in the middle of a run under this strategy (one line, with what to
        do instead), or ``None``."""
        return None

    def resample_grids(self, trainer: Any, module: nn.Module, vits: dict[str, VisionTransformer], grid: int) -> None:
        """Give every ViT in ``vits`` a ``pos_embed`` resampled to ``grid x grid`` and update what holds the old
        tables: the optimizers take the new parameters and drop the old ones' state (Adam moments and step: the new
        table starts fresh, bias-corrected moments); a DDP wrapper is built again (its buckets fit the old shapes)."""
        if any(is_sharded(vit.pos_embed) for vit in vits.values()):
            raise ConfigError(
                f"{STAGES_FLAG}: changing the position grid in the middle of a run needs whole position tables, but "
                f"this strategy ({type(self.strategy).__name__}) shards them; launch each stage from the previous "
                "stage's weights (--model.init_from, configs/webdino/vit_7b_378.yaml) instead (docs/resolution.md)"
            )
        swaps: dict[int, nn.Parameter] = {}
        for vit in vits.values():
            old = vit.pos_embed
            vit.resample_pos_embed(grid)
            swaps[id(old)] = vit.pos_embed
        for optimizer in _optimizers(trainer):
            for group in optimizer.param_groups:
                params = []
                for param in group["params"]:
                    if id(param) in swaps:
                        optimizer.state.pop(param, None)  # Adam moments and step of the old table
                        param = swaps[id(param)]
                    params.append(param)
                group["params"] = params
            self.after_param_swap(optimizer)
        self._rewrap_ddp()

    def after_param_swap(self, optimizer: torch.optim.Optimizer) -> None:
        """After :meth:`resample_grids` replaced parameters in ``optimizer``."""

    def _rewrap_ddp(self) -> None:
        """Rebuild the DDP wrapper (its gradient buckets are sized for the old parameter shapes)."""
        from torch.nn.parallel import DistributedDataParallel

        strategy = self.strategy
        old = getattr(strategy, "model", None)
        if not isinstance(old, DistributedDataParallel) or not callable(getattr(strategy, "configure_ddp", None)):
            return
        drop_ddp_hooks(old)  # the old reducer must not see the next backward
        strategy.model = strategy.lightning_module
        del old
        gc.collect()
        strategy.configure_ddp()


class FixedShapes(StrategyAdapter):
    """DeepSpeed ZeRO-1/2 and FSDP1: the model is built whole and wrapped after; their flat buffers (Adam moments and
    gradients, or flat parameters) are laid out for the shapes it was built with. ZeRO-Offload's optimizer steps on
    the host with DeepSpeed's CPU Adam."""

    def stages_refused(self) -> str | None:
        return (
            f"{type(self.strategy).__name__} lays out its buffers for the shapes the model was built with, so the "
            "position grid cannot change in the middle of a run; use FSDP2 or ZeRO-3 (configs/strategy/), or give "
            "one stage per launch and start each from the previous one's weights with --model.init_from "
            "(configs/webdino/vit_7b_378.yaml, docs/resolution.md)"
        )


class Sharded(StrategyAdapter):
    """What the sharded families (FSDP2, ZeRO-3) share: a resumed run is built at the position grid its checkpoint
    stores (a later resolution stage's: the sharded checkpoint loads into tensors of its own shapes), and the position
    tables sit in optimizer groups of their own (so a stage can replace them while every other parameter keeps its
    optimizer state)."""

    sharded = True

    def build_at_resumed_grid(self, module: LitWebSSL) -> None:
        """Set the backbone's ``img_size`` to the native size of the grid stored in the checkpoint ``fit`` resumes
        (``module.resume_from``, or the trainer's ``ckpt_path``), read without loading the weights."""
        from lit_webssl.checkpoint import stored_grid
        from lit_webssl.compat.lightning import attached_trainer, resolve_ckpt_path

        path = module.resume_from or getattr(attached_trainer(module), "ckpt_path", None)
        if not path:
            return

        path = resolve_ckpt_path(module.trainer, str(path))  # "last" resolved exactly as fit will resolve it
        with self.reading_files():  # nothing partitioned, files read as stored
            probe = module.build_backbone(device="meta")  # shapes only
            grid = stored_grid(path, num_prefix_tokens=probe.num_prefix_tokens) if path else None
        if grid is not None and grid != probe.grid_size:
            module.backbone_overrides["img_size"] = grid * probe.patch_size

    def param_groups(self, groups: list[dict[str, Any]], tables: Iterable[Tensor]) -> list[dict[str, Any]]:
        from lit_webssl.distributed.fsdp2 import isolate_params

        return isolate_params(groups, tables)


def adapter_for(strategy: Any) -> StrategyAdapter:
    """The adapter of ``strategy`` (a Lightning strategy, or ``None`` for a module outside a trainer)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    family = strategy_family(strategy)
    if family == "fsdp2":
        from lit_webssl.distributed.fsdp2 import FSDP2

        return FSDP2(strategy)
    if family == "deepspeed":
        from lit_webssl.distributed.zero3 import ZeRO3

        return ZeRO3(strategy)
    if isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy)):
        return FixedShapes(strategy)
    return StrategyAdapter(strategy)


def _optimizers(trainer: Any) -> Iterator[torch.optim.Optimizer]:
    if trainer is None:
        return iter(())
    try:
        return iter(list(trainer.optimizers))
    except (AttributeError, RuntimeError):
        return iter(())
