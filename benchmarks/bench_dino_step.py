"""Training-step time of the Web-DINO demo model: our ``DINOv2`` objective vs a reference built from lightly's losses.

One step = forward (EMA teacher on the 2 global crops, student on the masked global crops and the local crops) +
backward + per-module gradient clipping (3.0) + AdamW + EMA teacher update, on synthetic batches (no data loading)
of the crops of ``configs/demo/dino_tiny.yaml`` (its backbone, heads and objective settings). Rows:

* ours, Sinkhorn-Knopp: ``DINOv2(**init_args)`` as the config has it (DINOv2 ViT-g recipe);
* ours, centering: the same with ``centering: centering`` (DINO's EMA center), like for like with lightly;
* lightly: the same backbone (``build_backbone``, same overrides and init), ``DINOv2ProjectionHead`` heads (same
  weights), ``lightly.loss.DINOLoss`` / ``IBOTPatchLoss`` / ``KoLeoLoss`` and ``lightly.models.utils
  .update_momentum``, wired as lightly's DINOv2 benchmark does, with the same masks, crops, teacher temperature,
  momentum, clipping and AdamW parameter groups as ours.

Before timing, ours (centering) and lightly run one forward from the same weights on the same batch: their losses
must agree (printed). Rounds alternate the variants (rotating order); medians over all timed steps are reported.

    pip install lightly          # into the venv, for the reference only (not a project dependency)
    python benchmarks/bench_dino_step.py --batch-size 64 --rounds 5 --steps 4 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from lit_webssl.models.presets import build_backbone
from lit_webssl.objectives import DINOv2, StepContext
from lit_webssl.objectives.base import is_no_decay
from lit_webssl.objectives.masking import sample_ibot_masks
from lit_webssl.training.optim import cosine_schedule

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "dino_tiny.yaml"
INSTALL_HINT = (
    "the lightly reference needs the `lightly` package (not a project dependency): "
    "`. .venv/bin/activate && pip install lightly`"
)
VARIANTS = {
    "ours_sk": "ours, Sinkhorn-Knopp (config)",
    "ours_centering": "ours, centering",
    "lightly": "lightly losses + heads (centering)",
}


def load_model_config() -> dict[str, Any]:
    cfg = yaml.safe_load(CONFIG.read_text())
    model = cfg["model"]
    model["max_steps"] = cfg["trainer"]["max_steps"]
    return model


def make_batches(init_args: dict[str, Any], patch_size: int, batch_size: int, n: int) -> list[dict[str, Any]]:
    """``n`` synthetic normalized batches with the config's crops and iBOT masks drawn as ``DINOv2`` draws them."""
    g, l, n_local = init_args["global_crop_size"], init_args["local_crop_size"], init_args["local_crops_number"]
    grid = g // patch_size
    batches = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        masks = sample_ibot_masks(2 * batch_size, (grid, grid), 0.5, (0.1, 0.5), rng=np.random.default_rng(i))
        batches.append(
            {
                "views": {
                    "global1": torch.randn(batch_size, 1, 3, g, g, generator=gen),
                    "global2": torch.randn(batch_size, 1, 3, g, g, generator=gen),
                    "local": torch.randn(batch_size, n_local, 3, l, l, generator=gen),
                },
                "ibot_masks": masks,
            }
        )
    return batches


def param_groups(
    named: list[tuple[str, nn.Parameter]], weight_decay: float, patch_embed_lr_mult: float
) -> list[dict[str, Any]]:
    """Ours' grouping rule (layer-wise decay off, as in the config): patch-embed lr mult, no-decay set, last layer."""
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        key = (
            patch_embed_lr_mult if ".patch_embed." in name else 1.0,
            0.0 if is_no_decay(name, param) else 1.0,
            ".last_layer." in name,
        )
        group = groups.setdefault(key, {"params": [], "weight_decay": weight_decay * key[1], "lr_mult": key[0]})
        group["params"].append(param)
    return list(groups.values())


class OursStep:
    """Our objective over our backbone, stepped as ``LitWebSSL`` steps it."""

    def __init__(self, model: dict[str, Any], batch_size: int, centering: str) -> None:
        args = {**model["objective"]["init_args"], "centering": centering}
        torch.manual_seed(0)
        self.backbone = build_backbone(model["backbone"], model["backbone_overrides"])
        self.objective = DINOv2(**args)
        self.objective.configure(self.backbone)
        self.objective.bind_schedule(batch_size, model["max_steps"], "steps")
        optim = model["optim"]
        self.opt = torch.optim.AdamW(
            self.objective.param_groups(self.backbone, optim["weight_decay"]),
            lr=optim["base_lr"],
            betas=tuple(optim["betas"]),
        )

    def loss(self, batch: dict[str, Any], step: int) -> Tensor:
        return self.objective(batch, self.backbone, StepContext(step=step)).loss

    def __call__(self, batch: dict[str, Any], step: int) -> Tensor:
        loss = self.loss(batch, step)
        loss.backward()
        self.objective.on_before_optimizer_step(self.backbone, StepContext(step=step))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.objective.on_after_optimizer_step(self.backbone, StepContext(step=step + 1))
        return loss.detach()


