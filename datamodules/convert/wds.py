"""``--from wds``: webdataset tar shards, one chunk each (members grouped by key, as webdataset does)."""

from __future__ import annotations

import argparse
import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lit_webssl.datamodules.convert.plan import (
    CAPTION_FIELDS,
    LABEL_FIELDS,
    TAR_SUFFIXES,
    WDS_IMAGE_EXTENSIONS,
    Chunk,
    ConvertOptions,
    Plan,
    Record,
    input_files,
    make_options,
    pick_field,
)


def wds_key(name: str) -> tuple[str, str]:
    """webdataset's grouping: ``dir/key.ext1.ext2`` -> (``dir/key``, ``ext1.ext2``)."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def plan_wds(root: Path, opts: argparse.Namespace) -> Plan:
    tars = input_files(root, TAR_SUFFIXES, "wds")
    base = root if root.is_dir() else root.parent
    # columns from the first shard: caption with .txt members or a json caption field, label with .cls or json label
    caption = label = False
    try:
        with tarfile.open(tars[0], "r:*") as tar:
            for member in tar:
                _, ext = wds_key(member.name)
                caption |= ext == "txt"
                label |= ext == "cls"
                if ext == "json" and member.isfile():
                    try:
                        meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        continue
                    if isinstance(meta, dict):
                        caption |= (
                            pick_field(
                                CAPTION_FIELDS,
                                list(meta),
                                opts.caption_field,
                                "--caption-field",
                                f"{member.name} of {tars[0]}",
                            )
                            is not None
                        )
                        label |= (
                            pick_field(
                                LABEL_FIELDS,
                                list(meta),
                                opts.label_field,
                                "--label-field",
                                f"{member.name} of {tars[0]}",
                            )
                            is not None
                        )
    except (tarfile.TarError, OSError, EOFError):
        pass  # reported as a read error of that shard when it is converted
    chunks = [
        Chunk(i, "wds", (str(path), path.relative_to(base).as_posix(), path.stat().st_size))
        for i, path in enumerate(tars)
    ]
    return Plan("wds", str(root.absolute()), chunks, make_options(opts, caption=caption, label=label), [])


def _meta_fields(meta: Any, options: ConvertOptions) -> tuple[str | None, int | None]:
    if not isinstance(meta, dict):
        return None, None
    caption_field = options.caption_field or next((n for n in CAPTION_FIELDS if n in meta), None)
    label_field = options.label_field or next((n for n in LABEL_FIELDS if n in meta), None)
    caption = meta.get(caption_field) if caption_field else None
    label = meta.get(label_field) if label_field else None
    if isinstance(label, str) and re.fullmatch(r"-?\d+", label.strip()):
        label = int(label)
    return (None if caption is None else str(caption)), (label if isinstance(label, int) else None)


def _wds_record(source: str, members: dict[str, bytes], options: ConvertOptions) -> Record:
    caption = label = None
    if "json" in members:
        try:
            caption, label = _meta_fields(json.loads(members["json"]), options)
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    if "txt" in members:
        caption = members["txt"].decode("utf-8", errors="replace").strip()
    if "cls" in members:
        text = members["cls"].decode("utf-8", errors="replace").strip()
        label = int(text) if re.fullmatch(r"-?\d+", text) else label
    ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        return Record(
            source, None, reason="no_image", detail=f"no image member (members: {', '.join(sorted(members)) or 'none'})"
        )
    return Record(source, members[ext], caption, label)


def read_wds(chunk: Chunk, options: ConvertOptions) -> Iterator[Record]:
    path, name, _ = chunk.items
    wanted = set(WDS_IMAGE_EXTENSIONS) | {"txt", "json", "cls"}
    key, members = None, {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = wds_key(member.name)
                if member_key != key:
                    if key is not None:
                        yield _wds_record(f"{name}/{key}", members, options)
                    key, members = member_key, {}
                members[ext if ext in wanted else f"other:{ext}"] = (
                    tar.extractfile(member).read() if ext in wanted else b""
                )  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:  # the sample being read is dropped
        yield Record(name, None, reason="read_error", detail=f"tar shard unreadable after {key or 'its start'}: {err}")
        return
    if key is not None:
        yield _wds_record(f"{name}/{key}", members, options)
