"""Every built-in objective passes the shared contract."""

from __future__ import annotations

from contract import ObjectiveContract
from lit_webssl.objectives import MAE


class TestMAEContract(ObjectiveContract):
    def make_objective(self, crop_size: int) -> MAE:
        return MAE(crop_size=crop_size, decoder_dim=32, decoder_depth=1, decoder_heads=2)
