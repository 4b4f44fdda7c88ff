"""Test-only callback for the sharded-strategy tests: records the sample ids each rank trains on, step by step."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RecordBatches(L.Callback):
    """Writes ``<out>/rank<r>.json``: ``{global_step: [sample ids of the batch]}`` for every training batch.

    Args:
        out: Folder to write to (one file per rank, merged with what a previous run of the same folder wrote).
    """

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.seen: dict[str, list[int]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.seen[str(trainer.global_step)] = [int(i) for i in batch["index"]]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"rank{trainer.global_rank}.json"
        previous = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**previous, **self.seen}))
