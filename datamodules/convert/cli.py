"""The ``data convert`` command line: flags, their checks (one-line errors naming the flag)."""

from __future__ import annotations

import argparse
import os
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from lit_webssl.compat.streaming import uploader_schemes
from lit_webssl.datamodules.convert.output import is_remote
from lit_webssl.datamodules.convert.plan import (
    MANIFEST,
    SOURCES,
)
from lit_webssl.errors import ConfigError


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:
        return os.cpu_count() or 1


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the flag (``ConfigError``: the CLI prints it and exits 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def parse_size(text: str) -> int:
    """``67108864``, ``64MB``, ``64MiB``, ``1g`` -> bytes (K/M/G are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match:
        raise ValueError(text)
    return int(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " ")


def build_parser() -> argparse.ArgumentParser:
    """The ``data convert`` argument parser."""
    parser = _Parser(
        prog="python -m lit_webssl data convert",
        description="Convert an image folder, webdataset tar shards or parquet files to MDS shards "
        "(local directory or object storage such as s3://bucket/prefix; credentials and endpoint come "
        "from the environment, e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, S3_ENDPOINT_URL).",
    )
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES, help="input format")
    parser.add_argument(
        "--in", dest="src", required=True, metavar="SRC", help="input directory (searched recursively) or file"
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DST",
        help="output MDS dataset: a local directory or a URL (s3://, gs://, oci://, ...); point it "
        "at a split, e.g. data/mine/train",
    )
    parser.add_argument(
        "--workers", type=int, default=_usable_cpus(), help="worker processes (default: the CPU count, %(default)s)"
    )
    parser.add_argument(
        "--min-size",
        type=int,
        default=0,
        metavar="PX",
        help="skip images whose shorter side is below PX pixels (default: 0, keep all)",
    )
    parser.add_argument(
        "--shard-size",
        default="64MiB",
        metavar="BYTES",
        help="largest MDS shard, in bytes or with a unit (64MiB, 256MB; default: %(default)s)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=1000,
        metavar="N",
        help="images per unit of work for --from folder (a tar shard and a parquet row group are "
        "one unit each; default: %(default)s)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="finish an interrupted conversion into --out (complete chunks are kept)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a local --out that holds an MDS dataset or a conversion"
    )
    parser.add_argument(
        "--sidecar",
        metavar="FILE",
        help="--from folder: CSV/TSV (header row) or JSONL file with a path column (relative to "
        "--in) and caption and/or label columns",
    )
    parser.add_argument(
        "--class-folders",
        action="store_true",
        help="--from folder: label = index of the top-level subfolder name among the sorted names (ImageFolder layout)",
    )
    parser.add_argument("--image-field", metavar="NAME", help="--from parquet: the image column (default: detected)")
    parser.add_argument(
        "--caption-field",
        metavar="NAME",
        help="caption field of the sidecar, wds json or parquet (default: caption, text, txt, ...)",
    )
    parser.add_argument(
        "--label-field",
        metavar="NAME",
        help="label field of the sidecar, wds json or parquet (default: label, cls, class, ...)",
    )
    parser.add_argument(
        "--manifest",
        metavar="FILE",
        help=f"local copy of the skipped-inputs list (always also written as <out>/{MANIFEST}; "
        f"default for a remote --out: ./{MANIFEST})",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check the flags; bad ones raise ``ConfigError`` naming the flag."""
    opts = build_parser().parse_args(argv)
    for flag, value, low in (
        ("--workers", opts.workers, 1),
        ("--min-size", opts.min_size, 0),
        ("--chunk-size", opts.chunk_size, 1),
    ):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    try:
        opts.shard_size = parse_size(opts.shard_size)
    except ValueError:
        raise ConfigError(f"--shard-size: {opts.shard_size!r} is not a size (e.g. 67108864, 64MiB, 256MB)") from None
    if opts.shard_size < 1024:
        raise ConfigError(f"--shard-size must be >= 1024 bytes, got {opts.shard_size}")
    for flag, value in (("--sidecar", opts.sidecar), ("--class-folders", opts.class_folders)):
        if value and opts.source != "folder":
            raise ConfigError(f"{flag}: only for --from folder (got --from {opts.source})")
    if opts.image_field and opts.source != "parquet":
        raise ConfigError(f"--image-field: only for --from parquet (got --from {opts.source})")
    if opts.resume and opts.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if is_remote(opts.src):
        raise ConfigError(f"--in: {opts.src} is a URL; the converter reads local inputs (download them first)")
    if not Path(opts.src).exists():
        raise ConfigError(f"--in: nothing at {opts.src}")
    if not is_remote(opts.out):
        src, out = Path(opts.src).resolve(), Path(opts.out).resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ConfigError(f"--out: {opts.out} and --in {opts.src} must not contain one another")
    if is_remote(opts.out):
        scheme = urllib.parse.urlparse(opts.out).scheme
        if scheme not in uploader_schemes():
            raise ConfigError(
                f"--out: Streaming cannot write to {scheme}:// (schemes: {', '.join(uploader_schemes())})"
            )
    return opts
