"""The SimCLR objective: two augmented views per image, a projection MLP on the CLS token, NT-Xent.

Shapes: B images per batch, D backbone width, H projection hidden width, P projection width, S crop side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lit_webssl.errors import ConfigError
from lit_webssl.objectives import Objective, ObjectiveOutput, ViewSpec
from lit_webssl_simclr.ntxent_loss import NTXentLoss

if TYPE_CHECKING:
    from lit_webssl.models.vit import VisionTransformer


class ProjectionHead(nn.Sequential):
    """SimCLR's projection MLP: Linear, BatchNorm, ReLU, Linear (the loss reads its output, probes do not)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class SimCLR(Objective):
    """SimCLR: NT-Xent between the projected CLS tokens of two augmented views of each image.

    Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual Representations",
    ICML 2020. Both views go through the backbone in one batch of 2B, so the head's BatchNorm sees both.

    Args:
        crop_size: Side of both crops in pixels; must be divisible by the backbone's patch size.
        crop_scale: RandomResizedCrop area range.
        hflip_p: Horizontal flip probability.
        color_jitter_p: Probability of colour jitter (0.8 in SimCLR).
        color_jitter: Brightness, contrast, saturation, hue strengths (SimCLR's strength 1: 0.8, 0.8, 0.8, 0.2).
        grayscale_p: Probability of converting a crop to grayscale (0.2 in SimCLR).
        blur_p: Probability of a Gaussian blur (0.5 in SimCLR on ImageNet; 0 for small images).
        temperature: NT-Xent temperature (> 0).
        proj_hidden_dim: Hidden width of the projection MLP.
        proj_dim: Output width of the projection MLP, where the loss is computed.
    """

    def __init__(
        self,
        crop_size: int = 224,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip_p: float = 0.5,
        color_jitter_p: float = 0.8,
        color_jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2),
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        temperature: float = 0.1,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
    ) -> None:
        super().__init__()
        for flag, value in (("proj_hidden_dim", proj_hidden_dim), ("proj_dim", proj_dim)):
            if value < 1:
                raise ConfigError(f"--model.objective.init_args.{flag} must be >= 1, got {value}")
        self.view = ViewSpec(
            "pair",
            size=crop_size,
            count=2,
            scale=tuple(crop_scale),
            hflip_p=hflip_p,
            color_jitter_p=color_jitter_p,
            color_jitter=tuple(color_jitter),
            grayscale_p=grayscale_p,
            blur_p=blur_p,
        )  # checked here, so a bad probability stops the run before anything is built
        self.proj_hidden_dim = proj_hidden_dim
        self.proj_dim = proj_dim
        self.loss_fn = NTXentLoss(temperature)
        self.head: ProjectionHead | None = None

    def configure(self, backbone: VisionTransformer) -> None:
        if self.view.size % backbone.patch_size:
            raise ConfigError(
                f"--model.objective.init_args.crop_size={self.view.size} is not divisible by the patch size "
                f"{backbone.patch_size}"
            )
        self.head = ProjectionHead(backbone.embed_dim, self.proj_hidden_dim, self.proj_dim)

    def views(self) -> list[ViewSpec]:
        return [self.view]

    def forward(self, batch: dict[str, Any], backbone: VisionTransformer) -> ObjectiveOutput:
        pair = batch["views"]["pair"]  # B 2 3 S S
        b = pair.shape[0]
        images = torch.cat([pair[:, 0], pair[:, 1]])  # 2B 3 S S: first views, then second views
        z = self.head(backbone(images)["x_norm_clstoken"])  # 2B P
        z_a, z_b = z[:b], z[b:]
        loss = self.loss_fn(z_a, z_b)
        return ObjectiveOutput(loss=loss, metrics={"ntxent": loss.detach(), **self._stats(z_a, z_b)})

    @torch.no_grad()
    def _stats(self, z_a: Tensor, z_b: Tensor) -> dict[str, Tensor]:
        """Diagnostics: mean cosine to the positive and to the negatives, and how often the positive ranks first."""
        logits, targets = self.loss_fn.logits_and_targets(z_a.detach(), z_b.detach())
        cos = logits * self.loss_fn.temperature  # 2B 2B, -inf on the diagonal
        positive = cos.gather(1, targets[:, None]).squeeze(1)
        n = cos.shape[0]
        negative_sum = cos.masked_fill(torch.isinf(cos), 0.0).sum(1) - positive
        return {
            "stats/pos_cos": positive.mean(),
            "stats/neg_cos": (negative_sum / max(n - 2, 1)).mean(),
            "stats/top1": (logits.argmax(1) == targets).float().mean(),
        }
