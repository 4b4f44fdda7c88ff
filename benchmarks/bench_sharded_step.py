"""Sharded strategies against a plain single-device run of the same Web-DINO model: images/s and peak memory, each
peak also against the planner (``python -m lit_webssl plan``).

Every run is the real CLI (``python -m lit_webssl fit``) on one device, with the same model, crops, per-device batch,
data and seed; only the strategy block differs:

* ``single``: the size config alone (``configs/webdino/vit_7b.yaml``: DDP on one device, bf16-mixed autocast);
* ``zero3``:  plus ``configs/strategy/deepspeed_zero3.yaml`` (bf16 weights, fp32 masters, the EMA's fp32 masters);
* ``fsdp2``:  plus ``configs/strategy/fsdp2.yaml`` (fp32 shards, bf16 all-gather and compute).

Activation checkpointing is on in all three (the blocks switch it on; ``--no-checkpointing`` turns it off in all).
``ThroughputMonitor`` times steps after a warm-up (the device synchronized around each step) and records
``torch.cuda.max_memory_allocated``; the table gives images/s and peak per strategy, the ratio to ``single`` in the
same invocation, and the planner's peak without its allowance (CUDA context, NCCL, fragmentation) against the
measured peak.

    python benchmarks/bench_sharded_step.py --size vit_l --batch-size 32 --steps 30       # ViT-L/14 Web-DINO
    python benchmarks/bench_sharded_step.py --size 7b --depth 4 --batch-size 12 --steps 20  # depth-reduced ViT-7B

``--cpu`` runs a smoke version on this 2-core box: the tiny demo model, 1 CPU process, DeepSpeed through the
test-only CPU strategy (``tests/cpu_strategies.py``); its peaks are host RSS, not comparable with the planner.
The data is the demo set (``python -m lit_webssl data demo``), built under ``--data`` if missing: crops are cut and
resized from it on the fly, so the step costs what it would on web images of any size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BLOCKS = {
    "single": [],
    "zero3": ["--config", str(CONFIGS / "strategy" / "deepspeed_zero3.yaml")],
    "fsdp2": ["--config", str(CONFIGS / "strategy" / "fsdp2.yaml")],
}
SIZES = {"vit_l": "webdino_300m", "7b": "webdino_7b"}
PEAK_ROW = re.compile(r"peak = .*?│\s*│\s*([\d.]+)\s*│")
ALLOWANCE_ROW = re.compile(r"allowance.*?│\s*\w+\s*│\s*([\d.]+)\s*│")


def model_args(args: argparse.Namespace) -> list[str]:
    """The size config and the overrides every strategy shares."""
    if args.cpu:
        return [
            "--config",
            str(CONFIGS / "demo" / "dino_tiny.yaml"),
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            "bf16-mixed",
            "--data.init_args.batch_size",
            str(args.batch_size),
        ]
    out = [
        "--config",
        str(CONFIGS / "webdino" / "vit_7b.yaml"),
        "--model.backbone",
        SIZES[args.size],
        "--trainer.accelerator",
        "gpu",
        "--data.init_args.batch_size",
        str(args.batch_size),
    ]
    if args.depth:
        out += ["--model.backbone_overrides.depth", str(args.depth)]
    return out


def strategy_args(name: str, args: argparse.Namespace) -> list[str]:
    out = list(BLOCKS[name])
    if args.cpu and name == "zero3":
        out += ["--trainer.strategy", "cpu_strategies.CPUDeepSpeedStrategy", "--trainer.strategy.stage", "3"]
    return out + ["--model.activation_checkpointing", str(not args.no_checkpointing).lower()]


def _env() -> dict[str, str]:
    """The environment of the runs: ``tests/`` importable (the CPU DeepSpeed strategy of ``--cpu``)."""
    return {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }


def run_fit(name: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One ``fit`` of ``args.steps`` steps; returns its ``metrics.json`` figures."""
    run = f"bench_{name}"
    cmd = [
        sys.executable,
        "-m",
        "lit_webssl",
        "fit",
        *model_args(args),
        *strategy_args(name, args),
        "--trainer.devices",
        "1",
        "--trainer.num_nodes",
        "1",
        "--trainer.max_steps",
        str(args.steps),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.callbacks",
        "lit_webssl.callbacks.ThroughputMonitor",
        "--trainer.callbacks.warmup_steps",
        str(args.warmup),
        "--trainer.callbacks.log_every_n_steps",
        "1000",
        "--data.init_args.local",
        str(args.data),
        "--data.init_args.num_workers",
        str(args.workers),
        "--run_name",
        run,
    ]
    result = subprocess.run(cmd, cwd=out, env=_env(), capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{name}: fit failed\n{' '.join(cmd)}\n{result.stderr[-4000:]}")
    versions = sorted((out / "runs" / run).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return json.loads((versions[-1] / "metrics.json").read_text())


def planned_peak(name: str, args: argparse.Namespace, out: Path) -> tuple[float, float]:
    """The planner's per-device peak and its allowance (GiB; none on CPU) for the same model, batch and block."""
    cmd = [
        sys.executable,
        "-m",
        "lit_webssl",
        "plan",
        *model_args(args),
        *strategy_args(name, args),
        "--devices",
        "1",
        "--nodes",
        "1",
    ]
    result = subprocess.run(cmd, cwd=out, capture_output=True, text=True, env={**_env(), "COLUMNS": "200"})
    peak, allowance = PEAK_ROW.search(result.stdout), ALLOWANCE_ROW.search(result.stdout)
    if result.returncode or not peak:
        raise SystemExit(f"{name}: plan failed\n{' '.join(cmd)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return float(peak.group(1)), float(allowance.group(1)) if allowance else 0.0  # no allowance on CPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="vit_l")
    parser.add_argument("--depth", type=int, default=None, help="blocks (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per device")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps not timed")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--strategies", default="single,zero3,fsdp2")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "demo")
    parser.add_argument("--cpu", action="store_true", help="a smoke run with the tiny demo model on CPU")
    args = parser.parse_args()
    args.data = args.data.resolve()
    if not (args.data / "train").exists():
        subprocess.run([sys.executable, "-m", "lit_webssl", "data", "demo", "--out", str(args.data)], check=True)
    names = args.strategies.split(",")
    if unknown := set(names) - set(BLOCKS):
        raise SystemExit(f"--strategies: unknown {sorted(unknown)}; choose from {sorted(BLOCKS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_sharded_") as tmp:
        for name in names:
            figures = run_fit(name, args, Path(tmp))
            plan, allowance = planned_peak(name, args, Path(tmp))
            rows.append((name, figures, plan, allowance))
    what = (
        "tiny demo model on CPU (peaks: host RSS)" if args.cpu else f"{SIZES[args.size]} depth {args.depth or 'full'}"
    )
    print(
        f"Web-DINO {what}, {args.batch_size} images/device, {args.steps} steps ({args.warmup} untimed), "
        f"activation checkpointing {'off' if args.no_checkpointing else 'on'}"
    )
    print(
        f"{'strategy':<8} {'img/s':>9} {'vs single':>9} {'peak GiB':>9} {'vs single':>9} {'planned':>8} "
        f"{'planned/measured':>16}"
    )
    base = next((f for n, f, _, _ in rows if n == "single"), rows[0][1])
    for name, figures, plan, allowance in rows:
        ips, peak = figures.get("images_per_sec", float("nan")), figures["peak_memory_gib"]
        print(
            f"{name:<8} {ips:>9.1f} {ips / base.get('images_per_sec', float('nan')):>8.3f}x {peak:>9.2f} "
            f"{peak / base['peak_memory_gib']:>8.3f}x {plan - allowance:>8.2f} {(plan - allowance) / peak:>16.3f}"
        )


if __name__ == "__main__":
    main()
