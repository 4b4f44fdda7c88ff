"""The output root (local directory or object-storage URL), the chunks' completion markers, the merged index, and
the refusal to mix runs in one output."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lit_webssl.datamodules.convert.plan import (
    INDEX,
    MARKER,
    PLAN,
    ChunkResult,
    Plan,
)
from lit_webssl.errors import ConfigError


def is_remote(path: str) -> bool:
    scheme = urllib.parse.urlparse(path).scheme
    return bool(scheme) and not (len(scheme) == 1 and sys.platform == "win32")


class Output:
    """The output root: a local directory or an object-storage URL (written through Streaming's uploaders).

    Args:
        root: Local directory or URL (``s3://bucket/prefix``, ``gs://...``, any scheme Streaming uploads to).
    """

    def __init__(self, root: str) -> None:
        self.remote = is_remote(root)
        self.root = root.rstrip("/") if self.remote else str(Path(root).absolute())

    def join(self, *parts: str) -> str:
        """Path or URL of ``parts`` under the root."""
        return "/".join([self.root, *parts]) if self.remote else os.path.join(self.root, *parts)

    def list(self) -> set[str]:
        """Relative paths (``/``-separated) of every file under the root."""
        if not self.remote:
            root = Path(self.root)
            return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()
        from streaming.base.storage import CloudUploader

        with tempfile.TemporaryDirectory(prefix="lit_webssl_convert_") as tmp:
            keys = CloudUploader.get((tmp, self.root), exist_ok=True).list_objects() or []
        prefix = urllib.parse.urlparse(self.root).path.strip("/")
        return {key[len(prefix) :].lstrip("/") if prefix else key for key in keys}

    def read_text(self, relative: str) -> str:
        """Text of the file ``relative`` under the root."""
        if not self.remote:
            return Path(self.join(relative)).read_text()
        from streaming.base.storage import CloudDownloader

        with tempfile.TemporaryDirectory(prefix="lit_webssl_convert_") as tmp:
            local = os.path.join(tmp, "file")
            CloudDownloader.direct_download(self.join(relative), local)
            return Path(local).read_text()

    def write_text(self, relative: str, text: str) -> None:
        """Write (atomically for a local root) or upload the file ``relative`` under the root."""
        if not self.remote:
            path = Path(self.join(relative))
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            partial.write_text(text)
            os.replace(partial, path)
            return
        from streaming.base.storage import CloudUploader

        directory, _, name = relative.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="lit_webssl_convert_") as tmp:
            uploader = CloudUploader.get((tmp, self.join(directory) if directory else self.root), keep_local=True)
            Path(tmp, name).write_text(text)
            uploader.upload_file(name)


def part_name(index: int) -> str:
    """Directory of chunk ``index``'s sub-dataset, relative to the output root."""
    return f"part.{index:05d}"


def merged_index(results: Sequence[ChunkResult]) -> dict[str, Any]:
    """The dataset index of the sub-datasets: their shards in chunk order, basenames under ``part.NNNNN/``."""
    shards = []
    for result in sorted(results, key=lambda r: r.index):
        for shard in result.shards:
            shard = json.loads(json.dumps(shard))
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{part_name(result.index)}/{shard[key]['basename']}"
            shards.append(shard)
    return {"version": 2, "shards": shards}


def load_completed(output: Output, plan: Plan, files: set[str]) -> dict[int, ChunkResult]:
    done = {}
    for chunk in plan.chunks:
        name = f"{part_name(chunk.index)}/{MARKER}"
        if name in files:
            try:
                record = json.loads(output.read_text(name))
                done[chunk.index] = ChunkResult(**record)
            except (json.JSONDecodeError, TypeError, OSError):
                continue  # a damaged marker: convert the chunk again
    return done


def check_output(output: Output, plan: Plan, resume: bool, overwrite: bool) -> set[str]:
    """Refuse to mix runs: an existing output must hold the same plan and be resumed; returns its files."""
    files = output.list()
    if not files:
        return files
    if overwrite:
        if output.remote:
            raise ConfigError(
                f"--overwrite: only for a local --out; delete {output.root} yourself or pick a new prefix"
            )
        if PLAN not in files and INDEX not in files:  # never delete a directory that is not a dataset
            raise ConfigError(
                f"--overwrite: {output.root} is not empty and is no MDS dataset; remove it yourself "
                "or choose another --out"
            )
        shutil.rmtree(output.root)
        return set()
    if PLAN not in files:
        raise ConfigError(
            f"--out: {output.root} is not empty and holds no conversion ({PLAN}); pass --overwrite "
            "to replace it or choose another --out"
        )
    if not resume:
        raise ConfigError(
            f"--out: {output.root} holds a conversion; pass --resume to finish it (or --overwrite to start again)"
        )
    try:
        previous = json.loads(output.read_text(PLAN))
    except json.JSONDecodeError:
        raise ConfigError(f"--resume: {output.join(PLAN)} is damaged; pass --overwrite to start again") from None
    current = json.loads(json.dumps(plan.record()))
    differs = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    if "options" in differs:
        old, new = previous.get("options", {}), current["options"]
        differs = [d for d in differs if d != "options"] + sorted(
            f"options.{k}" for k in set(old) | set(new) if old.get(k) != new.get(k)
        )
    if differs:
        raise ConfigError(
            f"--resume: the conversion in {output.root} was made from other inputs or options "
            f"(differs: {', '.join(differs)}); rerun with the same flags or choose another --out"
        )
    return files
