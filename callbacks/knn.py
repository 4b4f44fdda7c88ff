"""kNN probe on frozen features: online every N steps, and a final report with pixel and random-init baselines."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn

from lit_webssl.callbacks.metrics_file import run_log_dir, update_metrics_file
from lit_webssl.distributed import adapter_for
from lit_webssl.errors import ConfigError
from lit_webssl.eval.knn import knn_top1
from lit_webssl.objectives.base import normalize_uint8

log = logging.getLogger(__name__)
Pool = Literal["cls", "mean", "cls+mean"]


def pool_features(out: dict[str, Tensor], pool: Pool) -> Tensor:
    """Image features from a backbone output: normed CLS, mean of normed patches, or both concatenated."""
    if pool == "cls":
        return out["x_norm_clstoken"]
    mean = out["x_norm_patchtokens"].mean(dim=1)
    return mean if pool == "mean" else torch.cat([out["x_norm_clstoken"], mean], dim=1)


class KNNProbe(L.Callback):
    """Cosine kNN top-1 of frozen backbone features on the datamodule's labelled splits.

    The bank is the labelled train split and the queries the validation split, both through a deterministic
    resize + center crop (``datamodule.knn_dataloaders``). Features come from ``objective.eval_backbone`` (the EMA
    teacher for DINO). At the end of fit it also scores raw pixels and a randomly initialized backbone of the same
    shape, prints the three figures and writes them to ``metrics.json`` in the run's log directory.

    Args:
        every_n_steps: Also probe every this many optimizer steps (logged as ``knn/top1``); ``None``: only at the end.
        at_fit_end: Probe when fit ends and write ``metrics.json``.
        baselines: At the end, also score pixels (``knn_top1_pixel``) and a random-init backbone
            (``knn_top1_random_init``).
        k: Neighbours in the vote.
        temperature: Vote temperature.
        pool: Features: ``cls`` token, ``mean`` of patch tokens, or ``cls+mean``.
        size: Probe crop size; ``None`` uses the backbone's native ``img_size``.
        batch_size: Probe batch size.
        seed: Seed of the random-init baseline backbone.
        metrics_file: File name written in the log directory.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        at_fit_end: bool = True,
        baselines: bool = True,
        k: int = 20,
        temperature: float = 0.07,
        pool: Pool = "cls",
        size: int | None = None,
        batch_size: int = 256,
        seed: int = 0,
        metrics_file: str = "metrics.json",
    ) -> None:
        if every_n_steps is not None and every_n_steps <= 0:
            raise ConfigError(f"--trainer.callbacks KNNProbe.every_n_steps must be > 0, got {every_n_steps}")
        if k <= 0:
            raise ConfigError(f"--trainer.callbacks KNNProbe.k must be > 0, got {k}")
        self.every_n_steps = every_n_steps
        self.at_fit_end = at_fit_end
        self.baselines = baselines
        self.k = k
        self.temperature = temperature
        self.pool = pool
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.metrics_file = metrics_file
        self.results: dict[str, float] = {}
        self._last_step = -1

    # -- features ---------------------------------------------------------------------------------------------
    def _loaders(self, trainer: L.Trainer, pl_module: L.LightningModule):
        size = self.size or pl_module.backbone.patch_embed.img_size[0]
        return trainer.datamodule.knn_dataloaders(size=size, batch_size=self.batch_size)

    @torch.no_grad()
    def _extract(self, loader, fn, device: torch.device) -> tuple[Tensor, Tensor]:
        feats, labels = [], []
        for batch in loader:
            feats.append(fn(batch["image"].to(device)).float())
            labels.append(batch["label"].to(device))
        return torch.cat(feats), torch.cat(labels)

    def _score(self, loaders, fn, device: torch.device) -> float:
        bank, bank_labels = self._extract(loaders[0], fn, device)
        queries, query_labels = self._extract(loaders[1], fn, device)
        return knn_top1(bank, bank_labels, queries, query_labels, self.k, self.temperature)

    def _backbone_fn(self, backbone: nn.Module, pl_module: L.LightningModule):
        def fn(images: Tensor) -> Tensor:
            return pool_features(backbone(pl_module.model_input(images)), self.pool)

        return fn

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, baselines: bool) -> dict[str, float]:
        """Score the current eval backbone (and, with ``baselines``, pixels and a random-init backbone)."""
        loaders = self._loaders(trainer, pl_module)
        device = pl_module.device
        backbone = pl_module.eval_backbone()
        was_training = backbone.training
        backbone.eval()
        results = {"knn_top1": self._score(loaders, self._backbone_fn(backbone, pl_module), device)}
        backbone.train(was_training)
        if baselines:
            mean, std = pl_module.objective.pixel_mean, pl_module.objective.pixel_std
            results["knn_top1_pixel"] = self._score(loaders, lambda x: normalize_uint8(x, mean, std).flatten(1), device)
            if _sharded(trainer):  # a whole random-init backbone on one rank is what sharding avoids
                log.info("kNN: no random-init baseline under a sharded strategy")
                return results
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                random_init = pl_module.build_backbone().to(device).eval()
            results["knn_top1_random_init"] = self._score(loaders, self._backbone_fn(random_init, pl_module), device)
        return results

    # -- hooks ------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        if trainer.is_global_zero or _sharded(trainer):
            top1 = self.evaluate(trainer, pl_module, baselines=False)["knn_top1"]
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics({"knn/top1": top1}, step=step)
        trainer.strategy.barrier()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.at_fit_end:
            return
        log_dir = run_log_dir(trainer)
        if trainer.is_global_zero or _sharded(trainer):
            self.results = self.evaluate(trainer, pl_module, baselines=self.baselines)
            self.results["step"] = trainer.global_step
            if trainer.is_global_zero:
                self._report(trainer, log_dir)
        trainer.strategy.barrier()

    def _report(self, trainer: L.Trainer, log_dir: Path) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"kNN top-1 (cosine, k={self.k}, {self.pool} features)")
        table.add_column("features")
        table.add_column("top-1", justify="right")
        names = {"knn_top1": "trained encoder", "knn_top1_pixel": "pixels", "knn_top1_random_init": "random init"}
        for key, name in names.items():
            if key in self.results:
                table.add_row(name, f"{100 * self.results[key]:.2f}%")
        Console().print(table)
        path = update_metrics_file(log_dir, self.results, self.metrics_file)
        log.info("kNN metrics written to %s", path)
        for logger in trainer.loggers:
            logger.log_metrics({f"knn/{k}": v for k, v in self.results.items() if k != "step"}, trainer.global_step)


def _sharded(trainer: L.Trainer) -> bool:
    """Sharded strategies gather weights with collectives: every rank runs the probe's forwards."""
    return adapter_for(trainer.strategy).sharded
