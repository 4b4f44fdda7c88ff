"""MAE view pipeline images/s: MDS shards through our uint8 pipeline vs torchvision ImageFolder + PIL, same JPEGs.

Both read the same JPEG bytes (written once as MDS shards and once as an ImageFolder tree), apply
RandomResizedCrop(224, scale=(0.2, 1), bicubic) + horizontal flip, and collate uint8 batches with the same number of
workers and batch size. One run measures both, alternating, and prints the median ratio (ours / reference).

    python benchmarks/bench_mae_pipeline.py --n-images 1000 --num-workers 2
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from streaming import MDSWriter
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from lit_webssl.datamodules import WebSSLDataModule
from lit_webssl.datamodules.demo import render
from lit_webssl.objectives.base import ViewSpec


def write_sources(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder = root / "folder" / "all"
    folder.mkdir(parents=True)
    with MDSWriter(out=str(root / "mds" / "train"), columns={"image": "bytes", "label": "int"}) as writer:
        for i in range(n):
            img, _ = render(i % 10, rng, size // 2)
            buf = io.BytesIO()
            img.resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=90)
            (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())
            writer.write({"image": buf.getvalue(), "label": i % 10})


def time_loader(loader) -> tuple[float, int]:
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["label"] if isinstance(batch, dict) else batch[1])
    return time.perf_counter() - start, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TMPDIR"] = tmp
        root = Path(tmp)
        write_sources(root, args.n_images, args.image_size)
        reference_tf = transforms.Compose([
            transforms.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(), transforms.PILToTensor(),
        ])
        reference = datasets.ImageFolder(str(root / "folder"), transform=reference_tf)
        ours, theirs = [], []
        for _ in range(args.repeats):
            dm = WebSSLDataModule(str(root / "mds"), val_split=None, batch_size=args.batch_size,
                                  num_workers=args.num_workers, pin_memory=False, drop_last=False)
            dm.set_views([ViewSpec("image", size=224, scale=(0.2, 1.0))])
            seconds, count = time_loader(dm.train_dataloader())
            ours.append(count / seconds)
            ref_loader = DataLoader(reference, batch_size=args.batch_size, shuffle=True,
                                    num_workers=args.num_workers)
            seconds, count = time_loader(ref_loader)
            theirs.append(count / seconds)
    ratios = [a / b for a, b in zip(ours, theirs)]
    print(f"images: {args.n_images} JPEG at {args.image_size}px, workers {args.num_workers}, batch {args.batch_size}")
    print(f"{'pipeline':<44}{'median img/s':>14}{'min':>10}{'max':>10}")
    for name, values in (("lit_webssl MDS + uint8 tensor views", ours), ("torchvision ImageFolder + PIL", theirs)):
        print(f"{name:<44}{statistics.median(values):>14.1f}{min(values):>10.1f}{max(values):>10.1f}")
    print(f"ratio ours/reference (median of per-repeat ratios): {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
