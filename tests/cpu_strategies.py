"""Test-only: Lightning's DeepSpeed strategy on CPU ranks over gloo (Lightning refuses CPU for it).

Lightning's ``DeepSpeedStrategy`` insists on CUDA. This subclass skips that guard, puts the root device on the CPU and
leaves out the device-index checks, which is enough to run ZeRO-3 fit / save / resume on 2 CPU processes with
``DS_ACCELERATOR=cpu``. Importing this module also turns DeepSpeed's CPU shared-memory op build (a ~45 s JIT compile
on first use, not needed over gloo) into a no-op. Runs use it as
``--trainer.strategy cpu_strategies.CPUDeepSpeedStrategy`` with this directory on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed.comm.torch  # noqa: E402,F401 - the module object whose op build we switch off
import torch  # noqa: E402
from lightning.pytorch.strategies import DeepSpeedStrategy  # noqa: E402
from lightning.pytorch.strategies.ddp import DDPStrategy  # noqa: E402

sys.modules["deepspeed.comm.torch"].build_shm_op = lambda *args, **kwargs: None


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` that runs on CPU processes (gloo): for tests only."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skip DeepSpeedStrategy's CUDA guard

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
