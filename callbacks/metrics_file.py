"""``metrics.json`` in the run's log directory: one file that several callbacks add their final figures to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


def run_log_dir(trainer: L.Trainer) -> Path:
    """The run's log directory. Call it on every rank: ``trainer.log_dir`` broadcasts from rank 0, so asking for it
    on rank 0 alone leaves the other ranks' next collective paired with the wrong call (a hang)."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def update_metrics_file(log_dir: Path, values: dict[str, Any], name: str = "metrics.json") -> Path:
    """Merge ``values`` into ``<log_dir>/<name>`` (``log_dir`` from :func:`run_log_dir`) and return its path.

    The file is rewritten through a temporary file and an atomic rename, so a reader (or a crash) never sees it
    half-written. Keys already there and not in ``values`` are kept.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / name
    current: dict[str, Any] = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text())
        except json.JSONDecodeError:
            current = {}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**current, **values}, indent=2) + "\n")
    tmp.replace(path)
    return path
