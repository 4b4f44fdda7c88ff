"""Exact resume of the data position: 2 ranks (gloo, CPU, separate processes), 2 loader workers each, via the CLI.

The sample ids (``batch["index"]``) each rank trains on are recorded per step by a callback. A run interrupted
mid-epoch and resumed with ``--ckpt_path last``, and a run resumed from a checkpoint taken on an epoch's last step,
must see the uninterrupted run's ids step for step and rank for rank, across the epoch boundary; an epoch has no
sample twice and the first covers every sample. Most runs fork their ranks (``ddp_fork``: no re-import, seconds);
the resumed run of the interrupted one starts each rank as its own interpreter, with the environment Lightning's
script launcher gives its ranks (``devices: N`` on a GPU node).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import yaml
from helpers import CONFIGS, free_port

from lit_webssl.cli import main

HERE = Path(__file__).resolve().parent
N_TRAIN, BATCH, RANKS = 48, 4, 2  # the `demo_root` fixture's training split
STEPS_PER_EPOCH = N_TRAIN // (BATCH * RANKS)  # 6
STEPS = 10  # an epoch and a half


class RecordSampleIds(L.Callback):
    """Appends ``{"step", "epoch", "index"}`` of every training batch to ``<out>/<tag>.rank<R>.jsonl``.

    Args:
        out: Directory of the record files.
        tag: Name of this run's records.
    """

    def __init__(self, out: str, tag: str) -> None:
        self.out, self.tag = out, tag

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch, "index": batch["index"].tolist()}
        with open(os.path.join(self.out, f"{self.tag}.rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def _config(out: Path, tag: str) -> str:
    """mae_tiny shrunk to a one-block ViT, checkpoints every 3 steps (kept), the recorder, no validation."""
    config = yaml.safe_load((CONFIGS / "demo" / "mae_tiny.yaml").read_text())
    config["trainer"].update(
        devices=RANKS,
        accelerator="cpu",
        limit_val_batches=0,
        val_check_interval=None,
        check_val_every_n_epoch=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        log_every_n_steps=1,
        callbacks=[
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True, "every_n_train_steps": 3, "save_top_k": -1},
            },
            {"class_path": "test_data_resume.RecordSampleIds", "init_args": {"out": str(out), "tag": tag}},
        ],
    )
    config["model"]["backbone_overrides"].update(embed_dim=32, depth=1, num_heads=2)
    config["model"]["objective"]["init_args"].update(decoder_dim=16, decoder_depth=1, decoder_heads=2)
    config["model"]["optim"]["total"] = 100  # one schedule for every run length
    path = out / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _args(data: Path, out: Path, tag: str, run: str, steps: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        _config(out, tag),
        "--run_name",
        run,
        "--trainer.max_steps",
        str(steps),
        "--data.init_args.local",
        str(data),
        "--data.init_args.batch_size",
        str(BATCH),
        "--data.init_args.num_workers",
        "2",
        "--data.init_args.val_split",
        "null",
        *extra,
    ]


def _fork_fit(*args: str) -> None:
    """Fit in this process, the ranks forked (``ddp_fork``; MAE's decoder-only mask token leaves DDP unused
    parameters)."""
    main([*args, "--trainer.strategy", "ddp_fork_find_unused_parameters_true"])


def _script_fit(*args: str) -> None:
    """Fit with every rank a separate interpreter, started at once with the environment Lightning's script launcher
    gives its ranks (``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``, the rendezvous; no ``RANK`` and no
    ``LOCAL_WORLD_SIZE``, which Streaming reads)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        PYTHONWARNINGS="ignore",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        NODE_RANK="0",
        WORLD_SIZE=str(RANKS),
        PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    )
    command = [sys.executable, "-m", "lit_webssl", *args, "--trainer.strategy", "ddp_find_unused_parameters_true"]
    logs = [open(out, "w+") for out in (f"script_rank{r}.log" for r in range(RANKS))]  # noqa: SIM115
    ranks = [
        subprocess.Popen(command, env={**env, "LOCAL_RANK": str(r)}, stdout=logs[r], stderr=subprocess.STDOUT)
        for r in range(RANKS)
    ]
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in ranks) and time.monotonic() < deadline:
        if any(p.returncode for p in ranks):  # one rank failed: the others would wait for it until gloo's timeout
            break
        time.sleep(0.2)
    for p in ranks:
        if p.poll() is None:
            p.kill()
            p.wait()
    for r, (p, log) in enumerate(zip(ranks, logs, strict=True)):
        log.seek(0)
        assert p.returncode == 0, f"rank {r} (exit {p.returncode}): {log.read()[-3000:]}"
        log.close()


def _records(out: Path, tag: str) -> list[dict[str, Any]]:
    """Per step: ``{"step", "epoch", "index": [ids of rank 0, ids of rank 1]}``."""
    ranks = [
        [json.loads(line) for line in (out / f"{tag}.rank{r}.jsonl").read_text().splitlines()] for r in range(RANKS)
    ]
    steps = []
    for rows in zip(*ranks, strict=True):
        assert len({(row["step"], row["epoch"]) for row in rows}) == 1, rows
        steps.append({"step": rows[0]["step"], "epoch": rows[0]["epoch"], "index": [row["index"] for row in rows]})
    return steps


@pytest.mark.distributed
def test_resumed_runs_see_the_uninterrupted_sample_sequence(demo_root, tmp_path):
    out = tmp_path
    _fork_fit(*_args(demo_root, out, "straight", "straight", STEPS))
    _fork_fit(*_args(demo_root, out, "first", "interrupted", 4))  # ends mid-epoch 0, a step after a checkpoint
    _script_fit(*_args(demo_root, out, "resumed", "interrupted", STEPS, "--ckpt_path", "last"))
    epoch_end = Path("runs/straight/checkpoints") / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    _fork_fit(*_args(demo_root, out, "from_epoch_end", "from_epoch_end", STEPS, "--ckpt_path", str(epoch_end)))

    straight = _records(out, "straight")
    assert [s["step"] for s in straight] == list(range(STEPS))
    assert [s["epoch"] for s in straight] == [0] * STEPS_PER_EPOCH + [1] * (STEPS - STEPS_PER_EPOCH)
    for epoch, steps in ((0, straight[:STEPS_PER_EPOCH]), (1, straight[STEPS_PER_EPOCH:])):
        ids = [i for s in steps for rank in s["index"] for i in rank]
        assert len(ids) == len(set(ids)), f"a sample twice in epoch {epoch}"
        if epoch == 0:
            assert sorted(ids) == list(range(N_TRAIN)), "epoch 0 skipped samples"

    # The interrupted run ended at step 4; its newest checkpoint is step 3's (`last`), so step 3 is trained again.
    assert _records(out, "first") == straight[:4]
    assert _records(out, "resumed") == straight[3:]  # ids, steps and Lightning's epoch number, across the boundary

    from_epoch_end = _records(out, "from_epoch_end")
    assert from_epoch_end == straight[STEPS_PER_EPOCH:]  # ids, steps and Lightning's epoch number
