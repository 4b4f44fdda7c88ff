"""CLIP objective: loss values, data-parallel exactness, tokenizer, logit-scale clamp, parameter groups, optimizer
recipe, config errors, the one-line error on data without captions, exact resume and the shipped configs."""

from __future__ import annotations

import io
import math
import os
import pickle
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from contract import fake_batch
from helpers import CONFIGS, fast_overrides, free_port, load_weights, run_cli, tiny_demo
from open_clip.loss import ClipLoss
from streaming import MDSWriter

from lit_webssl.cli import main
from lit_webssl.datamodules import DataConfigError, WebSSLDataModule
from lit_webssl.datamodules.demo import render
from lit_webssl.errors import ConfigError
from lit_webssl.models.presets import build_backbone
from lit_webssl.objectives import CLIP, StepContext
from lit_webssl.objectives import clip as clip_module
from lit_webssl.objectives.losses import CLIPLoss
from lit_webssl.training.module import LitWebSSL
from lit_webssl.training.optim import OptimConfig, StepSchedule

SOT, EOT = 49406, 49407
SMALL_TEXT = {"embed_dim": 16, "text_width": 32, "text_layers": 2, "text_heads": 2, "context_length": 16}


def small_clip(**kwargs) -> CLIP:
    return CLIP(**{"crop_size": 32, **SMALL_TEXT, **kwargs})


def setup(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    backbone = build_backbone("vit_debug")
    objective = small_clip(**kwargs)
    objective.configure(backbone)
    return backbone, objective


# -- the loss ------------------------------------------------------------------------------------------------------
def _hand_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """Symmetric InfoNCE with explicit loops over rows and a hand-written log-softmax."""

    def unit(rows: list[list[float]]) -> list[list[float]]:
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in rows]

    image, text = unit(image.tolist()), unit(text.tolist())
    n = len(image)

    def ce(queries, keys) -> float:
        total = 0.0
        for i in range(n):
            logits = [scale * sum(q * k for q, k in zip(queries[i], keys[j], strict=True)) for j in range(n)]
            log_norm = math.log(sum(math.exp(v) for v in logits))
            total += -(logits[i] - log_norm)
        return total / n

    return (ce(image, text) + ce(text, image)) / 2


def test_loss_matches_a_hand_computation_and_open_clip():
    gen = torch.Generator().manual_seed(0)
    image, text = (
        torch.randn(3, 4, generator=gen, dtype=torch.float64),
        torch.randn(3, 4, generator=gen, dtype=torch.float64),
    )
    for scale in (1.0, 14.285714, 100.0):
        loss = CLIPLoss()(image, text, torch.tensor(scale))
        assert loss.item() == pytest.approx(_hand_loss(image, text, scale), rel=1e-5)
        normed = torch.nn.functional.normalize
        reference = ClipLoss()(normed(image.float(), dim=-1), normed(text.float(), dim=-1), torch.tensor(scale))
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    matched = torch.eye(3, 4)  # each image identical to its text, orthogonal to the others
    assert CLIPLoss()(matched, matched, 100.0).item() == pytest.approx(math.log(1 + 2 * math.exp(-100.0)), abs=1e-6)
    with pytest.raises(ValueError, match="must both be"):
        CLIPLoss()(torch.randn(3, 4), torch.randn(2, 4), 1.0)


def test_loss_is_fp32_under_bf16_autocast():
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = CLIPLoss()(image.bfloat16(), text.bfloat16(), 50.0)
    assert loss.dtype == torch.float32
    expected = CLIPLoss()(image.bfloat16().float(), text.bfloat16().float(), 50.0)
    torch.testing.assert_close(loss, expected)


# -- the objective -------------------------------------------------------------------------------------------------
def test_view_normalization_and_metrics_follow_the_recipe():
    objective = CLIP()
    (view,) = objective.views()
    assert (view.size, view.count, view.scale, view.hflip_p) == (224, 1, (0.9, 1.0), 0.0)
    assert view.color_jitter_p == view.grayscale_p == view.blur_p == view.solarize_p == 0.0
    assert objective.pixel_mean == (0.48145466, 0.4578275, 0.40821073)
    assert objective.pixel_std == (0.26862954, 0.26130258, 0.27577711)
    assert objective.needs_text
    backbone, objective = setup()
    out = objective(fake_batch(objective), backbone)
    assert set(out.metrics) == {"clip", "stats/logit_scale", "stats/i2t_top1"}
    torch.testing.assert_close(out.metrics["clip"], out.loss.detach())
    assert out.metrics["stats/logit_scale"].item() == pytest.approx(1 / 0.07)
    assert 0.0 <= out.metrics["stats/i2t_top1"].item() <= 1.0


