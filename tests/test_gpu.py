"""On a CUDA GPU (skipped elsewhere, marker ``gpu``): the demo configs train on the device in bf16-mixed, and in fp32
the first steps' losses agree with the CPU golden losses (tests/assets/losses/) to float tolerance."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_golden_losses import ASSETS, DEMOS, STEPS, record_losses

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("objective", sorted(DEMOS))
def test_demo_config_on_the_gpu_matches_the_cpu_golden_losses(objective, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions (the patch embedding)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    golden = json.loads((ASSETS / f"{objective}_tiny_cpu.json").read_text())["losses"]
    got = record_losses(objective, tmp_path, extra=["--trainer.accelerator", "cuda"])
    assert len(got["train/loss"]) == STEPS
    # different kernels (TF32 off in fp32, other reduction orders): equal to float tolerance, not to the bit
    torch.testing.assert_close(got["train/loss"], golden["train/loss"], rtol=2e-3, atol=0.0)


@pytest.mark.parametrize("objective", sorted(DEMOS))
def test_demo_config_trains_in_bf16_mixed_on_the_gpu(objective, tmp_path):
    got = record_losses(
        objective, tmp_path, extra=["--trainer.accelerator", "cuda", "--trainer.precision", "bf16-mixed"]
    )
    assert got["train/loss"] and all(math.isfinite(v) for v in got["train/loss"] + got["val/loss"])
