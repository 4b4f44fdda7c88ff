"""GPU training-step throughput in bf16: Web-MAE ViT-L against the MAE reference; Web-DINO ViT-L/14 with MFU.

Both sides train the same network on the same synthetic uint8 batches (no data loading): forward under bf16
autocast, backward, fused AdamW step.

* ``ours``: ``webmae_300m`` (ViT-L/16) + :class:`lit_webssl.objectives.MAE`, exactly what ``fit`` builds.
* ``reference``: the MAE reference structure written against timm's ``vit_large_patch16_224`` (patch embed, pos
  embed, random masking by argsort, encoder blocks, a 512x8 decoder of timm blocks, norm-pix MSE), as
  ``facebookresearch/mae``'s ``models_mae.py`` does it.
* ``trainer``: ours again through ``lightning.Trainer(precision="bf16-mixed")`` and ``LitWebSSL`` (schedules,
  device-side normalization, logging), the path a user runs.

Rounds alternate ours / reference so clock and thermal drift hit both; the script prints images/s, the ratio,
peak memory and model FLOP utilization (FLOPs counted by ``torch.utils.flop_counter``).

``--objective dino`` times Web-DINO ViT-L/14 with the recipe of ``configs/webdino/vit_l.yaml`` (2 x 224 global +
8 x 98 local crops, iBOT masks, Sinkhorn-Knopp, KoLeo, ViT-g heads, per-module clipping, fp32 EMA teacher update)
on synthetic uint8 crops; images/s counts source images (each with its 10 crops).

    python benchmarks/bench_gpu_step.py --batch-size 128 --rounds 3 --steps 20
    python benchmarks/bench_gpu_step.py --objective dino --batch-size 32 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from torch import nn

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _peak_flops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def build_ours(device: torch.device):
    from lit_webssl.models.presets import build_backbone
    from lit_webssl.objectives import MAE, StepContext
    from lit_webssl.objectives.base import normalize_uint8

    backbone = build_backbone("webmae_300m", device=device)
    objective = MAE(crop_size=224).to(device)
    objective.configure(backbone)
    objective.to(device)
    groups = objective.param_groups(backbone, 0.05)
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
    step = [0]

    def loss_fn(images: torch.Tensor) -> torch.Tensor:
        context = StepContext(step=step[0])
        step[0] += 1
        views = normalize_uint8(images, objective.pixel_mean, objective.pixel_std)
        return objective({"views": {"image": views[:, None]}}, backbone, context).loss

    return loss_fn, opt, [backbone, objective]


class RefMAE(nn.Module):
    """The MAE reference structure (models_mae.py) over timm's ViT-L/16 and timm blocks."""

    def __init__(self) -> None:
        import timm
        from timm.models.vision_transformer import Block

        super().__init__()
        self.encoder = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(1024, 512)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 512))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 197, 512), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(512, 16, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(8))
        self.decoder_norm = norm(512)
        self.decoder_pred = nn.Linear(512, 16 * 16 * 3)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
        b, n, d = x.shape
        keep = int(n * 0.25)
        ids_shuffle = torch.argsort(torch.rand(b, n, device=x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in enc.blocks:
            x = blk(x)
        x = self.decoder_embed(enc.norm(x))
        fill = self.mask_token.expand(b, n - keep, -1).to(x.dtype)
        tokens = torch.gather(torch.cat([x[:, 1:], fill], 1), 1, ids_restore[..., None].expand(-1, -1, 512))
        x = torch.cat([x[:, :1], tokens], 1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        target = imgs.reshape(b, 3, 14, 16, 14, 16).permute(0, 2, 4, 3, 5, 1).reshape(b, n, -1)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum()


def build_reference(device: torch.device):
    model = RefMAE().to(device)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4,
        betas=(0.9, 0.95),
        fused=True,
    )
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255

    def loss_fn(images: torch.Tensor) -> torch.Tensor:
        return model((images.float() - mean) / std)

    return loss_fn, opt, [model]


def train_steps(loss_fn, opt, images: torch.Tensor, steps: int) -> float:
    """Seconds per step over ``steps`` steps (synchronized)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(images)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def flops_per_image(loss_fn, images: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cuda", dtype=torch.bfloat16):
        loss_fn(images).backward()
    return counter.get_total_flops() / images.shape[0]


def trainer_throughput(batch_size: int, steps: int) -> tuple[float, float]:
    """images/s and peak GiB of ``fit`` through Lightning on synthetic uint8 batches (after 5 warm-up steps)."""
    import lightning as L

    from lit_webssl.objectives import MAE
    from lit_webssl.training.module import LitWebSSL
    from lit_webssl.training.optim import OptimConfig

    class Synthetic(L.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = batch_size

        def train_dataloader(self):
            data = torch.randint(0, 256, (batch_size, 1, 3, 224, 224), dtype=torch.uint8)
            batch = {"views": {"image": data}, "label": torch.zeros(batch_size, dtype=torch.long)}
            # batch_size=None: the loader hands each prepared batch over as is (a bare list would be read
            # by Lightning as several dataloaders).
            return torch.utils.data.DataLoader([batch] * (steps + 5), batch_size=None, pin_memory=True)

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            torch.cuda.synchronize()
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, *args) -> None:
            torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    clock = Clock()
    module = LitWebSSL(
        MAE(crop_size=224), backbone="webmae_300m", optim=OptimConfig(base_lr=1.5e-4, warmup=2, total=1000)
    )
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps + 5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[clock],
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=Synthetic())
    per_step = (clock.ends[-1] - clock.starts[5]) / (len(clock.ends) - 5)  # steps 5..end; fit teardown excluded
    return batch_size / per_step, torch.cuda.max_memory_allocated() / 2**30


def dino_main(args: argparse.Namespace) -> None:
    """Web-DINO ViT-L/14 steps: forward (teacher + student) under bf16 autocast, backward, clipping, AdamW, EMA."""
    from pathlib import Path

    import yaml

    from lit_webssl.models.presets import build_backbone
    from lit_webssl.objectives import DINOv2, StepContext
    from lit_webssl.objectives.base import normalize_uint8

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/webdino/vit_l.yaml").read_text())["model"]
    device = torch.device("cuda")
    torch.manual_seed(0)
    overrides = {**config["backbone_overrides"], "grad_checkpointing": args.grad_checkpointing}
    backbone = build_backbone(args.backbone or config["backbone"], overrides, device=device)
    objective = DINOv2(**config["objective"]["init_args"])
    with torch.device(device):
        objective.configure(backbone)
    objective.to(device)
    objective.bind_schedule(args.batch_size, 625_000, "steps")
    opt = torch.optim.AdamW(objective.param_groups(backbone, 0.04), lr=3.5e-4, betas=(0.9, 0.999), fused=True)
    views = {
        v.name: torch.randint(0, 256, (args.batch_size, v.count, 3, v.size, v.size), dtype=torch.uint8, device=device)
        for v in objective.views()
    }

    done = [0]  # optimizer steps taken

    def loss_fn(n: int) -> torch.Tensor:
        batch = {
            "views": {k: normalize_uint8(v[:n], objective.pixel_mean, objective.pixel_std) for k, v in views.items()}
        }
        return objective(batch, backbone, StepContext(step=done[0])).loss

    def steps(count: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(count):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(args.batch_size)
            loss.backward()
            objective.on_before_optimizer_step(backbone, StepContext(step=done[0]))
            opt.step()
            opt.zero_grad(set_to_none=True)
            done[0] += 1
            objective.on_after_optimizer_step(backbone, StepContext(step=done[0]))
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / count

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cuda", dtype=torch.bfloat16):
        loss_fn(4).backward()
    opt.zero_grad(set_to_none=True)
    flops = counter.get_total_flops() / 4
    steps(3)
    torch.cuda.reset_peak_memory_stats()
    times = [steps(args.steps) for _ in range(args.rounds)]
    step = statistics.median(times)
    rate = args.batch_size / step
    peak = _peak_flops()
    mfu = f"{100 * flops * rate / peak:.1f}%" if peak else "n/a"
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; Web-DINO "
        f"{args.backbone or config['backbone']}, batch {args.batch_size} images x (2 x 224 + 8 x 98 crops), "
        f"grad checkpointing {args.grad_checkpointing}, {args.rounds} rounds x {args.steps} steps"
    )
    print(
        f"  web-dino   {rate:8.1f} img/s  {1000 * step:7.1f} ms/step  {flops / 1e9:7.1f} GFLOP/img  MFU {mfu}  "
        f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB  "
        f"(rounds: {', '.join(f'{args.batch_size / t:.0f}' for t in times)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-trainer", action="store_true")
    parser.add_argument("--objective", choices=["mae", "dino"], default="mae")
    parser.add_argument("--backbone", default=None, help="dino: preset instead of the config's (e.g. webdino_1b)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="dino: recompute blocks in backward")
    args = parser.parse_args()
    if args.objective == "dino":
        dino_main(args)
        return
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, 224, 224), dtype=torch.uint8, device=device)
    sides = {"ours": build_ours(device), "reference": build_reference(device)}
    flops = {name: flops_per_image(fn, images[:8]) for name, (fn, _, _) in sides.items()}
    for fn, opt, _ in sides.values():  # warm-up (allocator, cuDNN/cuBLAS heuristics)
        opt.zero_grad(set_to_none=True)
        train_steps(fn, opt, images, 3)
    times: dict[str, list[float]] = {name: [] for name in sides}
    peaks: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (fn, opt, _) in sides.items():
            torch.cuda.reset_peak_memory_stats()
            times[name].append(train_steps(fn, opt, images, args.steps))
            peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    peak = _peak_flops()
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch_size}, "
        f"{args.rounds} rounds x {args.steps} steps, bf16 autocast, fused AdamW"
    )
    rate = {}
    for name in sides:
        step = statistics.median(times[name])
        rate[name] = args.batch_size / step
        mfu = f"{100 * flops[name] * rate[name] / peak:.1f}%" if peak else "n/a"
        print(
            f"  {name:10s} {rate[name]:8.1f} img/s  {1000 * step:7.1f} ms/step  "
            f"{flops[name] / 1e9:7.1f} GFLOP/img  MFU {mfu}  peak {peaks[name]:.1f} GiB  "
            f"(rounds: {', '.join(f'{args.batch_size / t:.0f}' for t in times[name])})"
        )
    print(f"  ratio ours / reference: {rate['ours'] / rate['reference']:.3f}x")
    del sides
    torch.cuda.empty_cache()
    if not args.skip_trainer:
        img_s, gib = trainer_throughput(args.batch_size, args.steps)
        print(
            f"  trainer    {img_s:8.1f} img/s  (lightning bf16-mixed fit, LitWebSSL)  peak {gib:.1f} GiB  "
            f"ratio to the plain loop: {img_s / rate['ours']:.3f}x"
        )


if __name__ == "__main__":
    main()
