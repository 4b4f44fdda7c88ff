"""What autograd keeps for backward in one training step: a byte count per tensor kind, from the built model.

The planner (:mod:`lit_webssl.planner.plan`) adds these to the states of :mod:`lit_webssl.distributed.memory`. Counts
follow what the
code saves, op by op, for timm's ``Block`` (pre-norm attention + MLP, optional LayerScale and drop path) and for the
heads and losses of the built-in objectives; ``tests/lit_webssl/test_plan.py`` checks them against the bytes that
``torch.autograd.graph.saved_tensors_hooks`` sees in a real step.

Per token of a block of width D, H heads, MLP hidden width F (SwiGLU: F = 2h packed), in bytes with the regime's
dtypes (``r`` residual / LayerNorm input, ``i`` linear input, ``o`` linear output):

* LayerNorm x2: input ``D*r`` + mean and rstd (8);
* qkv and fc1 inputs: ``2*D*i``; q, k, v (one qkv storage): ``3*D*o``;
* fused attention (SDPA flash / efficient): output ``D*o`` (also the proj input, same storage) + logsumexp ``4*H``;
  the math path (timm ``fused_attn=False``) keeps contiguous copies of q*scale, k^T and v instead of the qkv storage
  (same ``3*D*o``), the probabilities ``H*N*o`` (+ ``4*H*N`` when autocast computes the softmax in fp32) and the proj
  input ``D*o``;
* MLP: GELU ``2*F*o`` (fc1 output, GELU output); SwiGLU ``4*h*o`` (fc1 output ``2h``, SiLU output, product);
* LayerScale: its input ``D*o`` per branch; drop path: one random scalar per image and branch.

Shapes: B images per device, N tokens of a crop (CLS + patches), D width, K prototypes, M masked tokens.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from timm.layers import GluMlp, Mlp
from torch import nn

from lit_webssl.compat.torch import TorchDispatchMode

if TYPE_CHECKING:
    from lit_webssl.models.vit import VisionTransformer
    from lit_webssl.objectives.base import Objective

FP32 = 4
NORM_STATS = 8  # LayerNorm's fp32 mean and rstd per token


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of the tensors a block saves, for one precision regime.

    Attributes:
        name: Regime name (``fp32``, ``autocast``, ``half``, ``autocast-half``).
        residual: The residual stream (LayerNorm inputs, block inputs).
        linear_in: Inputs saved by Linear/conv (a cast copy under autocast).
        linear_out: Linear outputs, attention tensors, MLP hidden activations.
        autocast: The forward runs under ``torch.autocast``.
        ln_fp32: Autocast runs LayerNorm in fp32 (CUDA's policy; CPU keeps bf16 inputs in bf16).
    """

    name: str
    residual: int
    linear_in: int
    linear_out: int
    autocast: bool
    ln_fp32: bool = True

    @property
    def norm_saved(self) -> int:
        """Bytes per element of a LayerNorm input as saved (a fp32 copy when autocast upcasts a half input)."""
        return FP32 if self.autocast and self.ln_fp32 else self.residual

    @property
    def normed(self) -> int:
        """Bytes per element of a LayerNorm output."""
        return FP32 if self.autocast and (self.ln_fp32 or self.residual == FP32) else self.residual

    def half_residual(self) -> Dtypes:
        """The same regime for a sub-network whose residual stream is in the compute dtype (the MAE decoder)."""
        return replace(self, residual=self.linear_out)


