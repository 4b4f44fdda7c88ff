"""``plan``: build the configured model on the meta device and report its size, with no memory allocated."""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lit_webssl.module import LitWebSSL

GIB = 1024**3


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (unique tensors), optionally only those with ``requires_grad``."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def forward_gflops(model: LitWebSSL, size: int) -> float:
    """Approximate forward GFLOPs per image at ``size`` px (2 x multiply-adds of the linear layers and attention)."""
    bb = model.backbone
    tokens = 1 + (size // bb.patch_size) ** 2
    block_params = sum(p.numel() for n, p in bb.blocks.named_parameters() if p.ndim == 2)
    attention = 2 * tokens * tokens * bb.embed_dim * bb.depth  # QK^T and AV
    patch = bb.patch_embed.proj.weight.numel() * (tokens - 1)
    return 2 * (tokens * block_params + attention + patch) / 1e9


def print_plan(model: LitWebSSL, datamodule: Any = None, console: Console | None = None) -> dict[str, Any]:
    """Build ``model`` on the meta device and print its shape, parameters and per-replica state sizes."""
    console = console or Console()
    with torch.device("meta"):
        model.configure_model()
    bb = model.backbone
    backbone_params = count_params(bb)
    objective_params = count_params(model.objective)
    trainable = count_params(bb, True) + count_params(model.objective, True)
    views = model.objective.views()
    info = {
        "backbone": model.backbone_name,
        "backbone_parameters": backbone_params,
        "objective_parameters": objective_params,
        "trainable_parameters": trainable,
    }
    console.print(f"backbone parameters: {backbone_params}")
    console.print(f"objective parameters: {objective_params}")
    table = Table(title=f"{model.backbone_name} + {type(model.objective).__name__}")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("width / depth / heads", f"{bb.embed_dim} / {bb.depth} / {bb.num_heads}")
    table.add_row("patch / native grid", f"{bb.patch_size} / {bb.grid_size}x{bb.grid_size}")
    for v in views:
        table.add_row(f"view {v.name}", f"{v.count} x {v.size}px, {(v.size // bb.patch_size) ** 2} patches")
        table.add_row("  backbone fwd GFLOPs/crop", f"{forward_gflops(model, v.size):.2f}")
    table.add_row("trainable parameters", f"{trainable / 1e6:,.2f} M")
    table.add_row("fp32 weights + grads + AdamW (unsharded)", f"{16 * trainable / GIB:,.2f} GiB")
    if datamodule is not None and getattr(datamodule, "batch_size", None):
        table.add_row("per-device batch", str(datamodule.batch_size))
    console.print(table)
    return info
