"""``--from folder``: an image folder (optionally a caption/label sidecar, ``.txt`` captions beside the images,
or class folders), cut into chunks of ``--chunk-size`` images."""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lit_webssl.datamodules.convert.plan import (
    CAPTION_FIELDS,
    IMAGE_EXTENSIONS,
    LABEL_FIELDS,
    PATH_FIELDS,
    Chunk,
    Plan,
    Record,
    index_labels,
    label_value,
    make_options,
    pick_field,
)
from lit_webssl.errors import ConfigError


def read_sidecar(path: Path, opts: argparse.Namespace) -> tuple[dict[str, str], dict[str, Any]]:
    """``relative path -> caption`` and ``relative path -> raw label`` from a CSV/TSV (header row) or JSONL file."""
    if not path.is_file():
        raise ConfigError(f"--sidecar: no file at {path}")
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"--sidecar: line {number} of {path} is not JSON ({err.msg})") from None
        fields = sorted({key for row in rows for key in row})
    else:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            rows, fields = list(reader), list(reader.fieldnames or [])
    where = f"sidecar {path}"
    path_field = pick_field(PATH_FIELDS, fields, None, "--sidecar", where)
    if path_field is None:
        raise ConfigError(
            f"--sidecar: {path} has no path column (one of {', '.join(PATH_FIELDS)}; "
            f"fields: {', '.join(fields) or 'none'})"
        )
    caption_field = pick_field(CAPTION_FIELDS, fields, opts.caption_field, "--caption-field", where)
    label_field = pick_field(LABEL_FIELDS, fields, opts.label_field, "--label-field", where)
    captions, labels = {}, {}
    for row in rows:
        relative = Path(str(row[path_field])).as_posix().lstrip("./") if row.get(path_field) else None
        if relative is None:
            continue
        if caption_field and row.get(caption_field) not in (None, ""):
            captions[relative] = str(row[caption_field])
        if label_field:
            labels[relative] = label_value(row.get(label_field), where)
    return captions, labels


def plan_folder(root: Path, opts: argparse.Namespace) -> Plan:
    if not root.is_dir():
        raise ConfigError(f"--in: {root} is not a directory (--from folder reads an image folder)")
    sidecar = Path(opts.sidecar).absolute() if opts.sidecar else None
    files: dict[str, int] = {}
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(directory, name)
            if not name.startswith(".") and path.absolute() != sidecar:
                files[path.relative_to(root).as_posix()] = path.stat().st_size
    images = sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    stems = {os.path.splitext(f)[0] for f in images}
    caption_files = {
        os.path.splitext(f)[0]: f for f in files if f.lower().endswith(".txt") and os.path.splitext(f)[0] in stems
    }
    skipped = [
        {
            "source": f,
            "reason": "not_image",
            "detail": f"extension {os.path.splitext(f)[1] or '(none)'!r} is not one of {' '.join(IMAGE_EXTENSIONS)}",
        }
        for f in sorted(files)
        if f not in set(images) and f not in set(caption_files.values())
    ]
    captions, raw_labels = read_sidecar(sidecar, opts) if sidecar else ({}, {})
    for relative in sorted(set(captions) | set(raw_labels)):
        if relative not in files:
            skipped.append(
                {
                    "source": relative,
                    "reason": "missing_file",
                    "detail": f"listed in --sidecar {sidecar} but not found under --in",
                }
            )
    if opts.class_folders:
        if any(v is not None for v in raw_labels.values()):
            raise ConfigError("--class-folders: the --sidecar already gives labels; use one or the other")
        outside = [f for f in images if "/" not in f]
        skipped += [
            {"source": f, "reason": "no_class_folder", "detail": "--class-folders: file at the top of --in"}
            for f in outside
        ]
        images = [f for f in images if "/" in f]
        raw_labels = {f: f.split("/", 1)[0] for f in images}
    labels, classes = index_labels({f: raw_labels.get(f) for f in images}, "--sidecar")
    options = make_options(
        opts, caption=bool(captions) or bool(caption_files), label=any(v is not None for v in labels.values())
    )
    items = [(f, captions.get(f), caption_files.get(os.path.splitext(f)[0]), labels.get(f)) for f in images]
    size = opts.chunk_size
    chunks = [
        Chunk(i, "folder", tuple(items[start : start + size]), len(items[start : start + size]))
        for i, start in enumerate(range(0, len(items), size))
    ]
    return Plan("folder", str(root.absolute()), stamp_sizes(chunks, files), options, skipped, classes)


def stamp_sizes(chunks: list[Chunk], sizes: dict[str, int]) -> list[Chunk]:
    """Folder chunks carry each file's size (in the fingerprint: a changed file does not resume silently)."""
    return [Chunk(c.index, c.kind, tuple((*item, sizes[item[0]]) for item in c.items), c.size) for c in chunks]


def read_folder(chunk: Chunk, root: str) -> Iterator[Record]:
    for relative, caption, caption_file, label, _ in chunk.items:
        try:
            data = Path(root, relative).read_bytes()
        except OSError as err:
            yield Record(relative, None, reason="read_error", detail=str(err))
            continue
        if caption is None and caption_file is not None:
            try:
                caption = Path(root, caption_file).read_text(errors="replace").strip()
            except OSError:
                caption = None
        yield Record(relative, data, caption, label)
