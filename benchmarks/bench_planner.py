"""The memory planner (``python -m lit_webssl plan``) against measurements; prints estimate, measurement and ratio.

CPU (default), tiny models (patch 4, heads of a few hundred prototypes), 8 images:

* saved activations: the planner's saved items (+ autocast weight copies) against the unique storages that
  ``torch.autograd.graph.saved_tensors_hooks`` sees in one real objective step (DINO multi-crop, MAE; GELU, SwiGLU;
  fp32, bf16 autocast; SDPA and the math attention path);
* CPU peak: activations + gradients against glibc's peak bytes in use (``mallinfo2`` sampled after every aten op)
  over forward + backward, with and without activation checkpointing.

GPU (``--gpu``): a depth-reduced Web-DINO ViT-7B (width 4096, the config's heads and crops) trained as Lightning
orders a step (forward under bf16 autocast, zero_grad(set_to_none), backward, per-module clipping, fused AdamW, EMA
update) on one device; ``torch.cuda.max_memory_allocated`` against the planner's peak without the allowance.

    python benchmarks/bench_planner.py
    python benchmarks/bench_planner.py --gpu --depth 4 --batch-size 12 [--grad-checkpointing]
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import torch
import yaml

from lit_webssl.distributed.memory import parse_precision, parse_strategy
from lit_webssl.objectives.base import StepContext, normalize_uint8
from lit_webssl.objectives.dino import DINOv2
from lit_webssl.objectives.mae import MAE
from lit_webssl.planner.activations import HostPeak, saved_tensor_bytes
from lit_webssl.planner.plan import GIB, MemoryPlan, TrainerSettings, estimate_memory
from lit_webssl.training.module import LitWebSSL

CONFIG_7B = Path(__file__).resolve().parents[1] / "configs" / "webdino" / "vit_7b.yaml"
HEADS = {
    "head_prototypes": 256,
    "head_hidden_dim": 128,
    "head_bottleneck_dim": 64,
    "ibot_prototypes": 192,
    "ibot_hidden_dim": 96,
    "ibot_bottleneck_dim": 48,
}
BATCH = 8
CASES = [  # name, objective, backbone shape, precision
    ("DINO GELU fp32 32/16 px", "dino", {}, "32-true"),
    (
        "DINO SwiGLU fp32 48/24 px w96, no LayerScale",
        "dino",
        {"ffn": "swiglu", "width": 96, "depth": 3, "size": 48, "layerscale": None},
        "32-true",
    ),
    ("DINO GELU bf16 32/16 px", "dino", {}, "bf16-mixed"),
    ("DINO SwiGLU bf16 depth 4", "dino", {"ffn": "swiglu", "depth": 4}, "bf16-mixed"),
    ("DINO GELU fp32 math attention", "dino", {"fused": False}, "32-true"),
    ("MAE GELU fp32 32 px", "mae", {}, "32-true"),
    ("MAE GELU fp32 48 px w128", "mae", {"size": 48, "width": 128, "depth": 3}, "32-true"),
    ("MAE SwiGLU bf16 32 px", "mae", {"ffn": "swiglu"}, "bf16-mixed"),
]


def tiny(
    objective: str,
    size: int = 32,
    width: int = 64,
    depth: int = 2,
    ffn: str = "mlp",
    fused: bool = True,
    **backbone: Any,
) -> LitWebSSL:
    """A tiny CPU model: DINO with 2 local crops of half size, or MAE with a 2 x 32 decoder."""
    torch.manual_seed(0)
    if objective == "dino":
        obj = DINOv2(global_crop_size=size, local_crops_number=2, local_crop_size=size // 2, **HEADS)
    else:
        obj = MAE(crop_size=size, decoder_dim=32, decoder_depth=2, decoder_heads=4)
    overrides = {
        "img_size": size,
        "patch_size": 4,
        "embed_dim": width,
        "depth": depth,
        "num_heads": 4,
        "ffn": ffn,
        "layerscale": 1e-5,
        "drop_path_rate": 0.1,
        **backbone,
    }
    model = LitWebSSL(obj, "vit_debug", overrides)
    model.configure_model()
    for block in model.backbone.blocks:
        block.attn.fused_attn = fused
    return model.train()


def cpu_settings(precision: str) -> TrainerSettings:
    return TrainerSettings(parse_strategy("auto"), parse_precision(precision), 1, 1, "cpu")


def random_views(model: LitWebSSL, batch: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    return {v.name: torch.randn(batch, v.count, 3, v.size, v.size, device=device) for v in model.objective.views()}


def saved_case(objective: str, shape: dict[str, Any], precision: str) -> tuple[int, int]:
    """(estimate, measured) saved-activation bytes of one step."""
    model = tiny(objective, **shape)
    batch = {"views": random_views(model, BATCH)}
    mixed = precision == "bf16-mixed"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            model.objective(batch, model.backbone)

    measured = saved_tensor_bytes(step, exclude=model.parameters())
    plan = estimate_memory(model, BATCH, cpu_settings(precision), device_type="cpu")
    estimate = sum(a.nbytes for a in plan.activations if a.saved)
    return estimate + (plan.row("autocast copies").device if mixed else 0), measured


def peak_case(checkpointing: bool) -> tuple[float, int]:
    """(estimate, measured) CPU peak bytes of forward + backward from no gradients, fp32 DINO."""
    model = tiny("dino", ffn="swiglu", width=96, depth=3, size=48, grad_checkpointing=checkpointing)
    batch = {"views": random_views(model, BATCH)}

    def step() -> None:
        model.objective(batch, model.backbone).loss.backward()

    step()
    model.zero_grad(set_to_none=True)
    gc.collect()
    mode = HostPeak()
    base = mode.in_use()
    with mode:
        step()
    plan = estimate_memory(model, BATCH, cpu_settings("32-true"), device_type="cpu")
    estimate = sum(plan.held(w) for w in ("fwd+bwd", "fwd", "bwd")) + plan.row("gradients").device
    return estimate - plan.row("input batch").device, mode.peak - base


def cpu_main() -> None:
    torch.set_num_threads(1)
    print(f"CPU, torch {torch.__version__}, {BATCH} images per step")
    print(f"{'case':50s} {'estimate MiB':>13s} {'measured MiB':>13s} {'ratio':>7s}")
    for name, objective, shape, precision in CASES:
        estimate, measured = saved_case(objective, shape, precision)
        print(f"{'saved: ' + name:50s} {estimate / 2**20:13.3f} {measured / 2**20:13.3f} {estimate / measured:7.3f}")
    for checkpointing in (False, True):
        estimate, measured = peak_case(checkpointing)
        name = f"peak: DINO SwiGLU fp32 48 px w96, checkpointing {'on' if checkpointing else 'off'}"
        print(f"{name:50s} {estimate / 2**20:13.3f} {measured / 2**20:13.3f} {estimate / measured:7.3f}")


# -- GPU ------------------------------------------------------------------------------------------------------------
def dino_7b(depth: int, checkpointing: bool) -> LitWebSSL:
    """Web-DINO ViT-7B as ``configs/webdino/vit_7b.yaml`` builds it, with ``depth`` blocks."""
    config = yaml.safe_load(CONFIG_7B.read_text())["model"]
    overrides = {**config["backbone_overrides"], "depth": depth, "grad_checkpointing": checkpointing}
    return LitWebSSL(DINOv2(**config["objective"]["init_args"]), config["backbone"], overrides)


def gpu_step(model: LitWebSSL, batch: dict[str, Any], optimizer: torch.optim.Optimizer, step: int) -> None:
    """One step in Lightning's order: forward under autocast, zero_grad, backward, clipping, AdamW, EMA."""
    objective, backbone = model.objective, model.backbone
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = objective(batch, backbone, StepContext(step=step)).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    objective.on_before_optimizer_step(backbone, StepContext(step=step))
    optimizer.step()
    objective.on_after_optimizer_step(backbone, StepContext(step=step + 1))


