"""Progressive resolution: stage checks, grids and optimizer surgery, a fit across a boundary (crops, batch, lr,
checkpoint grids), exact resume on either side of the boundary, and DDP on 2 CPU ranks; high-resolution stages as
their own launches, started with ``--model.init_from`` from weights at another grid (one process, FSDP2 shards, the
shipped 378 config shrunk to a tiny ViT after a real 224 run, and under FSDP2 / ZeRO-3 on 2 CPU ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import CONFIGS, REPO, free_port, load_weights, tiny_demo
from resolution_probe import fsdp2_warm_start_worker, tiny_dino_module, write_source_weights

from lit_webssl.callbacks.resolution import ProgressiveResolution, ResolutionStage, resample_module_grids
from lit_webssl.checkpoint import checkpoint_kind, read_state_dict, stored_grid
from lit_webssl.cli import main
from lit_webssl.errors import ConfigError
from lit_webssl.models.vit import VisionTransformer, fit_pos_embed_grids, grid_of, sincos_pos_embed
from lit_webssl.objectives import CLIP, MAE, DINOv2
from lit_webssl.training.module import LitWebSSL

HERE = Path(__file__).resolve().parent
FLAG = "--trainer.callbacks ProgressiveResolution"
OBJ = "--model.objective.init_args."

# Two stages of a tiny DINOv2 (patch 4): 16 px (4 x 4 grid), 4 images -> from step 2: 24 px (6 x 6), 2 images, lr x 0.5.
STAGES = [
    {"start": 0, "global_crop_size": 16, "local_crop_size": 8, "batch_size": 4},
    {"start": 2, "global_crop_size": 24, "local_crop_size": 12, "batch_size": 2, "lr_scale": 0.5},
]
STEPS = 8  # 16 training images: 2 steps x 4 + 4 steps x 2 end the epoch, 2 more steps run in the next one


def _config(path: Path, out: Path, probe: bool = False) -> str:
    """The two-stage tiny DINOv2 config; ``probe``: with a ``Zero3BoundaryProbe`` at the boundary (ZeRO-3 only)."""
    config = yaml.safe_load((CONFIGS / "demo" / "dino_tiny.yaml").read_text())
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": 1, "save_top_k": -1},
        },
        *(
            [
                {
                    "class_path": "resolution_probe.Zero3BoundaryProbe",
                    "init_args": {"out": str(out), "step": STAGES[1]["start"]},
                }
            ]
            if probe
            else []
        ),
        {"class_path": "lit_webssl.callbacks.ProgressiveResolution", "init_args": {"stages": STAGES}},
        {"class_path": "resolution_probe.StepRecorder", "init_args": {"out": str(out)}},
    ]
    config["trainer"]["enable_progress_bar"] = False
    config["model"]["backbone_overrides"].update(img_size=16, embed_dim=32, depth=1, num_heads=2)
    config["model"]["objective"]["init_args"].update(
        head_prototypes=32,
        head_hidden_dim=32,
        head_bottleneck_dim=16,
        ibot_prototypes=32,
        ibot_hidden_dim=32,
        ibot_bottleneck_dim=16,
        freeze_last_layer=1,
    )
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this module runs with one intra-op thread (``one_thread`` in conftest.py)."""


def _args(config: str, data: Path, run: str, *extra: str, steps: int = STEPS) -> list[str]:
    return [
        "fit",
        "--config",
        config,
        "--run_name",
        run,
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--data.init_args.local",
        str(data),
        "--data.init_args.num_workers",
        "0",
        "--model.optim.total",
        "100",
        *extra,
    ]


def _on_the_fly(table: torch.Tensor, grid: int) -> torch.Tensor:
    """What a tiny ViT (patch 4) holding the learned ``table`` uses for a ``grid x grid`` input in its forward pass
    (the on-the-fly interpolation): the table a warm start at that grid must load."""
    vit = VisionTransformer(img_size=4 * grid_of(table), patch_size=4, embed_dim=table.shape[-1], depth=1, num_heads=2)
    with torch.no_grad():
        vit.pos_embed.copy_(table)
        return vit.pos_embed_for(grid, grid).detach().clone()


