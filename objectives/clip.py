"""CLIP: the language-supervised baseline of Web-SSL, trained with the MetaCLIP recipe over the shared ViT
(docs/recipe.md section 5).

Image tower: the shared backbone, pooled (normed CLS token or mean of normed patch tokens), then a linear projection
without bias to ``embed_dim``. Text tower: open_clip's ``TextTransformer`` (causal, the embedding taken at the EOT
token, ``ln_final``, ``text_projection``), as MetaCLIP builds it. Tokens: OpenAI CLIP's BPE (open_clip's
``SimpleTokenizer``, whose vocabulary ships with the package: no download), applied per sample in the loader workers
(:meth:`CLIP.text_transform`), or to ``batch["caption"]`` in ``forward`` when a batch carries no tokens.

Shapes: B pairs on this rank, D backbone width, W text width, E embedding width, L context length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer
from torch import Tensor, nn

from lit_webssl.errors import ConfigError
from lit_webssl.models.init import built_partitioned, reset_tree, whole, whole_shape
from lit_webssl.models.vit import check_img_size
from lit_webssl.objectives.base import Objective, ObjectiveOutput, StepContext, ViewSpec
from lit_webssl.objectives.losses import CLIPLoss

if TYPE_CHECKING:
    from lit_webssl.models.vit import VisionTransformer

FLAG = "--model.objective.init_args."
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VOCAB_SIZE = 49408
"""Size of OpenAI CLIP's BPE vocabulary, SOT (49406) and EOT (49407) included."""


@lru_cache(maxsize=1)
def _simple_tokenizer() -> SimpleTokenizer:
    """open_clip's tokenizer over its bundled ``bpe_simple_vocab_16e6.txt.gz``, built once per process."""
    return SimpleTokenizer()


class CaptionTokenizer:
    """Captions -> OpenAI CLIP token ids ``[SOT, tokens..., EOT, 0...]``, truncated to ``context_length`` with EOT
    kept last. Small and picklable (the BPE tables are built lazily in each process), so loader workers can hold it.

    Args:
        context_length: Tokens per caption, SOT and EOT included.
    """

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = context_length

    def __call__(self, caption: str) -> Tensor:
        """One caption -> int64 ``(L,)``."""
        return self.batch([caption])[0]

    def batch(self, captions: Sequence[str]) -> Tensor:
        """Captions -> int64 ``(len(captions), L)``."""
        return _simple_tokenizer()(list(captions), context_length=self.context_length)


