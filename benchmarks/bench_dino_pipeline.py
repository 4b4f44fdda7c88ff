"""Images/s of the Web-DINO multi-crop view pipeline: MDS + uint8 tensor views vs a dinov2-style PIL pipeline.

Every image gives the views of ``DINOv2().views()``: 2 global crops of 224 px (scale 0.32-1) and 8 local crops of
98 px (scale 0.05-0.32), each with RandomResizedCrop (bicubic), horizontal flip, ColorJitter(0.4, 0.4, 0.2, 0.1)
with p 0.8, grayscale p 0.2, Gaussian blur (kernel 9, sigma 0.1-2) with p 1.0 / 0.1 / 0.5 and solarize p 0.2 on the
second global crop. All pipelines read the very same JPEG bytes (written once into MDS shards and once as an
ImageFolder tree by ``bench_mae_pipeline.write_sources``), with the same number of workers and batch size:

* ours: ``MultiViewStreamingDataset`` (``decode_image`` + ``MultiViewTransform``: crop and resize with uint8
  ``transforms.v2``, colour ops on one float copy of each crop, ``lit_webssl.datamodules.photometric``) in the
  ``ResumableStreamingLoader`` that ``WebSSLDataModule`` builds; batches stay uint8.
* reference: ``ImageFolder`` + PIL decode + torchvision (v1) transforms laid out as dinov2's
  ``data/augmentations.py::DataAugmentationDINO`` (colour ops on PIL images, blur through torchvision's tensor
  kernel, then ``ToTensor`` + ``Normalize``); batches are float. The blur probabilities are the documented ones
  (1.0 / 0.1 / 0.5), as ours; dinov2's code passes ``1 - p`` to ``RandomApply`` (see its GaussianBlur), which
  ``--dinov2-blur-as-coded`` reproduces.
* uint8: ours with torchvision's uint8 colour kernels op by op (``MultiViewTransform(specs, photometric="uint8")``,
  the implementation before the float kernels). Same random draws; outputs equal ours up to rounding (the max
  difference is printed).

Each repeat runs the pipelines in rotating order over a whole epoch (worker start-up included; "steady" leaves out
the first batch of each worker); medians are reported. A single-process, single-thread breakdown follows (ms per
image: decode, crop + resize, colour ops, ...), the three pipelines interleaved image by image.

    python benchmarks/bench_dino_pipeline.py --n-images 512 --image-size 448 --num-workers 2 --batch-size 64
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import PIL
import torch
import torchvision
from bench_mae_pipeline import source_tree  # run as a script: benchmarks/ is on sys.path
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.transforms import v2

from lit_webssl.datamodules import MultiViewStreamingDataset, MultiViewTransform, decode_image
from lit_webssl.datamodules.loader import ResumableStreamingLoader
from lit_webssl.objectives import DINOv2
from lit_webssl.objectives.base import IMAGENET_MEAN, IMAGENET_STD, ViewSpec

PIPELINES = {
    "ours": "lit_webssl: MDS + decode_image + v2 + float colour",
    "uint8": "lit_webssl with torchvision's uint8 colour kernels",
    "reference": "dinov2-style: ImageFolder + PIL",
}


# -- reference: dinov2's DataAugmentationDINO on PIL images ------------------------------------------------------
class DINOv2Augmentation:
    """The crops of dinov2 ``DataAugmentationDINO`` from the same specs: PIL in, float normalized tensors out.

    Returns ``{"global_crops": [2 x (3, S, S)], "local_crops": [L x (3, s, s)]}`` (dinov2 also returns the global
    crops a second time for the teacher, the same tensors, and an empty ``offsets``).
    """

    def __init__(self, specs: Sequence[ViewSpec], blur_as_coded: bool = False) -> None:
        by_name = {s.name: s for s in specs}
        g1, g2, local = by_name["global1"], by_name["global2"], by_name["local"]
        self.n_local = local.count
        bicubic = transforms.InterpolationMode.BICUBIC

        def geometric(spec: ViewSpec) -> list[Callable]:
            return [
                transforms.RandomResizedCrop(spec.size, scale=spec.scale, interpolation=bicubic),
                transforms.RandomHorizontalFlip(p=spec.hflip_p),
            ]

        def blur(p: float) -> Callable:  # dinov2's GaussianBlur(p) builds RandomApply(p=1 - p)
            return transforms.RandomApply(
                [transforms.GaussianBlur(9, sigma=g1.blur_sigma)], p=1.0 - p if blur_as_coded else p
            )

        colour = [
            transforms.RandomApply([transforms.ColorJitter(*g1.color_jitter)], p=g1.color_jitter_p),
            transforms.RandomGrayscale(p=g1.grayscale_p),
        ]
        normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.global1 = geometric(g1) + colour + [blur(g1.blur_p)] + normalize
        self.global2 = (
            geometric(g2)
            + colour
            + [blur(g2.blur_p)]
            + [transforms.RandomSolarize(threshold=128, p=g2.solarize_p)]
            + normalize
        )
        self.local = geometric(local) + colour + [blur(local.blur_p)] + normalize

    @staticmethod
    def _apply(ops: Iterable[Callable], image: Any) -> Tensor:
        for op in ops:
            image = op(image)
        return image

    def __call__(self, image: Image.Image) -> dict[str, list[Tensor]]:
        return {
            "global_crops": [self._apply(self.global1, image), self._apply(self.global2, image)],
            "local_crops": [self._apply(self.local, image) for _ in range(self.n_local)],
        }

    def op_lists(self) -> list[list[Callable]]:
        return [self.global1, self.global2, self.local]


# -- loaders and measurement -------------------------------------------------------------------------------------
def loader(kind: str, root: Path, batch_size: int, workers: int, blur_as_coded: bool) -> Iterable:
    """A fresh dataset and loader per measurement (a StreamingDataset is never shared between loaders)."""
    specs = DINOv2().views()
    if kind == "reference":
        folder = datasets.ImageFolder(str(root / "folder"), transform=DINOv2Augmentation(specs, blur_as_coded))
        return DataLoader(folder, batch_size=batch_size, shuffle=True, num_workers=workers)
    views = {"views": specs} if kind == "ours" else {"transform": MultiViewTransform(specs, photometric="uint8")}
    dataset = MultiViewStreamingDataset(
        **views, local=str(root / "mds"), split="train", shuffle=True, batch_size=batch_size
    )
    return ResumableStreamingLoader(dataset, batch_size=batch_size, num_workers=workers)


def measure(batches: Iterable, warm: int) -> tuple[float, float]:
    """(images/s over the whole epoch, images/s after the first ``warm`` batches) of one pass, checking the batches.

    With W workers the first W batches arrive together (each worker builds one), so ``warm = W`` leaves out the
    start-up: workers' launch and the first batch of each.
    """
    start = time.perf_counter()
    count, warm_at, warm_count = 0, None, 0
    for i, batch in enumerate(batches):
        if isinstance(batch, dict):  # ours: {"views": {name: uint8 (B, count, 3, S, S)}, ...}
            views = batch["views"]
            assert views["global1"].dtype == torch.uint8 and views["global1"].shape[1:] == (1, 3, 224, 224)
            assert views["local"].shape[1:] == (8, 3, 98, 98)
            count += len(batch["index"])
        else:  # reference: ({"global_crops": [2 x (B, 3, 224, 224)], "local_crops": [8 x (B, 3, 98, 98)]}, labels)
            crops, labels = batch
            assert len(crops["global_crops"]) == 2 and crops["global_crops"][0].shape[1:] == (3, 224, 224)
            assert len(crops["local_crops"]) == 8 and crops["local_crops"][0].shape[1:] == (3, 98, 98)
            count += len(labels)
        if i + 1 == max(warm, 1):
            warm_at, warm_count = time.perf_counter(), count
    end = time.perf_counter()
    steady = (count - warm_count) / (end - warm_at) if warm_at and count > warm_count else float("nan")
    return count / (end - start), steady


# -- single-thread breakdown -------------------------------------------------------------------------------------
STAGES = (
    "decode",
    "crop + resize",
    "flip",
    "colour jitter",
    "grayscale",
    "blur",
    "solarize",
    "dtype / normalize",
    "other",
)


def stage(op: Callable) -> str:
    """Breakdown bucket of one op (RandomApply counts with what it wraps, its coin flip included)."""
    inner = op.transforms[0] if isinstance(op, (v2.RandomApply, transforms.RandomApply)) else op
    names = {cls.__name__ for cls in type(inner).__mro__} | {getattr(inner, "__name__", "")}
    for key, bucket in (
        ("RandomResizedCrop", "crop + resize"),
        ("RandomHorizontalFlip", "flip"),
        ("ColorJitter", "colour jitter"),
        ("RandomGrayscale", "grayscale"),
        ("GaussianBlur", "blur"),
        ("RandomSolarize", "solarize"),
    ):
        if key in names:
            return bucket
    return "dtype / normalize"  # ToTensor, Normalize, to_float, to_uint8


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread, as in a loader worker (two threads on two shared cores spin and crawl on small ops)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Timed:
    """``op`` that adds its wall time to ``sink[bucket]``."""

    def __init__(self, op: Callable, bucket: str, sink: dict[str, float]) -> None:
        self.op, self.bucket, self.sink = op, bucket, sink

    def __call__(self, image: Any) -> Any:
        start = time.perf_counter()
        out = self.op(image)
        self.sink[self.bucket] += time.perf_counter() - start
        return out


def breakdown(files: list[bytes], blur_as_coded: bool, rounds: int = 2) -> dict[str, dict[str, float]]:
    """ms per image by stage, one thread in this process (as in one loader worker), pipelines interleaved."""
    specs = DINOv2().views()
    ours, uint8 = MultiViewTransform(specs), MultiViewTransform(specs, photometric="uint8")
    reference = DINOv2Augmentation(specs, blur_as_coded)
    sinks = {kind: defaultdict(float) for kind in PIPELINES}
    totals: dict[str, float] = defaultdict(float)
    for kind, transform in (("ours", ours), ("uint8", uint8)):
        for _, view in transform.transforms:
            view.ops = [Timed(op, stage(op), sinks[kind]) for op in view.ops]
    for ops in reference.op_lists():
        ops[:] = [Timed(op, stage(op), sinks["reference"]) for op in ops]

    def run_ours(transform: MultiViewTransform, sink: dict[str, float], data: bytes) -> None:
        start = time.perf_counter()
        image = decode_image(data)
        sink["decode"] += time.perf_counter() - start
        transform(image)

    def run_reference(data: bytes) -> None:
        start = time.perf_counter()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        sinks["reference"]["decode"] += time.perf_counter() - start
        reference(image)

    runs = {
        "ours": lambda d: run_ours(ours, sinks["ours"], d),
        "uint8": lambda d: run_ours(uint8, sinks["uint8"], d),
        "reference": run_reference,
    }
    with single_thread():
        for _ in range(rounds):
            for data in files:
                for kind, run in runs.items():
                    start = time.perf_counter()
                    run(data)
                    totals[kind] += time.perf_counter() - start
    n = rounds * len(files)
    table = {}
    for kind in PIPELINES:
        row = {key: 1000 * sinks[kind].get(key, 0.0) / n for key in STAGES[:-1]}
        row["other"] = 1000 * totals[kind] / n - sum(row.values())
        row["total"] = 1000 * totals[kind] / n
        table[kind] = row
    return table


def max_difference(files: list[bytes], n: int = 50) -> int:
    """Largest |uint8 kernels - ours| over all crops of ``n`` images, same seed per image (0 = identical)."""
    specs = DINOv2().views()
    ours, uint8 = MultiViewTransform(specs), MultiViewTransform(specs, photometric="uint8")
    worst = 0
    for i, data in enumerate(files[:n]):
        image = decode_image(data)
        with single_thread(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            a = ours(image)
            torch.manual_seed(i)
            b = uint8(image)
        worst = max(worst, *((a[k].int() - b[k].int()).abs().max().item() for k in a))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=512, help="source images (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=448, help="source image side in px (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=2, help="loader workers (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="epochs of each pipeline (default: %(default)s)")
    parser.add_argument(
        "--profile-images",
        type=int,
        default=60,
        help="images of the single-thread breakdown, 0 to skip it (default: %(default)s)",
    )
    parser.add_argument(
        "--dinov2-blur-as-coded",
        action="store_true",
        help="reference blurs with p 0 / 0.9 / 0.5, as dinov2's code does (default: documented p)",
    )
    args = parser.parse_args()
    with source_tree("bench_dino_", args.n_images, args.image_size) as root:
        files = [p.read_bytes() for p in sorted((root / "folder").rglob("*.jpg"))]
        worst = max_difference(files)
        results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in PIPELINES}
        order = list(PIPELINES)
        for i in range(args.repeats):
            for kind in order[i % len(order) :] + order[: i % len(order)]:
                batches = loader(kind, root, args.batch_size, args.num_workers, args.dinov2_blur_as_coded)
                results[kind].append(measure(batches, args.num_workers))
        table = breakdown(files[: args.profile_images], args.dinov2_blur_as_coded) if args.profile_images else None
    report(args, results, table, worst)


def report(
    args: argparse.Namespace,
    results: dict[str, list[tuple[float, float]]],
    table: dict[str, dict[str, float]] | None,
    worst: int,
) -> None:
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}"
    )
    blur = "0 / 0.9 / 0.5 (dinov2 as coded)" if args.dinov2_blur_as_coded else "1.0 / 0.1 / 0.5"
    print(
        f"DINO views: 2 x 224 + 8 x 98 crops per image, reference blur p {blur}; workers {args.num_workers}, "
        f"batch {args.batch_size}, {args.repeats} repeats (median)\n"
    )
    print(
        f"{'pipeline':<46}{'epoch img/s':>13}{'steady img/s':>14}{'vs reference':>14}   (steady: after the "
        f"first {max(args.num_workers, 1)} batches)"
    )
    medians = {kind: [statistics.median(r[i] for r in runs) for i in (0, 1)] for kind, runs in results.items()}
    for kind, name in PIPELINES.items():
        ratio = medians[kind][0] / medians["reference"][0]
        print(f"{name:<46}{medians[kind][0]:>13.1f}{medians[kind][1]:>14.1f}{ratio:>13.2f}x")
    for kind in ("ours", "uint8"):
        ratio = [a / b for a, b in zip(medians[kind], medians["reference"], strict=True)]
        print(f"ratio {kind} / reference: {ratio[0]:.2f}x (whole epoch), {ratio[1]:.2f}x (steady)")
    print(f"ours (float colour ops) vs uint8 kernels, same seeds: max |difference| {worst} (uint8 levels)")
    if table is None:
        return
    print(f"\nsingle-thread breakdown, ms per image ({args.profile_images} images x 2, interleaved):")
    print(f"{'stage':<20}" + "".join(f"{kind:>12}" for kind in PIPELINES))
    for key in (*STAGES, "total"):
        print(f"{key:<20}" + "".join(f"{table[kind][key]:>12.2f}" for kind in PIPELINES))
    print(
        f"{'ratio to reference':<20}"
        + "".join(f"{table['reference']['total'] / table[k]['total']:>11.2f}x" for k in PIPELINES)
    )


if __name__ == "__main__":
    main()
