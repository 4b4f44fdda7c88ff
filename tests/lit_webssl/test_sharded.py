"""Sharded strategies on 2 CPU ranks (gloo): FSDP2 (``ModelParallelStrategy``) and DeepSpeed ZeRO-3 (a test-only CPU
subclass of Lightning's ``DeepSpeedStrategy``, ``tests/cpu_strategies.py``), through the real CLI.

For each strategy: Web-DINO (tiny, fp32) runs 4 steps on 2 ranks x 4 images from the same initial weights
(``--model.init_from``) as an unsharded 1-process run on 8 images. The EMA teacher (updated on each rank's local
shards) and the student equal the unsharded run's to 1e-6; a run interrupted at step 2 and resumed from its sharded
checkpoint ends bit-identical to the uninterrupted one; ``checkpoint convert`` makes one fp32 file of each.
Settings that depend on the rank and not on the data (iBOT masks, KoLeo per rank, drop path) are switched off so
that the sharded and the unsharded run compute the same thing.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CONFIGS, REPO, fast_overrides, run_cli, tiny_demo

from lit_webssl.checkpoint import checkpoint_kind, read_state_dict

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TESTS = REPO / "tests"
STEPS, PER_RANK = 4, 4
STRATEGIES = {
    "fsdp2": ["--config", str(CONFIGS / "strategy" / "fsdp2.yaml")],
    "zero3": [
        "--config",
        str(CONFIGS / "strategy" / "deepspeed_zero3.yaml"),
        "--trainer.strategy",
        "cpu_strategies.CPUDeepSpeedStrategy",
        "--trainer.strategy.stage",
        "3",
        "--trainer.gradient_clip_val",
        "null",
    ],
}


def _overlay(path: Path, record: Path, every: int = 2) -> Path:
    """The settings every run of this module shares (fp32, no rank-dependent randomness, weights that move), with a
    checkpoint ``every`` steps."""
    overlay = {
        "trainer": {
            "precision": "32-true",
            "max_steps": STEPS,
            "limit_val_batches": 0,
            "log_every_n_steps": 1,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": every, "save_last": True, "save_top_k": -1},
                },
                {"class_path": "sharded_probe.RecordBatches", "init_args": {"out": str(record)}},
            ],
        },
        "model": {
            "activation_checkpointing": False,
            # no separate iBOT head: with iBOT off it would get no gradient, and DeepSpeed, whose flat buffers hold
            # zeros for such parameters, still applies AdamW's decoupled weight decay to them (PyTorch skips them)
            "objective": {
                "init_args": {
                    "koleo_weight": 0.0,
                    "ibot_weight": 0.0,
                    "clip_grad": 0.0,
                    "ibot_separate_head": False,
                    "freeze_last_layer": 0,
                    "momentum_teacher": 0.9,
                    "teacher_temp_warmup": 0,
                }
            },
            # Adam's first steps move every weight by about +-lr whatever its gradient's size, so the rounding noise
            # of the gradient reduction (two halves vs one batch) reaches the weights in proportion to lr and 1 / eps:
            # lr and eps are chosen so the teacher moves 1e-4..1e-3 while that noise stays below 1e-6
            "optim": {"base_lr": 0.01, "warmup": 0, "total": STEPS, "eps": 1.0e-6},
        },
    }
    path.write_text(yaml.safe_dump(overlay))
    return path


def _fit(tmp: Path, data: Path, run: str, devices: int, extra: list[str], init: Path, *more: str, every: int = 2):
    record = tmp / "ids" / run
    args = [
        "fit",
        "--config",
        str(CONFIGS / "demo" / "dino_tiny.yaml"),
        *extra,
        "--config",
        str(_overlay(tmp / f"{run}.yaml", record, every)),
        "--trainer.devices",
        str(devices),
        "--run_name",
        run,
        "--model.init_from",
        str(init),
        "--data.init_args.local",
        str(data),
        "--data.init_args.batch_size",
        str(8 // devices),
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.num_canonical_nodes",
        "2",
        *more,
    ]
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    os.chdir(tmp)  # runs/ of every run of the module in one place (the autouse fixture restores the cwd)
    result = run_cli(*args, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return record


def _ids(record: Path) -> dict[int, set[int]]:
    """Samples trained on per step, over all ranks."""
    steps: dict[int, set[int]] = {}
    for path in record.glob("rank*.json"):
        for step, ids in json.loads(path.read_text()).items():
            steps.setdefault(int(step), set()).update(ids)
    return steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Initial weights, and the unsharded 1-process run from them (8 images per step)."""
    tmp = tmp_path_factory.mktemp("sharded")
    data = tiny_demo(tmp)
    init = tmp / "init.ckpt"
    # the initial weights: what an unsharded build of the run's model draws (written by a 0-step fit)
    _save_init_weights(tmp, data, init)
    record = _fit(tmp, data, "reference", 1, [], init)
    return tmp, data, init, read_state_dict(tmp / "runs/reference/checkpoints/last.ckpt"), _ids(record)


