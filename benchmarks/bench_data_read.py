"""Read throughput of the same images from three places, side by side in one run: local MDS shards, MDS shards on an
S3 server on loopback (moto, remote + a cold local cache; then again with the cache filled) and a torchvision
``ImageFolder``.

Every path does the same work per image: read the encoded bytes, ``decode_image`` and one random-resized-crop view
(``MultiViewTransform``), batched by a ``DataLoader`` with the same worker count. The images are drawn by the demo
generator (512 px JPEGs, about 100 kB each), written once as a class-folder tree and converted to MDS with
``python -m lit_webssl data convert --from folder``.

    python benchmarks/bench_data_read.py                         # 2000 images of 512 px, 2 loader workers
    python benchmarks/bench_data_read.py --images 500 --workers 0 --repeats 1

Each source reads one epoch per round, the rounds go over the sources in turn (so load from other processes falls on
all of them alike) and the table shows the median and range of images/s.

Only loopback traffic: the S3 server is ``python -m moto.server`` on 127.0.0.1 (a subprocess, so it does not share
the reader's interpreter lock); dummy credentials and ``S3_ENDPOINT_URL`` are set in this process's environment.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from streaming.base.util import clean_stale_shared_memory
from torch.utils.data import DataLoader

from lit_webssl.datamodules import convert as cv
from lit_webssl.datamodules.demo import render
from lit_webssl.datamodules.streaming import MultiViewStreamingDataset
from lit_webssl.datamodules.transforms import MultiViewTransform, decode_image
from lit_webssl.objectives.base import ViewSpec

VIEWS = [ViewSpec("global", size=64, count=1, scale=(0.3, 1.0))]
SOURCES = (
    "local MDS (StreamingDataset)",
    "S3 on loopback, cold cache",
    "S3, warm cache (second read)",
    "torchvision ImageFolder",
)


def make_image_folder(root: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    """``n`` demo-texture JPEGs (quality 90) in ten class folders under ``root`` (kept if already complete); sides
    over 256 px are drawn at 256 px and upscaled."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{n} {size} {seed}":
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        picture, _ = render(i % 10, rng, min(size, 256))
        if size > 256:  # drawing is the slow part: upscale (bicubic) and add fresh sensor noise
            noise = rng.normal(0.0, 4.0, (size, size, 3))
            upscaled = np.asarray(picture.resize((size, size), Image.BICUBIC), dtype=np.float32)
            picture = Image.fromarray(np.clip(upscaled + noise, 0, 255).astype(np.uint8))
        path = root / f"class{i % 10}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
    done.write_text(f"{n} {size} {seed}")
    return root


class _FolderViews(torch.utils.data.Dataset):
    """torchvision ``ImageFolder`` listing; bytes -> ``decode_image`` -> the same views as the MDS datasets."""

    def __init__(self, root: Path) -> None:
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(str(root), loader=lambda p: Path(p).read_bytes())
        self.transform = MultiViewTransform(VIEWS)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, idx: int) -> dict:
        data, label = self.folder[idx]
        return {"views": self.transform(decode_image(data)), "label": label}


def _timed(loader: DataLoader, expected: int) -> float:
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += batch["views"]["global"].shape[0]
    elapsed = time.perf_counter() - start
    if seen != expected:
        raise RuntimeError(f"read {seen} images, expected {expected}")
    return seen / elapsed


def _streaming(local: str, remote: str | None, batch: int, workers: int) -> DataLoader:
    clean_stale_shared_memory()
    dataset = MultiViewStreamingDataset(
        views=VIEWS, local=local, remote=remote, split="train", shuffle=True, batch_size=batch, shuffle_seed=0
    )
    return DataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=False)


def _loader(name: str, args: argparse.Namespace, mds: Path, cache: Path, folder: Path, repeat: int) -> DataLoader:
    """The loader of source ``name`` (one of ``SOURCES``); the two S3 sources share ``cache`` (cold, then warm)."""
    if name == SOURCES[0]:
        return _streaming(str(mds), None, args.batch, args.workers)
    if name in SOURCES[1:3]:
        return _streaming(str(cache), "s3://bench/mds", args.batch, args.workers)
    return DataLoader(
        _FolderViews(folder),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        generator=torch.Generator().manual_seed(repeat),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server() -> tuple[subprocess.Popen, str]:
    """``python -m moto.server`` on 127.0.0.1 (a free port), with this process's environment pointed at it."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(endpoint, timeout=1)  # noqa: S310  (loopback only)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "S3_ENDPOINT_URL": endpoint,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    return server, endpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: %(default)s)")
    parser.add_argument("--shard-size", default="16MiB", help="MDS shard size (default: %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds over the sources; the median is shown (default: %(default)s)"
    )
    parser.add_argument("--dir", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_data_read_"))
    os.environ["TMPDIR"] = str(work / "tmp")  # Streaming's lock files
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(work / "tmp")
    folder = make_image_folder(work / "images", args.images, args.size)
    mds = work / "mds"
    shutil.rmtree(mds, ignore_errors=True)
    cv.main(
        [
            "--from",
            "folder",
            "--in",
            str(folder),
            "--out",
            str(mds / "train"),
            "--class-folders",
            "--workers",
            "1",
            "--no-progress",
            "--shard-size",
            args.shard_size,
        ]
    )
    server, endpoint = start_s3_server()
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        for path in sorted(p for p in (mds / "train").rglob("*") if p.is_file()):
            client.upload_file(str(path), "bench", f"mds/train/{path.relative_to(mds / 'train').as_posix()}")
        n, rates = args.images, {name: [] for name in SOURCES}
        for repeat in range(args.repeats):  # round robin: load from other processes spreads over every source
            cache = work / f"s3_cache_{repeat}"
            shutil.rmtree(cache, ignore_errors=True)
            for name in SOURCES:
                rates[name].append(_timed(_loader(name, args, mds, cache, folder, repeat), n))
    finally:
        server.terminate()
        server.wait(timeout=30)
    size_mb = sum(p.stat().st_size for p in (mds / "train").rglob("*.mds")) / 2**20
    print(
        f"{n} images of {args.size} px ({size_mb:.1f} MiB of MDS shards), decode + one {VIEWS[0].size} px view, "
        f"batch {args.batch}, {args.workers} loader workers, torch threads 1, median of {args.repeats} rounds "
        "(each round: every source once, a fresh S3 cache)"
    )
    print(f"{'source':<32} {'images/s':>9} {'(min-max)':>12} {'vs local MDS':>13}")
    reference = statistics.median(rates[SOURCES[0]])
    for name, values in rates.items():
        middle = statistics.median(values)
        print(f"{name:<32} {middle:>9.0f} {f'({min(values):.0f}-{max(values):.0f})':>12} {middle / reference:>12.2f}x")
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
