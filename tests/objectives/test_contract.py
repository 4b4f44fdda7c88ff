"""Every built-in objective passes the shared contract (DINOv2's subclass lives in test_dino.py)."""

from __future__ import annotations

from contract import ObjectiveContract, fake_batch

from lit_webssl.objectives import CLIP, MAE


class TestMAEContract(ObjectiveContract):
    def make_objective(self, crop_size: int) -> MAE:
        return MAE(crop_size=crop_size, decoder_dim=32, decoder_depth=1, decoder_heads=2)


class TestCLIPContract(ObjectiveContract):
    def make_objective(self, crop_size: int) -> CLIP:
        return CLIP(crop_size=crop_size, embed_dim=16, text_width=32, text_layers=2, text_heads=2, context_length=16)

    def test_gradients_reach_the_text_tower_and_logit_scale(self):
        backbone, objective = self._setup()
        objective(fake_batch(objective), backbone).loss.backward()
        assert objective.logit_scale.grad is not None and objective.logit_scale.grad != 0
        assert objective.text.text_projection.grad.abs().sum() > 0
        assert objective.image_proj.weight.grad.abs().sum() > 0
