"""The objective contract: what every SSL (or CLIP) objective declares, owns and returns.

An objective is an ``nn.Module`` that

* declares the views it needs from the data pipeline (:meth:`Objective.views`), as :class:`ViewSpec` entries;
* owns its heads, teacher and loss modules (they are sub-modules, so they are checkpointed and sharded with it);
* computes the total loss from one batch, the shared backbone and the step's :class:`StepContext` (step, rank)
  (:meth:`Objective.forward`) and returns an :class:`ObjectiveOutput`: the loss plus a flat dict of named metrics;
* may act after each optimizer step (:meth:`Objective.on_after_optimizer_step`, e.g. an EMA teacher update through
  :class:`lit_webssl.distributed.EMATeacher`) and may shape the optimizer's parameter groups
  (:meth:`Objective.param_groups`).

It runs unchanged under every strategy: it initializes its heads through :mod:`lit_webssl.models.init` and clips
through its context (:attr:`StepContext.clip_grad_norm_`), and never asks which strategy is in use.

Batch layout handed to :meth:`Objective.forward` (built by ``lit_webssl.datamodules``, normalized on the device by
``LitWebSSL``):

* ``batch["views"][name]``: float tensor ``(B, count, 3, size, size)`` per declared :class:`ViewSpec`, normalized
  with :attr:`Objective.pixel_mean` / :attr:`Objective.pixel_std`;
* ``batch["label"]``: ``(B,)`` int64, ``-1`` where the data has no label;
* ``batch["caption"]``: ``list[str]`` when the objective sets :attr:`Objective.needs_text`;
* ``batch["text"]``: the captions through the objective's :meth:`Objective.text_transform` (e.g. CLIP's token ids,
  int64 ``(B, context_length)``), applied per sample in the loader workers, when the objective defines one.
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lit_webssl.errors import ConfigError
from lit_webssl.models.init import whole_shape

if TYPE_CHECKING:
    from lit_webssl.models.vit import VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """One kind of augmented crop that an objective asks the data pipeline for.

    The pipeline returns ``count`` independent crops of each sample, as uint8 ``(count, 3, size, size)``; the
    photometric operations run on uint8 tensors in the loader workers, normalization runs on the device.
    """

    name: str
    """Key of this view in ``batch["views"]``."""
    size: int
    """Output side length in pixels (square crops)."""
    count: int = 1
    """Number of independent crops of this kind per sample."""
    scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range, as a fraction of the image."""
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    """RandomResizedCrop aspect-ratio range."""
    hflip_p: float = 0.5
    """Probability of a horizontal flip."""
    color_jitter_p: float = 0.0
    """Probability of applying color jitter with strengths :attr:`color_jitter`."""
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    """Brightness, contrast, saturation, hue jitter strengths."""
    grayscale_p: float = 0.0
    """Probability of converting to grayscale (3 channels kept)."""
    blur_p: float = 0.0
    """Probability of a Gaussian blur (kernel 9, sigma uniform in :attr:`blur_sigma`)."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range."""
    solarize_p: float = 0.0
    """Probability of solarizing (threshold 128)."""

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"view {self.name!r}: count must be >= 1, got {self.count}")
        if self.size < 1:
            raise ConfigError(f"view {self.name!r}: size must be >= 1, got {self.size}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"view {self.name!r}: scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        for prob in ("hflip_p", "color_jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, prob)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"view {self.name!r}: {prob} must be in [0, 1], got {value}")


def _clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> Tensor | None:
    return torch.nn.utils.clip_grad_norm_(list(params), max_norm)


@dataclass(frozen=True)
class StepContext:
    """What the trainer tells an objective about the step at hand: an explicit argument of :meth:`Objective.forward`
    and of the optimizer-step hooks, never state set on the objective from outside."""

    step: int = 0
    """Optimizer steps done so far (in the after-step hook: including the one just taken)."""
    rank: int = 0
    """Global rank of this process."""
    world_size: int = 1
    """Number of processes."""
    clip_grad_norm_: Callable[[Iterable[Tensor], float], Tensor | None] = _clip_grad_norm_
    """Clip gradients to a total L2 norm, as the strategy in use must (whole tensors, shards or both); returns
    ``None`` where the strategy clips by itself and ignores the call."""


@dataclass
class ObjectiveOutput:
    """What :meth:`Objective.forward` returns: the total loss and a flat dict of named metrics.

    Metric names are stable across steps; sub-losses under their own name (``mae``), diagnostics that do not
    contribute to the loss under ``stats/``. ``LitWebSSL`` logs the dict and never looks inside it.
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Objective(nn.Module, abc.ABC):
    """Base class of every training objective (Web-MAE, Web-DINO, CLIP, and users' own).

    Subclasses must set :attr:`embed_dim`-dependent modules in :meth:`configure` (called once the backbone exists,
    so heads can be sized from it) and implement :meth:`views` and :meth:`forward`.
    """

    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean used to normalize uint8 views on the device."""
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel std used to normalize uint8 views on the device."""
    needs_text: bool = False
    """True when batches must carry captions (``batch["caption"]``)."""
    global_batch: int = 1
    """Images per optimizer step over all ranks; set by ``LitWebSSL`` (:meth:`bind_schedule`) before training."""
    total_steps: int = 0
    """Length of the run's schedule in optimizer steps; set by ``LitWebSSL`` before training."""
    schedule_unit: str = "steps"
    """Unit of the objective's own schedule lengths (``steps`` or ``samples``), the one of ``--model.optim.unit``."""

    def configure(self, backbone: VisionTransformer) -> None:  # noqa: B027 - optional hook
        """Build backbone-dependent modules (heads, decoder, teacher). Called once by ``LitWebSSL``.

        Under a strategy that partitions parameters as they are built, a submodule's parameters are split across
        ranks as soon as its ``__init__`` returns: initialize children through :func:`lit_webssl.models.init.init_tree`
        (and :func:`~lit_webssl.models.init.whole`). Under one that builds on the meta device, it runs there and
        :meth:`init_weights` follows once the shards exist.
        """

    def init_weights(self, backbone: VisionTransformer) -> None:
        """Initialize this objective's parameters in place after a meta-device build materialized on its shards,
        and make copies (an EMA teacher) equal their sources. The default calls ``reset_parameters()`` on
        every submodule that has one (PyTorch's default init); override it when the objective initializes otherwise.
        """
        for module in self.modules():
            if module is not self and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()

    @abc.abstractmethod
    def views(self) -> Sequence[ViewSpec]:
        """The crops this objective needs from every training sample."""

    @abc.abstractmethod
    def forward(
        self, batch: dict[str, Any], backbone: VisionTransformer, context: StepContext | None = None
    ) -> ObjectiveOutput:
        """Compute the total loss and named metrics of one batch (``context``: the step and rank; ``None`` in a
        plain call, read as step 0 on rank 0)."""

    def compute(self, batch: dict[str, Any], backbone: VisionTransformer, context: StepContext) -> ObjectiveOutput:
        """How the trainer calls :meth:`forward`: with ``context`` where ``forward`` takes one (the built-in
        objectives do), without it for an objective written as ``forward(batch, backbone)``."""
        if _takes_context(type(self)):
            return self(batch, backbone, context)
        return self(batch, backbone)

    def text_transform(self) -> Callable[[str], Tensor] | None:
        """A picklable per-sample ``caption -> tensor`` transform (a tokenizer) that the data loaders apply in their
        workers when :attr:`needs_text` is set, delivering the stacked results as ``batch["text"]``; ``None``: none."""
        return None

    def bind_schedule(self, global_batch: int, total_steps: int, unit: str) -> None:
        """Called by ``LitWebSSL`` once the global batch and the schedule length are known (before training)."""
        self.global_batch, self.total_steps, self.schedule_unit = global_batch, total_steps, unit

    def set_resolution(self, global_size: int, local_size: int | None = None) -> None:
        """Change the crop sizes this objective asks for (a stage of ``ProgressiveResolution``); the caller then
        re-reads :meth:`views` and rebuilds the loaders. ``global_size`` is the side of the main crops (the native
        resolution of the stage), ``local_size`` that of the small crops of multi-crop objectives (``None``: keep).
        Sizes are checked against the patch size by the caller. The default raises: an objective opts in by
        overriding it.
        """
        raise ConfigError(f"{type(self).__name__} does not support resolution stages (it defines no set_resolution)")

    def to_steps(self, value: int) -> int:
        """A schedule length given in :attr:`schedule_unit` (steps or samples seen), in optimizer steps."""
        return int(value) if self.schedule_unit == "steps" else math.ceil(value / self.global_batch)

    @staticmethod
    def step_generator(device: torch.device | str, seed: int, context: StepContext | None) -> torch.Generator:
        """A generator seeded from ``(seed, step, rank)``: random draws that a resumed run repeats exactly."""
        context = context or StepContext()
        mixed = (seed * 1_000_003 + context.step) * 65_537 + context.rank
        return torch.Generator(device=device).manual_seed(mixed % (2**63))

    def eval_backbone(self, backbone: VisionTransformer) -> nn.Module:
        """The backbone whose frozen features probes should evaluate (the EMA teacher's, for DINO)."""
        return backbone

    def on_after_optimizer_step(self, backbone: VisionTransformer, context: StepContext) -> None:  # noqa: B027
        """Called after every optimizer step; ``context.step`` counts it (e.g. an EMA teacher update)."""

    def on_before_optimizer_step(self, backbone: VisionTransformer, context: StepContext) -> None:  # noqa: B027
        """Called after backward and before the optimizer step (e.g. per-module gradient clipping through
        ``context.clip_grad_norm_``)."""

    def param_groups(self, backbone: VisionTransformer, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups for the backbone and this objective's trainable modules.

        The default puts bias, norm, LayerScale gamma and token parameters (``ndim <= 1`` or named ``*_token``,
        ``pos_embed``) in a group without weight decay and everything else in one with ``weight_decay``. Each
        group carries ``lr_mult`` and ``wd_mult`` that the schedule multiplies in, and may carry ``frozen_until``
        (optimizer steps during which its lr is 0, e.g. DINO's last layer).
        """
        return split_decay_groups(self.optimized_named_parameters(backbone), weight_decay)

    def trainable_named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        """This objective's own parameters that the optimizer updates (an EMA teacher has ``requires_grad=False``)."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def optimized_named_parameters(self, backbone: VisionTransformer) -> list[tuple[str, nn.Parameter]]:
        """Every parameter the optimizer updates, named ``backbone.*`` and ``objective.*`` as in the module."""
        named = [(f"backbone.{n}", p) for n, p in backbone.named_parameters() if p.requires_grad]
        return named + [(f"objective.{n}", p) for n, p in self.trainable_named_parameters()]


@lru_cache(maxsize=64)
def _takes_context(cls: type) -> bool:
    params = list(inspect.signature(cls.forward).parameters.values())[1:]  # after self
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def is_no_decay(name: str, param: Tensor) -> bool:
    """True for parameters that take no weight decay: biases, norms, LayerScale gammas, tokens, 1-D tensors."""
    leaf = name.rsplit(".", 1)[-1]
    shape = whole_shape(param)  # a partitioned parameter's own shape is a 1-D placeholder
    return (
        len(shape) <= 1
        or name.endswith(".bias")
        or "norm" in name
        or leaf in ("gamma", "pos_embed", "cls_token", "mask_token", "logit_scale")
        or leaf.endswith("_token")
    )


def split_decay_groups(named: Iterable[tuple[str, Tensor]], weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: with ``weight_decay`` and without (see :func:`is_no_decay`). Frozen params skipped."""
    decay, no_decay = [], []
    for name, param in named:
        if not param.requires_grad:
            continue
        (no_decay if is_no_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0, "wd_mult": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0, "wd_mult": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


@lru_cache(maxsize=16)
def _pixel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` in uint8 units as ``(3, 1, 1)`` tensors on ``device``, built once (no copy per step)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0
    return mean_t.to(device), std_t.to(device)


def normalize_uint8(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``(..., 3, H, W)`` -> float normalized with ``mean``/``std`` (given for [0, 1] pixels)."""
    mean_t, std_t = _pixel_stats(tuple(mean), tuple(std), images.device)
    return (images.float() - mean_t) / std_t
