"""Reading and writing the MDS splits being filtered, with Streaming's own shard readers and writer: every column
of a kept sample is copied as its encoded bytes."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from streaming import MDSWriter
from streaming.base.compression import decompress
from streaming.base.format import reader_from_json
from streaming.base.format.mds.encodings import mds_decode

from lit_webssl.errors import ConfigError

log = logging.getLogger(__name__)


def find_splits(root: Path) -> list[str]:
    """The splits of an MDS dataset directory: ``[""]`` for ``<root>/index.json``, else the names of the
    subdirectories that hold an ``index.json``."""
    if (root / "index.json").is_file():
        return [""]
    splits = (
        sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "index.json").is_file()) if root.is_dir() else []
    )
    if not splits:
        raise ConfigError(f"--in: {root} holds no MDS dataset (no index.json there or in a split subdirectory)")
    return splits


def read_index(split_dir: Path) -> list[dict[str, Any]]:
    """The shard entries of ``<split_dir>/index.json``, checked to be MDS with one column layout."""
    index = split_dir / "index.json"
    try:
        shards = json.loads(index.read_text())["shards"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"--in: cannot read the MDS index {index}: {err}") from err
    for info in shards:
        if info.get("format") != "mds":
            raise ConfigError(f"--in: {index} lists a {info.get('format')!r} shard; only MDS shards are filtered")
        if (info["column_names"], info["column_encodings"]) != (
            shards[0]["column_names"],
            shards[0]["column_encodings"],
        ):
            raise ConfigError(f"--in: the shards of {index} do not share one column layout")
    return shards


def _shard_root(split_dir: Path, info: dict[str, Any], scratch: Path) -> Path:
    """The directory holding the uncompressed file of a shard: ``split_dir``, or ``scratch`` with the shard
    decompressed into it when only its compressed file is there (as in a remote dataset's cache)."""
    raw = split_dir / info["raw_data"]["basename"]
    if raw.is_file():
        return split_dir
    zipped = info.get("zip_data")
    if not (zipped and (split_dir / zipped["basename"]).is_file()):
        raise ConfigError(f"--in: shard {raw} is missing")
    target = scratch / info["raw_data"]["basename"]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(decompress(info["compression"], (split_dir / zipped["basename"]).read_bytes()))
    return scratch


def iter_samples(split_dir: Path, shards: list[dict[str, Any]]) -> Iterator[dict[str, bytes]]:
    """Every sample of a split in order, as ``{column: encoded bytes}``.

    Read with Streaming's shard reader (``reader_from_json``) told that every column is ``bytes``, so it splits the
    samples into their columns and decodes none; a compressed-only shard is decompressed to a temporary directory
    first (the source is never written to).
    """
    for info in shards:
        with tempfile.TemporaryDirectory(prefix="lit_webssl_filter_") as scratch:
            root = _shard_root(split_dir, info, Path(scratch))
            undecoded = {**info, "column_encodings": ["bytes"] * len(info["column_names"])}
            reader = reader_from_json(str(root), "", undecoded)
            for i in range(len(reader)):
                yield reader.get_item(i)


def open_writer(out: Path, columns: dict[str, str], info: dict[str, Any]) -> MDSWriter:
    """An ``MDSWriter`` of ``columns`` into ``out`` with the compression, hashes and shard size of the source shard
    ``info``; write through :func:`lit_webssl.compat.streaming.write_encoded` so encoded columns are copied."""
    return MDSWriter(
        out=str(out),
        columns=columns,
        compression=info.get("compression"),
        hashes=info.get("hashes") or None,
        size_limit=info.get("size_limit") or 1 << 26,
        progress_bar=False,
    )


def decode_rgb(data: bytes, encoding: str) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` of an image column's encoded bytes (``bytes``, ``jpeg``, ``png``, ``pil``...)."""
    if encoding == "pil":
        return np.asarray(mds_decode(encoding, data).convert("RGB"))
    from lit_webssl.datamodules.transforms import decode_image

    return decode_image(data).permute(1, 2, 0).numpy()


def decode_or_none(data: bytes, encoding: str) -> np.ndarray | None:
    """:func:`decode_rgb`, or ``None`` (logged) for an undecodable image."""
    try:
        return decode_rgb(data, encoding)
    except (ValueError, OSError) as err:
        log.warning("dropping an undecodable image: %s", err)
        return None