def gpu_main(args: argparse.Namespace) -> None:
    model = dino_7b(args.depth, args.grad_checkpointing)
    with torch.device("meta"):
        model.configure_model()
    settings = TrainerSettings(parse_strategy("auto"), parse_precision("bf16-mixed"), 1, 1, "gpu")
    plan: MemoryPlan = estimate_memory(model, args.batch_size, settings)
    expected = plan.peak_device - plan.row("allowance").device
    model = dino_7b(args.depth, args.grad_checkpointing)
    with torch.device("cuda"):
        model.configure_model()
    model.train()
    groups = model.objective.param_groups(model.backbone, 0.04)
    optimizer = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.999), fused=True)
    uint8 = {
        v.name: torch.randint(0, 256, (args.batch_size, v.count, 3, v.size, v.size), dtype=torch.uint8, device="cuda")
        for v in model.objective.views()
    }
    mean, std = model.objective.pixel_mean, model.objective.pixel_std
    for step in range(args.steps + 2):
        if step == 2:  # after the optimizer states exist
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        batch = {"views": {k: normalize_uint8(v, mean, std) for k, v in uint8.items()}}
        gpu_step(model, batch, optimizer, step)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}: webdino_7b depth {args.depth}, batch "
        f"{args.batch_size} x (2 x 224 + 8 x 98), bf16 autocast, checkpointing {args.grad_checkpointing}"
    )
    print(
        f"  planner (no allowance) {expected / GIB:.2f} GiB, measured max allocated {measured / GIB:.2f} GiB, "
        f"ratio {expected / measured:.3f}; reserved {torch.cuda.max_memory_reserved() / GIB:.2f} GiB, planner "
        f"with allowance {plan.peak_device / GIB:.2f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="measure a depth-reduced ViT-7B Web-DINO on one GPU")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2, help="measured steps (after 2 warm-up steps)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    args = parser.parse_args()
    if args.gpu:
        gpu_main(args)
    else:
        cpu_main()


if __name__ == "__main__":
    main()
