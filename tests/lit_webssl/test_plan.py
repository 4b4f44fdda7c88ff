"""The memory planner against measurements: saved activations, exact state sizes, sharding, the ``plan`` command."""

from __future__ import annotations

import gc
import io
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console

from lit_webssl.cli import WebSSLCLI
from lit_webssl.distributed.memory import parse_precision, parse_strategy
from lit_webssl.errors import ConfigError
from lit_webssl.objectives.dino import DINOv2
from lit_webssl.objectives.mae import MAE
from lit_webssl.planner.activations import HostPeak, has_mallinfo2, saved_tensor_bytes
from lit_webssl.planner.plan import GIB, MemoryPlan, TrainerSettings, estimate_memory, plan_main, trainer_settings
from lit_webssl.training.module import LitWebSSL

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
HEADS = {
    "head_prototypes": 256,
    "head_hidden_dim": 128,
    "head_bottleneck_dim": 64,
    "ibot_prototypes": 192,
    "ibot_hidden_dim": 96,
    "ibot_bottleneck_dim": 48,
}
BATCH = 8
DS = "lightning.pytorch.strategies.DeepSpeedStrategy"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this module runs with one intra-op thread (``one_thread`` in conftest.py)."""


def tiny(
    objective: str, size: int = 32, width: int = 64, depth: int = 2, ffn: str = "mlp", fused: bool = True, **backbone
) -> LitWebSSL:
    """A real (CPU) tiny model: patch 4, DINO with 2 local crops of half size, or MAE with a 2 x 32 decoder."""
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


def fake_batch(model: LitWebSSL) -> dict:
    return {"views": {v.name: torch.randn(BATCH, v.count, 3, v.size, v.size) for v in model.objective.views()}}


def settings(
    strategy: object = "auto", precision: str = "32-true", devices: int = 1, nodes: int = 1, accelerator: str = "cpu"
) -> TrainerSettings:
    return TrainerSettings(parse_strategy(strategy), parse_precision(precision), devices, nodes, accelerator)


def plan_of(model: LitWebSSL, **kwargs) -> MemoryPlan:
    return estimate_memory(model, BATCH, settings(**kwargs), device_type="cpu")


# -- (1) activations: estimate vs the bytes autograd saves ----------------------------------------------------------
CASES = {
    "dino-gelu-fp32": ("dino", {}, "32-true"),
    "dino-swiglu-fp32-w96-48px-no-layerscale": (
        "dino",
        {"ffn": "swiglu", "width": 96, "depth": 3, "size": 48, "layerscale": None},
        "32-true",
    ),
    "dino-gelu-bf16": ("dino", {}, "bf16-mixed"),
    "dino-swiglu-bf16-depth4": ("dino", {"ffn": "swiglu", "depth": 4}, "bf16-mixed"),
    "dino-gelu-fp32-math-attention": ("dino", {"fused": False}, "32-true"),
    "mae-gelu-fp32": ("mae", {}, "32-true"),
    "mae-gelu-fp32-48px-w128": ("mae", {"size": 48, "width": 128, "depth": 3}, "32-true"),
    "mae-swiglu-bf16": ("mae", {"ffn": "swiglu"}, "bf16-mixed"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_activation_estimate_agrees_with_saved_tensors(case):
    objective, shape, precision = CASES[case]
    model = tiny(objective, **shape)
    batch = fake_batch(model)
    mixed = precision == "bf16-mixed"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            model.objective(batch, model.backbone)

    measured = saved_tensor_bytes(step, exclude=model.parameters())
    plan = plan_of(model, precision=precision)
    estimate = sum(a.nbytes for a in plan.activations if a.saved)
    if mixed:
        estimate += plan.row("autocast copies").device
    assert estimate == pytest.approx(measured, rel=0.10), f"{case}: estimate {estimate} vs measured {measured}"


def test_activation_checkpointing_keeps_block_inputs_and_one_block():
    plain, checkpointed = plan_of(tiny("dino", depth=4)), plan_of(tiny("dino", depth=4, grad_checkpointing=True))
    inputs = sum(a.nbytes for a in checkpointed.activations if "block inputs" in a.name)
    tokens = 2 * BATCH * (1 + 8**2) + 2 * BATCH * (1 + 4**2)  # 2 global 32 px + 2 local 16 px crops, patch 4
    assert inputs == 4 * tokens * 64 * 4  # depth x tokens x width x fp32
    blocks = sum(a.nbytes for a in plain.activations if a.name.endswith("4 blocks"))
    recomputed = next(a for a in checkpointed.activations if "recomputed" in a.name)
    assert recomputed.nbytes < blocks / 4 and not recomputed.saved
    assert checkpointed.peak_device < plain.peak_device


@pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2) to measure CPU peaks")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_cpu_peak_of_forward_and_backward_agrees(checkpointing):
    """The planner's activations + gradients against the measured peak of a real fp32 step on the CPU (all
    allocations, not only what autograd saves: checkpoint recomputation, teacher outputs, backward buffers)."""
    model = tiny("dino", ffn="swiglu", width=96, depth=3, size=48, grad_checkpointing=checkpointing)
    batch = fake_batch(model)

    def step() -> None:
        model.objective(batch, model.backbone).loss.backward()

    step()  # warm up the allocator, then measure a step from no gradients (set_to_none, as Lightning does)
    model.zero_grad(set_to_none=True)
    gc.collect()
    mode = HostPeak()
    base = mode.in_use()
    with mode:
        step()
    measured = mode.peak - base
    plan = plan_of(model)
    estimate = sum(plan.held(when) for when in ("fwd+bwd", "fwd", "bwd")) + plan.row("gradients").device
    estimate -= plan.row("input batch").device  # allocated before the measurement starts
    assert estimate == pytest.approx(measured, rel=0.10), f"estimate {estimate} vs measured {measured}"


# -- (2) states: exact against the real tensors after an optimizer step -------------------------------------------
def test_state_sizes_are_exact_after_one_optimizer_step():
    model = tiny("dino", ffn="swiglu")
    objective, backbone = model.objective, model.backbone
    optimizer = torch.optim.AdamW(objective.param_groups(backbone, 0.04), lr=1e-3)
    objective(fake_batch(model), backbone).loss.backward()
    optimizer.step()
    trainable = [p for p in (*backbone.parameters(), *objective.parameters()) if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    plan = plan_of(model)
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    assert plan.row("backbone parameters").device == nbytes(backbone.parameters())
    assert plan.row("heads parameters").device == nbytes(p for p in objective.parameters() if p.requires_grad)
    assert plan.row("gradients").device == nbytes(p.grad for p in trainable)
    assert plan.row("optimizer").device == nbytes(t for s in optimizer.state.values() for t in s.values())
    assert plan.row("EMA teacher").device == nbytes(objective.teacher.parameters())
    assert plan.row("buffers").device == nbytes(objective.buffers())


# -- (3) sharding and offload arithmetic ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def meta_model() -> LitWebSSL:
    model = LitWebSSL(DINOv2(global_crop_size=224, local_crop_size=96, **HEADS), "vit_small")
    with torch.device("meta"):
        model.configure_model()
    return model


def _states(plan: MemoryPlan) -> dict[str, tuple[float, float]]:
    names = ("backbone parameters", "heads parameters", "gradients", "optimizer", "EMA teacher")
    return {n: (plan.row(n).device, plan.row(n).host) for n in names}


def test_ddp_replicates_and_zero3_shards_over_the_world(meta_model):
    ddp = _states(estimate_memory(meta_model, BATCH, settings("ddp", "bf16-mixed", 8, 2)))
    zero3 = _states(estimate_memory(meta_model, BATCH, settings("deepspeed_stage_3", "bf16-mixed", 8, 2)))
    one = _states(estimate_memory(meta_model, BATCH, settings("auto", "bf16-mixed", 1, 1)))
    assert ddp == one  # a full replica per device
    p = ddp["gradients"][0] / 4  # trainable parameters (fp32 grads under DDP)
    assert zero3["backbone parameters"][0] == ddp["backbone parameters"][0] / 2 / 16  # bf16, / 16 ranks
    assert zero3["gradients"][0] == 2 * p / 16
    assert zero3["optimizer"][0] == 12 * p / 16  # fp32 master + exp_avg + exp_avg_sq
    assert zero3["EMA teacher"][0] == ddp["EMA teacher"][0] / 2 / 16  # DeepSpeed stores it in bf16 too
    masters = estimate_memory(meta_model, BATCH, settings("deepspeed_stage_3", "bf16-mixed", 8, 2)).row("fp32 masters")
    assert masters.device == ddp["EMA teacher"][0] / 16  # and the EMA accumulates in fp32 copies of its partitions


def test_offload_moves_states_to_host(meta_model):
    spec = {"class_path": DS, "init_args": {"stage": 3, "offload_optimizer": True, "offload_parameters": True}}
    assert parse_strategy(spec) == replace(parse_strategy("deepspeed_stage_3_offload"), label="DeepSpeedStrategy")
    plain = _states(estimate_memory(meta_model, BATCH, settings("deepspeed_stage_3", "bf16-mixed", 8)))
    offload = _states(estimate_memory(meta_model, BATCH, settings(spec, "bf16-mixed", 8)))
    for name in ("backbone parameters", "optimizer", "EMA teacher"):
        assert offload[name] == (0.0, plain[name][0])
    assert offload["gradients"] == plain["gradients"]  # ZeRO keeps the bf16 gradient partition on the device
    opt_only = {
        "class_path": DS,
        "init_args": {
            "config": {
                "zero_optimization": {
                    "stage": 3,
                    "offload_optimizer": {"device": "cpu"},
                    "offload_param": {"device": "none"},
                }
            }
        },
    }
    partial = _states(estimate_memory(meta_model, BATCH, settings(opt_only, "bf16-mixed", 8)))
    assert partial["optimizer"] == (0.0, plain["optimizer"][0])
    assert partial["backbone parameters"] == plain["backbone parameters"]


@pytest.mark.parametrize(
    "strategy",
    [
        {
            "class_path": "lightning.pytorch.strategies.FSDPStrategy",
            "init_args": {"auto_wrap_policy": ["timm.models.vision_transformer.Block"]},
        },
        {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"},
    ],
    ids=["fsdp", "fsdp2"],
)
def test_fsdp_shards_fp32_states_over_the_world(meta_model, strategy):
    ddp = _states(estimate_memory(meta_model, BATCH, settings("ddp", "bf16-mixed", 8)))
    fsdp = _states(estimate_memory(meta_model, BATCH, settings(strategy, "bf16-mixed", 8)))
    for name, (device, _) in ddp.items():
        assert fsdp[name][0] == pytest.approx(device / 8, abs=4 * 1024)  # AdamW step counters stay per tensor
    hybrid = {
        "class_path": "lightning.pytorch.strategies.FSDPStrategy",
        "init_args": {
            "sharding_strategy": "HYBRID_SHARD",
            "auto_wrap_policy": ["timm.models.vision_transformer.Block"],
        },
    }
    across = _states(estimate_memory(meta_model, BATCH, settings(hybrid, "bf16-mixed", 8, 4)))
    assert across["EMA teacher"][0] == ddp["EMA teacher"][0] / 8  # sharded within a node only


def test_precision_sets_activation_dtypes(meta_model):
    full = estimate_memory(meta_model, BATCH, settings("ddp", "32-true", 8))
    mixed = estimate_memory(meta_model, BATCH, settings("ddp", "bf16-mixed", 8))
    zero3 = estimate_memory(meta_model, BATCH, settings("deepspeed_stage_3", "bf16-mixed", 8))
    blocks = lambda plan: plan.row("activations: backbone").device  # noqa: E731
    assert blocks(zero3) < blocks(mixed) < blocks(full)
    assert blocks(full) / blocks(zero3) == pytest.approx(2.0, rel=0.02)  # bf16 everywhere halves fp32
    assert any(r.name.startswith("autocast copies") for r in mixed.rows)
    assert not any(r.name.startswith("autocast copies") for r in zero3.rows)


# -- (4) the command -------------------------------------------------------------------------------------------------
def make_cli(rest: list[str]) -> WebSSLCLI:
    return WebSSLCLI(LitWebSSL, subclass_mode_data=True, args=rest, run=False, plan=True)


def run_plan(*argv: str) -> tuple[str, dict]:
    out = io.StringIO()
    info = plan_main(list(argv), make_cli, Console(file=out, width=200))
    return out.getvalue(), info


def test_plan_7b_on_8_devices_prints_the_table_and_whether_it_fits():
    config = str(CONFIGS / "webdino" / "vit_7b.yaml")
    out, info = run_plan("--config", config, "--devices", "8", "--nodes", "1", "--device-memory", "80")
    assert re.search(r"^backbone parameters: \d+$", out, re.M)
    assert "per-device memory: ddp, bf16-mixed, 8 devices" in out
    for component in ("optimizer", "EMA teacher", "heads parameters", "activations: backbone, 2x224px + 8x98px"):
        assert component in out
    assert re.search(r"^fits in 80 GiB: no \(headroom -\d", out, re.M)
    assert info["fits"] is False and info["peak_device_bytes"] > 150 * GIB
    out, info = run_plan(
        "--config",
        config,
        "--devices",
        "8",
        "--nodes",
        "1",
        "--device-memory",
        "80",
        "--trainer.strategy",
        "deepspeed_stage_3",
        "--model.backbone_overrides.grad_checkpointing",
        "true",
    )
    assert "deepspeed_stage_3" in out and "activation checkpointing on" in out
    assert re.search(r"^fits in 80 GiB: yes \(headroom \d", out, re.M)


def test_bad_strategy_and_planner_flags_name_the_flag():
    config = str(CONFIGS / "demo" / "dino_tiny.yaml")
    with pytest.raises(ConfigError, match="--trainer.strategy"):
        run_plan("--config", config, "--trainer.strategy", "no_such_strategy")
    with pytest.raises(ConfigError, match="--trainer.strategy"):
        parse_strategy({"class_path": "torch.nn.Linear"})
    with pytest.raises(ConfigError, match="--trainer.precision"):
        parse_precision("64-true")
    with pytest.raises(ConfigError, match="--devices"):
        run_plan("--config", config, "--devices", "0")


def test_trainer_settings_read_the_cli_config_and_overrides():
    s = trainer_settings(
        {
            "strategy": {"class_path": DS, "init_args": {"stage": 3}},
            "precision": "bf16-mixed",
            "devices": "auto",
            "num_nodes": 4,
        }
    )
    assert (s.strategy.kind, s.strategy.zero_stage, s.devices, s.num_nodes) == ("deepspeed", 3, 1, 4)
    assert any("--devices" in note for note in s.notes)
    s = trainer_settings({"devices": [0, 1, 2], "num_nodes": 2}, nodes=1)
    assert (s.devices, s.world_size) == (3, 3)
