"""``plan``: build the configured model on the meta device and estimate its per-device memory, allocating nothing.

``python -m lit_webssl plan --config FILE [--devices N] [--nodes M] [--device-memory GIB] [--detail]`` prints the
model's shape, then one row per component: parameters, gradients and optimizer states (replicated or sharded as the
configured strategy does it), the EMA teacher, the heads, the activations of the configured crop mix and batch, the
strategy's buffers and an allowance for the CUDA context and fragmentation; with ``--device-memory``, whether the
peak fits. The formulas are in ``docs/planner.md``; states come from :mod:`lit_webssl.distributed.memory`,
activations from :mod:`lit_webssl.planner.activations`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lit_webssl.distributed.memory import (
    ALWAYS,
    FWD_BWD,
    STEP,
    PrecisionSpec,
    Row,
    StrategySpec,
    activation_dtypes,
    count_model,
    parse_precision,
    parse_strategy,
    resolve_auto,
    state_rows,
)
from lit_webssl.errors import ConfigError
from lit_webssl.planner.activations import (
    BACKWARD,
    FORWARD,
    Activation,
    Dtypes,
    objective_activations,
    weight_copies,
)
from lit_webssl.training.module import LitWebSSL

GIB = 1024**3
CONTEXT_GIB = 1.0
"""Fixed allowance per accelerator: CUDA context, cuBLAS/cuDNN workspaces, NCCL communicator buffers."""
FRAGMENTATION = 0.05
"""Allowance for the caching allocator's fragmentation, as a fraction of the estimated peak."""


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


# -- trainer settings -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainerSettings:
    """The trainer settings that decide memory.

    Attributes:
        strategy: Parsed ``trainer.strategy``.
        precision: Parsed ``trainer.precision``.
        devices: Devices per node.
        num_nodes: Nodes.
        accelerator: ``trainer.accelerator`` (``cpu`` drops the CUDA allowance).
        notes: Assumptions made while reading the settings, printed under the table.
    """

    strategy: StrategySpec = field(default_factory=lambda: StrategySpec("auto", "auto"))
    precision: PrecisionSpec = field(default_factory=lambda: parse_precision(None))
    devices: int = 1
    num_nodes: int = 1
    accelerator: str = "auto"
    notes: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        """Devices over all nodes."""
        return self.devices * self.num_nodes


def trainer_settings(trainer: Any, devices: int | None = None, nodes: int | None = None) -> TrainerSettings:
    """Read LightningCLI's ``trainer`` namespace (or a dict); ``devices``/``nodes`` override its counts."""
    get = trainer.get if hasattr(trainer, "get") else lambda key, default=None: getattr(trainer, key, default)
    notes: list[str] = []
    if devices is None:
        devices = _count_devices(get("devices", "auto"))
        if devices is None:
            devices = 1
            notes.append(f"trainer.devices is {get('devices', 'auto')!r}: planned for 1 device per node (--devices)")
    return TrainerSettings(
        strategy=parse_strategy(get("strategy", "auto")),
        precision=parse_precision(get("precision", None)),
        devices=devices,
        num_nodes=nodes if nodes is not None else int(get("num_nodes", 1) or 1),
        accelerator=str(get("accelerator", "auto") or "auto"),
        notes=tuple(notes),
    )


def _count_devices(value: Any) -> int | None:
    """``trainer.devices`` as a count: an int, a digit string, a list of ids or ``"0,1"``; None for auto/-1."""
    if isinstance(value, (list, tuple)):
        return len(value)
    text = str(value).strip()
    if "," in text:
        return len([part for part in text.split(",") if part.strip()])
    if text.lstrip("-").isdigit() and int(text) > 0:
        return int(text)
    return None


