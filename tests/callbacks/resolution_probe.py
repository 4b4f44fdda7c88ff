"""A test-only callback that records what each step saw (view shapes, learning rates) and each rank's final state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


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

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.steps.append({"step": trainer.global_step, "epoch": trainer.current_epoch,
                           "views": {k: list(v.shape) for k, v in batch["views"].items()},
                           "index": batch["index"].tolist()})

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self.val.append({"step": trainer.global_step,
                             "views": {k: list(v.shape) for k, v in batch["views"].items()}})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        (self.out / f"steps_rank{rank}.json").write_text(json.dumps({"train": self.steps, "val": self.val}))
        optimizer = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        moments = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        torch.save({"state_dict": pl_module.state_dict(), "moments": moments}, self.out / f"state_rank{rank}.pt")