def test_text_tower_is_open_clips_causal_transformer():
    _, objective = setup(quick_gelu=True)
    text = objective.text
    assert (text.context_length, text.vocab_size, text.width, text.heads, text.pool_type) == (
        16,
        49408,
        32,
        2,
        "argmax",
    )
    assert text.text_projection.shape == (32, 16) and objective.image_proj.bias is None
    assert type(text.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert torch.isinf(text.attn_mask[0, 1:]).all() and (text.attn_mask.tril() == 0).all()  # causal
    _, gelu = setup(quick_gelu=False)
    assert isinstance(gelu.text.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


def test_text_embedding_is_taken_at_the_eot_token():
    _, objective = setup()
    objective.eval()
    tokens = objective.tokenizer.batch(["red zigzag on gray", "red zigzag on gray"])
    eot = int(tokens[0].argmax())
    tokens[1, eot + 1 :] = 7  # change only tokens after EOT: the causal embedding at EOT must not move
    emb = objective.encode_text(tokens)
    torch.testing.assert_close(emb[0], emb[1])


def test_tokens_from_the_loader_and_captions_in_forward_give_the_same_loss():
    backbone, objective = setup()
    batch = fake_batch(objective)
    from_captions = objective(batch, backbone).loss
    batch["text"] = torch.stack([objective.text_transform()(c) for c in batch["caption"]])
    batch["caption"] = ["ignored"] * len(batch["caption"])
    torch.testing.assert_close(objective(batch, backbone).loss, from_captions)


def test_tokenizer_works_offline_and_gives_sot_caption_eot(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    clip_module._simple_tokenizer.cache_clear()
    tokenizer = CLIP().text_transform()
    tokens = tokenizer.batch(["a photo of coarse checkerboard, red on blue", "", "stripes " * 200])
    assert tokens.shape == (3, 77) and tokens.dtype == torch.int64
    first = tokens[0].tolist()
    n = first.index(EOT)
    assert first[0] == SOT and n > 5 and all(t == 0 for t in first[n + 1 :]) and max(first[1:n]) < SOT
    assert tokens[1, :2].tolist() == [SOT, EOT] and not tokens[1, 2:].any()
    assert tokens[2, 0] == SOT and tokens[2, -1] == EOT and (tokens[2] != 0).all()  # truncated, EOT kept last
    assert int(tokens.max()) < 49408
    assert torch.equal(tokenizer("red zigzag"), tokenizer.batch(["red zigzag"])[0])
    assert len(pickle.dumps(tokenizer)) < 1000  # loader workers get a small object, not the BPE tables


def test_logit_scale_starts_at_one_over_007_and_is_clamped_after_every_step():
    backbone, objective = setup()
    assert objective.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        objective.logit_scale.fill_(5.0)
    objective.on_after_optimizer_step(backbone, StepContext(step=1))
    assert objective.logit_scale.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        objective.logit_scale.fill_(-0.5)
    objective.on_after_optimizer_step(backbone, StepContext(step=2))
    assert objective.logit_scale.item() == 0.0
    with torch.no_grad():
        objective.logit_scale.fill_(3.0)
    objective.on_after_optimizer_step(backbone, StepContext(step=3))
    assert objective.logit_scale.item() == 3.0


def test_param_groups_no_decay_on_vectors_and_logit_scale():
    backbone, objective = setup()
    groups = {g["name"]: g for g in objective.param_groups(backbone, weight_decay=0.2)}
    assert groups["decay"]["weight_decay"] == 0.2 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["no_decay"]["wd_mult"] == 0.0
    decay = {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    text = objective.text
    for param in (
        objective.logit_scale,
        text.ln_final.weight,
        text.ln_final.bias,
        text.transformer.resblocks[0].attn.in_proj_bias,
        backbone.norm.weight,
        backbone.blocks[0].attn.qkv.bias,
        backbone.cls_token,
        backbone.mask_token,
    ):
        assert id(param) in no_decay
    for param in (
        objective.image_proj.weight,
        text.text_projection,
        text.token_embedding.weight,
        text.positional_embedding,
        text.transformer.resblocks[0].attn.in_proj_weight,
        backbone.blocks[0].attn.qkv.weight,
        backbone.patch_embed.proj.weight,
        backbone.pos_embed,
    ):
        assert id(param) in decay


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"text_width": 30, "text_heads": 4}, "text_width \\(30\\) must be divisible by text_heads \\(4\\)"),
        ({"pool": "max"}, "pool"),
        ({"context_length": 1}, "context_length"),
        ({"init_temperature": 0.0}, "init_temperature"),
        ({"max_logit_scale": 10.0}, "max_logit_scale"),
        ({"embed_dim": 0}, "embed_dim"),
    ],
)
def test_contradictions_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=f"--model.objective.init_args.{flag}"):
        small_clip(**kwargs)