# -- the estimate -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    """Per-device memory of one training step.

    Attributes:
        rows: Components, in table order (the allowance last).
        activations: The activation items behind the activation rows.
        settings: The trainer settings planned for.
        strategy: The resolved strategy (``auto`` made concrete).
        batch_size: Images per device.
        checkpointing: Activation checkpointing of the backbone's blocks.
        dtypes: The activation dtype regime.
        heads_modelled: Whether the objective's heads and losses are counted.
    """

    rows: list[Row]
    activations: list[Activation]
    settings: TrainerSettings
    strategy: StrategySpec
    batch_size: int
    checkpointing: bool
    dtypes: Dtypes
    heads_modelled: bool

    def held(self, when: str) -> float:
        """Device bytes of the rows held ``when`` (``always``, ``fwd+bwd``, ``fwd``, ``bwd`` or ``step``)."""
        return sum(r.device for r in self.rows if r.held == when)

    @property
    def peak_device(self) -> float:
        """Peak accelerator bytes: ``always + max(fwd+bwd + fwd + bwd, step)``.

        Adding the forward-only and the backward-only activations is an upper bound: under checkpointing some heads'
        tensors are freed before the largest block is recomputed (by how much depends on the backward's order).
        """
        training = self.held(FWD_BWD) + self.held(FORWARD) + self.held(BACKWARD)
        return self.held(ALWAYS) + max(training, self.held(STEP))

    @property
    def host(self) -> float:
        """Host bytes per device (offloaded states)."""
        return sum(r.host for r in self.rows)

    def row(self, prefix: str) -> Row:
        """The first row whose name starts with ``prefix``."""
        return next(r for r in self.rows if r.name.startswith(prefix))

    def fits(self, device_memory_gib: float) -> bool:
        """The peak fits in ``device_memory_gib`` GiB."""
        return self.peak_device <= device_memory_gib * GIB


def estimate_memory(
    model: LitWebSSL, batch_size: int, settings: TrainerSettings, device_type: str = "cuda"
) -> MemoryPlan:
    """Per-device memory of a training step of ``model`` (built, e.g. on the meta device) at ``batch_size`` images
    per device under ``settings``. Pure: reads shapes only."""
    if model.backbone is None:
        raise ValueError("build the model first (model.configure_model() under torch.device('meta'))")
    spec = resolve_auto(settings.strategy, settings.world_size)
    bb, objective = model.backbone, model.objective
    rows = state_rows(count_model(bb, objective), spec, settings.precision, settings.world_size, settings.devices)
    dt = activation_dtypes(spec, settings.precision, device_type)
    checkpointing = bool(bb.grad_checkpointing) or spec.checkpointing
    items, modelled = objective_activations(objective, bb, batch_size, dt, checkpointing)
    rows.append(Row("input batch (uint8 + normalized fp32)", batch_bytes(objective, batch_size), held=FWD_BWD))
    rows += activation_rows(items, _crop_mix(objective, batch_size))
    if dt.name == "autocast":  # fp32 weights cast once per step, kept for backward
        copies = settings.precision.compute_bytes * weight_copies([*bb.modules(), *objective.modules()])
        rows.append(Row("autocast copies of the weights", copies, held=FWD_BWD))
    plan = MemoryPlan(rows, items, settings, spec, batch_size, checkpointing, dt, modelled)
    if settings.accelerator != "cpu":
        allowance = CONTEXT_GIB * GIB + FRAGMENTATION * plan.peak_device
        rows.append(
            Row(f"allowance: CUDA context + NCCL {CONTEXT_GIB:g} GiB, fragmentation {FRAGMENTATION:.0%}", allowance)
        )
    return plan


def batch_bytes(objective: Any, batch_size: int) -> int:
    """The batch on the device: uint8 crops as loaded plus their fp32 normalization (``on_after_batch_transfer``)."""
    pixels = sum(v.count * 3 * v.size * v.size for v in objective.views())
    return batch_size * pixels * (1 + 4)


def activation_rows(items: Sequence[Activation], crops: str) -> list[Row]:
    """Group activation items into the table's rows by when they are alive."""
    names = {
        FWD_BWD: f"activations: backbone, {crops}",
        FORWARD: "activations: heads, losses, final norms, teacher outputs",
        BACKWARD: "activations: one block recomputed (checkpointing)",
    }
    rows = []
    for phase, name in names.items():
        group = [a for a in items if a.phase == phase]
        if group:
            rows.append(Row(name, sum(a.nbytes for a in group), held=phase))
    return rows


def _crop_mix(objective: Any, batch_size: int) -> str:
    views = " + ".join(f"{v.count}x{v.size}px" for v in _merged_views(objective))
    return f"{views} crops x {batch_size} images"


def _merged_views(objective: Any) -> list[Any]:
    from lit_webssl.objectives.base import ViewSpec

    merged: dict[int, int] = {}
    for v in objective.views():
        merged[v.size] = merged.get(v.size, 0) + v.count
    return [ViewSpec("crop", size, count) for size, count in merged.items()]


# -- printing ---------------------------------------------------------------------------------------------------
def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:,.2f}" if nbytes else "-"


