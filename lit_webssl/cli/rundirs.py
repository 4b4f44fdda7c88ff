"""Run directories: every run writes to ``<save_dir>/<name>/version_<n>/``, its checkpoints to
``<save_dir>/<name>/checkpoints/`` (so ``fit --ckpt_path last`` finds the newest one across versions).

Standard library only: ``compare`` reads the run directories without importing Lightning or the CLI.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

RUNS_DIR = "runs"
"""Default ``save_dir`` of the loggers, relative to the working directory."""

_VERSION = re.compile(r"version_(\d+)")


def versions(run_root: Path) -> dict[int, Path]:
    """The ``version_<n>`` directories under ``run_root`` by ``n``."""
    return {int(m.group(1)): p for p in run_root.glob("version_*") if (m := _VERSION.fullmatch(p.name))}


def newest_version(run_root: Path) -> Path | None:
    """The ``version_<n>`` directory with the largest ``n`` under ``run_root``; ``None`` if there is none."""
    found = versions(run_root)
    return found[max(found)] if found else None


def assign_run_dirs(trainer_cfg: Any, run_name: str | None) -> None:
    """Name the loggers, give those without a version the same next free ``version_<n>`` and point checkpoints
    without a ``dirpath`` at ``<save_dir>/<name>/checkpoints``.

    Args:
        trainer_cfg: The parsed ``trainer`` group (``logger`` and ``callbacks`` as ``class_path``/``init_args``).
        run_name: ``--run_name``; sets the ``name`` of every logger that has one.
    """
    loggers = trainer_cfg.logger if isinstance(trainer_cfg.logger, list) else [trainer_cfg.logger]
    loggers = [lg for lg in loggers if lg not in (None, True, False) and "init_args" in lg]
    if not loggers:
        return
    for lg in loggers:
        if run_name and "name" in _init_arg_names(lg["class_path"]):
            lg["init_args"]["name"] = run_name
    first = loggers[0]["init_args"]
    root = Path(first.get("save_dir") or RUNS_DIR) / (first.get("name") or "")
    version = f"version_{max(versions(root), default=-1) + 1}"
    for lg in loggers:
        if lg["init_args"].get("version") is None and "version" in _init_arg_names(lg["class_path"]):
            lg["init_args"]["version"] = version
    callbacks = trainer_cfg.callbacks or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        if cb is not None and cb["class_path"].endswith("ModelCheckpoint") and not cb["init_args"].get("dirpath"):
            cb["init_args"]["dirpath"] = str(root / "checkpoints")


def _init_arg_names(class_path: str) -> set[str]:
    module, _, name = class_path.rpartition(".")
    return set(inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters)
