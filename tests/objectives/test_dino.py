"""Web-DINO objective: contract, teacher EMA in fp32, schedules, parameter groups, errors, data-parallel exactness."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from contract import ObjectiveContract, fake_batch
from helpers import free_port

from lit_webssl.errors import ConfigError
from lit_webssl.models.presets import build_backbone
from lit_webssl.objectives import DINOv2, StepContext
from lit_webssl.objectives.masking import sample_ibot_masks

SMALL_HEADS = {
    "head_prototypes": 64,
    "head_hidden_dim": 32,
    "head_bottleneck_dim": 16,
    "ibot_prototypes": 48,
    "ibot_hidden_dim": 32,
    "ibot_bottleneck_dim": 16,
}


def small_dino(**kwargs) -> DINOv2:
    args = {"global_crop_size": 32, "local_crops_number": 2, "local_crop_size": 16, **SMALL_HEADS, **kwargs}
    return DINOv2(**args)


def setup(seed: int = 0, layerscale: float | None = 1e-5, **kwargs):
    torch.manual_seed(seed)
    backbone = build_backbone("vit_debug", {"layerscale": layerscale, "ffn": "swiglu"})
    objective = small_dino(**kwargs)
    objective.configure(backbone)
    return backbone, objective


class TestDINOContract(ObjectiveContract):
    def make_objective(self, crop_size: int) -> DINOv2:
        return small_dino(global_crop_size=crop_size)


def test_views_follow_the_recipe():
    views = {v.name: v for v in DINOv2().views()}
    assert set(views) == {"global1", "global2", "local"}
    g1, g2, local = views["global1"], views["global2"], views["local"]
    assert (g1.size, g1.scale, g1.blur_p, g1.solarize_p) == (224, (0.32, 1.0), 1.0, 0.0)
    assert (g2.size, g2.blur_p, g2.solarize_p) == (224, 0.1, 0.2)
    assert (local.size, local.count, local.scale, local.blur_p) == (98, 8, (0.05, 0.32), 0.5)
    assert all(v.color_jitter_p == 0.8 and v.grayscale_p == 0.2 and v.hflip_p == 0.5 for v in views.values())
    assert all(v.color_jitter == (0.4, 0.4, 0.2, 0.1) for v in views.values())
    strong = DINOv2(color_jitter=(0.8, 0.8, 0.8, 0.5), color_jitter_p=1.0).views()
    assert all(v.color_jitter == (0.8, 0.8, 0.8, 0.5) and v.color_jitter_p == 1.0 for v in strong)
    assert "local" not in {v.name for v in DINOv2(local_crops_number=0, dino_local_weight=0).views()}


def test_teacher_is_an_eval_copy_without_gradients():
    backbone, objective = setup()
    objective.train()
    assert not objective.teacher.training
    assert all(not p.requires_grad for p in objective.teacher.parameters())
    for (name, s), t in zip(
        backbone.state_dict().items(), objective.teacher["backbone"].state_dict().values(), strict=True
    ):
        assert torch.equal(s, t), name
    names = {n for n, _ in objective.trainable_named_parameters()}
    assert names and not any(n.startswith("teacher.") for n in names)
    loss = objective(fake_batch(objective), backbone).loss
    loss.backward()
    assert all(p.grad is None for p in objective.teacher.parameters())


def test_ema_update_accumulates_in_fp32_below_bf16_resolution():
    backbone, objective = setup()
    teacher = objective.teacher["backbone"].blocks[0].attn.qkv.weight
    student = backbone.blocks[0].attn.qkv.weight
    with torch.no_grad():
        teacher.fill_(1.0)
        student.fill_(1.0 + 1e-3)  # (1 - m) * delta = 6e-6: far below bf16's step of 2**-7 at 1.0
    assert torch.equal(teacher.bfloat16(), (teacher + 6e-6).bfloat16())  # invisible in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        objective.update_teacher(backbone, momentum=0.994)
    assert teacher.dtype == torch.float32
    torch.testing.assert_close(teacher, torch.full_like(teacher, 1.0 + 0.006 * 1e-3), rtol=0, atol=1e-7)
    assert (teacher > 1.0).all()


def test_ema_of_a_bf16_teacher_accumulates_in_fp32_masters_that_round_trip_a_checkpoint():
    """A teacher stored in bf16 (as DeepSpeed stores it; here ``bf16-true`` on one process) gets fp32 masters: 5 updates
    of 6e-6 each, each invisible in bf16, add up in the master and reach the bf16 teacher once they pass its step."""
    from lit_webssl.distributed import FP32_MASTERS, assemble_masters, load_masters, save_masters

    backbone, objective = setup()
    objective.teacher.bfloat16()
    teacher = objective.teacher["backbone"].blocks[0].attn.qkv.weight
    student = backbone.blocks[0].attn.qkv.weight
    with torch.no_grad():
        teacher.fill_(1.0)
        student.fill_(1.0 + 1e-3)
    for _ in range(5):
        objective.update_teacher(backbone, momentum=0.994)
    master = objective.teacher.masters["backbone.blocks.0.attn.qkv.weight"]
    expected = 1.0 + 1e-3 * (1 - 0.994**5)
    torch.testing.assert_close(master, torch.full_like(master, expected), rtol=0, atol=3e-7)  # fp32 ulps at 1.0
    assert teacher.dtype == torch.bfloat16 and torch.equal(teacher, master.bfloat16())
    assert torch.equal(teacher, torch.ones_like(teacher))  # 3e-5 is still below bf16's step at 1.0 (2**-7)

    state = {FP32_MASTERS: save_masters(objective_module(objective))}
    assert state[FP32_MASTERS]["layout"] == "whole"
    whole = assemble_masters([state[FP32_MASTERS]])
    assert torch.equal(whole["objective.teacher.backbone.blocks.0.attn.qkv.weight"], master)
    _, resumed = setup()
    resumed.teacher.bfloat16()
    load_masters(objective_module(resumed), state[FP32_MASTERS])
    assert torch.equal(resumed.teacher.masters["backbone.blocks.0.attn.qkv.weight"], master)
    load_masters(objective_module(resumed), {})  # a checkpoint without masters: start afresh
    assert not resumed.teacher.masters


def objective_module(objective: DINOv2) -> torch.nn.Module:
    """The objective under the name it has in LitWebSSL (``objective.``), as checkpoints key its masters."""
    return torch.nn.ModuleDict({"objective": objective})


def test_fp32_masters_of_another_world_stop_with_one_line():
    """ZeRO-3 partitions depend on the number of ranks: masters saved by 2 ranks cannot be resumed by 1, and a
    conversion missing a rank's file cannot assemble them."""
    from lit_webssl.distributed import ShardedEMA, assemble_masters
    from lit_webssl.errors import ConfigError

    state = {
        "layout": "zero3",
        "rank": 0,
        "world_size": 2,
        "shapes": {"objective.teacher.w": (3,)},
        "masters": {"objective.teacher.w": torch.zeros(2)},
    }
    with pytest.raises(ConfigError, match=r"--ckpt_path: .* saved by 2 ranks, this run has 1"):
        ShardedEMA().load_state_dict(state, prefix="objective.")
    with pytest.raises(ConfigError, match=r"ranks \[1\] are missing"):
        assemble_masters([state])
    other = {**state, "rank": 1, "masters": {"objective.teacher.w": torch.tensor([5.0, 0.0])}}
    whole = assemble_masters([other, state])  # rank order, padding cut
    assert torch.equal(whole["objective.teacher.w"], torch.tensor([0.0, 0.0, 5.0]))