def memory_table(plan: MemoryPlan) -> Table:
    """The per-device table: one row per component, device and host GiB, the peak."""
    s = plan.settings
    title = (
        f"per-device memory: {plan.strategy.label}, {s.precision.name}, {s.world_size} devices "
        f"({s.devices} x {s.num_nodes} nodes), {plan.batch_size} images/device, activation checkpointing "
        f"{'on' if plan.checkpointing else 'off'}, activations in {plan.dtypes.name} dtypes"
    )
    table = Table(title=title)
    for name, justify in (("component", "left"), ("held", "left"), ("device GiB", "right"), ("host GiB", "right")):
        table.add_column(name, justify=justify)
    for r in plan.rows:
        table.add_row(r.name, r.held, _gib(r.device), _gib(r.host))
    table.add_section()
    table.add_row("peak = always + max(fwd+bwd + fwd + bwd, step)", "", _gib(plan.peak_device), _gib(plan.host))
    return table


def detail_table(plan: MemoryPlan) -> Table:
    """Every activation item behind the activation rows."""
    table = Table(title=f"activations ({plan.dtypes.name} dtypes)")
    table.add_column("tensor")
    table.add_column("saved", justify="center")
    table.add_column("GiB", justify="right")
    for a in plan.activations:
        table.add_row(a.name, "yes" if a.saved else "no", f"{a.nbytes / GIB:,.3f}")
    return table


def fits_line(plan: MemoryPlan, device_memory_gib: float) -> str:
    """``fits in <X> GiB: yes|no (headroom <Y> GiB)``."""
    headroom = device_memory_gib - plan.peak_device / GIB
    return f"fits in {device_memory_gib:g} GiB: {'yes' if headroom >= 0 else 'no'} (headroom {headroom:,.2f} GiB)"


def plan_notes(plan: MemoryPlan, model: LitWebSSL) -> list[str]:
    """Assumptions worth reading next to the table."""
    notes = list(plan.settings.notes)
    if not plan.heads_modelled:
        notes.append(
            f"{type(model.objective).__name__}: heads and losses are not modelled; activations count one "
            "backbone pass per declared view"
        )
    if plan.host:
        notes.append(
            f"host memory per node ({plan.settings.devices} devices): "
            f"{plan.host * plan.settings.devices / GIB:,.1f} GiB"
        )
    return notes


def model_table(model: LitWebSSL, datamodule: Any) -> Table:
    """Shape of the built model: width, depth, views, FLOPs, parameter counts."""
    bb = model.backbone
    table = Table(title=f"{model.backbone_name} + {type(model.objective).__name__}")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("width / depth / heads", f"{bb.embed_dim} / {bb.depth} / {bb.num_heads}")
    table.add_row("patch / native grid", f"{bb.patch_size} / {bb.grid_size}x{bb.grid_size}")
    for v in model.objective.views():
        table.add_row(f"view {v.name}", f"{v.count} x {v.size}px, {(v.size // bb.patch_size) ** 2} patches")
        table.add_row("  backbone fwd GFLOPs/crop", f"{forward_gflops(model, v.size):.2f}")
    trainable = count_params(bb, True) + count_params(model.objective, True)
    table.add_row("trainable parameters", f"{trainable / 1e6:,.2f} M")
    if datamodule is not None and getattr(datamodule, "batch_size", None):
        table.add_row("per-device batch", str(datamodule.batch_size))
    return table


