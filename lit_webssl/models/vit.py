"""The one ViT shared by every objective, built from timm's blocks.

Shape legend used in comments: B batch, N patch tokens, K kept patch tokens (MAE), D width, H x W crop size.

The layout follows DINOv2's ``DinoVisionTransformer`` (patch embed, CLS token, learned absolute position embedding
over 1 + grid, a learned ``mask_token`` for iBOT, pre-norm blocks, final LayerNorm), with timm's ``Block``,
``GluMlp`` (SwiGLU) and ``Mlp`` (GELU) doing the work. Presets live in :mod:`lit_webssl.models.presets`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache, partial
from typing import Literal

import torch
from timm.layers import GluMlp, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lit_webssl.distributed import copy_whole_, full_shape, init_module_tree, is_sharded
from lit_webssl.errors import ConfigError

FFN = Literal["mlp", "swiglu"]


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """DINOv2's SwiGLU hidden width: ``(int(ratio * dim * 2 / 3) + 7) // 8 * 8`` (keeps params ~ a GELU MLP)."""
    return (int(mlp_ratio * dim * 2 / 3) + 7) // 8 * 8


def _swiglu_layer(mlp_ratio: float):
    """A timm ``mlp_layer`` factory building DINOv2's fused SwiGLU (``w12`` packed, gate first) via ``GluMlp``."""

    def build(in_features: int, hidden_features: int | None = None, **kwargs) -> nn.Module:
        hidden = swiglu_hidden(in_features, mlp_ratio)
        kwargs.pop("act_layer", None)
        kwargs.pop("norm_layer", None)
        return GluMlp(in_features, hidden_features=2 * hidden, act_layer=nn.SiLU, gate_last=False, **kwargs)

    return build