def regime(half_bytes: int, autocast: bool, params_half: bool, device_type: str = "cuda") -> Dtypes:
    """Activation dtypes of a step.

    Args:
        half_bytes: Bytes of the compute dtype (2 for bf16/fp16, 4 for fp32).
        autocast: The step runs under ``torch.autocast`` (Lightning's ``*-mixed`` precisions, for most strategies).
        params_half: The weights the forward reads are already in the compute dtype (``*-true``, strategies that
            store or gather them in it: :func:`lit_webssl.distributed.memory.activation_dtypes`).
        device_type: ``cuda`` or ``cpu``: autocast's LayerNorm policy differs.
    """
    ln_fp32 = device_type != "cpu"
    if half_bytes == FP32:
        return Dtypes("fp32", FP32, FP32, FP32, autocast=False)
    if autocast and not params_half:
        return Dtypes("autocast", FP32, half_bytes, half_bytes, autocast=True, ln_fp32=ln_fp32)
    if autocast:
        return Dtypes("autocast-half", half_bytes, half_bytes, half_bytes, autocast=True, ln_fp32=ln_fp32)
    return Dtypes("half", half_bytes, half_bytes, half_bytes, autocast=False)


BOTH, FORWARD, BACKWARD = "fwd+bwd", "fwd", "bwd"


@dataclass(frozen=True)
class Activation:
    """One kind of tensor held through the step.

    Attributes:
        name: What it is (shown in the plan's detail).
        nbytes: Bytes per device.
        phase: When it is alive at the step's peak: ``fwd+bwd`` (until the backward reaches the blocks: block
            activations, inputs), ``fwd`` (at the end of the forward only: heads, losses, final norms, teacher
            outputs, all freed before the blocks' backward) or ``bwd`` (only in the backward: a block recomputed
            under activation checkpointing).
        saved: Saved by autograd for backward (what the validation measures); False for tensors merely alive.
    """

    name: str
    nbytes: int
    phase: str = BOTH
    saved: bool = True


@dataclass(frozen=True)
class Pass:
    """Crops of one size through the student backbone with gradients.

    Attributes:
        name: Crop kind (``global``, ``local``, ``image``...).
        rows: Crops per device (images x crops per image).
        size: Crop side in pixels.
        tokens: Tokens per crop through the blocks (CLS + patches, or CLS + kept patches for MAE).
    """

    name: str
    rows: int
    size: int
    tokens: int


# -- blocks ------------------------------------------------------------------------------------------------------
def _attention_per_token(block: nn.Module, tokens: int, dt: Dtypes) -> int:
    attn = block.attn
    dim, heads = attn.qkv.in_features, attn.num_heads
    if getattr(attn, "fused_attn", True):
        return dim * dt.linear_out + FP32 * heads
    softmax = FP32 if dt.autocast else dt.linear_out
    probs = heads * tokens * (softmax + (dt.linear_out if softmax != dt.linear_out else 0))
    return dim * dt.linear_out + probs  # q*scale, k^T and v copies replace the qkv storage; + proj input


def _mlp_per_token(mlp: nn.Module, dt: Dtypes) -> int:
    """GELU ``Mlp``: fc1 output + GELU output (2F); ``GluMlp`` (fc1 packs 2h): fc1 output + SiLU output + product
    (4h): both ``2 * fc1.out_features``."""
    if not isinstance(mlp, (GluMlp, Mlp)):
        raise TypeError(f"the planner models timm's Mlp and GluMlp, not {type(mlp).__name__}")
    return 2 * mlp.fc1.out_features * dt.linear_out


def _layerscales(block: nn.Module) -> int:
    return sum(not isinstance(getattr(block, name), nn.Identity) for name in ("ls1", "ls2"))


def _drop_paths(block: nn.Module) -> int:
    return sum(not isinstance(getattr(block, name), nn.Identity) for name in ("drop_path1", "drop_path2"))


def block_bytes(block: nn.Module, rows: int, tokens: int, dt: Dtypes) -> int:
    """Bytes autograd saves in one timm ``Block`` over ``rows`` sequences of ``tokens`` tokens."""
    dim = block.attn.qkv.in_features
    per_token = 2 * (dim * dt.norm_saved + NORM_STATS) + 2 * dim * dt.linear_in + 3 * dim * dt.linear_out
    per_token += _attention_per_token(block, tokens, dt) + _mlp_per_token(block.mlp, dt)
    per_token += _layerscales(block) * dim * dt.linear_out
    return rows * tokens * per_token + rows * _drop_paths(block) * dt.residual


