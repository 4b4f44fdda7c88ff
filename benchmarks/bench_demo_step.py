"""Training-step time of the demo model (configs/demo/mae_tiny.yaml's backbone and MAE objective) on this machine.

Times forward + backward + AdamW step on a synthetic batch (no data loading), after warm-up; prints ms/step and
images/s at the demo's batch size.

    python benchmarks/bench_demo_step.py --batch-size 256 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

from lit_webssl.models.presets import build_backbone
from lit_webssl.objectives import MAE, StepContext

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "mae_tiny.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    cfg = yaml.safe_load(CONFIG.read_text())["model"]
    torch.manual_seed(0)
    backbone = build_backbone(cfg["backbone"], cfg["backbone_overrides"])
    objective = MAE(**cfg["objective"]["init_args"])
    objective.configure(backbone)
    params = list(backbone.parameters()) + list(objective.parameters())
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)
    size = objective.crop_size
    batch = {"views": {"image": torch.randn(args.batch_size, 1, 3, size, size)}}
    times = []
    for step in range(args.steps + 2):
        start = time.perf_counter()
        loss = objective(batch, backbone, StepContext(step=step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(
        f"demo MAE step, batch {args.batch_size}, {torch.get_num_threads()} threads: "
        f"median {1000 * median:.0f} ms/step (min {1000 * min(times):.0f}, max {1000 * max(times):.0f}), "
        f"{args.batch_size / median:.0f} images/s"
    )


if __name__ == "__main__":
    main()
