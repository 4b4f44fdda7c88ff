"""What a conversion is made of: the output options, the chunks of work and their results, the plan (recorded
for a resume) and the input fields a source may name."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lit_webssl.errors import ConfigError

SOURCES = ("folder", "wds", "parquet")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")  # preference order in a sample

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

CAPTION_FIELDS = ("caption", "text", "txt", "alt", "prompt")

LABEL_FIELDS = ("label", "cls", "class", "target")

IMAGE_FIELDS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")

PATH_FIELDS = ("path", "file", "filename", "file_name", "image")

PLAN, MANIFEST, MARKER, INDEX = "convert_plan.json", "skipped.jsonl", "convert.done", "index.json"

PLAN_VERSION = 1

JPEG_QUALITY = 95

REPORT_EVERY = 16


class ConvertError(RuntimeError):
    """A conversion that could not finish (an input or the output failed); the message says how to go on."""


class Skip(Exception):  # noqa: N818  (a control-flow signal, not an error of the program)
    """An input that does not become a sample: ``reason`` is a short code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ConvertOptions:
    """Settings that shape the output (recorded in the plan; a resume must use the same).

    Attributes:
        min_size: Smallest accepted shorter image side in pixels (0: any).
        shard_size: Largest MDS shard in bytes.
        caption: Write a ``caption`` column.
        label: Write a ``label`` column.
        image_field: Parquet column holding the image.
        caption_field: Sidecar / json / parquet field holding the caption.
        label_field: Sidecar / json / parquet field holding the label.
    """

    min_size: int = 0
    shard_size: int = 1 << 26
    caption: bool = False
    label: bool = False
    image_field: str | None = None
    caption_field: str | None = None
    label_field: str | None = None

    @property
    def columns(self) -> dict[str, str]:
        """MDS columns of the output."""
        columns = {"image": "bytes", "source": "str"}
        if self.caption:
            columns["caption"] = "str"
        if self.label:
            columns["label"] = "int"
        return columns


@dataclass(frozen=True)
class Chunk:
    """One unit of work: inputs that become the sub-dataset ``part.<index>``.

    Attributes:
        index: Chunk number (its position in the merged dataset).
        kind: ``folder``, ``wds`` or ``parquet``.
        items: ``folder``: ``(relative path, caption or None, caption file or None, label or None)`` per image;
            ``wds``: ``(tar path,)``; ``parquet``: ``(file, row group, first row of the group in the file)``.
        size: Inputs in the chunk when known in advance (images or rows), else 0.
    """

    index: int
    kind: str
    items: tuple
    size: int = 0


@dataclass
class ChunkResult:
    """What a converted chunk reports (and stores in its ``convert.done`` marker)."""

    index: int
    samples: int = 0
    reencoded: int = 0
    inputs: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    shards: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ConvertSummary:
    """The outcome of a conversion.

    Attributes:
        out: Output dataset (directory or URL).
        samples: Samples written.
        skipped: Inputs skipped (listed in the manifest).
        reencoded: Samples whose image was re-encoded.
        chunks: Chunks in the plan.
        resumed: Chunks found complete and kept.
        manifest: Path of the local copy of the manifest.
        seconds: Wall time of the run.
    """

    out: str
    samples: int
    skipped: int
    reencoded: int
    chunks: int
    resumed: int
    manifest: str
    seconds: float


@dataclass
class Plan:
    """Chunks, output options and the inputs skipped before conversion (not images, missing files...)."""

    source: str
    input: str
    chunks: list[Chunk]
    options: ConvertOptions
    skipped: list[dict[str, str]]
    classes: list[str] | None = None

    @property
    def total(self) -> int | None:
        """Inputs to convert, when known in advance (``None`` for tar shards)."""
        return None if self.source == "wds" else sum(c.size for c in self.chunks)

    def record(self) -> dict[str, Any]:
        """The plan file's content: what must match for a resume."""
        digest = hashlib.sha256()
        for chunk in self.chunks:
            digest.update(json.dumps([chunk.index, chunk.kind, chunk.items], default=str).encode())
        return {
            "version": PLAN_VERSION,
            "source": self.source,
            "input": self.input,
            "chunks": len(self.chunks),
            "fingerprint": digest.hexdigest(),
            "options": asdict(self.options),
            "classes": self.classes,
            "columns": self.options.columns,
        }


@dataclass
class Record:
    """One input sample before checking: ``image`` is ``None`` when the input gave no image (``reason``, ``detail``
    say why: ``no_image`` or ``read_error``)."""

    source: str
    image: bytes | None
    caption: str | None = None
    label: int | None = None
    reason: str = ""
    detail: str = ""


def pick_field(
    candidates: Sequence[str], available: Sequence[str], chosen: str | None, flag: str, where: str
) -> str | None:
    """The field to use: ``chosen`` (checked against ``available``) or the first candidate present."""
    if chosen is not None:
        if chosen not in available:
            raise ConfigError(f"{flag}: no field {chosen!r} in {where} (fields: {', '.join(available) or 'none'})")
        return chosen
    return next((name for name in candidates if name in available), None)


def label_value(value: Any, where: str) -> int | str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ConfigError(f"--label-field: label {value!r} in {where} is not an integer or a class name")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def index_labels(labels: dict[str, int | str | None], flag: str) -> tuple[dict[str, int | None], list[str] | None]:
    """Integer labels as they are; class names mapped to indices of the sorted names (the list is returned)."""
    names = sorted({v for v in labels.values() if isinstance(v, str)})
    if names and any(isinstance(v, int) for v in labels.values()):
        raise ConfigError(f"{flag}: labels mix integers and class names")
    if not names:
        return dict(labels), None  # type: ignore[arg-type]
    lookup = {name: i for i, name in enumerate(names)}
    return {k: (None if v is None else lookup[v]) for k, v in labels.items()}, names  # type: ignore[index]


def make_options(opts: argparse.Namespace, **fields: Any) -> ConvertOptions:
    fields.setdefault("caption_field", opts.caption_field)
    fields.setdefault("label_field", opts.label_field)
    fields.setdefault("image_field", opts.image_field)
    return ConvertOptions(min_size=opts.min_size, shard_size=opts.shard_size, **fields)


def input_files(root: Path, suffixes: tuple[str, ...], flag_source: str) -> list[Path]:
    if root.is_file():
        if not root.name.lower().endswith(suffixes):
            raise ConfigError(f"--in: {root} is not a {' / '.join(suffixes)} file (--from {flag_source})")
        return [root]
    if not root.is_dir():
        raise ConfigError(f"--in: nothing at {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        raise ConfigError(f"--in: no {' / '.join(suffixes)} files under {root} (--from {flag_source})")
    return files
