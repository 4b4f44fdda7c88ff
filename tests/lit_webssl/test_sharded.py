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

import json
import os
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CONFIGS, REPO, run_cli, tiny_demo

from lit_webssl.checkpoint import checkpoint_kind, read_state_dict

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TESTS = REPO / "tests"
STEPS, PER_RANK = 4, 4
STRATEGIES = {
    "fsdp2": ["--config", str(CONFIGS / "strategy" / "fsdp2.yaml")],
    "zero3": ["--config", str(CONFIGS / "strategy" / "deepspeed_zero3.yaml"),
              "--trainer.strategy", "cpu_strategies.CPUDeepSpeedStrategy", "--trainer.strategy.stage", "3",
              "--trainer.gradient_clip_val", "null"],
}


def _overlay(path: Path, record: Path) -> Path:
    """The settings every run of this module shares (fp32, no rank-dependent randomness, weights that move)."""
    overlay = {
        "trainer": {
            "precision": "32-true", "max_steps": STEPS, "limit_val_batches": 0, "log_every_n_steps": 1,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"every_n_train_steps": 2, "save_last": True, "save_top_k": -1}},
                {"class_path": "sharded_probe.RecordBatches", "init_args": {"out": str(record)}},
            ],
        },
        "model": {
            "activation_checkpointing": False,
            # no separate iBOT head: with iBOT off it would get no gradient, and DeepSpeed, whose flat buffers hold
            # zeros for such parameters, still applies AdamW's decoupled weight decay to them (PyTorch skips them)
            "objective": {"init_args": {"koleo_weight": 0.0, "ibot_weight": 0.0, "clip_grad": 0.0,
                                        "ibot_separate_head": False,
                                        "freeze_last_layer": 0, "momentum_teacher": 0.9, "teacher_temp_warmup": 0}},
            # Adam's first steps move every weight by about +-lr whatever its gradient's size, so the rounding noise
            # of the gradient reduction (two halves vs one batch) reaches the weights in proportion to lr and 1 / eps:
            # lr and eps are chosen so the teacher moves 1e-4..1e-3 while that noise stays below 1e-6
            "optim": {"base_lr": 0.01, "warmup": 0, "total": STEPS, "eps": 1.0e-6},
        },
    }
    path.write_text(yaml.safe_dump(overlay))
    return path


def _fit(tmp: Path, data: Path, run: str, devices: int, extra: list[str], init: Path, *more: str):
    record = tmp / "ids" / run
    args = ["fit", "--config", str(CONFIGS / "demo" / "dino_tiny.yaml"), *extra,
            "--config", str(_overlay(tmp / f"{run}.yaml", record)),
            "--trainer.devices", str(devices), "--run_name", run, "--model.init_from", str(init),
            "--data.init_args.local", str(data), "--data.init_args.batch_size", str(8 // devices),
            "--data.init_args.num_workers", "0", "--data.init_args.num_canonical_nodes", "2", *more]
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
    from lit_webssl.cli import _cli

    cli = _cli(["--config", str(CONFIGS / "demo" / "dino_tiny.yaml"),
                "--config", str(_overlay(tmp / "init.yaml", tmp / "ids" / "init")),
                "--data.init_args.local", str(data), "--trainer.logger", "false"], run=False)
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
    worst = {part: max((weights[k] - ref_weights[k]).abs().max().item() for k in weights
                       if k.startswith("objective.teacher.") == (part == "teacher")) for part in ("teacher", "student")}
    assert worst["teacher"] <= 1e-6 and worst["student"] <= 1e-5, worst  # the student moves 10x the teacher

    # interrupted at step 2 (its sharded checkpoint), resumed to step 4: bit-identical to the uninterrupted run
    step2 = next(ckpt_dir.glob("*step=2*"))
    resumed = _fit(tmp, data, f"{strategy}_resumed", 2, extra, init, "--ckpt_path", str(step2))
    assert sorted(_ids(resumed)) == [2, 3]
    assert {s: ids for s, ids in _ids(resumed).items()} == {s: ref_ids[s] for s in (2, 3)}
    again = tmp / f"{strategy}_resumed_fp32.ckpt"
    assert run_cli("checkpoint", "convert", str(tmp / f"runs/{strategy}_resumed/checkpoints/last.ckpt"),
                   str(again)).returncode == 0
    resumed_weights = read_state_dict(again)
    for key, value in weights.items():
        assert torch.equal(value, resumed_weights[key]), key


# Each "node" gets its own /dev/shm, as real nodes have: Streaming keeps node-local state in shared memory under
# names that only need to be unique within a node, so two nodes on one host would collide.
_OWN_SHM = ["unshare", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm && exec $0", ]


def _can_unshare() -> bool:
    import subprocess

    return subprocess.run([*_OWN_SHM[:-1], "mount -t tmpfs tmpfs /dev/shm"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare --mount` (root) to give each simulated node its own "
                    "/dev/shm")
def test_two_nodes_of_one_process_each_train_like_one_node(reference):
    """Multi-node as documented (docs/scale.md): one ``torchrun`` per node with ``--nnodes 2 --node_rank r`` and a
    shared master address; here both "nodes" are processes on 127.0.0.1, one CPU rank each, running FSDP2 (the mesh
    is then 2 nodes x 1 device: sharded across the nodes). The result equals the unsharded reference run."""
    import subprocess
    import sys

    from helpers import free_port

    tmp, data, init, ref_weights, ref_ids = reference
    record = tmp / "ids" / "two_nodes"
    args = ["fit", "--config", str(CONFIGS / "demo" / "dino_tiny.yaml"), *STRATEGIES["fsdp2"],
            "--config", str(_overlay(tmp / "two_nodes.yaml", record)), "--trainer.devices", "1",
            "--trainer.num_nodes", "2", "--run_name", "two_nodes", "--model.init_from", str(init),
            "--data.init_args.local", str(data), "--data.init_args.batch_size", "4",
            "--data.init_args.num_workers", "0", "--data.init_args.num_canonical_nodes", "2"]
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    os.chdir(tmp)
    nodes = []
    for rank in (0, 1):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                    "-m", "lit_webssl", *args]
        nodes.append(subprocess.Popen([*_OWN_SHM, shlex.join(torchrun)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    assert _ids(record) == ref_ids
    converted = tmp / "two_nodes_fp32.ckpt"
    assert run_cli("checkpoint", "convert", str(tmp / "runs/two_nodes/checkpoints/last.ckpt"),
                   str(converted)).returncode == 0
    weights = read_state_dict(converted)
    worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights if k.startswith("objective.teacher."))
    assert worst <= 1e-6