@lru_cache(maxsize=32)
def sincos_pos_embed(
    dim: int, grid_h: int, grid_w: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``(grid_h * grid_w, dim)``, as in the MAE reference (no CLS row).

    Cached per shape, device and dtype: a step at a non-native resolution would otherwise rebuild it and copy it
    host-to-device (a synchronizing copy) every step. Do not modify the result in place.
    """
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return sincos_pos_embed(dim, grid_h, grid_w).to(device=device, dtype=dtype)
    if dim % 4:
        raise ConfigError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for pos in (xs.reshape(-1), ys.reshape(-1)):  # MAE: first half encodes w, second half h
        out = pos[:, None] * omega[None, :]
        parts += [out.sin(), out.cos()]
    return torch.cat(parts, dim=1).float()


class VisionTransformer(nn.Module):
    """ViT encoder with the Web-SSL layout; returns a fixed dict of named tokens.

    Args:
        img_size: Native crop size; sizes the learned position-embedding grid (any multiple of the patch size
            runs, the grid is interpolated on the fly).
        patch_size: Patch side in pixels (14 for the Web-SSL family, 16 for ViT-L MAE).
        embed_dim: Width D.
        depth: Number of blocks.
        num_heads: Attention heads (D must be divisible by it).
        mlp_ratio: MLP hidden width as a multiple of D (the SwiGLU hidden width follows DINOv2's 2/3 rule).
        ffn: ``"swiglu"`` (Web-DINO) or ``"mlp"`` (GELU; Web-MAE, CLIP).
        layerscale: LayerScale init value (1e-5 for Web-DINO), ``None`` for no LayerScale.
        qkv_bias: Bias in the qkv projection.
        drop_path_rate: Stochastic depth rate.
        drop_path_uniform: Same drop-path rate in every block (DINOv2) instead of linearly increasing.
        pos_embed: ``"learned"`` (DINOv2, trunc-normal init) or ``"sincos"`` (fixed 2-D sin-cos, MAE).
        weight_init: ``"trunc_normal"`` (DINOv2: std 0.02) or ``"xavier"`` (MAE reference).
        grad_checkpointing: Recompute each block in the backward pass (activation checkpointing).
        in_chans: Input channels.
        device: Device to build on (``"meta"`` builds without memory).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        ffn: FFN = "mlp",
        layerscale: float | None = None,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        pos_embed: Literal["learned", "sincos"] = "learned",
        weight_init: Literal["trunc_normal", "xavier"] = "trunc_normal",
        grad_checkpointing: bool = False,
        in_chans: int = 3,
        device: torch.device | str | None = None,
    ) -> None:
        init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "device", "__class__")}
        super().__init__()
        self.init_kwargs = init_kwargs
        """The constructor's arguments (``device`` aside): a twin of this backbone is ``VisionTransformer(
        **init_kwargs)`` (how an EMA teacher copies a backbone whose parameters are partitioned across ranks)."""
        check_img_size(img_size, patch_size, flag="--model.backbone_overrides.img_size")
        if embed_dim % num_heads:
            raise ConfigError(
                f"--model.backbone_overrides: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.depth = depth
        self.num_prefix_tokens = 1
        self.pos_embed_kind = pos_embed
        self.weight_init = weight_init
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False, device=device)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, device=device))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim, device=device))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, 1 + grid * grid, embed_dim, device=device), requires_grad=pos_embed == "learned"
        )
        step = drop_path_rate / max(depth - 1, 1)
        rates = [drop_path_rate] * depth if drop_path_uniform else [i * step for i in range(depth)]
        mlp_layer = _swiglu_layer(mlp_ratio) if ffn == "swiglu" else Mlp
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                init_values=layerscale,
                drop_path=rates[i],
                norm_layer=norm,
                mlp_layer=mlp_layer,
                device=device,
            )
            for i in range(depth)
        )
        self.norm = norm(embed_dim, device=device)
        if not self.pos_embed.is_meta:  # meta: shapes only (plan, sharded init)
            self.init_weights()

    @property
    def grid_size(self) -> int:
        """Side of the native patch grid stored in ``pos_embed``."""
        return math.isqrt(full_shape(self.pos_embed)[1] - self.num_prefix_tokens)

    def init_weights(self, materialize: bool = False) -> None:
        """DINOv2 init (trunc-normal 0.02, zero bias, CLS ~ N(0, 1e-6)) or the MAE reference's xavier init.

        Runs module by module (:func:`lit_webssl.distributed.init_module_tree`), so it also initializes a model built
        partitioned as it is built (each submodule gathered in turn) or sharded after a meta-device build (on its
        shards).

        Args:
            materialize: The parameters hold garbage (a meta-device build moved to real memory with ``to_empty``):
                also run the constructors' own init (``reset_parameters``: patch-embedding conv, LayerScale).
        """
        init_module_tree(self, partial(self._init_module, materialize=materialize))

    def _init_module(self, module: nn.Module, materialize: bool = False) -> None:
        if materialize and module is not self and callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()  # constructor init first, as in an ordinary build; then the recipe's
        if module is self:
            if self.pos_embed_kind == "sincos":  # a zero CLS row, then the grid's table (whole, then sharded)
                table = sincos_pos_embed(self.embed_dim, self.grid_size, self.grid_size)
                copy_whole_(self.pos_embed, torch.cat([table.new_zeros(1, self.embed_dim), table])[None])
            else:
                trunc_normal_(self.pos_embed, std=0.02)
            nn.init.zeros_(self.mask_token)
            nn.init.normal_(self.cls_token, std=0.02 if self.weight_init == "xavier" else 1e-6)
        elif module is self.patch_embed.proj and self.weight_init == "xavier":
            w = module.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        elif isinstance(module, nn.Linear):
            if self.weight_init == "xavier":
                nn.init.xavier_uniform_(module.weight)
            else:
                trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def pos_embed_for(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embedding ``(1, 1 + grid_h * grid_w, D)`` for a patch grid, interpolated if not native."""
        if (grid_h, grid_w) == (self.grid_size, self.grid_size):
            return self.pos_embed
        return self.table_at(self.pos_embed, grid_h, grid_w)

    def table_at(self, table: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """``table`` (this ViT's whole position table, or a copy of it) at another grid: a learned table through
        timm's bicubic ``resample_abs_pos_embed`` (no antialias), a sin-cos one recomputed; the CLS row kept."""
        if self.pos_embed_kind == "sincos":
            patch = sincos_pos_embed(self.embed_dim, grid_h, grid_w, table.device, table.dtype)
            return torch.cat([table[:, :1], patch[None]], dim=1)
        return resample_abs_pos_embed(
            table, [grid_h, grid_w], num_prefix_tokens=self.num_prefix_tokens, antialias=False
        )

    def resample_pos_embed(self, grid: int) -> None:
        """Permanently change the native grid to ``grid x grid``: ``pos_embed`` becomes a new ``Parameter``.

        A learned table is resampled with the interpolation :meth:`pos_embed_for` applies on the fly (timm's bicubic
        ``resample_abs_pos_embed``, no antialias), so at the new native size the network computes exactly what it
        computed before; a sin-cos table is recomputed. The CLS row is kept. ``patch_embed``'s nominal image size
        follows (probes read the native size from it). Whoever holds the old parameter (an optimizer, a DDP
        wrapper) must be updated by the caller; see :mod:`lit_webssl.callbacks.resolution`.

        Args:
            grid: Side of the new patch grid (``img_size // patch_size``), >= 1.
        """
        if grid < 1:
            raise ConfigError(f"position-embedding grid must be >= 1, got {grid}")
        if grid == self.grid_size:
            return
        old = self.pos_embed
        if is_sharded(old):  # split across ranks: its shape cannot change in place
            raise ConfigError(
                "cannot change the grid of a sharded position embedding: build the model at the "
                "stage's --model.backbone_overrides.img_size instead (docs/resolution.md)"
            )
        with torch.no_grad():
            table = self.pos_embed_for(grid, grid).detach().clone()
        self.set_pos_embed(table, requires_grad=old.requires_grad)

    def set_pos_embed(self, table: Tensor, requires_grad: bool = True) -> None:
        """Make the whole ``(1, prefix + grid**2, D)`` ``table`` the native position table (a new ``Parameter``),
        and the patch embedding's nominal size its grid's."""
        grid = grid_of(table, self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(table, requires_grad=requires_grad)
        size = grid * self.patch_size
        self.patch_embed.img_size = (size, size)
        self.patch_embed.grid_size = (grid, grid)
        self.patch_embed.num_patches = grid * grid

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None, keep_idx: Tensor | None = None) -> Tensor:
        """Patchify, apply mask tokens, add positions, keep a subset (MAE), prepend CLS: ``(B, 1 + N|K, D)``."""
        _, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ConfigError(f"crop size {h}x{w} is not divisible by the patch size {self.patch_size}")
        tokens = self.patch_embed(x)  # B N D
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        pos = self.pos_embed_for(h // self.patch_size, w // self.patch_size)
        tokens = tokens + pos[:, 1:]
        if keep_idx is not None:
            tokens = torch.gather(tokens, 1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # B K D
        cls = (self.cls_token + pos[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def forward(self, x: Tensor, masks: Tensor | None = None, keep_idx: Tensor | None = None) -> dict[str, Tensor]:
        """Encode a batch of crops.

        Args:
            x: Images ``(B, 3, H, W)``, H and W multiples of the patch size.
            masks: Optional bool ``(B, N)``; True patches are replaced by the learned mask token (iBOT).
            keep_idx: Optional int64 ``(B, K)`` indices of the patches the encoder sees (MAE).

        Returns:
            ``x_norm_clstoken`` ``(B, D)``, ``x_norm_patchtokens`` ``(B, N|K, D)``, ``x_prenorm`` ``(B, 1+N|K, D)``.
        """
        tokens = self.prepare_tokens(x, masks, keep_idx)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        normed = self.norm(tokens)
        return {"x_norm_clstoken": normed[:, 0], "x_norm_patchtokens": normed[:, 1:], "x_prenorm": tokens}


def check_img_size(size: int, patch_size: int, flag: str) -> None:
    """Raise a one-line error naming ``flag`` when ``size`` is not a positive multiple of ``patch_size``."""
    if size <= 0 or size % patch_size:
        raise ConfigError(f"{flag}={size} is not divisible by the patch size {patch_size}")


def match_pos_embed_grids(root: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Give every :class:`VisionTransformer` under ``root`` the position-embedding grid ``state_dict`` stores.

    Called before loading a checkpoint taken at another native resolution (a high-res stage), so the shapes match;
    the loaded values then replace the resampled ones. Keys are ``root``'s own names (``backbone.pos_embed``,
    ``objective.teacher.backbone.pos_embed``); ViTs without an entry are left alone.

    Returns:
        The keys whose grid changed.
    """
    changed = []
    for key, module, stored in _stored_pos_embeds(root, state_dict):
        if tuple(stored.shape) == tuple(module.pos_embed.shape):
            continue
        module.resample_pos_embed(grid_of(stored, module.num_prefix_tokens, key))
        changed.append(key)
    return changed


def _stored_pos_embeds(root: nn.Module, state_dict: Mapping[str, Tensor]):
    """``(key, module, stored table)`` for every :class:`VisionTransformer` under ``root`` with an entry in
    ``state_dict`` (keys are ``root``'s own names)."""
    for name, module in list(root.named_modules()):
        if isinstance(module, VisionTransformer):
            key = f"{name}.pos_embed" if name else "pos_embed"
            if key in state_dict:
                yield key, module, state_dict[key]


def grid_of(pos_embed: Tensor, num_prefix_tokens: int = 1, name: str = "pos_embed") -> int:
    """Side of the square patch grid of a ``(1, prefix + grid**2, D)`` position-embedding table."""
    tokens = pos_embed.shape[-2] - num_prefix_tokens
    grid = math.isqrt(max(tokens, 0))
    if tokens < 1 or grid * grid != tokens:
        raise ConfigError(f"{name}: {tokens} patch positions do not form a square grid")
    return grid


def fit_pos_embed_grids(root: nn.Module, state_dict: dict[str, Tensor]) -> list[str]:
    """The opposite of :func:`match_pos_embed_grids`: resample, in ``state_dict``, every stored position embedding
    of a :class:`VisionTransformer` under ``root`` to that module's grid (weights taken at 224 px loaded into a
    378 px run). Learned tables are interpolated as :meth:`VisionTransformer.pos_embed_for` does; a fixed sin-cos
    table is dropped from ``state_dict``, so the module keeps its own exact one.

    Returns:
        The keys that were resampled.
    """
    changed = []
    for key, module, stored in _stored_pos_embeds(root, state_dict):
        if tuple(stored.shape[-2:]) == (module.grid_size**2 + module.num_prefix_tokens, module.embed_dim):
            continue
        if module.pos_embed_kind == "sincos":
            del state_dict[key]
            continue
        grid = module.grid_size
        grid_of(stored, module.num_prefix_tokens, key)  # a clear error for a non-square table
        state_dict[key] = resample_abs_pos_embed(
            stored.float(), [grid, grid], num_prefix_tokens=module.num_prefix_tokens, antialias=False
        )
        changed.append(key)
    return changed