class LightlyStep:
    """The same model and step from lightly's parts (its DINOv2 benchmark's wiring), weights copied from ``ours``."""

    def __init__(self, model: dict[str, Any], ours: OursStep, lightly: dict[str, Any]) -> None:
        args = model["objective"]["init_args"]
        self.args, self.total = args, model["max_steps"]
        torch.manual_seed(0)
        self.backbone = build_backbone(model["backbone"], model["backbone_overrides"])
        self.backbone.load_state_dict(ours.backbone.state_dict())
        dim = self.backbone.embed_dim
        head = lightly["head"]
        self.dino_head = head(dim, args["head_hidden_dim"], args["head_bottleneck_dim"], args["head_prototypes"])
        self.ibot_head = head(dim, args["ibot_hidden_dim"], args["ibot_bottleneck_dim"], args["ibot_prototypes"])
        for mine, theirs in ((ours.objective.dino_head, self.dino_head), (ours.objective.ibot_head, self.ibot_head)):
            theirs.load_state_dict({k.replace("mlp.", "layers."): v for k, v in mine.state_dict().items()})
        self.students = [self.backbone, self.dino_head, self.ibot_head]
        # lightly's heads use nn.utils.weight_norm (not deep-copyable): teacher heads are built and loaded instead
        t_dino = head(dim, args["head_hidden_dim"], args["head_bottleneck_dim"], args["head_prototypes"])
        t_ibot = head(dim, args["ibot_hidden_dim"], args["ibot_bottleneck_dim"], args["ibot_prototypes"])
        t_dino.load_state_dict(self.dino_head.state_dict())
        t_ibot.load_state_dict(self.ibot_head.state_dict())
        self.teachers = [m.requires_grad_(False).eval() for m in (copy.deepcopy(self.backbone), t_dino, t_ibot)]
        self.dino_loss = lightly["DINOLoss"](
            output_dim=args["head_prototypes"], teacher_temp=args["teacher_temp"], student_temp=0.1, center_momentum=0.9
        )
        self.ibot_loss = lightly["IBOTPatchLoss"](
            output_dim=args["ibot_prototypes"], teacher_temp=args["teacher_temp"], student_temp=0.1, center_momentum=0.9
        )
        self.koleo_loss = lightly["KoLeoLoss"]()
        self.update_momentum = lightly["update_momentum"]
        named = [(f"backbone.{n}", p) for n, p in self.backbone.named_parameters()]
        named += [(f"dino_head.{n}", p) for n, p in self.dino_head.named_parameters()]
        named += [(f"ibot_head.{n}", p) for n, p in self.ibot_head.named_parameters()]
        optim = model["optim"]
        self.opt = torch.optim.AdamW(
            param_groups(named, optim["weight_decay"], 0.2), lr=optim["base_lr"], betas=tuple(optim["betas"])
        )

    def teacher_temp(self, step: int) -> float:
        warm, final, length = (
            self.args["warmup_teacher_temp"],
            self.args["teacher_temp"],
            self.args["teacher_temp_warmup"],
        )
        return final if step >= length else warm + (final - warm) * step / length

    def loss(self, batch: dict[str, Any], step: int) -> Tensor:
        views, masks = batch["views"], batch["ibot_masks"]
        b = views["global1"].shape[0]
        global_crops = torch.cat([views["global1"][:, 0], views["global2"][:, 0]])
        local_crops = views["local"].transpose(0, 1).flatten(0, 1)
        grid = global_crops.shape[-1] // self.backbone.patch_size
        temp = self.teacher_temp(step)
        t_backbone, t_dino, t_ibot = self.teachers
        with torch.no_grad():
            teacher = t_backbone(global_crops)
            t_cls_out = t_dino(teacher["x_norm_clstoken"])
            t_masked_out = t_ibot(teacher["x_norm_patchtokens"][masks])
        student = self.backbone(global_crops, masks=masks)
        s_cls = student["x_norm_clstoken"]
        s_cls_out = self.dino_head(s_cls)
        s_masked_out = self.ibot_head(student["x_norm_patchtokens"][masks])
        s_local_out = self.dino_head(self.backbone(local_crops)["x_norm_clstoken"])
        n_views = 2 + local_crops.shape[0] // b
        dino = self.dino_loss(
            teacher_out=list(t_cls_out.chunk(2)),
            student_out=list(torch.cat([s_cls_out, s_local_out]).chunk(n_views)),
            teacher_temp=temp,
        )
        ibot = self.ibot_loss(
            teacher_out=t_masked_out, student_out=s_masked_out, mask=masks.view(2 * b, grid, grid), teacher_temp=temp
        )
        koleo = sum(self.koleo_loss(chunk) for chunk in s_cls.chunk(2))
        return dino + ibot + 0.1 * koleo  # the config keeps DINO's default weights (1, 1, 0.1)

    def __call__(self, batch: dict[str, Any], step: int) -> Tensor:
        loss = self.loss(batch, step)
        loss.backward()
        for module in self.students:
            torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], 3.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        momentum = cosine_schedule(step, self.args["momentum_teacher"], self.args["final_momentum_teacher"], self.total)
        for student, teacher in zip(self.students, self.teachers, strict=True):
            self.update_momentum(student, teacher, m=momentum)
        return loss.detach()


