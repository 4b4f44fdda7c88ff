"""Converter throughput: an image folder -> MDS shards with 1 worker and with N workers, same images, one run.

    python benchmarks/bench_convert.py                  # 2000 demo-texture JPEGs of 512 px, 1 vs 2 workers
    python benchmarks/bench_convert.py --workers 1 4 8 --repeats 1

Each conversion is a fresh ``python -m lit_webssl data convert --from folder`` in this process (every image read,
fully decoded and checked, JPEG bytes kept, shards written). Several workers run in a forkserver pool: the first pool
of a process starts the server, which imports torch once; that first conversion is shown on its own row. Then the
worker counts take turns for ``--repeats`` rounds and the table shows the median and range of images/s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from bench_data_read import make_image_folder

from lit_webssl.datamodules import convert as cv


def _convert(folder: Path, out: Path, workers: int, chunk_size: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    summary = cv.main(
        [
            "--from",
            "folder",
            "--in",
            str(folder),
            "--out",
            str(out),
            "--class-folders",
            "--workers",
            str(workers),
            "--chunk-size",
            str(chunk_size),
            "--no-progress",
        ]
    )
    return summary.samples / summary.seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default: 1 2)")
    parser.add_argument("--chunk-size", type=int, default=100, help="images per chunk (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the worker counts (default: %(default)s)")
    parser.add_argument("--dir", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_convert_"))
    folder = make_image_folder(work / "images", args.images, args.size)
    out = work / "converted"
    first = None
    if any(w > 1 for w in args.workers):
        workers = max(args.workers)
        first = (f"{workers} workers, first pool", _convert(folder, out, workers, args.chunk_size))
    rates: dict[int, list[float]] = {w: [] for w in args.workers}
    for _ in range(args.repeats):
        for workers in args.workers:
            rates[workers].append(_convert(folder, out, workers, args.chunk_size))
    print(
        f"\n{args.images} images of {args.size} px, folder -> local MDS, chunks of {args.chunk_size}, median of "
        f"{args.repeats} rounds"
    )
    print(f"{'workers':<40} {'images/s':>9} {'(min-max)':>12} {'vs 1 worker':>12}")
    reference = statistics.median(rates[args.workers[0]])
    for workers, values in rates.items():
        middle = statistics.median(values)
        name = f"{workers} worker{'s' if workers > 1 else ''}"
        print(f"{name:<40} {middle:>9.0f} {f'({min(values):.0f}-{max(values):.0f})':>12} {middle / reference:>11.2f}x")
    if first is not None:
        print(f"{first[0] + ' (forkserver start)':<40} {first[1]:>9.0f} {'':>12} {first[1] / reference:>11.2f}x")
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
