"""DINOv2 losses (DINO CLS, iBOT patch, KoLeo) against hand-derived cases, SK/centering properties and a 2-rank run.

Reference: facebookresearch/dinov2 ``dinov2/loss/*.py``; spec: docs/recipe.md section 3. Shapes: B rows, K prototypes,
M masked tokens, n_images images with N patches each.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from lit_webssl.objectives.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss

# ----------------------------------------------------------------------------------------------------------------------
# Independent plain-Python references (float64, loops; no torch ops)


def _ref_ce(s_row: list[float], p_row: list[float], temp: float) -> float:
    """``-Σ_k p_k log_softmax(s / temp)_k`` for one row."""
    z = [v / temp for v in s_row]
    mx = max(z)
    lse = mx + math.log(sum(math.exp(v - mx) for v in z))
    return -sum(p * (v - lse) for p, v in zip(p_row, z, strict=True))


def _ref_sinkhorn(logits: list[list[float]], temp: float, n_iterations: int) -> list[list[float]]:
    """Textbook SK on a (B, K) list: Q[k][b] = exp(t[b][k] / temp), as in DINOv2 with a single rank."""
    b_, k_ = len(logits), len(logits[0])
    q = [[math.exp(logits[b][k] / temp) for b in range(b_)] for k in range(k_)]
    total = sum(sum(r) for r in q)
    q = [[v / total for v in r] for r in q]
    for _ in range(n_iterations):
        q = [[v / sum(r) / k_ for v in r] for r in q]
        cols = [sum(q[k][b] for k in range(k_)) for b in range(b_)]
        q = [[q[k][b] / cols[b] / b_ for b in range(b_)] for k in range(k_)]
    return [[q[k][b] * b_ for k in range(k_)] for b in range(b_)]


# ----------------------------------------------------------------------------------------------------------------------
# DINOLoss


def test_dino_loss_hand_case_k3_b2():
    s = [[1.0, 2.0, 3.0], [0.5, -0.5, 0.0]]
    p = [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]
    # row 0: z = (10, 20, 30), lse = 30 + log(1 + e^-10 + e^-20); CE = lse - (0.2*10 + 0.3*20 + 0.5*30) = lse - 23
    lse0 = 30 + math.log(1 + math.exp(-10) + math.exp(-20))
    # row 1: z = (5, -5, 0), CE = lse - 5
    lse1 = 5 + math.log(1 + math.exp(-10) + math.exp(-5))
    expected = ((lse0 - 23) + (lse1 - 5)) / 2
    assert expected == pytest.approx((_ref_ce(s[0], p[0], 0.1) + _ref_ce(s[1], p[1], 0.1)) / 2)
    loss = DINOLoss(3, student_temp=0.1)([torch.tensor(s)], [torch.tensor(p)])
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_pairs_every_student_with_every_teacher():
    gen = torch.Generator().manual_seed(0)
    loss_fn = DINOLoss(5)
    students = [torch.randn(4, 5, generator=gen, requires_grad=True) for _ in range(2)]
    teachers = [torch.softmax(torch.randn(4, 5, generator=gen), dim=-1) for _ in range(2)]
    total = loss_fn(students, teachers)
    pairs = sum(loss_fn([s], [t]) for s in students for t in teachers)
    torch.testing.assert_close(total, pairs)
    by_hand = sum(_ref_ce(s[i].tolist(), t[i].tolist(), 0.1) / 4 for s in students for t in teachers for i in range(4))
    assert total.item() == pytest.approx(by_hand, rel=1e-5)
    g_total = torch.autograd.grad(total, students)
    g_pairs = torch.autograd.grad(pairs, students)
    for a, b in zip(g_total, g_pairs, strict=True):
        torch.testing.assert_close(a, b)


def test_dino_loss_is_fp32_for_half_inputs():
    s = torch.randn(3, 4).to(torch.bfloat16)
    p = torch.softmax(torch.randn(3, 4), dim=-1).to(torch.bfloat16)
    loss = DINOLoss(4)([s], [p])
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(DINOLoss(4)([s.float()], [p.float()]).item(), rel=1e-6)


def test_dino_loss_rejects_bad_arguments():
    loss_fn = DINOLoss(3)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="student_logits"):
        loss_fn([], [x])
    with pytest.raises(ValueError, match="teacher_probs"):
        loss_fn([x], [])
    with pytest.raises(ValueError, match="sequences"):
        loss_fn(x, [x])
    with pytest.raises(ValueError, match="student_logits\\[0\\]"):
        loss_fn([torch.zeros(3, 3)], [x])
    with pytest.raises(ValueError, match="teacher_temp"):
        loss_fn.sinkhorn_knopp_teacher(x, 0.0)
    with pytest.raises(ValueError, match="n_iterations"):
        loss_fn.sinkhorn_knopp_teacher(x, 0.1, n_iterations=0)


def test_sinkhorn_matches_plain_python_reference():
    t = [[0.3, -1.2, 0.8], [1.5, 0.1, -0.4]]  # K = 3, B = 2
    for temp, n_it in [(1.0, 3), (0.1, 3), (0.5, 1)]:
        got = DINOLoss(3).sinkhorn_knopp_teacher(torch.tensor(t), temp, n_it)
        assert got.dtype == torch.float32 and got.shape == (2, 3)
        torch.testing.assert_close(got, torch.tensor(_ref_sinkhorn(t, temp, n_it)), atol=1e-6, rtol=1e-5)


def test_sinkhorn_one_iteration_k2_b2_by_hand():
    # t / temp = log of Q^T = [[1, 2], [3, 4]] ... i.e. Q = [[1, 3], [2, 4]] (K x B). After /sum (10), row normalization
    # gives rows [1/4, 3/4] / 2 and [2/6, 4/6] / 2; column sums are (1/8 + 1/6, 3/8 + 1/3) = (7/24, 17/24).
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).log()
    got = DINOLoss(2).sinkhorn_knopp_teacher(t, 1.0, n_iterations=1)
    expected = torch.tensor([[(1 / 8) / (7 / 24), (1 / 6) / (7 / 24)], [(3 / 8) / (17 / 24), (1 / 3) / (17 / 24)]])
    torch.testing.assert_close(got, expected)


def test_sinkhorn_rows_sum_to_one_and_columns_become_uniform():
    gen = torch.Generator().manual_seed(1)
    b, k = 32, 4
    t = 0.5 * torch.randn(b, k, generator=gen)  # well conditioned: t / temp has std 0.5
    loss_fn = DINOLoss(k)
    errors = []
    for n_it in (3, 10, 30):
        p = loss_fn.sinkhorn_knopp_teacher(t, 1.0, n_iterations=n_it)
        torch.testing.assert_close(p.sum(dim=1), torch.ones(b), atol=1e-6, rtol=0)
        errors.append(((p.sum(dim=0) - b / k).abs().max() / (b / k)).item())
    # After 3 rounds the prototype marginals are uniform to ~1e-3 relative on this input (SK converges geometrically,
    # slower for sharper targets); after 30 they are uniform to fp32 rounding.
    assert errors[0] < 1e-2
    assert errors[2] < 1e-5
    assert errors[0] > errors[1] >= errors[2]


def test_sinkhorn_is_invariant_to_a_constant_shift():
    gen = torch.Generator().manual_seed(2)
    t = torch.randn(6, 5, generator=gen)
    loss_fn = DINOLoss(5)
    p = loss_fn.sinkhorn_knopp_teacher(t, 0.1)
    # +100 at temp 0.1 would overflow exp() in fp32 without the global max shift
    torch.testing.assert_close(loss_fn.sinkhorn_knopp_teacher(t + 100.0, 0.1), p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_fn.sinkhorn_knopp_teacher(t - 3.0, 0.1), p, atol=1e-5, rtol=1e-5)


def test_sinkhorn_is_fp32_for_bf16_input():
    t = torch.randn(4, 3).to(torch.bfloat16)
    p = DINOLoss(3).sinkhorn_knopp_teacher(t, 0.07)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, DINOLoss(3).sinkhorn_knopp_teacher(t.float(), 0.07))


def test_centering_update_and_softmax():
    loss_fn = DINOLoss(3, center_momentum=0.9)
    assert loss_fn.center.shape == (1, 3) and not loss_fn.center.any()
    assert "center" in loss_fn.state_dict()
    t = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0]])  # mean (2, 1, 1)
    loss_fn.update_center(t)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.2, 0.1, 0.1]]))
    loss_fn.update_center(torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.18, 0.09, 0.19]]))  # 0.9 * c + 0.1 * (0, 0, 1)
    x = torch.tensor([[0.5, 0.4, 0.3]])
    expected = torch.softmax((x - torch.tensor([[0.18, 0.09, 0.19]])) / 0.04, dim=-1)
    torch.testing.assert_close(loss_fn.softmax_center_teacher(x, 0.04), expected)
    # hand check of the first entry: z = (0.32, 0.31, 0.11) / 0.04 = (8, 7.75, 2.75)
    p0 = 1 / (1 + math.exp(-0.25) + math.exp(-5.25))
    assert loss_fn.softmax_center_teacher(x, 0.04)[0, 0].item() == pytest.approx(p0, rel=1e-5)
    assert loss_fn.softmax_center_teacher(x.to(torch.bfloat16), 0.04).dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# iBOTPatchLoss


def test_ibot_forward_masked_hand_case():
    masks = torch.tensor([[True, False, False, False], [True, True, True, False], [False] * 4])
    s = [[1.0, 0.0, -1.0], [0.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.3, 0.2, 0.1]]  # M = 4 (1 + 3 + 0)
    p = [[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]]
    ce = [_ref_ce(s[i], p[i], 0.1) for i in range(4)]
    expected = (ce[0] / 1 + (ce[1] + ce[2] + ce[3]) / 3) / 3  # three images, the unmasked one counts too
    # row 1: all-zero logits give the uniform distribution, so its CE is log 3
    assert ce[1] == pytest.approx(math.log(3))
    loss = iBOTPatchLoss(3, student_temp=0.1).forward_masked(torch.tensor(s), torch.tensor(p), masks)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    w = torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3])
    loss_w = iBOTPatchLoss(3).forward_masked(torch.tensor(s), torch.tensor(p), masks, masks_weight=w)
    assert loss_w.item() == pytest.approx(expected, rel=1e-6)


def test_ibot_images_count_equally_whatever_their_mask_size():
    masks = torch.tensor([[True, False, False, False], [True, True, True, False], [False] * 4])
    row_s, row_p = torch.tensor([[0.4, -0.2, 1.0]]), torch.tensor([[0.1, 0.7, 0.2]])
    s, p = row_s.expand(4, 3), row_p.expand(4, 3)
    c = _ref_ce(row_s[0].tolist(), row_p[0].tolist(), 0.1)
    loss_fn = iBOTPatchLoss(3)
    # the 1-token image and the 3-token image each contribute c; the unmasked image only adds to the denominator
    assert loss_fn.forward_masked(s, p, masks).item() == pytest.approx(2 * c / 3, rel=1e-6)
    assert loss_fn.forward_masked(s, p, masks[:2]).item() == pytest.approx(c, rel=1e-6)


def test_ibot_rejects_bad_arguments():
    loss_fn = iBOTPatchLoss(3)
    masks = torch.tensor([[True, True], [False, True]])
    s = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="masks"):
        loss_fn.forward_masked(s[:2], s[:2], masks)
    with pytest.raises(ValueError, match="masks"):
        loss_fn.forward_masked(s, s, masks.float())
    with pytest.raises(ValueError, match="teacher_probs"):
        loss_fn.forward_masked(s, s[:2], masks)
    with pytest.raises(ValueError, match="masks_weight"):
        loss_fn.forward_masked(s, s, masks, masks_weight=torch.ones(2))
    with pytest.raises(ValueError, match="n_masked_patches"):
        loss_fn.sinkhorn_knopp_teacher(s, 0.1, 2)


def test_ibot_sinkhorn_and_centering():
    t = [[0.3, -1.2, 0.8], [1.5, 0.1, -0.4], [0.0, 0.2, 0.1]]
    loss_fn = iBOTPatchLoss(3, center_momentum=0.5)
    assert loss_fn.center.shape == (1, 3) and "center" in loss_fn.state_dict()
    ref = torch.tensor(_ref_sinkhorn(t, 0.5, 3))
    torch.testing.assert_close(loss_fn.sinkhorn_knopp_teacher(torch.tensor(t), 0.5, 3), ref, atol=1e-6, rtol=1e-5)
    n = torch.tensor(3)
    torch.testing.assert_close(loss_fn.sinkhorn_knopp_teacher(torch.tensor(t), 0.5, n), ref, atol=1e-6, rtol=1e-5)
    assert n.item() == 3  # not modified in place
    loss_fn.update_center(torch.tensor(t))  # mean (0.6, -0.3, 1/6)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.3, -0.15, 1 / 12]]))
    x = torch.tensor(t)
    torch.testing.assert_close(loss_fn.softmax_center_teacher(x, 0.1), torch.softmax((x - loss_fn.center) / 0.1, -1))
    # no masked token anywhere: empty targets, center unchanged
    empty = torch.zeros(0, 3)
    assert loss_fn.sinkhorn_knopp_teacher(empty, 0.1, 0).shape == (0, 3)
    before = loss_fn.center.clone()
    loss_fn.update_center(empty)
    torch.testing.assert_close(loss_fn.center, before)


# ----------------------------------------------------------------------------------------------------------------------
# KoLeoLoss


def test_koleo_three_points_on_a_circle():
    # angles 0, 60, 180 degrees (radii differ: the loss normalizes). Nearest distances: 1 (0-60), 1 (60-0),
    # sqrt(3) (180-60, chord 2 sin 60°), so the loss is -(log 1 + log 1 + log sqrt 3) / 3 = -log(3) / 6.
    ang = torch.tensor([0.0, math.pi / 3, math.pi], dtype=torch.float64)
    radii = torch.tensor([1.0, 2.5, 0.3], dtype=torch.float64)
    x = torch.stack([ang.cos(), ang.sin()], dim=1) * radii[:, None]
    loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-math.log(3) / 6, abs=1e-6)


def test_koleo_never_picks_the_point_itself():
    # an antipodal pair: every other point is at dot product -1, which ties with DINOv2's "-1 on the diagonal"
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(2.0), abs=1e-6)


def test_koleo_runs_in_fp32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, generator=gen)
    ref = KoLeoLoss()(x)
    xb = x.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = KoLeoLoss()(xb)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(KoLeoLoss()(xb.detach().float()).item(), rel=1e-6)
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)  # only the bf16 rounding of the input differs
    loss.backward()
    assert xb.grad is not None and torch.isfinite(xb.grad.float()).all()


def test_koleo_needs_two_points():
    with pytest.raises(ValueError, match="at least 2"):
        KoLeoLoss()(torch.randn(1, 4))
    with pytest.raises(ValueError, match="2-D"):
        KoLeoLoss()(torch.randn(4))


# ----------------------------------------------------------------------------------------------------------------------
# Two ranks over gloo: per-rank results on halves of a batch equal single-process results on the whole batch

_K, _B, _N = 6, 8, 5  # prototypes, global batch (4 per rank), patches per image
_TEMP = 0.2
# masked tokens per image: rank 0 holds images 0, 1 (1 + 4 = 5 tokens), rank 1 images 2, 3 (0 + 2 = 2 tokens)
_MASKS = torch.tensor(
    [
        [False, True, False, False, False],
        [True, True, True, False, True],
        [False] * 5,
        [False, False, True, True, False],
    ]
)


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    m = int(_MASKS.sum())
    return {
        "t1": torch.randn(_B, _K, generator=gen),  # teacher CLS logits, global crop 1
        "t2": torch.randn(_B, _K, generator=gen),
        "s1": torch.randn(_B, _K, generator=gen),  # student CLS logits
        "s2": torch.randn(_B, _K, generator=gen),
        "tp": torch.randn(m, _K, generator=gen),  # teacher patch logits at masked positions (image-major)
        "sp": torch.randn(m, _K, generator=gen),
    }


def _compute(x: dict[str, torch.Tensor], masks: torch.Tensor, n_masked: torch.Tensor | int) -> dict[str, torch.Tensor]:
    """The same computation on a rank's shard (under a process group) or on the whole batch (single process)."""
    out: dict[str, torch.Tensor] = {}
    b = x["t1"].shape[0]
    dino = DINOLoss(_K)
    probs = dino.sinkhorn_knopp_teacher(torch.cat([x["t1"], x["t2"]]), _TEMP)  # DINOv2 stacks both global crops
    out["dino_sk"] = probs
    p1, p2 = probs[:b], probs[b:]
    s1, s2 = x["s1"].clone().requires_grad_(), x["s2"].clone().requires_grad_()
    loss = dino([s1, s2], [p2, p1])
    g1, g2 = torch.autograd.grad(loss, [s1, s2])
    out["dino_loss"], out["dino_g1"], out["dino_g2"] = loss.detach(), g1, g2
    dino.update_center(x["t1"])
    dino.update_center(x["t2"])
    out["dino_center"] = dino.center.clone()
    out["dino_centered"] = dino.softmax_center_teacher(x["t1"], _TEMP)

    ibot = iBOTPatchLoss(_K)
    tp = ibot.sinkhorn_knopp_teacher(x["tp"], _TEMP, n_masked)
    out["ibot_sk"] = tp
    sp = x["sp"].clone().requires_grad_()
    loss = ibot.forward_masked(sp, tp, masks)
    (gp,) = torch.autograd.grad(loss, [sp])
    out["ibot_loss"], out["ibot_g"] = loss.detach(), gp
    ibot.update_center(x["tp"])
    out["ibot_center"] = ibot.center.clone()
    return out


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        x = _inputs()
        b = _B // world_size
        rows = slice(rank * b, (rank + 1) * b)
        n_img = _MASKS.shape[0] // world_size
        masks = _MASKS[rank * n_img : (rank + 1) * n_img]
        first = int(_MASKS[: rank * n_img].sum())
        n_masked = int(masks.sum())
        shard = {k: x[k][rows] for k in ("t1", "t2", "s1", "s2")}
        shard |= {k: x[k][first : first + n_masked] for k in ("tp", "sp")}  # this rank's images' tokens
        out = _compute(shard, masks, torch.tensor([n_masked]))
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_match_single_process(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(world)]
    x = _inputs()
    ref = _compute(x, _MASKS, int(_MASKS.sum()))
    tol = {"atol": 1e-6, "rtol": 1e-6}
    b = _B // world
    # SK on the stacked crops: each rank's rows are [crop 1 shard; crop 2 shard]
    for i in range(world):
        rows = torch.cat([torch.arange(i * b, (i + 1) * b), _B + torch.arange(i * b, (i + 1) * b)])
        torch.testing.assert_close(r[i]["dino_sk"], ref["dino_sk"][rows], **tol)
        torch.testing.assert_close(r[i]["dino_center"], ref["dino_center"], **tol)
        torch.testing.assert_close(r[i]["ibot_center"], ref["ibot_center"], **tol)
        torch.testing.assert_close(r[i]["dino_centered"], ref["dino_centered"][i * b : (i + 1) * b], **tol)
    torch.testing.assert_close(torch.cat([r[0]["ibot_sk"], r[1]["ibot_sk"]]), ref["ibot_sk"], **tol)
    assert r[0]["ibot_sk"].shape[0] == 5 and r[1]["ibot_sk"].shape[0] == 2
    # DDP averages gradients over ranks: mean of local losses == global loss, concatenated local grads / 2 == global
    for name in ("dino_loss", "ibot_loss"):
        torch.testing.assert_close((r[0][name] + r[1][name]) / world, ref[name], **tol)
    for name in ("dino_g1", "dino_g2", "ibot_g"):
        torch.testing.assert_close(torch.cat([r[0][name], r[1][name]]) / world, ref[name], **tol)