def blocks_bytes(blocks: Iterable[nn.Module], rows: int, tokens: int, dt: Dtypes) -> int:
    """Bytes saved by a stack of blocks (no activation checkpointing)."""
    return sum(block_bytes(block, rows, tokens, dt) for block in blocks)


# -- backbone ----------------------------------------------------------------------------------------------------
def backbone_pass(bb: VisionTransformer, p: Pass, dt: Dtypes, checkpointing: bool) -> list[Activation]:
    """Activations of one student pass: patch-embedding input, blocks (or their inputs under checkpointing), final
    LayerNorm input."""
    label = f"{p.name} crops ({p.rows} x {p.size}px, {p.tokens} tokens)"
    dim = bb.embed_dim
    items = [Activation(f"{label}: patch-embedding input", p.rows * 3 * p.size * p.size * dt.linear_in)]
    if checkpointing:
        inputs = len(bb.blocks) * p.rows * p.tokens * dim * dt.residual
        items.append(Activation(f"{label}: block inputs (checkpointed)", inputs))
        internals = max(block_bytes(b, p.rows, p.tokens, dt) for b in bb.blocks)
        items.append(Activation(f"{label}: one block recomputed in backward", internals, BACKWARD, saved=False))
    else:
        items.append(Activation(f"{label}: {len(bb.blocks)} blocks", blocks_bytes(bb.blocks, p.rows, p.tokens, dt)))
    final = p.rows * p.tokens * (dim * dt.norm_saved + NORM_STATS)
    items.append(Activation(f"{label}: final LayerNorm input", final, FORWARD))
    return items


def recompute_peak(items: list[Activation]) -> list[Activation]:
    """Under checkpointing only one block is recomputed at a time: keep the largest backward-only item."""
    recomputed = [a for a in items if a.phase == BACKWARD]
    if len(recomputed) < 2:
        return items
    keep = max(recomputed, key=lambda a: a.nbytes)
    return [a for a in items if a.phase != BACKWARD or a is keep]


def weight_copies(modules: Iterable[nn.Module]) -> int:
    """Elements of the trainable weights that autocast casts once per step and autograd keeps (Linear, conv and
    MultiheadAttention projection weights; biases are cast too but not saved)."""
    total, seen = 0, set()
    for module in modules:
        weights = []
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            weights.append(module.weight)
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            weights.append(module.in_proj_weight)
        for w in weights:
            if w.requires_grad and id(w) not in seen:
                seen.add(id(w))
                total += w.numel()
    return total


