"""Images/s of the MAE view pipeline: MDS shards + uint8 tensor views vs torchvision ImageFolder + PIL, same JPEGs.

Both pipelines read the very same JPEG bytes (written once into MDS shards and once as an ImageFolder tree), apply
RandomResizedCrop(224, scale=(0.2, 1), bicubic) + horizontal flip and return uint8 batches, with the same number of
workers and batch size. Ours: ``MultiViewStreamingDataset`` (torchvision.io decode + ``transforms.v2`` on uint8
tensors) in a ``StreamingDataLoader``; reference: ``ImageFolder`` + PIL ``transforms.Compose`` in a ``DataLoader``.
Each repeat runs both, alternating, over a whole epoch (worker start-up included); medians are reported.

    python benchmarks/bench_mae_pipeline.py --n-images 2000 --image-size 320 --num-workers 2 --batch-size 64
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from streaming import MDSWriter, StreamingDataLoader
from streaming.base.util import clean_stale_shared_memory
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from lit_webssl.datamodules import MultiViewStreamingDataset
from lit_webssl.datamodules.demo import CLASSES, render
from lit_webssl.objectives.base import ViewSpec

MAE_VIEW = ViewSpec("image", size=224, scale=(0.2, 1.0))


def write_sources(root: Path, n: int, size: int) -> float:
    """Draw ``n`` demo images of ``size`` px, JPEG them once, store the same bytes as MDS and as an ImageFolder."""
    rng = np.random.default_rng(0)
    total = 0
    with MDSWriter(
        out=str(root / "mds" / "train"), columns={"image": "bytes", "label": "int"}, progress_bar=False
    ) as writer:
        for i in range(n):
            label = i % len(CLASSES)
            picture, _ = render(label, rng, size)
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=90)
            data = buffer.getvalue()
            total += len(data)
            folder = root / "folder" / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:06d}.jpg").write_bytes(data)
            writer.write({"image": data, "label": label})
    return total / n


def ours(root: Path, batch_size: int, workers: int) -> StreamingDataLoader:
    """A fresh dataset and loader per measurement (a StreamingDataset is never shared between loaders)."""
    dataset = MultiViewStreamingDataset(
        views=[MAE_VIEW], local=str(root / "mds"), split="train", shuffle=True, batch_size=batch_size
    )
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=workers)


def reference(root: Path, batch_size: int, workers: int) -> DataLoader:
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ]
    )
    folder = datasets.ImageFolder(str(root / "folder"), transform=transform)
    return DataLoader(folder, batch_size=batch_size, shuffle=True, num_workers=workers)


def measure(loader: Iterable) -> tuple[float, float]:
    """(images/s over the whole epoch, images/s after the first batch) of one pass, checking the batch layout."""
    start = time.perf_counter()
    count, first_at, first_count = 0, None, 0
    for batch in loader:
        images = batch["views"]["image"].flatten(0, 1) if isinstance(batch, dict) else batch[0]
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 224, 224)
        count += len(images)
        if first_at is None:
            first_at, first_count = time.perf_counter(), count
    end = time.perf_counter()
    steady = (count - first_count) / (end - first_at) if end > first_at and count > first_count else float("nan")
    return count / (end - start), steady


@contextmanager
def source_tree(prefix: str, n_images: int, image_size: int) -> Iterator[Path]:
    """A temporary root holding the same JPEGs as MDS shards (``mds/``) and an ImageFolder (``folder/``), with
    Streaming's lock files kept inside it; prints what was written."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        os.environ["TMPDIR"] = tempfile.tempdir = tmp  # Streaming's lock files
        clean_stale_shared_memory()
        root = Path(tmp)
        start = time.perf_counter()
        mean_bytes = write_sources(root, n_images, image_size)
        print(
            f"wrote {n_images} JPEGs of {image_size} px (mean {mean_bytes / 1024:.1f} KiB) as MDS and "
            f"ImageFolder in {time.perf_counter() - start:.1f} s"
        )
        yield root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=2000, help="source images (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=320, help="source image side in px (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=2, help="loader workers (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="passes of each pipeline (default: %(default)s)")
    args = parser.parse_args()
    with source_tree("bench_mae_", args.n_images, args.image_size) as root:
        results: dict[str, list[tuple[float, float]]] = {"ours": [], "reference": []}
        for _ in range(args.repeats):
            results["ours"].append(measure(ours(root, args.batch_size, args.num_workers)))
            results["reference"].append(measure(reference(root, args.batch_size, args.num_workers)))
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, list[tuple[float, float]]]) -> None:
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}"
    )
    print(
        f"MAE view: RandomResizedCrop(224, scale=(0.2, 1), bicubic) + hflip; workers {args.num_workers}, "
        f"batch {args.batch_size}, {args.repeats} repeats (median)\n"
    )
    names = {"ours": "lit_webssl: MDS + decode_image + v2 uint8", "reference": "torchvision ImageFolder + PIL"}
    print(f"{'pipeline':<44}{'epoch img/s':>13}{'steady img/s':>14}")
    medians = {}
    for key, name in names.items():
        medians[key] = [statistics.median(r[i] for r in results[key]) for i in (0, 1)]
        print(f"{name:<44}{medians[key][0]:>13.1f}{medians[key][1]:>14.1f}")
    ratio = [a / b for a, b in zip(medians["ours"], medians["reference"], strict=True)]
    print(f"\nratio ours / reference: {ratio[0]:.2f}x (whole epoch), {ratio[1]:.2f}x (after the first batch)")


if __name__ == "__main__":
    main()