def _save_init_weights(tmp: Path, data: Path, out: Path) -> None:
    from lit_webssl.cli.lightning import build_cli as _cli

    cli = _cli(
        [
            "--config",
            str(CONFIGS / "demo" / "dino_tiny.yaml"),
            "--config",
            str(_overlay(tmp / "init.yaml", tmp / "ids" / "init")),
            "--data.init_args.local",
            str(data),
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    cli.model.configure_model()
    torch.save({"state_dict": cli.model.state_dict()}, out)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_sharded_teacher_resume_and_conversion_match_the_unsharded_run(reference, strategy):
    tmp, data, init, ref_weights, ref_ids = reference
    extra = STRATEGIES[strategy]
    straight = _fit(tmp, data, f"{strategy}_straight", 2, extra, init)
    assert _ids(straight) == ref_ids, "the 2 ranks together must train on the reference's samples, step by step"

    ckpt_dir = tmp / f"runs/{strategy}_straight/checkpoints"
    last = ckpt_dir / "last.ckpt"
    assert checkpoint_kind(last) == ("dcp" if strategy == "fsdp2" else "deepspeed")
    converted = tmp / f"{strategy}_fp32.ckpt"
    result = run_cli("checkpoint", "convert", str(last), str(converted))
    assert result.returncode == 0, result.stderr[-3000:]
    weights = read_state_dict(converted)
    assert weights.keys() == ref_weights.keys()
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())

    initial = read_state_dict(init)
    teacher = [k for k in weights if k.startswith("objective.teacher.")]
    moved = max((ref_weights[k] - initial[k]).abs().max().item() for k in teacher)
    assert moved > 1e-4, "the teacher must move far more than the tolerance for the comparison to mean anything"
    worst = {
        part: max(
            (weights[k] - ref_weights[k]).abs().max().item()
            for k in weights
            if k.startswith("objective.teacher.") == (part == "teacher")
        )
        for part in ("teacher", "student")
    }
    assert worst["teacher"] <= 1e-6 and worst["student"] <= 1e-5, worst  # the student moves 10x the teacher

    # interrupted at step 2 (its sharded checkpoint), resumed to step 4: bit-identical to the uninterrupted run
    step2 = next(ckpt_dir.glob("*step=2*"))
    resumed = _fit(tmp, data, f"{strategy}_resumed", 2, extra, init, "--ckpt_path", str(step2))
    assert sorted(_ids(resumed)) == [2, 3]
    assert {s: ids for s, ids in _ids(resumed).items()} == {s: ref_ids[s] for s in (2, 3)}
    again = tmp / f"{strategy}_resumed_fp32.ckpt"
    assert (
        run_cli(
            "checkpoint", "convert", str(tmp / f"runs/{strategy}_resumed/checkpoints/last.ckpt"), str(again)
        ).returncode
        == 0
    )
    resumed_weights = read_state_dict(again)
    for key, value in weights.items():
        assert torch.equal(value, resumed_weights[key]), key


def test_zero3_bf16_teacher_accumulates_in_fp32_masters(reference):
    """DeepSpeed in bf16 stores every parameter in bf16, the EMA teacher's included; the EMA accumulates in rank-local
    fp32 masters of the teacher's partitions instead (``ShardedEMA``), saved in every rank's checkpoint file.

    2 ranks, bf16, a checkpoint every step. The teacher of the last checkpoint, converted to one fp32 file, equals
    an EMA recomputed offline in fp32 from ``--model.init_from``'s exact values and the student's fp32 weights of
    every step's checkpoint (DeepSpeed's fp32 masters): so the masters are exact from the start (the file's values,
    not their bf16 rounding), follow the student's fp32 masters, and survive saving, resuming and conversion.
    """
    from lit_webssl.checkpoint import convert

    tmp, data, init, _, _ = reference
    momentum = 0.9
    extra = STRATEGIES["zero3"]
    bf16 = ["--trainer.precision", "bf16-mixed", "--model.objective.init_args.final_momentum_teacher", str(momentum)]
    _fit(tmp, data, "zero3_bf16", 2, extra, init, *bf16, every=1)
    ckpt_dir = tmp / "runs/zero3_bf16/checkpoints"
    weights = {}
    for step in range(1, STEPS + 1):
        weights[step] = read_state_dict(convert(next(ckpt_dir.glob(f"*step={step}.ckpt")), tmp / f"bf16_{step}.pt"))
    initial = read_state_dict(init)
    teacher_keys = [k for k in initial if k.startswith("objective.teacher.")]
    student_of = {
        k: "backbone." + k[len("objective.teacher.backbone.") :]
        if ".teacher.backbone." in k
        else k.replace(".teacher.", ".")
        for k in teacher_keys
    }

    def offline_ema(store: torch.dtype) -> dict[str, torch.Tensor]:
        teacher = {k: initial[k].to(store).float() for k in teacher_keys}
        for step in range(1, STEPS + 1):
            teacher = {
                k: torch.lerp(t, weights[step][student_of[k]], 1 - momentum).to(store).float()
                for k, t in teacher.items()
            }
        return teacher

    moved = max((weights[STEPS][k] - initial[k]).abs().max().item() for k in set(student_of.values()))
    assert moved > 1e-3, "the student must train (a non-finite loss makes DeepSpeed skip every step)"
    expected, in_bf16 = offline_ema(torch.float32), offline_ema(torch.bfloat16)
    final = weights[STEPS]
    worst = max((final[k] - expected[k]).abs().max().item() for k in teacher_keys)
    assert worst <= 1e-6, worst
    # the comparison can tell: an EMA kept in bf16 (or started from the file's bf16 rounding) is far off
    assert max((in_bf16[k] - expected[k]).abs().max().item() for k in teacher_keys) > 100 * max(worst, 1e-8)
    assert any(not torch.equal(final[k], final[k].bfloat16().float()) for k in teacher_keys)

    # resumed at step 2 on 2 ranks, each restoring its own masters: bit-identical teacher at step 4
    step2 = next(ckpt_dir.glob("*step=2.ckpt"))
    _fit(tmp, data, "zero3_bf16_resumed", 2, extra, init, *bf16, "--ckpt_path", str(step2))
    resumed = read_state_dict(convert(tmp / "runs/zero3_bf16_resumed/checkpoints/last.ckpt", tmp / "bf16_res.pt"))
    for key in final:
        assert torch.equal(final[key], resumed[key]), key


CPU_ZERO3 = ["--trainer.strategy", "cpu_strategies.CPUDeepSpeedStrategy", "--trainer.strategy.stage", "3"]


@pytest.mark.parametrize(
    ("block", "objective"),
    [
        *[(block, objective) for block in ("deepspeed_zero3", "fsdp2") for objective in ("dino", "mae", "clip")],
        ("deepspeed_zero3_offload", "dino"),  # DeepSpeed's CPU Adam, the EMA reading offloaded fp32 masters
    ],
)
def test_shipped_strategy_blocks_train_every_objective_as_shipped(tmp_path, block, objective):
    """Each objective's demo config plus a strategy block exactly as shipped (bf16, activation checkpointing, the
    block's clipping, offload), on 2 CPU ranks, with the kNN probe: every logged loss is finite. ZeRO-3 on CPU needs
    the test-only strategy class; the block's settings (stage 3, buckets, clip, offload) are kept."""
    data = tiny_demo(tmp_path, n_train=80, n_val=20)
    os.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        str(CONFIGS / "demo" / f"{objective}_tiny.yaml"),
        "--config",
        str(CONFIGS / "strategy" / f"{block}.yaml"),
        *(CPU_ZERO3 if block != "fsdp2" else []),
        *fast_overrides(data, steps=3, run_name="shipped"),
        "--data.init_args.batch_size",
        "8",
        "--trainer.devices",
        "2",
        "--trainer.log_every_n_steps",
        "1",
    ]
    result = run_cli(
        *args, timeout=600, env={"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    version = tmp_path / "runs/shipped/version_0"
    assert yaml.safe_load((version / "config.yaml").read_text())["trainer"]["precision"] == "bf16-mixed"
    rows = list(csv.DictReader((version / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert "knn_top1" in json.loads((version / "metrics.json").read_text())


# Each "node" gets its own /dev/shm, as real nodes have: Streaming keeps node-local state in shared memory under
# names that only need to be unique within a node, so two nodes on one host would collide.
_OWN_SHM = [
    "unshare",
    "--mount",
    "sh",
    "-c",
    "mount -t tmpfs tmpfs /dev/shm && exec $0",
]


def _can_unshare() -> bool:
    import subprocess

    return subprocess.run([*_OWN_SHM[:-1], "mount -t tmpfs tmpfs /dev/shm"], capture_output=True).returncode == 0


@pytest.mark.skipif(
    not _can_unshare(), reason="needs `unshare --mount` (root) to give each simulated node its own /dev/shm"
)
def test_two_nodes_of_one_process_each_train_like_one_node(reference):
    """Multi-node as documented (docs/scale.md): one ``torchrun`` per node with ``--nnodes 2 --node_rank r`` and a
    shared master address; here both "nodes" are processes on 127.0.0.1, one CPU rank each, running FSDP2 (the mesh
    is then 2 nodes x 1 device: sharded across the nodes). The result equals the unsharded reference run."""
    import subprocess
    import sys

    from helpers import free_port

    tmp, data, init, ref_weights, ref_ids = reference
    record = tmp / "ids" / "two_nodes"
    args = [
        "fit",
        "--config",
        str(CONFIGS / "demo" / "dino_tiny.yaml"),
        *STRATEGIES["fsdp2"],
        "--config",
        str(_overlay(tmp / "two_nodes.yaml", record)),
        "--trainer.devices",
        "1",
        "--trainer.num_nodes",
        "2",
        "--run_name",
        "two_nodes",
        "--model.init_from",
        str(init),
        "--data.init_args.local",
        str(data),
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.num_canonical_nodes",
        "2",
    ]
    port = free_port()
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    os.chdir(tmp)
    nodes = []
    for rank in (0, 1):
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "-m",
            "lit_webssl",
            *args,
        ]
        nodes.append(
            subprocess.Popen(
                [*_OWN_SHM, shlex.join(torchrun)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    assert _ids(record) == ref_ids
    converted = tmp / "two_nodes_fp32.ckpt"
    assert (
        run_cli("checkpoint", "convert", str(tmp / "runs/two_nodes/checkpoints/last.ckpt"), str(converted)).returncode
        == 0
    )
    weights = read_state_dict(converted)
    worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights if k.startswith("objective.teacher."))
    assert worst <= 1e-6
