"""Web-MAE: masked autoencoding over the shared ViT (docs/recipe.md section 4).

Shapes: B batch, N patches, K = N * (1 - mask_ratio) kept patches, D encoder width, E decoder width,
P = patch_size**2 * 3 pixel values per patch.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from lit_webssl.errors import ConfigError
from lit_webssl.models.init import init_tree
from lit_webssl.models.vit import sincos_pos_embed
from lit_webssl.objectives.base import Objective, ObjectiveOutput, StepContext, ViewSpec
from lit_webssl.objectives.losses import MAELoss, patchify

if TYPE_CHECKING:
    from lit_webssl.models.vit import VisionTransformer


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by argsort of uniform noise (MAE reference).

    Returns ``keep_idx`` ``(B, K)`` (sorted by noise), ``mask`` ``(B, N)`` with 1 on removed patches, and
    ``ids_restore`` ``(B, N)`` that undoes the shuffle.
    """
    num_keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    keep_idx = ids_shuffle[:, :num_keep]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :num_keep] = 0
    return keep_idx, torch.gather(mask, 1, ids_restore), ids_restore


class MAEDecoder(nn.Module):
    """The MAE decoder: embed, re-insert mask tokens, fixed sin-cos positions, timm blocks, pixel prediction."""

    def __init__(self, in_dim: int, patch_size: int, dim: int, depth: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3)
        if not self.mask_token.is_meta:
            self.init_weights()

    def init_weights(self) -> None:
        """The MAE reference's init: mask token ~ N(0, 0.02), xavier-uniform linears, zero biases, unit norms."""
        nn.init.normal_(self.mask_token, std=0.02)
        init_tree(self, _xavier)

    def forward(self, latent: Tensor, ids_restore: Tensor, grid: tuple[int, int]) -> Tensor:
        """``latent`` ``(B, 1 + K, D)`` normed encoder tokens -> predictions ``(B, N, P)``."""
        x = self.embed(latent)  # B 1+K E
        b, n = ids_restore.shape
        fill = self.mask_token.to(x.dtype).expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], fill], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, self.dim))  # B N E
        pos = sincos_pos_embed(self.dim, *grid, x.device, x.dtype)
        x = torch.cat([x[:, :1], patches + pos], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


def _xavier(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MAE(Objective):
    """Masked autoencoder (Web-MAE): the encoder sees visible patches only; MSE on masked normalized pixels.

    Args:
        crop_size: Training crop side (RandomResizedCrop); must be divisible by the backbone's patch size.
        crop_scale: RandomResizedCrop area range.
        hflip_p: Horizontal flip probability.
        mask_ratio: Fraction of patches removed per sample (0.75 in MAE and Web-MAE).
        decoder_dim: Decoder width.
        decoder_depth: Decoder blocks.
        decoder_heads: Decoder attention heads.
        decoder_mlp_ratio: Decoder MLP ratio.
        norm_pix_loss: Regress per-patch normalized pixels.
        seed: Seed of the masking noise; each step draws from ``(seed, step, rank)`` so a resumed run masks exactly
            as an uninterrupted one.
    """

    def __init__(
        self,
        crop_size: int = 224,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        hflip_p: float = 0.5,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"--model.objective.init_args.mask_ratio must be in (0, 1), got {mask_ratio}")
        if decoder_dim % decoder_heads:
            raise ConfigError(
                f"--model.objective.init_args.decoder_dim ({decoder_dim}) must be divisible by decoder_heads "
                f"({decoder_heads})"
            )
        self.crop_size = crop_size
        self.crop_scale = tuple(crop_scale)
        self.hflip_p = hflip_p
        self.mask_ratio = mask_ratio
        self.decoder_cfg = {
            "dim": decoder_dim,
            "depth": decoder_depth,
            "num_heads": decoder_heads,
            "mlp_ratio": decoder_mlp_ratio,
        }
        self.seed = seed
        self.loss_fn = MAELoss(norm_pix_loss=norm_pix_loss)
        self.decoder: MAEDecoder | None = None
        self.patch_size = 0

    def configure(self, backbone: VisionTransformer) -> None:
        if self.crop_size % backbone.patch_size:
            raise ConfigError(
                f"--model.objective.init_args.crop_size={self.crop_size} is not divisible by the patch size "
                f"{backbone.patch_size}"
            )
        self.patch_size = backbone.patch_size
        self.decoder = MAEDecoder(backbone.embed_dim, backbone.patch_size, **self.decoder_cfg)

    def init_weights(self, backbone: VisionTransformer) -> None:
        self.decoder.init_weights()

    def views(self) -> list[ViewSpec]:
        return [ViewSpec("image", size=self.crop_size, scale=self.crop_scale, hflip_p=self.hflip_p)]

    def set_resolution(self, global_size: int, local_size: int | None = None) -> None:
        """Training crops of ``global_size``; this objective has no local crops, so ``local_size`` must be ``None``."""
        if local_size is not None:
            raise ConfigError(f"{type(self).__name__} has no local crops; leave the stage's local_crop_size unset")
        self.crop_size = global_size

    def forward(
        self, batch: dict[str, Any], backbone: VisionTransformer, context: StepContext | None = None
    ) -> ObjectiveOutput:
        images = batch["views"]["image"][:, 0]  # B 3 H W
        b, _, h, w = images.shape
        grid = (h // backbone.patch_size, w // backbone.patch_size)
        gen = self.step_generator(images.device, self.seed, context)
        keep_idx, mask, ids_restore = random_masking(b, grid[0] * grid[1], self.mask_ratio, gen, images.device)
        out = backbone(images, keep_idx=keep_idx)
        latent = torch.cat([out["x_norm_clstoken"].unsqueeze(1), out["x_norm_patchtokens"]], dim=1)
        pred = self.decoder(latent, ids_restore, grid)
        loss = self.loss_fn(pred, patchify(images, backbone.patch_size), mask)
        return ObjectiveOutput(loss=loss, metrics={"mae": loss.detach()})
