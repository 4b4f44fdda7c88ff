"""Web-DINO: the DINOv2 recipe (DINO + iBOT + KoLeo, Sinkhorn-Knopp) over the shared ViT (docs/recipe.md sections 2-3).

Shapes: B images per rank, G = 2 global crops, L local crops, N patches of a global crop, M masked patches of the
rank's global crops (all images), D backbone width, K prototypes (DINO head), Kp prototypes (iBOT head).

Crop routing (DINOv2 ``ssl_meta_arch.py``): the teacher sees the G global crops unmasked; the student sees them with
iBOT masks plus the L local crops. Each student global crop is paired with the teacher's *other* global crop; each
local crop with both. Crops are stacked crop-major: rows ``[crop 0 of every image; crop 1 of every image; ...]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lit_webssl.distributed import EMATeacher
from lit_webssl.errors import ConfigError
from lit_webssl.models.vit import check_img_size
from lit_webssl.objectives.base import Objective, ObjectiveOutput, StepContext, ViewSpec, is_no_decay
from lit_webssl.objectives.heads import DINOHead
from lit_webssl.objectives.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from lit_webssl.objectives.masking import sample_ibot_masks
from lit_webssl.training.optim import cosine_schedule

if TYPE_CHECKING:
    from lit_webssl.models.vit import VisionTransformer

FLAG = "--model.objective.init_args."


class DINOv2(Objective):
    """Web-DINO = DINOv2: self-distillation from an EMA teacher with DINO (CLS), iBOT (masked patches) and KoLeo.

    Defaults are DINOv2's ViT-g recipe that Web-DINO uses (docs/recipe.md section 2.2). Schedule lengths
    (``teacher_temp_warmup``,
    ``freeze_last_layer``) count in the unit of ``--model.optim.unit`` (steps or samples seen); the teacher momentum
    follows a cosine over the whole run (``--model.optim.total`` or ``--trainer.max_steps``).

    Args:
        global_crop_size: Side of the 2 global crops (224; 378/518 for high-res stages).
        global_crops_scale: RandomResizedCrop area range of the global crops.
        local_crops_number: Local crops per image (0 disables them; then ``dino_local_weight`` must be 0).
        local_crop_size: Side of the local crops (98 for patch 14).
        local_crops_scale: RandomResizedCrop area range of the local crops.
        head_prototypes: Prototypes of the DINO head (K).
        head_hidden_dim: Hidden width of the DINO head's MLP.
        head_bottleneck_dim: Bottleneck width of the DINO head.
        head_layers: Linear layers of the DINO head's MLP.
        ibot_separate_head: Give iBOT its own head (ViT-g recipe) instead of sharing the DINO head.
        ibot_prototypes: Prototypes of the separate iBOT head (Kp).
        ibot_hidden_dim: Hidden width of the separate iBOT head.
        ibot_bottleneck_dim: Bottleneck width of the separate iBOT head.
        dino_local_weight: Weight of the DINO loss of local crops against the teacher's global crops.
        dino_global_weight: Weight of the DINO loss between the two global crops.
        ibot_weight: Weight of the iBOT masked-patch loss (0 disables masking altogether).
        koleo_weight: Weight of the KoLeo regularizer on the student's global CLS tokens (computed per rank).
        centering: Teacher targets: ``sinkhorn_knopp`` (ViT-g recipe) or EMA ``centering`` (DINO's original).
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        center_momentum: Momentum of the EMA center (``centering`` mode).
        student_temp: Softmax temperature of the student.
        teacher_temp: Teacher temperature after warmup.
        warmup_teacher_temp: Teacher temperature at step 0 (linear warmup to ``teacher_temp``).
        teacher_temp_warmup: Length of the teacher-temperature warmup (steps or samples, ``--model.optim.unit``).
        momentum_teacher: EMA momentum at step 0 (cosine to ``final_momentum_teacher``).
        final_momentum_teacher: EMA momentum at the end of the run.
        freeze_last_layer: Length during which the prototype layers' lr is 0 (steps or samples).
        mask_probability: Fraction of global crops that get an iBOT mask.
        mask_ratio_range: Range of masked-patch fractions, stratified over the masked crops.
        patch_embed_lr_mult: lr multiplier of the patch embedding.
        layerwise_decay: Layer-wise lr decay (1.0 disables it): block i gets ``decay ** (depth - i)``.
        clip_grad: Max L2 norm of the gradient of each student sub-module (backbone, DINO head, iBOT head);
            ``None`` or 0 disables clipping.
        color_jitter_p: Probability of colour jitter on every crop.
        color_jitter: Brightness, contrast, saturation and hue strengths of the colour jitter.
        grayscale_p: Probability of grayscale on every crop.
        solarize_p: Probability of solarization on the second global crop.
        seed: Seed of the iBOT masks; each step draws from ``(seed, step, rank)``, so a resumed run masks as an
            uninterrupted one.
    """

    def __init__(
        self,
        global_crop_size: int = 224,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_number: int = 8,
        local_crop_size: int = 98,
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        head_prototypes: int = 131072,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 384,
        head_layers: int = 3,
        ibot_separate_head: bool = True,
        ibot_prototypes: int = 131072,
        ibot_hidden_dim: int = 2048,
        ibot_bottleneck_dim: int = 256,
        dino_local_weight: float = 1.0,
        dino_global_weight: float = 1.0,
        ibot_weight: float = 1.0,
        koleo_weight: float = 0.1,
        centering: Literal["sinkhorn_knopp", "centering"] = "sinkhorn_knopp",
        sinkhorn_iterations: int = 3,
        center_momentum: float = 0.9,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        teacher_temp_warmup: int = 37500,
        momentum_teacher: float = 0.994,
        final_momentum_teacher: float = 1.0,
        freeze_last_layer: int = 1250,
        mask_probability: float = 0.5,
        mask_ratio_range: tuple[float, float] = (0.1, 0.5),
        patch_embed_lr_mult: float = 0.2,
        layerwise_decay: float = 1.0,
        clip_grad: float | None = 3.0,
        color_jitter_p: float = 0.8,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        grayscale_p: float = 0.2,
        solarize_p: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for flag, value in (
            ("momentum_teacher", momentum_teacher),
            ("final_momentum_teacher", final_momentum_teacher),
            ("center_momentum", center_momentum),
            ("mask_probability", mask_probability),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{FLAG}{flag} must be in [0, 1], got {value}")
        if local_crops_number < 0:
            raise ConfigError(f"{FLAG}local_crops_number must be >= 0, got {local_crops_number}")
        if local_crops_number == 0 and dino_local_weight != 0:
            raise ConfigError(
                f"{FLAG}dino_local_weight={dino_local_weight} needs local crops, but "
                f"{FLAG}local_crops_number=0; set the weight to 0 or add local crops"
            )
        for flag, value in (
            ("student_temp", student_temp),
            ("teacher_temp", teacher_temp),
            ("warmup_teacher_temp", warmup_teacher_temp),
        ):
            if value <= 0:
                raise ConfigError(f"{FLAG}{flag} must be > 0, got {value}")
        for flag, value in (
            ("dino_local_weight", dino_local_weight),
            ("dino_global_weight", dino_global_weight),
            ("ibot_weight", ibot_weight),
            ("koleo_weight", koleo_weight),
        ):
            if value < 0:
                raise ConfigError(f"{FLAG}{flag} must be >= 0, got {value}")
        lo, hi = mask_ratio_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"{FLAG}mask_ratio_range must satisfy 0 <= min <= max <= 1, got {mask_ratio_range}")
        if centering not in ("sinkhorn_knopp", "centering"):
            raise ConfigError(f"{FLAG}centering must be 'sinkhorn_knopp' or 'centering', got {centering!r}")
        if sinkhorn_iterations < 1:
            raise ConfigError(f"{FLAG}sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}")
        if teacher_temp_warmup < 0 or freeze_last_layer < 0:
            raise ConfigError(f"{FLAG}teacher_temp_warmup and freeze_last_layer must be >= 0")
        if not 0.0 < layerwise_decay <= 1.0:
            raise ConfigError(f"{FLAG}layerwise_decay must be in (0, 1], got {layerwise_decay}")
        self.global_crop_size, self.global_crops_scale = global_crop_size, tuple(global_crops_scale)
        self.local_crops_number, self.local_crop_size = local_crops_number, local_crop_size
        self.local_crops_scale = tuple(local_crops_scale)
        self.head_cfg = {
            "out_dim": head_prototypes,
            "hidden_dim": head_hidden_dim,
            "bottleneck_dim": head_bottleneck_dim,
            "nlayers": head_layers,
        }
        self.ibot_cfg = {
            "out_dim": ibot_prototypes,
            "hidden_dim": ibot_hidden_dim,
            "bottleneck_dim": ibot_bottleneck_dim,
            "nlayers": head_layers,
        }
        self.ibot_separate_head = ibot_separate_head
        self.weights = {
            "dino_local": dino_local_weight,
            "dino_global": dino_global_weight,
            "ibot": ibot_weight,
            "koleo": koleo_weight,
        }
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.teacher_temp, self.warmup_teacher_temp = teacher_temp, warmup_teacher_temp
        self.teacher_temp_warmup, self.freeze_last_layer = teacher_temp_warmup, freeze_last_layer
        self.momentum_teacher, self.final_momentum_teacher = momentum_teacher, final_momentum_teacher
        self.mask_probability, self.mask_ratio_range = mask_probability, (lo, hi)
        self.patch_embed_lr_mult, self.layerwise_decay = patch_embed_lr_mult, layerwise_decay
        self.clip_grad = clip_grad or None
        self.augment = {
            "color_jitter_p": color_jitter_p,
            "color_jitter": tuple(color_jitter),
            "grayscale_p": grayscale_p,
        }
        self.solarize_p = solarize_p
        self.seed = seed
        ibot_dim = ibot_prototypes if ibot_separate_head else head_prototypes
        self.dino_loss = DINOLoss(head_prototypes, student_temp=student_temp, center_momentum=center_momentum)
        self.ibot_loss = iBOTPatchLoss(ibot_dim, student_temp=student_temp, center_momentum=center_momentum)
        self.koleo_loss = KoLeoLoss()
        self.dino_head: DINOHead | None = None
        self.ibot_head: DINOHead | None = None
        self.teacher: EMATeacher | None = None

    # -- building -----------------------------------------------------------------------------------------------
    def configure(self, backbone: VisionTransformer) -> None:
        check_img_size(self.global_crop_size, backbone.patch_size, f"{FLAG}global_crop_size")
        if self.local_crops_number:
            check_img_size(self.local_crop_size, backbone.patch_size, f"{FLAG}local_crop_size")
        device = backbone.pos_embed.device
        with torch.device(device):
            self.dino_head = DINOHead(backbone.embed_dim, **self.head_cfg)
            self.ibot_head = DINOHead(backbone.embed_dim, **self.ibot_cfg) if self.ibot_separate_head else None
        with torch.device(device):
            self.teacher = EMATeacher(self.student_modules(backbone))

    def init_weights(self, backbone: VisionTransformer) -> None:
        """Initialize the heads on their shards after a meta-device build, and copy the student into the teacher."""
        self.dino_head.init_weights()
        if self.ibot_head is not None:
            self.ibot_head.init_weights()
        self.teacher.sync(self.student_modules(backbone))
        return self

    def views(self) -> list[ViewSpec]:
        common = {"hflip_p": 0.5, **self.augment}
        views = [
            ViewSpec("global1", self.global_crop_size, scale=self.global_crops_scale, blur_p=1.0, **common),
            ViewSpec(
                "global2",
                self.global_crop_size,
                scale=self.global_crops_scale,
                blur_p=0.1,
                solarize_p=self.solarize_p,
                **common,
            ),
        ]
        if self.local_crops_number:
            views.append(
                ViewSpec(
                    "local",
                    self.local_crop_size,
                    count=self.local_crops_number,
                    scale=self.local_crops_scale,
                    blur_p=0.5,
                    **common,
                )
            )
        return views

    def set_resolution(self, global_size: int, local_size: int | None = None) -> None:
        """Global crops of ``global_size``; local crops of ``local_size`` (``None`` keeps them)."""
        self.global_crop_size = global_size
        if local_size is not None:
            self.local_crop_size = local_size

    # -- schedules ----------------------------------------------------------------------------------------------
    def teacher_temp_at(self, step: int) -> float:
        """Linear warmup ``warmup_teacher_temp -> teacher_temp``, then constant."""
        warmup = self.to_steps(self.teacher_temp_warmup)
        if step >= warmup:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / warmup

    def momentum_at(self, step: int) -> float:
        """Cosine ``momentum_teacher -> final_momentum_teacher`` over the run's schedule length."""
        if self.total_steps <= 0:
            return self.momentum_teacher
        return cosine_schedule(step, self.momentum_teacher, self.final_momentum_teacher, self.total_steps)

    # -- loss ---------------------------------------------------------------------------------------------------
    def _masks(
        self, batch: dict[str, Any], n_images: int, grid: int, device: torch.device, context: StepContext
    ) -> Tensor | None:
        """iBOT masks ``(G*B, N)``: ``batch["ibot_masks"]`` when given (tests, custom pipelines), else drawn."""
        if self.weights["ibot"] == 0 or self.mask_probability == 0:
            return None
        if "ibot_masks" in batch:
            return batch["ibot_masks"].to(device=device, dtype=torch.bool).flatten(1)
        rng = np.random.default_rng([self.seed, context.step, context.rank, 0x1B07])
        masks = sample_ibot_masks(n_images, (grid, grid), self.mask_probability, self.mask_ratio_range, rng=rng)
        return masks.to(device, non_blocking=True)

    def _targets(self, loss: DINOLoss | iBOTPatchLoss, logits: Tensor, temp: float, **kwargs: Any) -> Tensor:
        """Teacher probabilities: Sinkhorn-Knopp, or softmax around the EMA center (then the center moves)."""
        if self.centering == "sinkhorn_knopp":
            return loss.sinkhorn_knopp_teacher(logits, temp, n_iterations=self.sinkhorn_iterations, **kwargs)
        probs = loss.softmax_center_teacher(logits, temp)
        if self.training:
            loss.update_center(logits)
        return probs

    def forward(
        self, batch: dict[str, Any], backbone: VisionTransformer, context: StepContext | None = None
    ) -> ObjectiveOutput:
        context = context or StepContext()
        views = batch["views"]
        b = views["global1"].shape[0]
        global_crops = torch.cat([views["global1"][:, 0], views["global2"][:, 0]])  # G*B 3 H W
        grid = global_crops.shape[-1] // backbone.patch_size
        masks = self._masks(batch, 2 * b, grid, global_crops.device, context)  # G*B N, or None
        temp = self.teacher_temp_at(context.step)
        ibot_head = self.ibot_head if self.ibot_separate_head else self.dino_head

        with torch.no_grad():
            teacher_out = self.teacher["backbone"](global_crops)
            t_cls = teacher_out["x_norm_clstoken"]
            t_cls = torch.cat([t_cls[b:], t_cls[:b]])  # swap: student crop 1 learns from teacher crop 2
            t_ibot_head = self.teacher["ibot_head"] if self.ibot_separate_head else self.teacher["dino_head"]
            t_cls_probs = self._targets(self.dino_loss, self.teacher["dino_head"](t_cls), temp)
            if masks is not None:
                t_masked = teacher_out["x_norm_patchtokens"][masks]  # M D, image-major
                extra = {"n_masked_patches": t_masked.shape[0]} if self.centering == "sinkhorn_knopp" else {}
                t_patch_probs = self._targets(self.ibot_loss, t_ibot_head(t_masked), temp, **extra)

        student_global = backbone(global_crops, masks=masks)
        s_global_cls = student_global["x_norm_clstoken"]  # G*B D
        s_global_logits = self.dino_head(s_global_cls)
        n_terms = 2 + 2 * self.local_crops_number  # DINOv2: 2 global pairs + 2 targets per local crop
        metrics: dict[str, Tensor] = {}
        total = s_global_logits.new_zeros((), dtype=torch.float32)

        dino_global = self.dino_loss([s_global_logits], [t_cls_probs]) * 2 / n_terms
        metrics["dino_global"] = dino_global.detach()
        total = total + self.weights["dino_global"] * dino_global
        if self.local_crops_number:
            local = views["local"].transpose(0, 1).flatten(0, 1)  # L*B 3 h w, crop-major
            s_local_logits = self.dino_head(backbone(local)["x_norm_clstoken"])
            dino_local = self.dino_loss(s_local_logits.chunk(self.local_crops_number), t_cls_probs.chunk(2)) / n_terms
            metrics["dino_local"] = dino_local.detach()
            total = total + self.weights["dino_local"] * dino_local
        if self.weights["koleo"]:
            koleo = sum(self.koleo_loss(chunk) for chunk in s_global_cls.chunk(2))
            metrics["koleo"] = koleo.detach()
            total = total + self.weights["koleo"] * koleo
        if masks is not None:
            s_masked = student_global["x_norm_patchtokens"][masks]
            ibot = self.ibot_loss.forward_masked(ibot_head(s_masked), t_patch_probs, masks)
            metrics["ibot"] = ibot.detach()
            metrics["stats/masked_fraction"] = masks.float().mean()
            total = total + self.weights["ibot"] * ibot
        metrics["stats/teacher_temp"] = total.new_tensor(temp)
        metrics["stats/momentum"] = total.new_tensor(self.momentum_at(context.step))
        return ObjectiveOutput(loss=total, metrics=metrics)

    # -- teacher and optimizer ----------------------------------------------------------------------------------
    def student_modules(self, backbone: VisionTransformer) -> dict[str, nn.Module]:
        """The student's parts, in the teacher's order: backbone, DINO head and (separate) iBOT head."""
        modules: dict[str, nn.Module] = {"backbone": backbone, "dino_head": self.dino_head}
        if self.ibot_head is not None:
            modules["ibot_head"] = self.ibot_head
        return modules

    def update_teacher(self, backbone: VisionTransformer, momentum: float) -> None:
        """``teacher <- m * teacher + (1 - m) * student`` over backbone and heads, accumulated in fp32 so that an
        update below bf16 resolution still lands, on whatever each rank holds
        (:class:`lit_webssl.distributed.EMATeacher`)."""
        self.teacher.follow(self.student_modules(backbone), momentum)

    def on_after_optimizer_step(self, backbone: VisionTransformer, context: StepContext) -> None:
        self.update_teacher(backbone, self.momentum_at(context.step - 1))

    def on_before_optimizer_step(self, backbone: VisionTransformer, context: StepContext) -> None:
        """DINOv2's clip of each student part's gradient norm (where the strategy clips by itself, its global clip
        applies instead: the context's clip returns ``None``)."""
        if not self.clip_grad:
            return
        for module in self.student_modules(backbone).values():
            params = [p for p in module.parameters() if p.grad is not None]
            if params and context.clip_grad_norm_(params, self.clip_grad) is None:
                return

    def eval_backbone(self, backbone: VisionTransformer) -> nn.Module:
        return self.teacher["backbone"]

    def param_groups(self, backbone: VisionTransformer, weight_decay: float) -> list[dict[str, Any]]:
        """DINOv2's groups: lr x ``layerwise_decay ** (depth + 1 - layer_id)`` x ``patch_embed_lr_mult`` on the patch
        embedding, no weight decay on bias/norm/LayerScale/tokens, lr 0 on the prototype layers for the first
        ``freeze_last_layer``."""
        depth = backbone.depth
        frozen_until = self.to_steps(self.freeze_last_layer)
        groups: dict[tuple[float, float, int], dict[str, Any]] = {}
        for name, param in self.optimized_named_parameters(backbone):
            lr_mult = self.layerwise_decay ** (depth + 1 - _layer_id(name, depth))
            if ".patch_embed." in name:
                lr_mult *= self.patch_embed_lr_mult
            wd_mult = 0.0 if is_no_decay(name, param) else 1.0
            frozen = frozen_until if ".last_layer." in name else 0
            key = (lr_mult, wd_mult, frozen)
            if key not in groups:
                groups[key] = {
                    "params": [],
                    "weight_decay": weight_decay * wd_mult,
                    "lr_mult": lr_mult,
                    "wd_mult": wd_mult,
                    "frozen_until": frozen,
                    "name": f"lr{lr_mult:g}_wd{wd_mult:g}" + ("_last_layer" if frozen else ""),
                }
            groups[key]["params"].append(param)
        return list(groups.values())


def _layer_id(name: str, depth: int) -> int:
    """DINOv2's layer id: 0 for the patch embedding and tokens, ``i + 1`` for block ``i``, ``depth + 1`` above."""
    if not name.startswith("backbone."):
        return depth + 1
    rest = name[len("backbone.") :]
    if rest.startswith(("patch_embed.", "cls_token", "pos_embed", "mask_token")):
        return 0
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    return depth + 1