def import_lightly() -> dict[str, Any] | None:
    """lightly's parts, or ``None`` when it is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import lightly
            from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
            from lightly.models.modules import heads
            from lightly.models.utils import update_momentum
    except ImportError:
        return None
    head = getattr(heads, "DINOv2ProjectionHead", None)
    if head is None:  # older lightly: the DINO head, with a trainable weight_g as DINOv2

        def head(i: int, h: int, b: int, o: int) -> nn.Module:
            return heads.DINOProjectionHead(i, h, b, o, norm_last_layer=False)

    return {
        "version": lightly.__version__,
        "head": head,
        "DINOLoss": DINOLoss,
        "IBOTPatchLoss": IBOTPatchLoss,
        "KoLeoLoss": KoLeoLoss,
        "update_momentum": update_momentum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default: the config's, 64)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant per round (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default: %(default)s, per core: on a shared box 2 threads spin)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lightly = import_lightly()
    if lightly is None:
        raise SystemExit(INSTALL_HINT)
    warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)  # lightly's heads
    model = load_model_config()
    init_args = model["objective"]["init_args"]
    patch = model["backbone_overrides"]["patch_size"]
    batches = make_batches(init_args, patch, args.batch_size, max(args.steps, args.warmup))

    # like-for-like check: one forward from the same weights on the same batch
    ours_c = OursStep(model, args.batch_size, "centering")
    check_ref = LightlyStep(model, ours_c, lightly)
    with torch.no_grad():
        check = (ours_c.loss(batches[0], 0).item(), check_ref.loss(batches[0], 0).item())
    del ours_c, check_ref

    variants: dict[str, Any] = {
        "ours_sk": OursStep(model, args.batch_size, "sinkhorn_knopp"),
        "ours_centering": OursStep(model, args.batch_size, "centering"),
    }
    variants["lightly"] = LightlyStep(model, variants["ours_centering"], lightly)
    steps = dict.fromkeys(variants, 0)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for key, step in variants.items():
        for i in range(args.warmup):
            step(batches[i % len(batches)], steps[key])
            steps[key] += 1
    order = list(variants)
    for r in range(args.rounds):
        for key in order[r % len(order) :] + order[: r % len(order)]:
            for i in range(args.steps):
                start = time.perf_counter()
                loss = variants[key](batches[i % len(batches)], steps[key])
                times[key].append(time.perf_counter() - start)
                steps[key] += 1
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{key}: non-finite loss at step {steps[key]}")
    report(args, model, lightly["version"], check, times)


def report(
    args: argparse.Namespace,
    model: dict[str, Any],
    version: str,
    check: tuple[float, float],
    times: dict[str, list[float]],
) -> None:
    a, o = model["objective"]["init_args"], model["backbone_overrides"]
    print(
        f"demo DINO step ({CONFIG.name}): ViT width {o['embed_dim']} depth {o['depth']} patch {o['patch_size']}, "
        f"2 x {a['global_crop_size']} px + {a['local_crops_number']} x {a['local_crop_size']} px crops, heads "
        f"{a['head_prototypes']}/{a['ibot_prototypes']} prototypes; batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}, lightly {version}"
    )
    print(
        f"same weights, same batch, first forward: loss ours (centering) {check[0]:.6f}, lightly {check[1]:.6f} "
        f"(|diff| {abs(check[0] - check[1]):.2e})"
    )
    print(f"{args.rounds} rounds x {args.steps} steps per variant, alternating (median)\n")
    print(f"{'variant':<38}{'ms/step':>9}{'min':>8}{'max':>8}{'img/s':>8}{'vs lightly':>12}")
    ref = statistics.median(times["lightly"])
    for key, name in VARIANTS.items():
        median = statistics.median(times[key])
        print(
            f"{name:<38}{1000 * median:>9.1f}{1000 * min(times[key]):>8.1f}{1000 * max(times[key]):>8.1f}"
            f"{args.batch_size / median:>8.0f}{median / ref:>11.2f}x"
        )
    for key in ("ours_sk", "ours_centering"):
        print(f"ratio {key} / lightly (time): {statistics.median(times[key]) / ref:.2f}")


if __name__ == "__main__":
    main()