def test_ema_update_moves_the_teacher_under_bf16_mixed_fit(tmp_path):
    import lightning as L

    from lit_webssl.training.module import LitWebSSL

    class Data(L.LightningDataModule):
        batch_size = 4

        def train_dataloader(self):
            views = fake_batch(small_dino(), batch_size=4)["views"]
            batch = {
                "views": {k: (v.clamp(-2, 2) * 60 + 128).to(torch.uint8) for k, v in views.items()},
                "label": torch.zeros(4, dtype=torch.long),
            }
            return torch.utils.data.DataLoader([batch] * 3, batch_size=None)

    torch.manual_seed(0)
    module = LitWebSSL(small_dino(momentum_teacher=0.9, final_momentum_teacher=0.9), backbone="vit_debug")
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=Data())
    teacher = module.objective.teacher["backbone"]
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    student_w, teacher_w = module.backbone.blocks[0].mlp.fc1.weight, teacher.blocks[0].mlp.fc1.weight
    assert not torch.equal(student_w, teacher_w)  # teacher lags the student
    assert module.objective.teacher["dino_head"].last_layer.weight_v.dtype == torch.float32


def test_schedules_at_chosen_steps():
    objective = small_dino(
        teacher_temp_warmup=100,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        momentum_teacher=0.994,
        final_momentum_teacher=1.0,
    )
    objective.bind_schedule(global_batch=64, total_steps=1000, unit="steps")
    assert objective.teacher_temp_at(0) == pytest.approx(0.04)
    assert objective.teacher_temp_at(50) == pytest.approx(0.055)
    assert objective.teacher_temp_at(100) == pytest.approx(0.07)
    assert objective.teacher_temp_at(900) == pytest.approx(0.07)
    assert objective.momentum_at(0) == pytest.approx(0.994)
    assert objective.momentum_at(500) == pytest.approx(0.997)
    assert objective.momentum_at(1000) == pytest.approx(1.0)
    samples = small_dino(teacher_temp_warmup=6400, freeze_last_layer=640)
    samples.bind_schedule(global_batch=64, total_steps=1000, unit="samples")
    assert samples.teacher_temp_at(50) == pytest.approx(0.055)  # 6400 samples = 100 steps of 64
    assert samples.to_steps(640) == 10


