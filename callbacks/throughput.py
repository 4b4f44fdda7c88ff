"""Training throughput and peak memory: logged while training and written to ``metrics.json`` at the end."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning as L
import torch

from lit_webssl.callbacks.metrics_file import run_log_dir, update_metrics_file
from lit_webssl.errors import ConfigError


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """Peak memory of this process so far and what it measures: CUDA's max allocated, else the host's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "host_max_rss"


class ThroughputMonitor(L.Callback):
    """Images per second of the whole job (all ranks) and peak memory per rank.

    Step times are taken between the start and the end of each training batch (the device is synchronized on
    CUDA), so data-loading stalls between steps show as a gap between ``images_per_sec`` (compute only) and
    ``images_per_sec_wall`` (from the first timed step to the last, stalls included). The first
    ``warmup_steps`` steps (compilation, allocator growth, worker start) are not counted. Logged every
    ``log_every_n_steps`` as ``perf/*``; at the end of fit rank 0 merges ``images_per_sec``,
    ``images_per_sec_wall``, ``peak_memory_gib`` and ``peak_memory_kind`` into ``metrics.json``.

    Lightning's own ``ThroughputMonitor`` logs rolling rates and MFU but needs a batch-size function per
    objective and writes nothing at the end; this one reads the images per step off the batch the objective
    consumed and records the figures the comparison table reports.

    Args:
        warmup_steps: Steps excluded from the figures.
        log_every_n_steps: Log the running figures this often.
    """

    def __init__(self, warmup_steps: int = 5, log_every_n_steps: int = 20) -> None:
        if warmup_steps < 0:
            raise ConfigError(f"--trainer.callbacks ThroughputMonitor.warmup_steps must be >= 0, got {warmup_steps}")
        if log_every_n_steps <= 0:
            raise ConfigError(
                f"--trainer.callbacks ThroughputMonitor.log_every_n_steps must be > 0, got {log_every_n_steps}"
            )
        self.warmup_steps = warmup_steps
        self.log_every_n_steps = log_every_n_steps
        self._reset()

    def _reset(self) -> None:
        self._seen_steps = 0
        self._images = 0
        self._compute_s = 0.0
        self._first: float | None = None
        self._last: float | None = None
        self._start = 0.0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()
        if self._seen_steps == self.warmup_steps:
            self._first = self._start

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args
    ) -> None:
        self._sync(pl_module)
        now = time.perf_counter()
        self._seen_steps += 1
        if self._seen_steps <= self.warmup_steps:
            return
        self._images += _batch_images(batch) * trainer.world_size
        self._compute_s += now - self._start
        self._last = now
        if self._seen_steps % self.log_every_n_steps == 0:
            pl_module.log_dict(
                {f"perf/{k}": v for k, v in self.figures(pl_module).items() if isinstance(v, float)},
                on_step=True,
                on_epoch=False,
            )

    def figures(self, pl_module: L.LightningModule) -> dict[str, float | str]:
        """The running figures: images/s (compute only and wall), peak memory of this rank in GiB and its kind."""
        peak, kind = peak_memory_gib(pl_module.device)
        out: dict[str, float | str] = {"peak_memory_gib": peak, "peak_memory_kind": kind}
        if self._images and self._compute_s > 0:
            out["images_per_sec"] = self._images / self._compute_s
        if self._images and self._first is not None and self._last is not None and self._last > self._first:
            out["images_per_sec_wall"] = self._images / (self._last - self._first)
        return out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        figures = self.figures(pl_module)
        peak = torch.tensor(float(figures["peak_memory_gib"]), device=pl_module.device)
        figures["peak_memory_gib"] = float(trainer.strategy.reduce(peak, reduce_op="max"))  # the fullest rank
        log_dir = run_log_dir(trainer)
        if trainer.is_global_zero:
            update_metrics_file(log_dir, {**figures, "timed_steps": max(self._seen_steps - self.warmup_steps, 0)})


def _batch_images(batch: Any) -> int:
    """Images one sample-batch holds: the length of its first view (or of ``image``/``label``)."""
    if isinstance(batch, dict):
        views = batch.get("views")
        if isinstance(views, dict) and views:
            return len(next(iter(views.values())))
        for key in ("image", "label", "index"):
            if key in batch:
                return len(batch[key])
    raise TypeError("ThroughputMonitor: cannot tell the batch size of a batch without 'views', 'image' or 'label'")
