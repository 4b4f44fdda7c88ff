"""Per-device bytes of the training state under Lightning's strategies and precisions (used by ``plan``).

Parameters, gradients, AdamW states and the EMA teacher, replicated (DDP) or sharded (DeepSpeed ZeRO, FSDP,
FSDP2 through ``ModelParallelStrategy``), on the device or offloaded to host memory, plus each strategy's own
buffers (DDP gradient buckets, ZeRO communication buckets and gathered parameters, FSDP's unsharded units).
Settings are read from the ``trainer`` section exactly as LightningCLI parses it (strings or ``class_path`` dicts).

Shapes: P trainable parameters (backbone + heads), T EMA-teacher parameters, W the world size (devices x nodes).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timm.models.vision_transformer import Block
from torch import nn

from lit_webssl.errors import ConfigError
from lit_webssl.models.vit import VisionTransformer
from lit_webssl.planner.activations import BOTH, Dtypes, regime

STRATEGY_FLAG = "--trainer.strategy"
PRECISION_FLAG = "--trainer.precision"
FP32 = 4

_PRECISIONS = {
    "32-true": (4, False),
    "bf16-mixed": (2, True),
    "16-mixed": (2, True),
    "bf16-true": (2, False),
    "16-true": (2, False),
}
_PRECISION_ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "half": "16-true"}


@dataclass(frozen=True)
class PrecisionSpec:
    """A Lightning precision setting.

    Attributes:
        name: Normalized name (``32-true``, ``bf16-mixed``, ``16-mixed``, ``bf16-true``, ``16-true``).
        compute_bytes: Bytes per element of the compute dtype.
        mixed: Mixed precision (fp32 weights, half compute) rather than ``*-true``.
    """

    name: str
    compute_bytes: int
    mixed: bool


def parse_precision(value: Any) -> PrecisionSpec:
    """``trainer.precision`` as LightningCLI gives it (``None`` is Lightning's default ``32-true``)."""
    name = "32-true" if value is None else str(value)
    name = _PRECISION_ALIASES.get(name, name)
    if name not in _PRECISIONS:
        raise ConfigError(
            f"{PRECISION_FLAG}={value!r} is not modelled by the planner; choose one of {', '.join(_PRECISIONS)}"
        )
    return PrecisionSpec(name, *_PRECISIONS[name])


@dataclass(frozen=True)
class StrategySpec:
    """What the planner needs to know of a Lightning strategy.

    Attributes:
        kind: ``single``, ``ddp``, ``deepspeed``, ``fsdp`` (``FSDPStrategy``) or ``fsdp2`` (``ModelParallelStrategy``).
        label: How the table names it.
        zero_stage: DeepSpeed ZeRO stage (0-3).
        shard: FSDP sharding: ``full``, ``grad_op`` (SHARD_GRAD_OP), ``hybrid`` (within a node) or ``none``.
        offload_optimizer: Optimizer states (and the fp32 gradients of the step) live in host memory.
        offload_parameters: Parameter shards (student and teacher) live in host memory.
        wrap_blocks: FSDP wraps each block (an ``auto_wrap_policy`` is set); otherwise the whole model is one unit.
        checkpointing: The strategy checkpoints activations (``FSDPStrategy(activation_checkpointing_policy=...)``).
        bucket_view: DDP ``gradient_as_bucket_view`` (no second copy of the gradients in the buckets).
        data_parallel_size: ``ModelParallelStrategy``'s data-parallel size (None: the world size).
        reduce_bucket: DeepSpeed ``reduce_bucket_size`` (elements).
        allgather_bucket: DeepSpeed ``allgather_bucket_size`` (elements, stages 1-2).
        prefetch_bucket: DeepSpeed ``stage3_prefetch_bucket_size`` (elements).
        overlap_comm: DeepSpeed ``overlap_comm`` (double-buffered reduce bucket).
    """

    kind: str
    label: str
    zero_stage: int = 0
    shard: str = "full"
    offload_optimizer: bool = False
    offload_parameters: bool = False
    wrap_blocks: bool = True
    checkpointing: bool = False
    bucket_view: bool = False
    data_parallel_size: int | None = None
    reduce_bucket: int = 200_000_000
    allgather_bucket: int = 200_000_000
    prefetch_bucket: int = 50_000_000
    overlap_comm: bool = True


def parse_strategy(value: Any) -> StrategySpec:
    """``trainer.strategy``: a registered name (``ddp``, ``deepspeed_stage_3_offload``, ``fsdp``...), ``auto``, a
    class path, or ``{class_path, init_args}``; anything else raises :class:`ConfigError` naming the flag."""
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        value = value.as_dict()
    if value is None or value == "auto":
        return StrategySpec("auto", "auto")
    if isinstance(value, Mapping):
        if "class_path" not in value:
            raise ConfigError(f"{STRATEGY_FLAG}: a dict needs a class_path, got {dict(value)}")
        return _from_class(_import_class(value["class_path"]), dict(value.get("init_args") or {}), value["class_path"])
    if not isinstance(value, str):
        raise ConfigError(
            f"{STRATEGY_FLAG}: cannot plan for a {type(value).__name__} strategy; give a name or class_path"
        )
    if "." in value:
        return _from_class(_import_class(value), {}, value)
    from lightning.pytorch.strategies import StrategyRegistry

    if value not in StrategyRegistry:
        raise ConfigError(
            f"{STRATEGY_FLAG}={value!r} is unknown; choose one of auto, "
            f"{', '.join(sorted(StrategyRegistry))} or a class_path"
        )
    entry = StrategyRegistry[value]
    return _from_class(entry["strategy"], dict(entry["init_params"]), value)


def _import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{STRATEGY_FLAG}: cannot import {path!r} ({err})") from None


def _from_class(cls: type, args: dict[str, Any], label: str) -> StrategySpec:
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    label = label.rpartition(".")[2]
    if issubclass(cls, DeepSpeedStrategy):  # before DDP: DeepSpeedStrategy subclasses DDPStrategy
        return _deepspeed(args, label)
    if issubclass(cls, FSDPStrategy):
        return _fsdp(args, label)
    if issubclass(cls, ModelParallelStrategy):
        return _model_parallel(args, label)
    if issubclass(cls, DDPStrategy):
        return StrategySpec("ddp", label, bucket_view=bool(args.get("gradient_as_bucket_view", False)))
    if issubclass(cls, SingleDeviceStrategy):
        return StrategySpec("single", label)
    raise ConfigError(
        f"{STRATEGY_FLAG}: the planner models DDP, DeepSpeed, FSDP and ModelParallelStrategy, not {cls.__name__}"
    )


def _deepspeed(args: dict[str, Any], label: str) -> StrategySpec:
    """``DeepSpeedStrategy`` arguments; a ``config`` (dict or JSON path) overrides them as DeepSpeed would."""
    zero = _deepspeed_config(args.get("config")).get("zero_optimization", {})
    stage = int(zero.get("stage", args.get("stage", 2))) if args.get("zero_optimization", True) else 0

    def setting(key: str, default: Any) -> Any:
        return zero.get(key, args.get(key, default))

    return StrategySpec(
        "deepspeed",
        label,
        zero_stage=stage,
        offload_optimizer=_offloaded(zero, "offload_optimizer", args.get("offload_optimizer", False)),
        offload_parameters=stage == 3 and _offloaded(zero, "offload_param", args.get("offload_parameters", False)),
        reduce_bucket=int(setting("reduce_bucket_size", 200_000_000)),
        allgather_bucket=int(setting("allgather_bucket_size", 200_000_000)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
        overlap_comm=bool(setting("overlap_comm", True)),
    )


def _offloaded(zero: dict[str, Any], key: str, default: bool) -> bool:
    """DeepSpeed's ``zero_optimization.<key>.device`` (``cpu``/``nvme`` offload, ``none``), else ``default``."""
    if key not in zero:
        return bool(default)
    return (zero[key] or {}).get("device", "none") not in ("none", None)


def _deepspeed_config(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, (str, Path)):
        try:
            return json.loads(Path(config).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{STRATEGY_FLAG}: cannot read the DeepSpeed config {config} ({err})") from None
    return dict(config)


_FSDP_SHARDING = {
    "FULL_SHARD": "full",
    "SHARD_GRAD_OP": "grad_op",
    "NO_SHARD": "none",
    "HYBRID_SHARD": "hybrid",
    "_HYBRID_SHARD_ZERO2": "hybrid",
}


def _fsdp(args: dict[str, Any], label: str) -> StrategySpec:
    sharding = str(args.get("sharding_strategy", "FULL_SHARD")).rpartition(".")[2].upper()
    if sharding not in _FSDP_SHARDING:
        raise ConfigError(
            f"{STRATEGY_FLAG}: unknown FSDP sharding_strategy {sharding!r}; choose one of {', '.join(_FSDP_SHARDING)}"
        )
    offload = args.get("cpu_offload", False)
    if hasattr(offload, "as_dict"):
        offload = offload.as_dict()
    if isinstance(offload, Mapping):
        offload = offload.get("init_args", offload).get("offload_params", False)
    checkpointing = bool(args.get("activation_checkpointing_policy") or args.get("activation_checkpointing"))
    return StrategySpec(
        "fsdp",
        label,
        shard=_FSDP_SHARDING[sharding],
        offload_optimizer=bool(offload),
        offload_parameters=bool(offload),
        wrap_blocks=args.get("auto_wrap_policy") is not None,
        checkpointing=checkpointing,
    )


def _model_parallel(args: dict[str, Any], label: str) -> StrategySpec:
    tp = args.get("tensor_parallel_size", "auto")
    if tp not in ("auto", 1, "1"):
        raise ConfigError(
            f"{STRATEGY_FLAG}: tensor_parallel_size={tp} is not modelled by the planner (the ViT "
            "is not tensor-parallel); use 1"
        )
    dp = args.get("data_parallel_size", "auto")
    return StrategySpec("fsdp2", label, data_parallel_size=None if dp == "auto" else int(dp))


# -- the model's tensors ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCounts:
    """Element counts of a built (meta) :class:`~lit_webssl.training.module.LitWebSSL`.

    Attributes:
        backbone: Trainable backbone parameters.
        backbone_frozen: Backbone parameters without gradient (MAE's sin-cos positions).
        heads: The objective's trainable parameters (heads, decoder, projections).
        teacher: The objective's parameters without gradient (the EMA teacher).
        tensors: Trainable parameter tensors (AdamW keeps a 4-byte step counter for each).
        buffer_bytes: Bytes of all buffers (DINO centers...), as stored.
        largest_block: Parameters of the largest timm ``Block`` (a sharding unit).
        outside_blocks: Parameters outside every ``Block`` (student and teacher: FSDP's root unit).
        tables: Trainable elements of the ViTs' position tables (FSDP2 keeps them whole on every rank).
        tables_frozen: Position-table elements without gradient (the EMA teacher's, MAE's sin-cos).
    """

    backbone: int
    backbone_frozen: int
    heads: int
    teacher: int
    tensors: int
    buffer_bytes: int
    largest_block: int
    outside_blocks: int
    tables: int = 0
    tables_frozen: int = 0

    @property
    def trainable(self) -> int:
        """P: parameters the optimizer updates."""
        return self.backbone + self.heads

    @property
    def total(self) -> int:
        """Every parameter, student, frozen and teacher."""
        return self.trainable + self.backbone_frozen + self.teacher


def count_model(backbone: nn.Module, objective: nn.Module) -> ModelCounts:
    """Count the parameters of a built model by role (unique tensors)."""
    seen: set[int] = set()

    def unique(module: nn.Module) -> list[nn.Parameter]:
        fresh = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        return fresh

    bb, obj = unique(backbone), unique(objective)
    trainable = [p for p in bb + obj if p.requires_grad]
    blocks = [m for m in (*backbone.modules(), *objective.modules()) if isinstance(m, Block)]
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    buffers = {id(b): b.numel() * b.element_size() for m in (backbone, objective) for b in m.buffers()}
    tables = {
        id(m.pos_embed): m.pos_embed
        for root in (backbone, objective)
        for m in root.modules()
        if isinstance(m, VisionTransformer)
    }.values()
    return ModelCounts(
        backbone=sum(p.numel() for p in bb if p.requires_grad),
        backbone_frozen=sum(p.numel() for p in bb if not p.requires_grad),
        heads=sum(p.numel() for p in obj if p.requires_grad),
        teacher=sum(p.numel() for p in obj if not p.requires_grad),
        tensors=len(trainable),
        buffer_bytes=sum(buffers.values()),
        largest_block=max(block_sizes, default=0),
        outside_blocks=sum(p.numel() for p in bb + obj) - sum(block_sizes),
        tables=sum(t.numel() for t in tables if t.requires_grad),
        tables_frozen=sum(t.numel() for t in tables if not t.requires_grad),
    )


# -- per-device rows --------------------------------------------------------------------------------------------
ALWAYS, STEP = "always", "step"
FWD_BWD = BOTH


@dataclass(frozen=True)
class Row:
    """One line of the plan: bytes per device (accelerator and host memory) and when they are held.

    Attributes:
        name: Component.
        device: Bytes in accelerator memory.
        host: Bytes in host memory (offloaded states).
        held: ``always`` (between steps too), ``fwd+bwd`` (forward and backward), ``fwd`` (the end of the forward
            only), ``bwd`` (the backward only) or ``step`` (the optimizer step only); the peak is
            ``always + max(fwd+bwd + max(fwd, bwd), step)``.
    """

    name: str
    device: float
    host: float = 0.0
    held: str = ALWAYS


def resolve_auto(spec: StrategySpec, world: int) -> StrategySpec:
    """Lightning's ``auto``: one device -> no strategy wrapper, several -> DDP."""
    if spec.kind != "auto":
        return spec
    return StrategySpec("single", "auto (single device)") if world == 1 else StrategySpec("ddp", "auto (ddp)")


def param_bytes(spec: StrategySpec, precision: PrecisionSpec) -> int:
    """Bytes per element of the stored student parameters (and gradients): fp32 under mixed precision except
    DeepSpeed, which keeps bf16/fp16 weights (its fp32 master copy counts as optimizer state)."""
    if not precision.mixed:
        return precision.compute_bytes
    return precision.compute_bytes if spec.kind == "deepspeed" else FP32


def shard_groups(spec: StrategySpec, world: int, devices: int) -> tuple[int, int, int]:
    """Ranks that share one copy of the (parameters and teacher, gradients, optimizer states)."""
    if spec.kind == "deepspeed":
        stage = spec.zero_stage
        return (world if stage >= 3 else 1, world if stage >= 2 else 1, world if stage >= 1 else 1)
    if spec.kind in ("fsdp", "fsdp2"):
        group = {"full": world, "grad_op": world, "hybrid": devices, "none": 1}[spec.shard]
        group = spec.data_parallel_size or group
        return group, group, group
    return 1, 1, 1


def state_rows(
    counts: ModelCounts, spec: StrategySpec, precision: PrecisionSpec, world: int, devices: int
) -> list[Row]:
    """Parameters, gradients, optimizer states, EMA teacher and buffers per device, then the strategy's buffers."""
    pbytes = param_bytes(spec, precision)
    p_div, g_div, o_div = shard_groups(spec, world, devices)
    on_host = spec.offload_parameters

    def place(name: str, nbytes: float, host: bool) -> Row:
        return Row(name, 0.0, nbytes, ALWAYS) if host else Row(name, nbytes)

    dtype = {2: "bf16/fp16", 4: "fp32"}[pbytes]
    rows = [
        place(f"backbone parameters ({dtype})", (counts.backbone + counts.backbone_frozen) * pbytes / p_div, on_host),
        place(f"heads parameters ({dtype})", counts.heads * pbytes / p_div, on_host),
        place(f"gradients ({dtype})", counts.trainable * pbytes / g_div, spec.kind == "fsdp" and on_host),
        place(
            _optimizer_name(spec),
            optimizer_bytes(counts, spec, pbytes) / o_div + _step_counters(counts, spec),
            spec.offload_optimizer,
        ),
        # DeepSpeed stores every parameter in its precision, the teacher's too (distributed/); others keep fp32
        place(
            f"EMA teacher ({dtype if spec.kind == 'deepspeed' else 'fp32'})",
            counts.teacher * (pbytes if spec.kind == "deepspeed" else FP32) / p_div,
            on_host,
        ),
    ]
    if spec.kind == "deepspeed" and pbytes < FP32 and counts.teacher:  # ShardedEMA's fp32 masters of its partitions
        rows.append(place("fp32 masters of the EMA teacher", counts.teacher * FP32 / p_div, on_host))
    if spec.kind == "fsdp2" and p_div > 1 and counts.tables + counts.tables_frozen:
        # LitWebSSL keeps the position tables out of FSDP2's sharding (resolution stages change their shape): the
        # rows above divided them by p_div, add the rest (fp32 weights, gradient and two moments; teacher weights)
        whole = counts.tables * 4 * FP32 + counts.tables_frozen * FP32
        rows.append(Row("position tables, whole on every rank (fp32)", whole * (1 - 1 / p_div)))
    if counts.buffer_bytes:
        rows.append(Row("buffers", counts.buffer_bytes))
    return rows + strategy_rows(counts, spec, precision, world, devices)


def _optimizer_name(spec: StrategySpec) -> str:
    if spec.kind == "deepspeed":
        return "optimizer: fp32 master + AdamW exp_avg, exp_avg_sq"
    return "optimizer: AdamW exp_avg, exp_avg_sq"


def optimizer_bytes(counts: ModelCounts, spec: StrategySpec, pbytes: int) -> int:
    """Unsharded optimizer-state bytes: DeepSpeed 12 per parameter (fp32 master, exp_avg, exp_avg_sq); torch's
    AdamW two states in the parameters' dtype."""
    if spec.kind == "deepspeed":
        return 3 * FP32 * counts.trainable
    return 2 * pbytes * counts.trainable


def _step_counters(counts: ModelCounts, spec: StrategySpec) -> int:
    return 0 if spec.kind == "deepspeed" else FP32 * counts.tensors  # torch AdamW: a 0-d fp32 step per tensor


def strategy_rows(
    counts: ModelCounts, spec: StrategySpec, precision: PrecisionSpec, world: int, devices: int
) -> list[Row]:
    """The strategy's own memory: DDP's gradient buckets, ZeRO's buckets, gathered parameters and fp32 step
    gradients, FSDP's unsharded units."""
    pbytes = param_bytes(spec, precision)
    if spec.kind == "ddp":
        return [] if spec.bucket_view else [Row("DDP gradient buckets (a second copy)", counts.trainable * pbytes)]
    if spec.kind == "deepspeed":
        return _deepspeed_rows(counts, spec, pbytes, world)
    if spec.kind in ("fsdp", "fsdp2"):
        return _fsdp_rows(counts, spec, precision)
    return []


def _deepspeed_rows(counts: ModelCounts, spec: StrategySpec, pbytes: int, world: int) -> list[Row]:
    buckets = spec.reduce_bucket * pbytes * (2 if spec.overlap_comm else 1)
    if spec.zero_stage < 3:
        buckets += spec.allgather_bucket * pbytes
    rows = [Row("ZeRO communication buckets", buckets)]
    if spec.zero_stage >= 3:
        gathered = (counts.largest_block + spec.prefetch_bucket) * pbytes
        rows.append(Row("ZeRO-3 gathered parameters (a block + prefetch)", gathered, held=FWD_BWD))
    o_div = world if spec.zero_stage >= 1 else 1
    if pbytes != FP32:
        grads = counts.trainable * FP32 / o_div
        rows.append(
            Row("fp32 gradients of the optimizer step", 0.0, grads, ALWAYS)
            if spec.offload_optimizer
            else Row("fp32 gradients of the optimizer step", grads, held=STEP)
        )
    return rows


def _fsdp_rows(counts: ModelCounts, spec: StrategySpec, precision: PrecisionSpec) -> list[Row]:
    if spec.shard == "none":
        return []
    cbytes = precision.compute_bytes
    if spec.kind == "fsdp" and not spec.wrap_blocks:
        name = "FSDP gathered parameters (one unit: no auto_wrap_policy)"
        gathered, grads = counts.total, counts.trainable
    elif spec.shard == "grad_op":
        name = "FSDP gathered parameters (SHARD_GRAD_OP: the student stays gathered)"
        gathered = counts.trainable + counts.backbone_frozen + counts.largest_block
        grads = counts.largest_block
    else:
        name = "FSDP gathered parameters (2 blocks + root unit)"
        gathered, grads = 2 * counts.largest_block + counts.outside_blocks, counts.largest_block
    return [
        Row(name, gathered * cbytes, held=FWD_BWD),
        Row("FSDP unsharded gradients before reduce-scatter", grads * cbytes, held=FWD_BWD),
    ]


def activation_dtypes(spec: StrategySpec, precision: PrecisionSpec, device_type: str = "cuda") -> Dtypes:
    """The activation regime: autocast over fp32 weights (DDP ``*-mixed``), bf16 throughout (DeepSpeed, ``*-true``)
    or autocast over bf16-gathered weights (FSDP's mixed-precision gather)."""
    if not precision.mixed or spec.kind == "deepspeed":  # DeepSpeed casts the model and inputs, no autocast
        return regime(precision.compute_bytes, autocast=False, params_half=True, device_type=device_type)
    params_half = spec.kind in ("fsdp", "fsdp2")
    return regime(precision.compute_bytes, autocast=True, params_half=params_half, device_type=device_type)