def generic_passes(objective: Objective, bb: VisionTransformer, batch: int) -> list[Pass]:
    """One student pass per declared view (what an objective the planner does not know is assumed to do)."""
    return [Pass(v.name, batch * v.count, v.size, 1 + (v.size // bb.patch_size) ** 2) for v in objective.views()]


# -- objectives --------------------------------------------------------------------------------------------------
def objective_activations(
    objective: Objective, bb: VisionTransformer, batch: int, dt: Dtypes, checkpointing: bool
) -> tuple[list[Activation], bool]:
    """Activations of one training step of ``objective`` at ``batch`` images per device.

    Returns:
        The items, and whether the objective's heads and losses are modelled (DINOv2 and MAE are; for any other
        objective only one student pass per declared view is counted).
    """
    from lit_webssl.objectives.dino import DINOv2
    from lit_webssl.objectives.mae import MAE

    if isinstance(objective, DINOv2):
        items, modelled = dino_activations(objective, bb, batch, dt, checkpointing), True
    elif isinstance(objective, MAE):
        items, modelled = mae_activations(objective, bb, batch, dt, checkpointing), True
    else:
        passes = generic_passes(objective, bb, batch)
        items, modelled = [a for p in passes for a in backbone_pass(bb, p, dt, checkpointing)], False
    return recompute_peak(items), modelled


def masked_tokens(objective: Objective, n_images: int, n_patches: int) -> int:
    """Expected iBOT-masked tokens M per device: ``int(n_images * p)`` crops masked at ratios stratified over the
    range (mean ratio: its midpoint); 0 when iBOT is off."""
    if objective.weights["ibot"] == 0 or objective.mask_probability == 0:
        return 0
    lo, hi = objective.mask_ratio_range
    return int(int(n_images * objective.mask_probability) * n_patches * (lo + hi) / 2)


def dino_head_bytes(head: nn.Module, rows: int, dt: Dtypes, input_copy: bool) -> int:
    """A DINO head (Linear/GELU MLP, L2 normalization, weight-normed prototypes) over ``rows`` vectors.

    Per row: the first Linear's input when it is a copy (autocast cast, or a gathered tensor), GELU input and output
    per GELU, the bottleneck vector and its normalized copy; per call: the normalized prototype matrix ``K x bn``.
    """
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    per_row = linears[0].in_features * dt.linear_in if input_copy else 0
    per_row += sum(2 * lin.out_features * dt.linear_out for lin in linears[:-1])  # GELU input and output
    prototypes, bottleneck = head.last_layer.weight_v.shape
    per_row += bottleneck * (dt.linear_out + dt.linear_in) + 2 * FP32
    per_call = prototypes * bottleneck * dt.linear_in + 2 * prototypes * dt.residual
    return rows * per_row + per_call


def dino_passes(objective: Objective, bb: VisionTransformer, batch: int) -> list[Pass]:
    """The student's passes: 2 global crops (iBOT-masked), then the local crops."""
    grid = (objective.global_crop_size // bb.patch_size) ** 2
    passes = [Pass("global", 2 * batch, objective.global_crop_size, 1 + grid)]
    if objective.local_crops_number:
        local = (objective.local_crop_size // bb.patch_size) ** 2
        passes.append(Pass("local", objective.local_crops_number * batch, objective.local_crop_size, 1 + local))
    return passes


def dino_activations(
    objective: Objective, bb: VisionTransformer, batch: int, dt: Dtypes, checkpointing: bool
) -> list[Activation]:
    """Web-DINO: student passes, DINO head on every CLS token, iBOT head on the masked tokens, the three losses, and
    the teacher's outputs that stay alive through the student pass."""
    passes = dino_passes(objective, bb, batch)
    items = [a for p in passes for a in backbone_pass(bb, p, dt, checkpointing)]
    glob, dim = passes[0], bb.embed_dim
    masked = masked_tokens(objective, glob.rows, glob.tokens - 1)
    if masked:
        items.append(Activation("iBOT masks", glob.rows * (glob.tokens - 1)))
    for p in passes:  # a head reading a CLS view without a cast keeps the whole normed output alive
        kept = not dt.autocast or (p is glob and objective.weights["koleo"] > 0)
        if kept:
            items.append(
                Activation(f"{p.name} normed tokens (held by CLS views)", p.rows * p.tokens * dim * dt.normed, FORWARD)
            )
        items.append(
            Activation(
                f"DINO head, {p.name} CLS",
                dino_head_bytes(objective.dino_head, p.rows, dt, input_copy=dt.autocast),
                FORWARD,
            )
        )
    items += _dino_losses(objective, passes, batch, masked, dt, dim)
    if masked:
        head = objective.ibot_head if objective.ibot_separate_head else objective.dino_head
        items.append(Activation("iBOT head, masked tokens", dino_head_bytes(head, masked, dt, True), FORWARD))
    teacher = glob.rows * glob.tokens * dim * (dt.residual + dt.normed)
    items.append(Activation("teacher outputs (no grad)", teacher, FORWARD, saved=False))
    return items


def _dino_losses(
    objective: Objective, passes: list[Pass], batch: int, masked: int, dt: Dtypes, dim: int
) -> list[Activation]:
    """DINO: fp32 log-softmax per student CLS + the teacher targets; iBOT: the same per masked token + weights;
    KoLeo: per global crop, the distance vectors (and an fp32 copy of half CLS tokens)."""
    k = objective.dino_loss.out_dim
    students = sum(p.rows for p in passes)
    targets = passes[0].rows + (batch if len(passes) > 1 else 0)
    items = [Activation("DINO loss", (students + targets) * k * FP32, FORWARD)]
    if masked:
        kp = objective.ibot_loss.patch_out_dim
        items.append(Activation("iBOT loss", masked * (2 * kp * FP32 + FP32), FORWARD))
    if objective.weights["koleo"]:
        per_row = dim * FP32 * (1 if dt.normed == FP32 else 2) + 6 * FP32
        items.append(Activation("KoLeo loss", passes[0].rows * per_row, FORWARD))
    return items


def mae_activations(
    objective: Objective, bb: VisionTransformer, batch: int, dt: Dtypes, checkpointing: bool
) -> list[Activation]:
    """Web-MAE: the encoder on the kept tokens, the decoder on all tokens (its residual stream is in the compute
    dtype: the mask tokens and sin-cos positions are cast to it), the normalized-pixel loss."""
    patches = (objective.crop_size // bb.patch_size) ** 2
    kept = int(patches * (1 - objective.mask_ratio))
    p = Pass("image", batch, objective.crop_size, 1 + kept)
    items = backbone_pass(bb, p, dt, checkpointing)
    dec, ddt, tokens = objective.decoder, dt.half_residual(), 1 + patches
    width, pixels = dec.embed.out_features, dec.pred.out_features
    items += [  # torch.gather saves its whole input (for the shape of the gradient) besides the indices
        Activation("encoder gather input (all patch tokens)", batch * patches * bb.embed_dim * dt.residual),
        Activation("masking indices (encoder gather, decoder restore)", 2 * batch * patches * 8),
        Activation("decoder input (latent tokens)", batch * p.tokens * bb.embed_dim * dt.linear_in, FORWARD),
        Activation("decoder gather input", batch * patches * width * ddt.residual, FORWARD),
        Activation(f"decoder: {len(dec.blocks)} blocks", blocks_bytes(dec.blocks, batch, tokens, ddt), FORWARD),
        Activation(
            "decoder final LayerNorm + prediction inputs",
            batch * tokens * (width * (ddt.norm_saved + ddt.linear_in) + NORM_STATS),
            FORWARD,
        ),
        Activation("reconstruction loss", batch * patches * (pixels + 1) * FP32, FORWARD),
    ]
    return items


# -- measurement ---------------------------------------------------------------------------------------------------
def saved_tensor_bytes(step: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Measure what autograd saves while ``step()`` runs: the bytes of the unique storages packed by
    ``torch.autograd.graph.saved_tensors_hooks``, without the storages of ``exclude`` (the parameters).

    This is the quantity the activation estimate predicts (``Activation.saved``); it sees neither tensors merely
    alive (teacher outputs) nor what activation checkpointing recomputes.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def has_mallinfo2() -> bool:
    """Whether glibc >= 2.33's ``mallinfo2`` is there to measure host peaks with :class:`HostPeak`."""
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


class HostPeak(TorchDispatchMode):
    """Peak of glibc's bytes in use (``mallinfo2``: arena + mmapped chunks), sampled after every aten op.

    Use as a context manager around CPU work; ``peak - in_use()`` taken before is what the work added.
    """

    def __init__(self) -> None:
        super().__init__()
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallinfo2.restype = _MallInfo2
        self.peak = 0

    def in_use(self) -> int:
        """glibc's bytes in use now."""
        info = self.libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out