def _final(out: Path, rank: int = 0) -> dict:
    return torch.load(out / f"state_rank{rank}.pt", weights_only=False)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["moments"].keys() == b["moments"].keys()
    for name, state in a["moments"].items():
        for key, value in state.items():
            assert torch.equal(value, b["moments"][name][key]), f"{name}.{key}"


# -- stages --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        ([{"start": 5, "global_crop_size": 224}], f"{FLAG}.stages[0].start must be 0"),
        (
            [{"start": 0, "global_crop_size": 224}, {"start": 0, "global_crop_size": 378}],
            f"{FLAG}.stages[1].start=0 must be larger than stages[0].start=0",
        ),
        ([{"start": 0, "global_crop_size": 224, "batch_size": 0}], f"{FLAG}.stages[0].batch_size must be >= 1"),
        ([{"start": 0, "global_crop_size": 224, "lr_scale": 0.0}], f"{FLAG}.stages[0].lr_scale must be > 0"),
        ([], f"{FLAG}.stages: give at least one stage"),
    ],
    ids=["first_start", "unsorted", "batch", "lr_scale", "empty"],
)
def test_bad_stages_are_one_line_errors_naming_the_flag(stages, expected):
    with pytest.raises(ConfigError) as err:
        ProgressiveResolution(stages)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def _fake_trainer(datamodule, world_size: int = 1, accumulate: int = 1, optimizers=()):
    return SimpleNamespace(
        datamodule=datamodule,
        world_size=world_size,
        accumulate_grad_batches=accumulate,
        optimizers=list(optimizers),
        strategy=SimpleNamespace(model=None),
        ckpt_path=None,
    )


def _fake_datamodule(batch_size: int = 12):
    views = {}
    return SimpleNamespace(batch_size=batch_size, set_views=lambda v: views.update(views=list(v)), views=views)


_module = tiny_dino_module


def test_crop_sizes_must_be_multiples_of_the_patch_size():
    callback = ProgressiveResolution(
        [{"start": 0, "global_crop_size": 32}, {"start": 10, "global_crop_size": 48, "local_crop_size": 18}]
    )
    with pytest.raises(ConfigError, match=r"stages\[1\]\.local_crop_size=18 is not divisible by the patch size 4"):
        callback.setup(_fake_trainer(_fake_datamodule()), _module(), "fit")


def test_zero2_takes_one_stage_per_launch_fsdp2_and_zero3_many():
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    trainer = _fake_trainer(_fake_datamodule())
    trainer.strategy = DeepSpeedStrategy(stage=2)
    two = ProgressiveResolution([{"start": 0, "global_crop_size": 32}, {"start": 10, "global_crop_size": 48}])
    with pytest.raises(ConfigError, match=r"stages: DeepSpeedStrategy lays out.*ZeRO-3.*--model\.init_from"):
        two.setup(trainer, _module(), "fit")
    module = _module()
    ProgressiveResolution([{"start": 0, "global_crop_size": 48}]).setup(trainer, module, "fit")
    assert module.backbone_overrides["img_size"] == 48  # built at the stage's grid, before any sharding
    for strategy in (ModelParallelStrategy(), DeepSpeedStrategy(stage=3)):
        trainer.strategy = strategy
        module = _module()
        two.setup(trainer, module, "fit")  # stages change the tables in the run (FSDP2: whole; ZeRO-3: new engine)
        assert module.backbone_overrides["img_size"] == 32