def test_crop_size_not_divisible_by_patch_names_the_flag():
    objective = small_clip(crop_size=30)
    with pytest.raises(ConfigError, match="--model.objective.init_args.crop_size=30 is not divisible by the patch"):
        objective.configure(build_backbone("vit_debug"))


# -- optimizer recipe ----------------------------------------------------------------------------------------------
def test_metaclip_optimizer_settings_reach_adamw():
    cfg = OptimConfig(
        base_lr=4e-4, lr_scaling="none", warmup=2000, total=61036, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2
    )
    schedule = StepSchedule(cfg, global_batch=32768, max_steps=0)
    assert schedule.peak_lr == 4e-4  # no batch scaling
    assert schedule.lr(0) == 0.0 and schedule.lr(1000) == pytest.approx(2e-4) and schedule.lr(2000) == 4e-4
    assert schedule.lr(61036) == pytest.approx(0.0, abs=1e-12)
    assert StepSchedule(cfg, global_batch=64, max_steps=0).peak_lr == 4e-4
    torch.manual_seed(0)
    module = LitWebSSL(small_clip(), backbone="vit_debug", optim=cfg)
    module.configure_model()
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(batch_size=256), world_size=128, accumulate_grad_batches=1, max_steps=0
    )
    module._trainer = trainer
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-6 and group["lr"] == 4e-4
    assert module.objective.global_batch == 32768 and module.objective.total_steps == 61036
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {"decay": 0.2, "no_decay": 0.0}


