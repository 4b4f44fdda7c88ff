"""Optimizer settings and step-indexed schedules (warmup + cosine), counted in steps or samples seen.

Schedules are pure functions of the optimizer step, so a resumed run reproduces them exactly and nothing about
them needs to be checkpointed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lit_webssl.errors import ConfigError

Unit = Literal["steps", "samples"]


def cosine_schedule(step: int, base: float, final: float, total: int, warmup: int = 0, start: float = 0.0) -> float:
    """DINOv2's ``CosineScheduler`` as a function: linear ``start -> base`` over ``warmup`` steps, then a half cosine
    from ``base`` to ``final`` over the remaining ``total - warmup`` steps, then ``final``."""
    if step < warmup:
        return start + (base - start) * step / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay of the learning rate (and optionally of the weight decay)."""

    base_lr: float = 1.5e-4
    """Learning rate for a global batch of ``lr_reference_batch``; scaled by ``lr_scaling``."""
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    """How the lr follows the global batch: MAE/CLIP ``linear`` (x batch/256), DINOv2 ``sqrt`` (x sqrt(batch/1024))."""
    lr_reference_batch: int = 256
    """The global batch size that ``base_lr`` refers to."""
    min_lr: float = 0.0
    """Final learning rate of the cosine."""
    warmup: int = 0
    """Linear warmup length, in ``unit``."""
    total: int | None = None
    """Schedule length, in ``unit``; ``None`` uses ``--trainer.max_steps``."""
    unit: Unit = "steps"
    """Unit of ``warmup`` and ``total``: optimizer ``steps`` or ``samples`` seen (converted with the global batch)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.05
    """Weight decay at the start (no decay on bias, norm, LayerScale and token parameters)."""
    weight_decay_end: float | None = None
    """Weight decay at the end of a cosine schedule; ``None`` keeps it constant."""
    fused: bool | None = None
    """Use the fused AdamW kernel (``None``: when on CUDA)."""

    def __post_init__(self) -> None:
        if self.base_lr <= 0:
            raise ConfigError(f"--model.optim.base_lr must be > 0, got {self.base_lr}")
        if self.warmup < 0:
            raise ConfigError(f"--model.optim.warmup must be >= 0, got {self.warmup}")
        if self.total is not None and self.total <= self.warmup:
            raise ConfigError(
                f"--model.optim.total ({self.total}) must be larger than --model.optim.warmup ({self.warmup})"
            )
        if self.lr_reference_batch <= 0:
            raise ConfigError(f"--model.optim.lr_reference_batch must be > 0, got {self.lr_reference_batch}")

    def peak_lr(self, global_batch: int) -> float:
        """The learning rate after warmup for ``global_batch`` images per optimizer step."""
        ratio = global_batch / self.lr_reference_batch
        scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[self.lr_scaling]
        return self.base_lr * scale

    def to_steps(self, value: int, global_batch: int) -> int:
        """Convert ``value`` (in ``unit``) to optimizer steps."""
        return value if self.unit == "steps" else math.ceil(value / global_batch)


class StepSchedule:
    """Learning rate and weight decay as functions of the optimizer step, for one resolved global batch."""

    def __init__(self, cfg: OptimConfig, global_batch: int, max_steps: int) -> None:
        self.cfg = cfg
        self.peak_lr = cfg.peak_lr(global_batch)
        self.warmup = cfg.to_steps(cfg.warmup, global_batch)
        self.total = cfg.to_steps(cfg.total, global_batch) if cfg.total is not None else max_steps
        if self.total <= 0:
            raise ConfigError("set --trainer.max_steps or --model.optim.total: the lr schedule needs a length")

    def lr(self, step: int) -> float:
        return cosine_schedule(step, self.peak_lr, self.cfg.min_lr, self.total, self.warmup)

    def weight_decay(self, step: int) -> float:
        end = self.cfg.weight_decay_end
        if end is None:
            return self.cfg.weight_decay
        return cosine_schedule(step, self.cfg.weight_decay, end, self.total)
