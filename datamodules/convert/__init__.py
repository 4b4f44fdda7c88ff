"""Convert an image folder, webdataset tar shards or parquet files to MDS shards, locally or on object storage.

    python -m lit_webssl data convert --from folder --in photos/ --out data/photos/train --sidecar captions.csv
    python -m lit_webssl data convert --from wds --in shards/ --out s3://bucket/web/train --workers 8
    python -m lit_webssl data convert --from parquet --in pq/ --out data/pq/train --min-size 64 --resume

Output schema (one MDS dataset, the split directory that ``WebSSLDataModule`` reads as ``<root>/<split>``):
``image`` (``bytes``: the original file when ``decode_image`` reads it as uint8 RGB, else a quality-95 JPEG
re-encoding), ``source`` (``str``: where the sample came from), and, when the input has them, ``caption`` (``str``,
``""`` where a sample has none) and ``label`` (``int``, ``-1`` where a sample has none).

Design: the inputs are listed in a fixed order and cut into chunks (``--chunk-size`` files of a folder, one tar
shard, one parquet row group). Each chunk is converted by one worker process into its own MDS sub-dataset
``<out>/part.NNNNN/`` and then marked complete by ``part.NNNNN/convert.done`` (its sample count, its skipped inputs
and its shard index). When every chunk is complete, the sub-indices are merged into ``<out>/index.json`` (as
Streaming's ``merge_index`` does: shard basenames ``part.NNNNN/shard.*.mds``), and the skipped inputs are listed in
``<out>/skipped.jsonl``. An interrupted run is finished by rerunning it with ``--resume``: complete chunks are kept,
incomplete ones are converted again from scratch, and, since a chunk's output depends only on its inputs, the
result is the same dataset, file for file, as an uninterrupted run. ``<out>/convert_plan.json`` records the inputs'
fingerprint and the options that shape the output, so a resume with different inputs or options is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lit_webssl.datamodules.convert.cli import build_parser, parse_args, parse_size
from lit_webssl.datamodules.convert.images import prepare_image
from lit_webssl.datamodules.convert.plan import ConvertError, ConvertOptions, ConvertSummary, Skip
from lit_webssl.datamodules.convert.run import convert
from lit_webssl.datamodules.convert.workers import convert_chunk
from lit_webssl.errors import ConfigError

__all__ = [
    "ConfigError",
    "ConvertError",
    "ConvertOptions",
    "ConvertSummary",
    "Skip",
    "build_parser",
    "convert",
    "convert_chunk",
    "main",
    "parse_args",
    "parse_size",
    "prepare_image",
]


def main(argv: Sequence[str] | None = None) -> ConvertSummary:
    """``python -m lit_webssl data convert --from {folder,wds,parquet} --in SRC --out DST [options]``."""
    opts = parse_args(argv)
    try:
        summary = convert(opts.source, opts.src, opts.out, opts)
    except ConvertError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    resumed = f", {summary.resumed} of them kept from an earlier run" if summary.resumed else ""
    print(
        f"converted {summary.samples} images ({summary.reencoded} re-encoded) in {summary.chunks} chunks"
        f"{resumed} to {summary.out} in {summary.seconds:.1f} s; skipped {summary.skipped} "
        f"(manifest: {summary.manifest})"
    )
    return summary
