"""Test helpers: a tiny demo set and running the real CLI in-process or as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from lit_webssl.datamodules.demo import build_demo_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def tiny_demo(root: Path, n_train: int = 160, n_val: int = 60) -> Path:
    """A small demo set (same generator as the real one) under ``root``."""
    return build_demo_dataset(root / "demo", n_train=n_train, n_val=n_val, image_size=48, seed=1)


def fast_overrides(data_dir: Path, steps: int = 3, run_name: str = "test") -> list[str]:
    """Overrides that make any demo config run a few steps on ``data_dir`` in seconds."""
    return [
        "--run_name",
        run_name,
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(max(steps - 1, 1)),
        "--trainer.limit_val_batches",
        "1",
        "--data.init_args.local",
        str(data_dir),
        "--data.init_args.batch_size",
        "16",
        "--data.init_args.num_workers",
        "0",
    ]


def run_cli(*args: str, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m lit_webssl ARGS`` in a subprocess (cwd: the test's tmp dir); ``env`` adds to the environment."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lit_webssl", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
