"""Golden losses: the seeded demo configs reproduce their stored per-step losses exactly (CPU, fp32, one thread).

A change that should not change the numerics (a refactor, a move of code between modules) must keep these equal to
the last bit. A change that means to change them regenerates the files and says why in its commit::

    python tests/test_golden_losses.py   # rewrites tests/assets/losses/*.json
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import CONFIGS, fast_overrides, tiny_demo  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets" / "losses"
DEMOS = {"dino": "dino_tiny.yaml", "mae": "mae_tiny.yaml", "clip": "clip_tiny.yaml"}
STEPS = 4


def record_losses(objective: str, root: Path, extra: list[str] | None = None) -> dict[str, list[float]]:
    """Fit the demo config of ``objective`` for :data:`STEPS` steps in this process and read back every logged loss
    (``train/loss`` per step, ``val/loss`` at the one validation) from the CSV log; ``extra``: more flags."""
    from lit_webssl.cli import main

    data = tiny_demo(root)
    torch.set_num_threads(1)
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "demo" / DEMOS[objective]),
            *fast_overrides(data, steps=STEPS),
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.default_root_dir",
            str(root),
            *(extra or []),
        ]
    )
    (metrics,) = Path("runs").glob("test/version_*/metrics.csv")
    out: dict[str, list[float]] = {"train/loss": [], "val/loss": []}
    with metrics.open() as f:
        for row in csv.DictReader(f):
            for key in out:
                if row.get(key):
                    out[key].append(float(row[key]))
    return out


@pytest.mark.parametrize("objective", sorted(DEMOS))
def test_demo_losses_equal_the_golden_ones(objective, tmp_path, one_thread):
    golden = json.loads((ASSETS / f"{objective}_tiny_cpu.json").read_text())
    got = record_losses(objective, tmp_path)
    assert len(got["train/loss"]) == STEPS and len(got["val/loss"]) == 1
    assert got == golden["losses"], f"{objective}: losses changed (see this module's docstring)"


if __name__ == "__main__":  # regenerate
    import os
    import tempfile

    ASSETS.mkdir(parents=True, exist_ok=True)
    for name in sorted(DEMOS):
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            os.environ["TMPDIR"] = tmp
            losses = record_losses(name, Path(tmp))
        record = {
            "config": f"configs/demo/{DEMOS[name]}",
            "steps": STEPS,
            "device": "cpu",
            "precision": "32-true",
            "threads": 1,
            "torch": torch.__version__,
            "losses": losses,
        }
        (ASSETS / f"{name}_tiny_cpu.json").write_text(json.dumps(record, indent=1) + "\n")
        print(name, losses)