def test_param_groups_patch_embed_no_decay_layerwise_and_frozen_last_layer():
    backbone, objective = setup(layerwise_decay=0.5, patch_embed_lr_mult=0.2, freeze_last_layer=7)
    groups = objective.param_groups(backbone, weight_decay=0.04)
    by_param = {id(p): g for g in groups for p in g["params"]}
    depth = backbone.depth

    def group(param):
        return by_param[id(param)]

    assert group(backbone.patch_embed.proj.weight)["lr_mult"] == pytest.approx(0.2 * 0.5 ** (depth + 1))
    assert group(backbone.blocks[0].attn.qkv.weight)["lr_mult"] == pytest.approx(0.5**depth)
    assert group(backbone.blocks[depth - 1].attn.qkv.weight)["lr_mult"] == pytest.approx(0.5)
    assert group(backbone.norm.weight)["lr_mult"] == 1.0
    assert group(objective.dino_head.mlp[0].weight)["lr_mult"] == 1.0
    for no_decay in (
        backbone.blocks[0].attn.qkv.bias,
        backbone.blocks[0].norm1.weight,
        backbone.blocks[0].ls1.gamma,
        backbone.cls_token,
        backbone.pos_embed,
    ):
        assert group(no_decay)["wd_mult"] == 0.0 and group(no_decay)["weight_decay"] == 0.0
    assert group(backbone.blocks[0].mlp.fc1.weight)["wd_mult"] == 1.0
    for last in (objective.dino_head.last_layer.weight_v, objective.ibot_head.last_layer.weight_g):
        assert group(last)["frozen_until"] == 7
    assert group(objective.dino_head.mlp[0].weight)["frozen_until"] == 0
    teacher_ids = {id(p) for p in objective.teacher.parameters()}
    assert not teacher_ids & set(by_param)


def test_per_module_gradient_clipping():
    backbone, objective = setup(clip_grad=1e-3)
    objective(fake_batch(objective), backbone).loss.backward()
    objective.on_before_optimizer_step(backbone, StepContext())
    for module in objective.student_modules(backbone).values():
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))
        assert norm <= 1e-3 * (1 + 1e-4)