@pytest.mark.distributed
def test_mixed_fsdp2_and_replicated_gradients_clip_and_step_like_whole_ones(tmp_path):
    """FSDP2 shards plus a replicated table (the position tables under progressive resolution): the table's
    gradients are averaged over ranks, the clip uses the norm of the whole gradient, and AdamW steps the split groups
    as torch's own functions do on the whole, unsharded tensors."""
    import torch.multiprocessing as mp
    from resolution_probe import mixed_clip_worker
    from torch import nn

    torch.manual_seed(0)
    whole = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    whole.register_parameter("table", nn.Parameter(torch.randn(1, 7, 3)))
    torch.save({k: v.detach() for k, v in whole.named_parameters()}, tmp_path / "start.pt")
    grads = [{k: torch.randn_like(v) * (rank + 1) for k, v in whole.named_parameters()} for rank in (0, 1)]
    for rank in (0, 1):
        torch.save(grads[rank], tmp_path / f"grads{rank}.pt")
    mp.spawn(mixed_clip_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)

    for name, param in whole.named_parameters():
        param.grad = (grads[0][name] + grads[1][name]) / 2
    total = torch.nn.utils.clip_grad_norm_(whole.parameters(), 0.5)
    assert total > 1.0  # the clip is active
    torch.optim.AdamW(whole.parameters(), lr=0.1, weight_decay=0.1).step()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"clip{rank}.pt")
        assert got["groups"] == 2  # the table apart from the DTensors
        torch.testing.assert_close(got["total"], total, rtol=1e-6, atol=0)
        for name, param in whole.named_parameters():
            torch.testing.assert_close(got["grads"][name], param.grad, rtol=1e-6, atol=1e-7, msg=name)
            torch.testing.assert_close(got["params"][name], param.detach(), rtol=1e-6, atol=1e-7, msg=name)


def test_samples_convert_to_steps_with_each_previous_stage_global_batch():
    callback = ProgressiveResolution(
        [
            ResolutionStage(start=0, global_crop_size=32, batch_size=8),
            ResolutionStage(start=100, global_crop_size=48, batch_size=4),
            ResolutionStage(start=200, global_crop_size=64),
        ],
        unit="samples",
    )
    datamodule = _fake_datamodule(batch_size=12)
    module = _module()
    callback.setup(_fake_trainer(datamodule, world_size=2), module, "fit")
    # 100 samples at 8 x 2 ranks = 7 steps (rounded up); 100 more at 4 x 2 = 13; the last stage gets --data's batch.
    assert callback.step_starts() == [0, 7, 20]
    assert [callback.stage_at(s) for s in (0, 6, 7, 19, 20, 10**9)] == [0, 0, 1, 1, 2, 2]
    assert datamodule.batch_size == 8  # the first stage's batch is the run's base batch (the lr schedule's)
    assert module.backbone_overrides["img_size"] == 32  # built at the first stage's native grid
    assert [v.size for v in datamodule.views["views"]] == [32, 32, 16]


def test_objectives_change_their_crops():
    dino = DINOv2(global_crop_size=224, local_crop_size=98)
    dino.set_resolution(378, 168)
    assert [(v.name, v.size) for v in dino.views()] == [("global1", 378), ("global2", 378), ("local", 168)]
    dino.set_resolution(518)
    assert [v.size for v in dino.views()] == [518, 518, 168]
    for single in (MAE(), CLIP()):
        single.set_resolution(378)
        assert [v.size for v in single.views()] == [378]
        with pytest.raises(ConfigError, match="has no local crops"):
            single.set_resolution(378, 168)


# -- position embeddings -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["learned", "sincos"])
def test_permanent_resample_keeps_the_function_at_the_new_native_size(kind):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, pos_embed=kind).eval()
    images = torch.randn(2, 3, 24, 24)
    before = vit(images)["x_norm_patchtokens"]
    table = vit.pos_embed.detach().clone()
    vit.resample_pos_embed(6)
    assert vit.pos_embed.shape == (1, 1 + 36, 32) and vit.grid_size == 6
    assert vit.patch_embed.img_size == (24, 24)
    assert vit.pos_embed.requires_grad == (kind == "learned")
    assert torch.equal(vit(images)["x_norm_patchtokens"], before)  # the same interpolation, made permanent
    if kind == "sincos":
        assert torch.equal(vit.pos_embed[0, 1:].detach(), sincos_pos_embed(32, 6, 6))
    # The warm-start path (--model.init_from: the stored table fitted to a model built at the new grid) gives the same
    # table; a fixed sin-cos table is not loaded at all, the model keeps its own exact one.
    built = VisionTransformer(img_size=24, patch_size=4, embed_dim=32, depth=1, num_heads=2, pos_embed=kind)
    state = {"pos_embed": table}
    fit_pos_embed_grids(built, state)
    if kind == "learned":
        assert torch.equal(state["pos_embed"], vit.pos_embed.detach())
    else:
        assert "pos_embed" not in state and torch.equal(built.pos_embed.detach(), vit.pos_embed.detach())


