"""DINOv2's heads: an MLP to a bottleneck, L2 normalization, weight-normed prototypes (DINOv2's ``dino_head.py``).

Shapes: B rows (CLS tokens or masked patch tokens), D the backbone width, K prototypes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from lit_webssl.models.init import init_tree, whole

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """``Linear(in, out, bias=False)`` with weight normalization ``w = g * v / ||v||`` per output row.

    Written out (not ``torch.nn.utils.weight_norm``) so that the two tensors are plain parameters that sharded
    strategies can split, with DINOv2's checkpoint names ``weight_g`` ``(out, 1)`` and ``weight_v`` ``(out, in)``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``v``: PyTorch's ``Linear`` init (as DINOv2's weight-normed ``Linear``); ``g = 1``."""
        if not self.weight_v.is_meta:
            nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
            nn.init.ones_(self.weight_g)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
        return F.linear(x, weight)


def _trunc_normal_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


class DINOHead(nn.Module):
    """DINOv2 head: MLP (``nlayers`` Linear, GELU between) to a bottleneck, L2 norm, weight-normed prototypes.

    Args:
        in_dim: Input width (the backbone's).
        out_dim: Number of prototypes K.
        hidden_dim: MLP hidden width.
        bottleneck_dim: Width before the prototype layer.
        nlayers: Linear layers in the MLP (>= 1).
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3
    ) -> None:
        super().__init__()
        self.init_kwargs = {
            "in_dim": in_dim,
            "out_dim": out_dim,
            "hidden_dim": hidden_dim,
            "bottleneck_dim": bottleneck_dim,
            "nlayers": nlayers,
        }
        """The constructor's arguments: a twin is ``DINOHead(**init_kwargs)`` (the EMA teacher's copy of a head
        whose parameters are partitioned across ranks)."""
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        if not next(self.mlp.parameters()).is_meta:
            init_tree(self.mlp, _trunc_normal_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def init_weights(self) -> None:
        """Re-initialize (after a meta-device build): trunc-normal MLP, fresh weight-normed prototypes."""
        init_tree(self.mlp, _trunc_normal_linear)
        with whole(self.last_layer):
            self.last_layer.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return self.last_layer(F.normalize(x, dim=-1, p=2, eps=eps))
