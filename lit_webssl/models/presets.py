"""Backbone presets by name: a debug flavour, the classic ViT sizes and the Web-SSL family (docs/recipe.md
section 1)."""

from __future__ import annotations

import inspect
from typing import Any

from lit_webssl.errors import ConfigError
from lit_webssl.models.vit import VisionTransformer

_DINO = {"patch_size": 14, "ffn": "swiglu", "layerscale": 1e-5, "img_size": 224}
_MAE = {
    "patch_size": 14,
    "ffn": "mlp",
    "layerscale": None,
    "img_size": 224,
    "pos_embed": "sincos",
    "weight_init": "xavier",
}

PRESETS: dict[str, dict[str, Any]] = {
    # 2 blocks, width 32, patch 4 at 32 px: the whole loop runs on a CPU in seconds.
    "vit_debug": {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    # Web-DINO (DINOv2 layout: SwiGLU, LayerScale 1e-5, patch 14, no registers).
    "webdino_300m": {**_DINO, "embed_dim": 1024, "depth": 24, "num_heads": 16},
    "webdino_1b": {**_DINO, "embed_dim": 1536, "depth": 40, "num_heads": 24},
    "webdino_2b": {**_DINO, "embed_dim": 2688, "depth": 24, "num_heads": 21},
    "webdino_3b": {**_DINO, "embed_dim": 3072, "depth": 26, "num_heads": 24},
    "webdino_5b": {**_DINO, "embed_dim": 3584, "depth": 32, "num_heads": 28},
    "webdino_7b": {**_DINO, "embed_dim": 4096, "depth": 32, "num_heads": 32},
    # Web-MAE (timm ViT layout: GELU MLP 4x; patch 16 for ViT-L, 14 above).
    "webmae_300m": {**_MAE, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16},
    "webmae_700m": {**_MAE, "embed_dim": 1280, "depth": 32, "num_heads": 16},
    "webmae_1b": {**_MAE, "embed_dim": 1536, "depth": 40, "num_heads": 24},
    "webmae_2b": {**_MAE, "embed_dim": 2688, "depth": 24, "num_heads": 21},
    "webmae_3b": {**_MAE, "embed_dim": 3072, "depth": 26, "num_heads": 24},
}

_ARGS = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self", "device"}


def build_backbone(
    name: str, overrides: dict[str, Any] | None = None, device: str | None = None, flag: str = "--model.backbone"
) -> VisionTransformer:
    """Build the preset ``name`` with ``overrides`` applied; errors name ``flag`` and list the valid choices."""
    if name not in PRESETS:
        raise ConfigError(f"{flag}: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - _ARGS)
    if unknown:
        raise ConfigError(f"{flag}_overrides: unknown backbone argument(s) {unknown}; valid: {sorted(_ARGS)}")
    return VisionTransformer(**{**PRESETS[name], **overrides}, device=device)