def test_resample_swaps_the_optimizer_parameter_and_drops_only_its_moments():
    module = _module()
    module.configure_model()
    teacher = module.objective.teacher["backbone"]
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params}])
    sum(p.float().sum() for p in params).backward()
    optimizer.step()
    old = module.backbone.pos_embed
    assert old in optimizer.state
    changed = resample_module_grids(_fake_trainer(None, optimizers=[optimizer]), module, 12)
    assert sorted(changed) == ["backbone", "objective.teacher.backbone"]
    new = module.backbone.pos_embed
    assert new is not old and new.shape == (1, 145, 32) and teacher.pos_embed.shape == (1, 145, 32)
    group = optimizer.param_groups[0]["params"]
    assert any(p is new for p in group) and not any(p is old for p in group)
    assert old not in optimizer.state and new not in optimizer.state
    assert len(optimizer.state) == len(params) - 1  # every other parameter keeps its moments
    new.grad = torch.ones_like(new)
    optimizer.step()  # fresh, bias-corrected moments for the new table
    assert optimizer.state[new]["exp_avg"].shape == new.shape


# -- a fit across the boundary ---------------------------------------------------------------------------------------
@pytest.mark.slow  # whole fits in this process: the full suite, not the fast tier
def test_fit_across_a_boundary_and_resume_on_either_side_is_exact(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    data = tiny_demo(tmp_path, n_train=16, n_val=8)
    out = tmp_path / "out"
    config = _config(tmp_path / "stages.yaml", out / "straight")
    main(_args(config, data, "straight"))

    record = json.loads((out / "straight" / "steps_rank0.json").read_text())
    shapes = [(s["views"]["global1"], s["views"]["local"]) for s in record["train"]]
    assert shapes == [([4, 1, 3, 16, 16], [4, 2, 3, 8, 8])] * 2 + [([2, 1, 3, 24, 24], [2, 2, 3, 12, 12])] * 6
    assert [s["lr_ratio"] for s in record["train"]][1:] == pytest.approx([1.0] + [0.5] * 6)  # step 0: warmup lr 0
    assert record["val"][0]["views"]["global1"][-1] == 24  # the validation loader follows the stage
    # The rebuilt loader continues the epoch's stream: every image once, then the next epoch at the new batch.
    assert [s["epoch"] for s in record["train"]] == [0] * 6 + [1] * 2
    first_epoch = [i for s in record["train"][:6] for i in s["index"]]
    assert sorted(first_epoch) == list(range(16))

    ckpts = Path("runs/straight/checkpoints")
    for step, grid in [(1, 4), (2, 6), (8, 6)]:
        weights = load_weights(next(ckpts.glob(f"epoch=*-step={step}.ckpt")))
        for key in ("backbone.pos_embed", "objective.teacher.backbone.pos_embed"):
            assert weights[key].shape == (1, 1 + grid * grid, 32), (step, key)
        hparams = torch.load(next(ckpts.glob(f"epoch=*-step={step}.ckpt")), weights_only=False)["hyper_parameters"]
        assert hparams["backbone_overrides"]["img_size"] == grid * 4

    # Interrupted in stage 0 (resumes and crosses the boundary itself), and in stage 1 (rebuilds at the 6 x 6 grid).
    for step in (1, 3):
        run = f"resumed{step}"
        main(
            _args(
                _config(tmp_path / f"{run}.yaml", out / run),
                data,
                run,
                "--ckpt_path",
                str(ckpts / f"epoch=0-step={step}.ckpt"),
            )
        )
        _assert_same_state(_final(out / "straight"), _final(out / run))
        resumed = json.loads((out / run / "steps_rank0.json").read_text())["train"]
        assert [s["index"] for s in resumed] == [s["index"] for s in record["train"][step:]]


def test_init_from_weights_at_another_grid(tmp_path):
    path = tmp_path / "source.ckpt"
    stored = write_source_weights(path)  # a 32 px run: 8 x 8 grid
    target = tiny_dino_module(init_from=str(path))
    target.backbone_overrides["img_size"] = 48  # a 48 px stage: 12 x 12 grid
    target.configure_model()
    loaded = target.state_dict()
    assert loaded.keys() == stored.keys()  # student, DINO / iBOT heads, EMA teacher and both centers
    for key, value in stored.items():
        if key.endswith("pos_embed"):
            assert loaded[key].shape == (1, 145, 32)
            assert torch.equal(loaded[key], _on_the_fly(value, 12)), key
        else:
            assert torch.equal(loaded[key], value), key
    with pytest.raises(ConfigError, match="--model.init_from: no file at"):
        tiny_dino_module(init_from=str(tmp_path / "missing.ckpt"))


# -- FSDP2 ---------------------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_init_from_loads_fsdp2_shards_on_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    stored = write_source_weights(tmp_path / "source.ckpt")  # 8 x 8 grid
    mp.spawn(fsdp2_warm_start_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        loaded = torch.load(tmp_path / f"loaded{rank}.pt")
        assert loaded.keys() == stored.keys()
        for key, value in stored.items():
            expected = _on_the_fly(value, 12) if key.endswith("pos_embed") else value
            assert torch.equal(loaded[key], expected), (rank, key)


# -- DDP, FSDP2 and ZeRO-3 on 2 ranks ----------------------------------------------------------------------------------
def _launch(tmp: Path, data: Path, run: str, *extra: str, probe: bool = False) -> None:
    """``fit`` the two-stage tiny DINOv2 of :func:`_config` on 2 CPU ranks (torchrun), from ``<tmp>/init.ckpt``, at
    the full lr from the first step (no warmup: each step moves the weights by ~lr = 1.8e-4) and without DINOv2's
    per-module clip (a block given in ``extra`` may set its own: ZeRO-3's global clip); the records go to
    ``<tmp>/out/<run>``, checkpoints (one every step) to ``<tmp>/runs/<run>/checkpoints``."""
    config = _config(tmp / f"{run}.yaml", tmp / "out" / run, probe=probe)
    path = os.pathsep.join([str(HERE), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "lit_webssl",
        *_args(
            config,
            data,
            run,
            "--trainer.devices",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--model.init_from",
            str(tmp / "init.ckpt"),
            "--model.optim.warmup",
            "0",
            f"{OBJ}clip_grad",
            "0",
            "--trainer.gradient_clip_val",
            "null",
            *extra,
            steps=4,
        ),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, Path]:
    """The two-stage run under DDP on 2 ranks, 4 steps (the boundary after step 2), from weights saved once (so
    other strategies start from the same ones): ``(tmp, data)``."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    data = tiny_demo(tmp, n_train=32, n_val=8)
    config = yaml.safe_load(_config(tmp / "probe.yaml", tmp / "probe") and (tmp / "probe.yaml").read_text())
    model = config["model"]
    torch.manual_seed(0)
    module = LitWebSSL(
        DINOv2(**model["objective"]["init_args"]),
        backbone=model["backbone"],
        backbone_overrides=model["backbone_overrides"],
    )
    write_source_weights(tmp / "init.ckpt", img_size=16, source=module)
    _launch(tmp, data, "ddp", "--trainer.strategy", "ddp")
    return tmp, data


@pytest.mark.distributed
def test_ddp_on_two_ranks_crosses_the_boundary_and_resumes_exactly(ddp_run):
    tmp, data = ddp_run
    out = tmp / "out"
    ranks = [_final(out / "ddp", rank) for rank in (0, 1)]
    _assert_same_state(*ranks)  # gradients of the new 6 x 6 table were all-reduced: the rebuilt DDP wrapper works
    record = [json.loads((out / "ddp" / f"steps_rank{r}.json").read_text())["train"] for r in (0, 1)]
    for steps in record:
        assert [s["views"]["global1"][0] for s in steps] == [4, 4, 2, 2]
        assert [s["views"]["global1"][-1] for s in steps] == [16, 16, 24, 24]
    seen = [i for steps in record for s in steps for i in s["index"]]
    assert len(seen) == len(set(seen)) == 24  # the ranks' streams continue across the rebuild without overlap
    weights = load_weights(tmp / "runs" / "ddp" / "checkpoints" / "last.ckpt")
    assert weights["objective.teacher.backbone.pos_embed"].shape == (1, 37, 32)

    _launch(
        tmp,
        data,
        "ddp_resumed",
        "--trainer.strategy",
        "ddp",
        "--ckpt_path",
        str(tmp / "runs" / "ddp" / "checkpoints" / "epoch=0-step=3.ckpt"),
    )
    _assert_same_state(ranks[0], _final(out / "ddp_resumed", 0))


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("block", "kind", "precision"),
    [
        ("fsdp2", "dcp", "32-true"),
        ("deepspeed_zero3", "deepspeed", "32-true"),
        ("deepspeed_zero3", "deepspeed", "bf16-mixed"),
    ],
)
def test_sharded_on_two_ranks_crosses_the_boundary_and_resumes_exactly(ddp_run, block, kind, precision):
    """The shipped FSDP2 and ZeRO-3 blocks (fp32 here) across the boundary, from the DDP run's weights.

    FSDP2 keeps the position tables whole on every rank, out of the sharding, and resamples them in place: the run
    equals DDP's (FSDP2's reduce-scatter averages exactly as DDP's all-reduce does). ZeRO-3 builds its engine again
    around the new tables: at the boundary every other parameter's fp32 partition and Adam moments are bit-identical
    before and after, the new tables are the resample of the old fp32 ones with fresh moments. (ZeRO-3 reduces a
    parameter used by several crops per backward pass, so it rounds differently from DDP from the first step on, and
    Adam's first steps turn that into differences of an update on near-zero gradients: no tolerance against DDP
    tests the boundary.) Under both, runs resumed from the sharded checkpoints taken after the boundary (6 x 6
    tables, which the model is built at before it loads) and before it end bit-identical. ZeRO-3 in bf16, as
    shipped: the same checks at the boundary, the EMA teacher's table taken from and put back into its fp32
    masters."""
    tmp, data = ddp_run
    run, out = f"{block}_{precision}", tmp / "out"
    sharded = ["--config", str(CONFIGS / "strategy" / f"{block}.yaml"), "--trainer.precision", precision]
    if kind == "deepspeed":
        sharded += ["--trainer.strategy.class_path", "cpu_strategies.CPUDeepSpeedStrategy"]
    else:  # Lightning's clip over shards and replicated tables (LitWebSSL.clip_gradients); too high to act here
        sharded += ["--trainer.gradient_clip_val", "1e6"]
    _launch(tmp, data, run, *sharded, probe=kind == "deepspeed")
    record = [json.loads((out / run / f"steps_rank{r}.json").read_text())["train"] for r in (0, 1)]
    assert record == [json.loads((out / "ddp" / f"steps_rank{r}.json").read_text())["train"] for r in (0, 1)]
    ranks = [_final(out / run, rank)["state_dict"] for rank in (0, 1)]
    reference = _final(out / "ddp", 0)["state_dict"]
    assert ranks[0]["backbone.pos_embed"].shape == ranks[0]["objective.teacher.backbone.pos_embed"].shape == (1, 37, 32)
    for key in reference:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.isfinite(ranks[0][key].float()).all(), key
    if kind == "dcp":
        for key, value in reference.items():
            assert torch.equal(ranks[0][key], value), key
    else:
        for rank in (0, 1):
            probe = torch.load(out / run / f"boundary_rank{rank}.pt", weights_only=False)
            before, after = probe["before"], probe["after"]
            assert before["tables"]["backbone.pos_embed"].shape == (1, 17, 32)
            for name, table in before["tables"].items():
                torch.testing.assert_close(after["tables"][name], _on_the_fly(table, 6), rtol=0, atol=0, msg=name)
            assert before["partitions"].keys() == after["partitions"].keys()
            for name, parts in before["partitions"].items():
                if name == "backbone.pos_embed":
                    assert after["partitions"][name]["exp_avg"] is None  # fresh moments for the new table
                    continue
                for key, value in parts.items():
                    assert torch.equal(after["partitions"][name][key], value), f"{name}.{key}"

    checkpoint = tmp / "runs" / run / "checkpoints" / "epoch=0-step=3.ckpt"
    assert checkpoint_kind(checkpoint) == kind and stored_grid(checkpoint) == 6
    if precision != "32-true":
        return  # resume: the fp32 runs (the bf16 state's own save and restore: tests/lit_webssl/test_sharded.py)
    for step in (3, 1):  # after the boundary (a checkpoint with 6 x 6 tables) and before it (the run crosses it)
        before = tmp / "runs" / run / "checkpoints" / f"epoch=0-step={step}.ckpt"
        _launch(tmp, data, f"{run}_resumed{step}", *sharded, "--ckpt_path", str(before))
        resumed = _final(out / f"{run}_resumed{step}", 0)["state_dict"]
        for key, value in ranks[0].items():
            assert torch.equal(resumed[key], value), f"resumed at step {step}: {key}"


# -- high-resolution stage configs -----------------------------------------------------------------------------------
TINY_DINO = {
    "head_prototypes": 16,
    "head_hidden_dim": 16,
    "head_bottleneck_dim": 8,
    "ibot_prototypes": 16,
    "ibot_hidden_dim": 16,
    "ibot_bottleneck_dim": 8,
    "local_crop_size": 8,
    "local_crops_number": 2,
}


def _shrunk(size: int, data: Path, out: Path | None = None) -> list[str]:
    """Arguments that shrink a shipped Web-DINO 7B config to ``vit_debug`` (patch 4, width 32) with tiny heads at
    ``size`` px on CPU ranks of one node, fp32, 2 images per rank; ``out``: add a :class:`StepRecorder` there."""
    objective = {**TINY_DINO, "global_crop_size": size}
    recorder = {"class_path": "resolution_probe.StepRecorder", "init_args": {"out": str(out)}}
    return [
        "--trainer.num_nodes",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
        *([f"--trainer.callbacks+={json.dumps(recorder)}"] if out else []),
        "--model.backbone",
        "vit_debug",
        "--model.backbone_overrides",
        json.dumps({"img_size": size}),
        "--model.optim.warmup",
        "0",
        "--model.optim.total",
        "10",
        *(a for k, v in objective.items() for a in (f"{OBJ}{k}", str(v))),
        "--data.init_args.local",
        str(data),
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.batch_size",
        "2",
    ]


def _assert_loaded(final: dict, stored: dict, grid: int) -> None:
    """``final`` (after one or two steps at lr <= 1e-5) holds ``stored``'s tensors, position tables at
    ``grid x grid``."""
    assert final.keys() == stored.keys()
    for key, value in stored.items():
        expected = _on_the_fly(value, grid) if key.endswith("pos_embed") else value
        assert final[key].shape == expected.shape, key
        # Each step moves a student weight by about lr <= 1e-5 (AdamW) and a teacher weight by (1 - 0.999) of its
        # distance to the student (up to ~5e-2 in write_source_weights' files): far below what sets the stored
        # tensors apart from a fresh init (that file's 1e-2 noise; another seed for a real run). The loaded values,
        # not a fresh init, were trained.
        assert (final[key].float() - expected.float()).abs().max() < 5e-4, key


def test_high_res_configs_chain_224_378_518():
    configs = {
        name: yaml.safe_load((CONFIGS / "webdino" / f"{name}.yaml").read_text())
        for name in ("vit_7b", "vit_7b_378", "vit_7b_518")
    }
    for previous, name, size in [("vit_7b", "vit_7b_378", 378), ("vit_7b_378", "vit_7b_518", 518)]:
        config = configs[name]
        objective = config["model"]["objective"]["init_args"]
        assert objective["global_crop_size"] == config["model"]["backbone_overrides"]["img_size"] == size
        assert objective["local_crop_size"] % 14 == 0 and size % 14 == 0
        # The weights come from --model.init_from (a path in the file would have to exist to parse): the header
        # names the previous stage's run, its conversion and the flag.
        assert config["model"]["init_from"] is None
        header = (CONFIGS / "webdino" / f"{name}.yaml").read_text().split("\nseed_everything")[0]
        run = f"runs/{configs[previous]['run_name']}"
        assert f"checkpoint convert {run}/checkpoints/last.ckpt \\\n#     {run}/model_fp32.ckpt" in header
        assert f"--model.init_from {run}/model_fp32.ckpt" in header


def test_high_res_config_starts_from_a_converted_224_run(tmp_path, monkeypatch):
    """The documented chain, shrunk: a 224-style run (vit_7b.yaml at 16 px: 4 x 4 grid), ``checkpoint convert`` of
    its last checkpoint, then vit_7b_378.yaml (at 24 px: 6 x 6) with ``--model.init_from`` the converted file."""
    monkeypatch.syspath_prepend(str(HERE))
    data = tiny_demo(tmp_path, n_train=16, n_val=8)
    run = "runs/webdino_vit_7b"
    # Another seed than the 378 run's (0), so its weights differ from the init the 378 run would draw itself.
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "webdino" / "vit_7b.yaml"),
            "--seed_everything",
            "1",
            "--trainer.devices",
            "1",
            "--trainer.strategy",
            "auto",
            "--trainer.max_steps",
            "1",
            *_shrunk(16, data),
        ]
    )
    main(["checkpoint", "convert", f"{run}/checkpoints/last.ckpt", f"{run}/model_fp32.ckpt"])
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "webdino" / "vit_7b_378.yaml"),
            "--trainer.devices",
            "1",
            "--trainer.strategy",
            "auto",
            "--trainer.max_steps",
            "1",
            "--model.init_from",
            f"{run}/model_fp32.ckpt",
            *_shrunk(24, data, tmp_path / "out"),
        ]
    )
    record = json.loads((tmp_path / "out" / "steps_rank0.json").read_text())["train"]
    assert [s["views"]["global1"] for s in record] == [[2, 1, 3, 24, 24]]  # the first step ran at the new grid
    final = _final(tmp_path / "out")["state_dict"]
    assert final["backbone.pos_embed"].shape == final["objective.teacher.backbone.pos_embed"].shape == (1, 37, 32)
    _assert_loaded(final, read_state_dict(f"{run}/model_fp32.ckpt"), 6)


# -- the 378 stage under sharded strategies ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed_zero3"])
def test_high_res_stage_starts_from_init_from_under_sharded_strategies_on_two_ranks(strategy, tmp_path):
    stored = write_source_weights(tmp_path / "source.ckpt", img_size=16)  # the previous stage: 4 x 4 grid
    data = tiny_demo(tmp_path, n_train=16, n_val=8)
    config = CONFIGS / "webdino" / "vit_7b_378.yaml"
    extra = ["--trainer.strategy.class_path", "cpu_strategies.CPUDeepSpeedStrategy"] if "deepspeed" in strategy else []
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "lit_webssl",
        "fit",
        "--config",
        str(config),
        "--config",
        str(CONFIGS / "strategy" / f"{strategy}.yaml"),
        *extra,
        "--trainer.devices",
        "2",
        "--trainer.max_steps",
        "2",
        "--model.activation_checkpointing",
        "false",
        "--model.init_from",
        str(tmp_path / "source.ckpt"),
        *_shrunk(24, data, tmp_path / "out"),
    ]
    path = os.pathsep.join([str(HERE), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):  # both steps ran at the new grid
        record = json.loads((tmp_path / "out" / f"steps_rank{rank}.json").read_text())["train"]
        assert [s["views"]["global1"] for s in record] == [[2, 1, 3, 24, 24]] * 2
    ranks = [_final(tmp_path / "out", rank)["state_dict"] for rank in (0, 1)]
    for key in stored:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # Under ZeRO-3 the engine's fp32 master copies are made after configure_model, so from the loaded weights: two
    # steps do not put the random init back.
    _assert_loaded(ranks[0], stored, 6)
