"""A shared contract every objective subclass must pass (subclass ``ObjectiveContract`` once per objective)."""

from __future__ import annotations

import abc
import math

import torch

from lit_webssl.models.presets import build_backbone
from lit_webssl.objectives.base import Objective, ObjectiveOutput, StepContext, ViewSpec


def fake_batch(objective: Objective, batch_size: int = 4, seed: int = 0) -> dict:
    """A normalized random batch with the views ``objective`` declares."""
    gen = torch.Generator().manual_seed(seed)
    views = {v.name: torch.randn(batch_size, v.count, 3, v.size, v.size, generator=gen) for v in objective.views()}
    batch = {"views": views, "label": torch.arange(batch_size)}
    if objective.needs_text:
        batch["caption"] = [f"a photo of thing {i}" for i in range(batch_size)]
    return batch


class ObjectiveContract(abc.ABC):
    backbone = "vit_debug"

    @abc.abstractmethod
    def make_objective(self, crop_size: int) -> Objective:
        """The objective under test, training at ``crop_size``."""

    def _setup(self, crop_size: int = 32):
        torch.manual_seed(0)
        backbone = build_backbone(self.backbone)
        objective = self.make_objective(crop_size)
        objective.configure(backbone)
        return backbone, objective

    def test_declares_views(self):
        _, objective = self._setup()
        views = objective.views()
        assert views and all(isinstance(v, ViewSpec) for v in views)
        assert len({v.name for v in views}) == len(views)

    def test_returns_finite_scalar_loss_and_flat_metrics(self):
        backbone, objective = self._setup()
        out = objective(fake_batch(objective), backbone)
        assert isinstance(out, ObjectiveOutput)
        assert out.loss.ndim == 0 and math.isfinite(out.loss.item())
        assert all(isinstance(k, str) and v.ndim == 0 for k, v in out.metrics.items())

    def test_gradients_reach_the_backbone(self):
        backbone, objective = self._setup()
        objective(fake_batch(objective), backbone).loss.backward()
        grads = [p.grad for p in backbone.blocks.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0

    def test_metric_keys_are_stable(self):
        backbone, objective = self._setup()
        first = objective(fake_batch(objective, seed=0), backbone).metrics.keys()
        second = objective.compute(fake_batch(objective, seed=1), backbone, StepContext(step=1)).metrics.keys()
        assert first == second

    def test_works_at_two_resolutions(self):
        for size in (32, 48):
            backbone, objective = self._setup(size)
            assert max(v.size for v in objective.views()) == size
            assert math.isfinite(objective(fake_batch(objective), backbone).loss.item())

    def test_param_groups_cover_trainable_parameters_once(self):
        backbone, objective = self._setup()
        groups = objective.param_groups(backbone, weight_decay=0.05)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids))
        expected = {id(p) for p in backbone.parameters() if p.requires_grad}
        expected |= {id(p) for _, p in objective.trainable_named_parameters()}
        assert set(ids) == expected