# -- data without captions: one line naming the dataset and the column ---------------------------------------------
def test_clip_on_data_without_captions_stops_with_one_line(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        with MDSWriter(
            out=str(tmp_path / "nocap" / split), columns={"image": "bytes", "label": "int"}, progress_bar=False
        ) as writer:
            for label in range(4):
                buffer = io.BytesIO()
                render(label, rng, 32)[0].save(buffer, format="PNG")
                writer.write({"image": buffer.getvalue(), "label": label})
    config = str(CONFIGS / "demo" / "clip_tiny.yaml")
    data = tmp_path / "nocap"
    proc = run_cli("fit", "--config", config, *fast_overrides(data, steps=1))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    message = f"--data.caption_key: split 'train' has no column 'caption' in its MDS index {data}/train/index.json"
    assert message in proc.stderr
    datamodule = WebSSLDataModule(str(data), caption_key=None, num_workers=0)
    datamodule.set_text_transform(small_clip().text_transform(), required_by="CLIP")  # what the CLI hands over
    with pytest.raises(
        DataConfigError, match=f"--data.caption_key: CLIP needs captions; name the caption column of the data at {data}"
    ):
        datamodule.setup("fit")


@pytest.mark.slow  # whole fits in this process: the full suite, not the fast tier
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    data = tiny_demo(tmp_path)
    config = yaml.safe_load((CONFIGS / "demo" / "clip_tiny.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 2
        if callback["class_path"].endswith("KNNProbe"):
            callback["init_args"]["at_fit_end"] = False
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    fixed = ["--model.optim.total", "100", "--model.optim.warmup", "1"]  # one schedule for all three runs
    main(["fit", "--config", str(path), *fast_overrides(data, steps=4, run_name="straight"), *fixed])
    main(["fit", "--config", str(path), *fast_overrides(data, steps=2, run_name="resumed"), *fixed])
    main(
        [
            "fit",
            "--config",
            str(path),
            *fast_overrides(data, steps=4, run_name="resumed"),
            *fixed,
            "--ckpt_path",
            "last",
        ]
    )
    straight = load_weights(Path("runs/straight/checkpoints/last.ckpt"))
    resumed = load_weights(Path("runs/resumed/checkpoints/last.ckpt"))
    assert straight.keys() == resumed.keys() and "objective.logit_scale" in straight
    assert straight["objective.logit_scale"] != math.log(1 / 0.07)  # it trained
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_shipped_clip_configs_follow_the_recipe():
    for path in sorted((CONFIGS / "clip").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        trainer, optim, data = cfg["trainer"], cfg["model"]["optim"], cfg["data"]["init_args"]
        assert data["batch_size"] * trainer["devices"] * trainer["num_nodes"] == 32768, path.name
        assert trainer["precision"] == "bf16-mixed" and data["caption_key"] == "caption"
        assert (optim["base_lr"], optim["lr_scaling"], optim["betas"], optim["eps"], optim["weight_decay"]) == (
            4e-4,
            "none",
            [0.9, 0.98],
            1e-6,
            0.2,
        ), path.name
        assert optim["unit"] == "samples" and optim["warmup"] == 2000 * 32768 and optim["min_lr"] == 0.0
        samples = 8_000_000_000 if path.stem == "vit_7b" else 2_000_000_000
        assert optim["total"] == samples and trainer["max_steps"] == math.ceil(samples / 32768), path.name
        init = cfg["model"]["objective"]["init_args"]
        assert init["embed_dim"] == init["text_width"] and init["text_width"] % init["text_heads"] == 0
    assert len(list((CONFIGS / "clip").glob("*.yaml"))) == 6


# -- data-parallel exactness: 2 ranks == 1 process with the whole batch ---------------------------------------------
N = 8  # images in the whole batch


def _loss_and_grads(lo: int, hi: int):
    """Loss of rows [lo, hi) of the whole batch, and the gradients of ``loss * (hi - lo) * world / N``.

    Weighting each rank's mean loss by its share of the batch makes the DDP mean of the ranks' gradients the gradient
    of the whole batch's loss, also with unequal shares; with equal shares the weight is 1 (plain DDP).
    """
    backbone, objective = setup(seed=0)
    batch = fake_batch(objective, batch_size=N, seed=7)
    batch["caption"] = [f"{c} {'stripes ' * i}" for i, c in enumerate(batch["caption"])]
    part = {
        "views": {k: v[lo:hi] for k, v in batch["views"].items()},
        "label": batch["label"][lo:hi],
        "caption": batch["caption"][lo:hi],
    }
    out = objective(part, backbone)
    world = dist.get_world_size() if dist.is_initialized() else 1
    (out.loss * (hi - lo) * world / N).backward()
    named = [(f"backbone.{n}", p) for n, p in backbone.named_parameters()]
    named += [(n, p) for n, p in objective.trainable_named_parameters()]
    grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
    return out.loss.detach() * (hi - lo) / N, grads


SPLITS = (4, 3)  # rows of rank 0: equal shares (plain DDP), then unequal ones (3 + 5, e.g. a last partial batch)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {}
        for split in SPLITS:
            lo, hi = (0, split) if rank == 0 else (split, N)
            loss, grads = _loss_and_grads(lo, hi)
            dist.all_reduce(loss)  # sum of the ranks' shares = loss of the whole batch
            for g in grads.values():
                dist.all_reduce(g)
            results[split] = {"loss": loss, "grads": {k: g / 2 for k, g in grads.items()}}  # DDP: mean over ranks
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "ranks.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / "ranks.pt")
    loss, grads = _loss_and_grads(0, N)
    assert "logit_scale" in grads and any(k.startswith("text.") for k in grads)
    for split in SPLITS:
        ranks = results[split]
        torch.testing.assert_close(ranks["loss"], loss, rtol=0, atol=1e-5, msg=f"rank 0 holds {split} of {N}")
        assert ranks["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(
                ranks["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=f"{name}, rank 0 holds {split} of {N}"
            )