def print_plan(
    model: LitWebSSL,
    datamodule: Any = None,
    console: Console | None = None,
    settings: TrainerSettings | None = None,
    device_memory_gib: float | None = None,
    detail: bool = False,
) -> dict[str, Any]:
    """Build ``model`` on the meta device, print its shape and per-device memory plan; return the figures.

    Args:
        model: The configured module (not yet built).
        datamodule: Gives the per-device batch (``batch_size``; 1 when absent).
        console: Where to print (a new rich console by default).
        settings: Trainer settings (default: one device, fp32, no strategy).
        device_memory_gib: Print whether the peak fits in this much device memory.
        detail: Also print every activation item.
    """
    console = console or Console()
    with torch.device("meta"):
        model.configure_model()
    info = {
        "backbone": model.backbone_name,
        "backbone_parameters": count_params(model.backbone),
        "objective_parameters": count_params(model.objective),
        "trainable_parameters": count_params(model.backbone, True) + count_params(model.objective, True),
    }
    console.print(f"backbone parameters: {info['backbone_parameters']}")
    console.print(f"objective parameters: {info['objective_parameters']}")
    console.print(model_table(model, datamodule))
    batch = getattr(datamodule, "batch_size", None) or 1
    plan = estimate_memory(model, batch, settings or TrainerSettings())
    console.print(memory_table(plan))
    if detail:
        console.print(detail_table(plan))
    for note in plan_notes(plan, model):
        console.print(f"note: {note}")
    info.update(plan=plan, peak_device_bytes=plan.peak_device, host_bytes=plan.host)
    if device_memory_gib is not None:
        console.print(fits_line(plan, device_memory_gib))
        info["fits"] = plan.fits(device_memory_gib)
    return info


# -- command line -----------------------------------------------------------------------------------------------
def _plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lit_webssl plan",
        add_help=False,
        allow_abbrev=False,
        description="Per-device memory of the configured run; every other argument is the run's config (--config "
        "FILE, --trainer.strategy ..., as for fit).",
    )
    parser.add_argument("--devices", type=int, help="Devices per node (default: the config's trainer.devices).")
    parser.add_argument("--nodes", type=int, help="Nodes (default: the config's trainer.num_nodes).")
    parser.add_argument(
        "--device-memory", type=float, metavar="GIB", help="Memory of one device in GiB: print whether the peak fits."
    )
    parser.add_argument("--detail", action="store_true", help="Also list every activation tensor kind.")
    return parser


def parse_plan_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split the planner's own flags from the run's config arguments; check them."""
    args, rest = _plan_parser().parse_known_args(list(argv))
    for flag, value in (("--devices", args.devices), ("--nodes", args.nodes)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.device_memory is not None and args.device_memory <= 0:
        raise ConfigError(f"--device-memory must be > 0 GiB, got {args.device_memory}")
    return args, rest


def _console() -> Console:
    """A console for the table: the terminal's width, or 120 columns when writing to a pipe or file."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def plan_main(
    argv: Sequence[str], make_cli: Callable[[list[str]], Any], console: Console | None = None
) -> dict[str, Any]:
    """``plan [--devices N] [--nodes M] [--device-memory GIB] [--detail] --config FILE ...``.

    Args:
        argv: Arguments after ``plan``.
        make_cli: Builds the parsed LightningCLI (``run=False``, no trainer) from the remaining arguments; it must
            expose ``model``, ``datamodule`` and ``config.trainer``.
        console: Where to print.
    """
    console = console or _console()
    if "-h" in argv or "--help" in argv:
        console.print(_plan_parser().format_help())
    args, rest = parse_plan_args(argv)
    cli = make_cli(rest)
    settings = trainer_settings(cli.config["trainer"], devices=args.devices, nodes=args.nodes)
    return print_plan(cli.model, cli.datamodule, console, settings, args.device_memory, args.detail)