def test_loss_terms_and_normalization():
    backbone, objective = setup(koleo_weight=0.0)
    out = objective(fake_batch(objective), backbone)
    parts = out.metrics["dino_global"] + out.metrics["dino_local"] + out.metrics["ibot"]
    torch.testing.assert_close(out.loss.detach(), parts)
    # with uniform-ish targets, each DINO pair costs about log(K): global = 2 pairs, local = 2 * 2 pairs, / 6
    assert 0 < out.metrics["dino_global"] < out.metrics["dino_local"]


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"local_crops_number": 0}, "dino_local_weight"),
        ({"momentum_teacher": 1.5}, "momentum_teacher"),
        ({"final_momentum_teacher": -0.1}, "final_momentum_teacher"),
        ({"mask_ratio_range": (0.6, 0.2)}, "mask_ratio_range"),
        ({"centering": "none"}, "centering"),
    ],
)
def test_contradictions_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=f"--model.objective.init_args.{flag}"):
        small_dino(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "flag"), [({"global_crop_size": 30}, "global_crop_size"), ({"local_crop_size": 18}, "local_crop_size")]
)
def test_crop_size_not_divisible_by_patch_names_the_flag(kwargs, flag):
    objective = small_dino(**kwargs)
    with pytest.raises(ConfigError, match=f"--model.objective.init_args.{flag}=\\d+ is not divisible"):
        objective.configure(build_backbone("vit_debug"))


# -- data-parallel exactness: 2 ranks with batch b == 1 process with batch 2b ------------------------------------
B = 4


def _inputs(centering: str):
    """The whole batch of 2B images (views + iBOT masks), identical in every process."""
    torch.manual_seed(123)
    objective = small_dino(centering=centering, koleo_weight=0.0)
    batch = fake_batch(objective, batch_size=2 * B, seed=7)
    grid = 32 // 4
    rng = np.random.default_rng(5)
    masks = sample_ibot_masks(2 * 2 * B, (grid, grid), rng=rng).view(2, 2 * B, -1)  # crop, image, N
    return batch, masks


def _slice(batch, masks, lo: int, hi: int):
    views = {k: v[lo:hi] for k, v in batch["views"].items()}
    return {"views": views, "label": batch["label"][lo:hi], "ibot_masks": masks[:, lo:hi].flatten(0, 1)}


def _loss_and_grads(centering: str, lo: int, hi: int):
    batch, masks = _inputs(centering)
    # No LayerScale: at init a 1e-5 LayerScale makes every image's CLS token nearly the same, which would hide a
    # missing all-reduce of the teacher statistics.
    backbone, objective = setup(seed=0, layerscale=None, centering=centering, koleo_weight=0.0)
    objective.train()
    out = objective(_slice(batch, masks, lo, hi), backbone)
    out.loss.backward()
    named = [(f"backbone.{n}", p) for n, p in backbone.named_parameters()]
    named += [(n, p) for n, p in objective.trainable_named_parameters()]
    grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
    return out.loss.detach(), grads, objective.dino_loss.center.clone()


def _worker(rank: int, port: int, centering: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        loss, grads, center = _loss_and_grads(centering, rank * B, (rank + 1) * B)
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)  # DDP: mean of the ranks' gradients
        if rank == 0:
            torch.save(
                {"loss": loss / 2, "grads": {k: g / 2 for k, g in grads.items()}, "center": center},
                os.path.join(out_dir, "ranks.pt"),
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_two_ranks_equal_one_process_with_the_whole_batch(centering, tmp_path):
    mp.spawn(_worker, args=(free_port(), centering, str(tmp_path)), nprocs=2, join=True)
    ranks = torch.load(tmp_path / "ranks.pt")
    loss, grads, center = _loss_and_grads(centering, 0, 2 * B)
    torch.testing.assert_close(ranks["loss"], loss, rtol=0, atol=1e-5)
    assert ranks["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ranks["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(ranks["center"], center, rtol=0, atol=1e-6)