class CLIP(Objective):
    """CLIP (MetaCLIP v1 recipe): symmetric InfoNCE between the backbone's images and a causal text transformer.

    Args:
        crop_size: Side of the training crop; must be divisible by the backbone's patch size.
        crop_scale: RandomResizedCrop area range (MetaCLIP: 0.9-1.0; no flip, no colour augmentation).
        pool: Image feature before the projection: the normed ``cls`` token or the ``mean`` of normed patch tokens.
        embed_dim: Width E of the joint embedding space (both projections).
        text_width: Text transformer width W.
        text_layers: Text transformer blocks.
        text_heads: Text transformer attention heads (must divide ``text_width``).
        text_mlp_ratio: Text MLP hidden width as a multiple of W.
        context_length: Tokens per caption (77 in CLIP); longer captions are truncated, EOT kept.
        quick_gelu: QuickGELU activations in the text tower (MetaCLIP v1), else exact GELU.
        init_temperature: Initial softmax temperature; the learnable logit scale starts at ``ln(1 / T)``.
        max_logit_scale: The logit scale is clamped to ``[1, max_logit_scale]`` after every optimizer step.
    """

    pixel_mean = OPENAI_CLIP_MEAN
    pixel_std = OPENAI_CLIP_STD
    needs_text = True

    def __init__(
        self,
        crop_size: int = 224,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        pool: Literal["cls", "mean"] = "cls",
        embed_dim: int = 1024,
        text_width: int = 1024,
        text_layers: int = 24,
        text_heads: int = 16,
        text_mlp_ratio: float = 4.0,
        context_length: int = 77,
        quick_gelu: bool = True,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ConfigError(f"{FLAG}pool must be 'cls' or 'mean', got {pool!r}")
        for flag, value in (
            ("embed_dim", embed_dim),
            ("text_width", text_width),
            ("text_layers", text_layers),
            ("text_heads", text_heads),
        ):
            if value < 1:
                raise ConfigError(f"{FLAG}{flag} must be >= 1, got {value}")
        if text_width % text_heads:
            raise ConfigError(f"{FLAG}text_width ({text_width}) must be divisible by text_heads ({text_heads})")
        if context_length < 2:
            raise ConfigError(f"{FLAG}context_length must be >= 2 (SOT and EOT), got {context_length}")
        if not 0.0 < init_temperature <= 1.0:
            raise ConfigError(f"{FLAG}init_temperature must be in (0, 1], got {init_temperature}")
        if max_logit_scale < 1.0 / init_temperature:
            raise ConfigError(
                f"{FLAG}max_logit_scale ({max_logit_scale}) must be >= 1 / init_temperature "
                f"({1.0 / init_temperature:.4g})"
            )
        self.crop_size, self.crop_scale, self.pool = crop_size, tuple(crop_scale), pool
        self.embed_dim, self.context_length = embed_dim, context_length
        self.text_cfg = {
            "width": text_width,
            "layers": text_layers,
            "heads": text_heads,
            "mlp_ratio": text_mlp_ratio,
            "act_layer": QuickGELU if quick_gelu else nn.GELU,
        }
        self.init_logit_scale = math.log(1.0 / init_temperature)
        self.max_log_scale = math.log(max_logit_scale)
        self.tokenizer = CaptionTokenizer(context_length)
        self.loss_fn = CLIPLoss()
        self.image_proj: nn.Linear | None = None
        self.text: TextTransformer | None = None
        self.logit_scale: nn.Parameter | None = None

    def configure(self, backbone: VisionTransformer) -> None:
        check_img_size(self.crop_size, backbone.patch_size, f"{FLAG}crop_size")
        with torch.device(backbone.pos_embed.device):
            self.image_proj = nn.Linear(backbone.embed_dim, self.embed_dim, bias=False)
            self.text = TextTransformer(
                context_length=self.context_length,
                vocab_size=VOCAB_SIZE,
                output_dim=self.embed_dim,
                pool_type="argmax",
                **self.text_cfg,
            )
            # shape (1,), not open_clip's 0-d: sharded strategies can neither shard nor broadcast a 0-d tensor
            self.logit_scale = nn.Parameter(torch.full((1,), self.init_logit_scale))
        if self.image_proj.weight.is_meta:
            return
        if built_partitioned(self.text):  # open_clip's init ran on placeholders
            with whole(self.text, recurse=True):
                self.text.init_parameters()
        with whole(self.image_proj):
            nn.init.normal_(self.image_proj.weight, std=backbone.embed_dim**-0.5)  # open_clip's visual ``proj``

    def init_weights(self, backbone: VisionTransformer) -> None:
        """After a meta-device build: constructor inits, open_clip's text-tower init, the causal mask (a
        non-persistent buffer, so never in a checkpoint), the image projection and the logit scale."""
        reset_tree(self.text)
        self.text.init_parameters()
        self.text.attn_mask = self.text.build_causal_mask().to(self.text.positional_embedding.device)
        nn.init.normal_(self.image_proj.weight, std=backbone.embed_dim**-0.5)
        with torch.no_grad():
            self.logit_scale.fill_(self.init_logit_scale)

    def views(self) -> list[ViewSpec]:
        return [ViewSpec("image", size=self.crop_size, scale=self.crop_scale, hflip_p=0.0)]

    def set_resolution(self, global_size: int, local_size: int | None = None) -> None:
        """Training crops of ``global_size``; this objective has no local crops, so ``local_size`` must be ``None``."""
        if local_size is not None:
            raise ConfigError(f"{type(self).__name__} has no local crops; leave the stage's local_crop_size unset")
        self.crop_size = global_size

    def text_transform(self) -> CaptionTokenizer:
        return self.tokenizer

    def encode_image(self, images: Tensor, backbone: VisionTransformer) -> Tensor:
        """Images ``(B, 3, H, W)`` -> unnormalized embeddings ``(B, E)``."""
        out = backbone(images)
        pooled = out["x_norm_clstoken"] if self.pool == "cls" else out["x_norm_patchtokens"].mean(dim=1)
        return self.image_proj(pooled)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Token ids ``(B, L)`` -> unnormalized embeddings ``(B, E)``."""
        return self.text(tokens)

    def forward(
        self, batch: dict[str, Any], backbone: VisionTransformer, context: StepContext | None = None
    ) -> ObjectiveOutput:
        images = batch["views"]["image"][:, 0]  # B 3 H W
        tokens = batch.get("text")
        if tokens is None:  # loaders without the text transform: tokenize here
            tokens = self.tokenizer.batch(batch["caption"])
        image_emb = self.encode_image(images, backbone)  # B E
        text_emb = self.encode_text(tokens.to(images.device, non_blocking=True))  # B E
        scale = self.logit_scale.exp().squeeze(0)
        loss = self.loss_fn(image_emb, text_emb, scale)
        with torch.no_grad():  # image -> text retrieval within this rank's batch
            sims = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).t()  # B B
            i2t_top1 = (sims.argmax(dim=1) == torch.arange(sims.shape[0], device=sims.device)).float().mean()
        metrics = {"clip": loss.detach(), "stats/logit_scale": scale.detach(), "stats/i2t_top1": i2t_top1}
        return ObjectiveOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def on_after_optimizer_step(self, backbone: VisionTransformer, context: StepContext) -> None:
        """MetaCLIP: clamp the log scale to ``[0, ln(max_logit_scale)]`` after every step."""
        self.logit_scale.clamp_(0.0, self.max_log_scale)

    def param_groups(self, backbone: VisionTransformer, weight_decay: float) -> list[dict[str, Any]]:
        """MetaCLIP's rule: no weight decay on tensors of fewer than 2 dimensions (biases, norms, ``logit_scale``),
        decay on every matrix, token and position embedding included.

        The backbone's ``(1, 1, D)`` CLS and mask tokens count as the 1-D vectors they are (open_clip's
        ``class_embedding`` is ``(D,)``); its ``(1, 1 + N, D)`` position embedding decays as open_clip's 2-D one.
        """
        decay, no_decay = [], []
        for name, param in self.optimized_named_parameters(backbone):
            vector = sum(size > 1 for size in whole_shape(param)) < 2
            (no_decay if vector or name.endswith("logit_scale") else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0, "wd_mult": 1.0, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0, "wd_mult": 0.0, "name": "no_decay"},
        ]
        return [g for g in groups if g["params"]]
