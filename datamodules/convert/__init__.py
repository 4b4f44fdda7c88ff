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

import argparse
import csv
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lit_webssl.errors import ConfigError

__all__ = ["ConvertError", "ConvertOptions", "ConvertSummary", "convert", "main", "prepare_image"]

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


# -- images ---------------------------------------------------------------------------------------------------------
def prepare_image(data: bytes, min_size: int = 0) -> tuple[bytes, bool]:
    """Check one encoded image and return the bytes to store.

    The original bytes are kept when :func:`lit_webssl.datamodules.transforms.decode_image` decodes them to one
    uint8 RGB image; otherwise an image that PIL can decode in full (BMP, TIFF, 16-bit PNG, a JPEG torchvision
    rejects...) is re-encoded as a quality-95 JPEG. Truncated and corrupt files are refused, not repaired.

    Args:
        data: The encoded file's bytes.
        min_size: Smallest accepted shorter side, in pixels (0: any).

    Returns:
        The bytes to store and whether they were re-encoded.

    Raises:
        Skip: ``undecodable`` (neither decoder reads it) or ``too_small`` (shorter side below ``min_size``).
    """
    import torch
    from PIL import Image

    from lit_webssl.datamodules.transforms import decode_image

    try:
        image = decode_image(data)
        if image.dtype == torch.uint8 and image.ndim == 3:
            height, width = image.shape[-2:]
            _check_size(int(width), int(height), min_size)
            return data, False
        first_error = f"decoded as {tuple(image.shape)} {image.dtype}, not one uint8 RGB image"
    except ValueError as err:
        first_error = str(err)
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
            rgb = picture.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise Skip("undecodable", first_error) from err
    _check_size(rgb.width, rgb.height, min_size)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    encoded = buffer.getvalue()
    decode_image(encoded)  # the stored bytes must decode on the training side
    return encoded, True


def _check_size(width: int, height: int, min_size: int) -> None:
    if min(width, height) < min_size:
        raise Skip("too_small", f"{width}x{height} px, shorter side below --min-size {min_size}")


# -- options, chunks and results -----------------------------------------------------------------------------------
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


# -- output location -----------------------------------------------------------------------------------------------
def _is_remote(path: str) -> bool:
    scheme = urllib.parse.urlparse(path).scheme
    return bool(scheme) and not (len(scheme) == 1 and sys.platform == "win32")


class Output:
    """The output root: a local directory or an object-storage URL (written through Streaming's uploaders).

    Args:
        root: Local directory or URL (``s3://bucket/prefix``, ``gs://...``, any scheme Streaming uploads to).
    """

    def __init__(self, root: str) -> None:
        self.remote = _is_remote(root)
        self.root = root.rstrip("/") if self.remote else str(Path(root).absolute())

    def join(self, *parts: str) -> str:
        """Path or URL of ``parts`` under the root."""
        return "/".join([self.root, *parts]) if self.remote else os.path.join(self.root, *parts)

    def list(self) -> set[str]:
        """Relative paths (``/``-separated) of every file under the root."""
        if not self.remote:
            root = Path(self.root)
            return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()
        from streaming.base.storage.upload import CloudUploader

        with tempfile.TemporaryDirectory(prefix="lit_webssl_convert_") as tmp:
            keys = CloudUploader.get((tmp, self.root), exist_ok=True).list_objects() or []
        prefix = urllib.parse.urlparse(self.root).path.strip("/")
        return {key[len(prefix) :].lstrip("/") if prefix else key for key in keys}

    def read_text(self, relative: str) -> str:
        """Text of the file ``relative`` under the root."""
        if not self.remote:
            return Path(self.join(relative)).read_text()
        from streaming.base.storage.download import CloudDownloader

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
        from streaming.base.storage.upload import CloudUploader

        directory, _, name = relative.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="lit_webssl_convert_") as tmp:
            uploader = CloudUploader.get((tmp, self.join(directory) if directory else self.root), keep_local=True)
            Path(tmp, name).write_text(text)
            uploader.upload_file(name)


def part_name(index: int) -> str:
    """Directory of chunk ``index``'s sub-dataset, relative to the output root."""
    return f"part.{index:05d}"


# -- planning ------------------------------------------------------------------------------------------------------
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


def _first(
    candidates: Sequence[str], available: Sequence[str], chosen: str | None, flag: str, where: str
) -> str | None:
    """The field to use: ``chosen`` (checked against ``available``) or the first candidate present."""
    if chosen is not None:
        if chosen not in available:
            raise ConfigError(f"{flag}: no field {chosen!r} in {where} (fields: {', '.join(available) or 'none'})")
        return chosen
    return next((name for name in candidates if name in available), None)


def _label_value(value: Any, where: str) -> int | str | None:
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


def _index_labels(labels: dict[str, int | str | None], flag: str) -> tuple[dict[str, int | None], list[str] | None]:
    """Integer labels as they are; class names mapped to indices of the sorted names (the list is returned)."""
    names = sorted({v for v in labels.values() if isinstance(v, str)})
    if names and any(isinstance(v, int) for v in labels.values()):
        raise ConfigError(f"{flag}: labels mix integers and class names")
    if not names:
        return dict(labels), None  # type: ignore[arg-type]
    lookup = {name: i for i, name in enumerate(names)}
    return {k: (None if v is None else lookup[v]) for k, v in labels.items()}, names  # type: ignore[index]


def _read_sidecar(path: Path, opts: argparse.Namespace) -> tuple[dict[str, str], dict[str, Any]]:
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
    path_field = _first(PATH_FIELDS, fields, None, "--sidecar", where)
    if path_field is None:
        raise ConfigError(
            f"--sidecar: {path} has no path column (one of {', '.join(PATH_FIELDS)}; "
            f"fields: {', '.join(fields) or 'none'})"
        )
    caption_field = _first(CAPTION_FIELDS, fields, opts.caption_field, "--caption-field", where)
    label_field = _first(LABEL_FIELDS, fields, opts.label_field, "--label-field", where)
    captions, labels = {}, {}
    for row in rows:
        relative = Path(str(row[path_field])).as_posix().lstrip("./") if row.get(path_field) else None
        if relative is None:
            continue
        if caption_field and row.get(caption_field) not in (None, ""):
            captions[relative] = str(row[caption_field])
        if label_field:
            labels[relative] = _label_value(row.get(label_field), where)
    return captions, labels


def _plan_folder(root: Path, opts: argparse.Namespace) -> Plan:
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
    captions, raw_labels = _read_sidecar(sidecar, opts) if sidecar else ({}, {})
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
    labels, classes = _index_labels({f: raw_labels.get(f) for f in images}, "--sidecar")
    options = _options(
        opts, caption=bool(captions) or bool(caption_files), label=any(v is not None for v in labels.values())
    )
    items = [(f, captions.get(f), caption_files.get(os.path.splitext(f)[0]), labels.get(f)) for f in images]
    size = opts.chunk_size
    chunks = [
        Chunk(i, "folder", tuple(items[start : start + size]), len(items[start : start + size]))
        for i, start in enumerate(range(0, len(items), size))
    ]
    return Plan("folder", str(root.absolute()), _stamp(chunks, files), options, skipped, classes)


def _stamp(chunks: list[Chunk], sizes: dict[str, int]) -> list[Chunk]:
    """Folder chunks carry each file's size (in the fingerprint: a changed file does not resume silently)."""
    return [Chunk(c.index, c.kind, tuple((*item, sizes[item[0]]) for item in c.items), c.size) for c in chunks]


def _input_files(root: Path, suffixes: tuple[str, ...], flag_source: str) -> list[Path]:
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


def _wds_key(name: str) -> tuple[str, str]:
    """webdataset's grouping: ``dir/key.ext1.ext2`` -> (``dir/key``, ``ext1.ext2``)."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _plan_wds(root: Path, opts: argparse.Namespace) -> Plan:
    tars = _input_files(root, TAR_SUFFIXES, "wds")
    base = root if root.is_dir() else root.parent
    # columns from the first shard: caption with .txt members or a json caption field, label with .cls or json label
    caption = label = False
    try:
        with tarfile.open(tars[0], "r:*") as tar:
            for member in tar:
                _, ext = _wds_key(member.name)
                caption |= ext == "txt"
                label |= ext == "cls"
                if ext == "json" and member.isfile():
                    try:
                        meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        continue
                    if isinstance(meta, dict):
                        caption |= (
                            _first(
                                CAPTION_FIELDS,
                                list(meta),
                                opts.caption_field,
                                "--caption-field",
                                f"{member.name} of {tars[0]}",
                            )
                            is not None
                        )
                        label |= (
                            _first(
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
    return Plan("wds", str(root.absolute()), chunks, _options(opts, caption=caption, label=label), [])


def _parquet_image_column(schema: Any, chosen: str | None, where: str) -> str:
    import pyarrow as pa

    def is_image(column: str) -> bool:
        kind = schema.field(column).type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return True
        return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0

    names = list(schema.names)
    if chosen is not None:
        if chosen not in names or not is_image(chosen):
            raise ConfigError(
                f"--image-field: no binary (or {{bytes, path}} struct) column {chosen!r} in {where} "
                f"(columns: {', '.join(names)})"
            )
        return chosen
    found = next((n for n in IMAGE_FIELDS if n in names and is_image(n)), None)
    found = found or next((n for n in names if is_image(n)), None)
    if found is None:
        raise ConfigError(
            f"--image-field: no image column (binary, or a struct with bytes) in {where} (columns: {', '.join(names)})"
        )
    return found


def _plan_parquet(root: Path, opts: argparse.Namespace) -> Plan:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _input_files(root, (".parquet",), "parquet")
    base = root if root.is_dir() else root.parent
    schema = pq.read_schema(files[0])
    where = f"parquet {files[0]}"
    image_field = _parquet_image_column(schema, opts.image_field, where)
    caption_field = _first(
        CAPTION_FIELDS,
        [
            n
            for n in schema.names
            if pa.types.is_string(schema.field(n).type) or pa.types.is_large_string(schema.field(n).type)
        ],
        opts.caption_field,
        "--caption-field",
        f"{where} (string columns)",
    )
    label_field = _first(
        LABEL_FIELDS,
        [n for n in schema.names if pa.types.is_integer(schema.field(n).type)],
        opts.label_field,
        "--label-field",
        f"{where} (integer columns)",
    )
    needed = [c for c in (image_field, caption_field, label_field) if c]
    chunks, index = [], 0
    for path in files:
        lacking = [c for c in needed if c not in pq.read_schema(path).names]
        if lacking:
            raise ConfigError(
                f"--in: {path} has no column {', '.join(map(repr, lacking))} (the columns are chosen "
                f"from the first file, {files[0]}: name them with --image-field / --caption-field / "
                "--label-field)"
            )
        meta = pq.ParquetFile(path).metadata
        first = 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            chunks.append(Chunk(index, "parquet", (str(path), path.relative_to(base).as_posix(), group, first), rows))
            index, first = index + 1, first + rows
    options = _options(
        opts,
        caption=caption_field is not None,
        label=label_field is not None,
        image_field=image_field,
        caption_field=caption_field,
        label_field=label_field,
    )
    return Plan("parquet", str(root.absolute()), chunks, options, [])


def _options(opts: argparse.Namespace, **fields: Any) -> ConvertOptions:
    fields.setdefault("caption_field", opts.caption_field)
    fields.setdefault("label_field", opts.label_field)
    fields.setdefault("image_field", opts.image_field)
    return ConvertOptions(min_size=opts.min_size, shard_size=opts.shard_size, **fields)


# -- reading inputs (in the workers) -------------------------------------------------------------------------------
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


def _read_folder(chunk: Chunk, root: str) -> Iterator[Record]:
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


def _read_wds(chunk: Chunk, options: ConvertOptions) -> Iterator[Record]:
    path, name, _ = chunk.items
    wanted = set(WDS_IMAGE_EXTENSIONS) | {"txt", "json", "cls"}
    key, members = None, {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _wds_key(member.name)
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


def _read_parquet(chunk: Chunk, options: ConvertOptions) -> Iterator[Record]:
    import pyarrow.parquet as pq

    path, name, group, first = chunk.items
    columns = [
        c
        for c in (
            options.image_field,
            options.caption_field if options.caption else None,
            options.label_field if options.label else None,
        )
        if c
    ]
    table = pq.ParquetFile(path).read_row_group(group, columns=list(dict.fromkeys(columns)))
    images = table.column(options.image_field).to_pylist()
    captions = table.column(options.caption_field).to_pylist() if options.caption else [None] * len(images)
    labels = table.column(options.label_field).to_pylist() if options.label else [None] * len(images)
    for offset, (image, caption, label) in enumerate(zip(images, captions, labels, strict=True)):
        source = f"{name}#{first + offset}"
        if isinstance(image, dict):
            image = image.get("bytes")
        if not image:
            yield Record(source, None, reason="no_image", detail=f"empty image column {options.image_field!r}")
        else:
            yield Record(source, bytes(image), caption, label)


def _records(chunk: Chunk, root: str, options: ConvertOptions) -> Iterator[Record]:
    if chunk.kind == "folder":
        return _read_folder(chunk, root)
    if chunk.kind == "wds":
        return _read_wds(chunk, options)
    return _read_parquet(chunk, options)


# -- converting one chunk ------------------------------------------------------------------------------------------
_report: Callable[[int], None] = lambda n: None  # noqa: E731  (set per worker process)


def _init_worker(queue: Any, environ: dict[str, str]) -> None:
    """Worker set-up: progress reports go to ``queue``; the environment is the parent's now (a forkserver started
    earlier in the same process would otherwise hand out its own, e.g. without credentials set since)."""
    global _report
    _report = queue.put
    os.environ.clear()
    os.environ.update(environ)


def convert_chunk(chunk: Chunk, root: str, out: str, options: ConvertOptions) -> ChunkResult:
    """Convert one chunk into the sub-dataset ``<out>/part.<index>`` and mark it complete.

    Any earlier partial output of the chunk is replaced. The marker ``convert.done`` is written last (after the
    shards and the sub-index are stored), so a chunk with a marker is complete.

    Args:
        chunk: The inputs.
        root: The input root (``--in``).
        out: The output root (directory or URL).
        options: Output settings.

    Returns:
        Counts, the skipped inputs and the shard entries of the sub-index.
    """
    from streaming import MDSWriter

    output = Output(out)
    part = part_name(chunk.index)
    result = ChunkResult(chunk.index)
    staging = None
    if output.remote:
        staging = tempfile.mkdtemp(prefix=f"lit_webssl_{part}_")
        target: str | tuple[str, str] = (os.path.join(staging, part), output.join(part))
    else:
        shutil.rmtree(output.join(part), ignore_errors=True)
        target = output.join(part)
    writer = MDSWriter(
        out=target,
        columns=options.columns,
        size_limit=options.shard_size,
        progress_bar=False,
        exist_ok=False,
        keep_local=False,
    )
    pending = 0
    try:
        for record in _records(chunk, root, options):
            result.inputs += 1
            pending += 1
            if pending >= REPORT_EVERY:
                _report(pending)
                pending = 0
            try:
                if record.image is None:
                    raise Skip(record.reason, record.detail)
                data, reencoded = prepare_image(record.image, options.min_size)
            except Skip as skip:
                result.skipped.append({"source": record.source, "reason": skip.reason, "detail": skip.detail})
                continue
            sample: dict[str, Any] = {"image": data, "source": record.source}
            if options.caption:
                sample["caption"] = record.caption or ""
            if options.label:
                sample["label"] = -1 if record.label is None else int(record.label)
            writer.write(sample)
            result.samples += 1
            result.reencoded += int(reencoded)
        writer.finish()
    except BaseException:
        writer.cancel_future_jobs()
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    _report(pending)
    result.shards = list(writer.shards)
    output.write_text(f"{part}/{MARKER}", json.dumps(asdict(result), sort_keys=True) + "\n")
    return result


def _convert_chunk_star(args: tuple) -> ChunkResult:
    return convert_chunk(*args)


# -- the whole conversion ------------------------------------------------------------------------------------------
def _merged_index(results: Sequence[ChunkResult]) -> dict[str, Any]:
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


def _load_completed(output: Output, plan: Plan, files: set[str]) -> dict[int, ChunkResult]:
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


def _check_output(output: Output, plan: Plan, resume: bool, overwrite: bool) -> set[str]:
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


def _progress(enabled: bool) -> Any:
    """A rich progress bar over input images (rate and chunk count in the last text column)."""
    from rich import progress as rp

    return rp.Progress(
        rp.TextColumn("{task.description}"),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        rp.TextColumn("{task.fields[rate]}"),
        rp.TimeElapsedColumn(),
        rp.TimeRemainingColumn(),
        disable=not enabled,
    )


def convert(source: str, src: str | Path, out: str, opts: argparse.Namespace) -> ConvertSummary:
    """Convert ``src`` (a ``source`` input) to the MDS dataset ``out``; see the module docstring.

    Args:
        source: ``folder``, ``wds`` or ``parquet``.
        src: Input directory or file.
        out: Output directory or URL.
        opts: Parsed options (``workers``, ``min_size``, ``shard_size``, ``chunk_size``, ``resume``, ``overwrite``,
            ``sidecar``, ``class_folders``, ``image_field``, ``caption_field``, ``label_field``, ``manifest``,
            ``progress``).

    Returns:
        The counts of the run.

    Raises:
        ConfigError: An option or input that cannot work (names the flag).
        ConvertError: A chunk failed (complete chunks are kept: rerun with ``--resume``).
    """
    started = time.perf_counter()
    root = Path(src).absolute()
    planner = {"folder": _plan_folder, "wds": _plan_wds, "parquet": _plan_parquet}[source]
    plan = planner(root, opts)
    if not plan.chunks:
        raise ConfigError(f"--in: no input images under {root} (--from {source})")
    output = Output(out)
    try:
        files = _check_output(output, plan, opts.resume, opts.overwrite)
    except ConfigError:
        raise
    except Exception as err:  # the object store refused (no bucket, no credentials, no endpoint...)
        raise ConfigError(f"--out: cannot list {output.root}: {type(err).__name__}: {err}") from None
    done = _load_completed(output, plan, files) if files else {}
    if not files:
        output.write_text(PLAN, json.dumps(plan.record(), indent=2, sort_keys=True) + "\n")
    pending = [c for c in plan.chunks if c.index not in done]
    base = str(root if root.is_dir() else root.parent)
    results = dict(done)
    progress = _progress(opts.progress)
    with progress:
        task = progress.add_task(f"{source} -> MDS", total=plan.total, rate="")
        progress.update(task, completed=sum(r.inputs for r in done.values()))
        first_time, first_done = time.perf_counter(), sum(r.inputs for r in done.values())

        def advance(n: int) -> None:
            progress.advance(task, n)
            seen = progress.tasks[0].completed - first_done
            elapsed = max(time.perf_counter() - first_time, 1e-6)
            progress.update(task, rate=f"{seen / elapsed:.0f} img/s, chunks {len(results)}/{len(plan.chunks)}")

        args = [(chunk, base, output.root, plan.options) for chunk in pending]
        try:
            if opts.workers == 1 or len(pending) <= 1:
                _run_inline(args, results, advance)
            else:
                _run_pool(args, min(opts.workers, len(pending)), results, advance)
        except KeyboardInterrupt:
            raise ConvertError(
                f"interrupted: {len(results)} of {len(plan.chunks)} chunks complete in "
                f"{output.root}; rerun with --resume to finish"
            ) from None
    skipped = plan.skipped + [s for i in sorted(results) for s in results[i].skipped]
    manifest = "".join(json.dumps(s, sort_keys=True) + "\n" for s in skipped)
    output.write_text(MANIFEST, manifest)
    local_manifest = opts.manifest or (output.join(MANIFEST) if not output.remote else MANIFEST)
    if local_manifest != output.join(MANIFEST):
        Path(local_manifest).parent.mkdir(parents=True, exist_ok=True)
        Path(local_manifest).write_text(manifest)
    samples = sum(r.samples for r in results.values())
    if samples == 0:
        raise ConvertError(f"no decodable image in {root} (every input was skipped: see {local_manifest})")
    output.write_text(INDEX, json.dumps(_merged_index(list(results.values())), sort_keys=True))
    return ConvertSummary(
        out=output.root,
        samples=samples,
        skipped=len(skipped),
        reencoded=sum(r.reencoded for r in results.values()),
        chunks=len(plan.chunks),
        resumed=len(done),
        manifest=str(local_manifest),
        seconds=time.perf_counter() - started,
    )


def _run_inline(args: list[tuple], results: dict[int, ChunkResult], advance: Callable[[int], None]) -> None:
    """Convert chunks one after the other in this process."""
    global _report
    previous, _report = _report, advance
    try:
        for item in args:
            results[item[0].index] = convert_chunk(*item)
            advance(0)
    finally:
        _report = previous


def _run_pool(args: list[tuple], workers: int, results: dict[int, ChunkResult], advance: Callable[[int], None]) -> None:
    """Convert chunks in ``workers`` processes (forkserver: no fork of a threaded parent), reporting progress."""
    import queue as queue_module

    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([__name__, "lit_webssl.datamodules.transforms", "streaming"])
    updates = ctx.Queue()
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(updates, dict(os.environ)))
    try:
        jobs = {item[0].index: pool.apply_async(_convert_chunk_star, (item,)) for item in args}
        while jobs:
            try:
                advance(updates.get(timeout=0.1))
            except queue_module.Empty:
                pass
            for index in [i for i, job in jobs.items() if job.ready()]:
                job = jobs.pop(index)
                try:
                    results[index] = job.get()
                    advance(0)
                except Exception as err:
                    raise ConvertError(
                        f"chunk {index} ({part_name(index)}) failed: {type(err).__name__}: {err}; "
                        "complete chunks are kept: rerun with --resume"
                    ) from err
        while True:  # progress reported after the last result arrived
            try:
                advance(updates.get_nowait())
            except queue_module.Empty:
                break
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


# -- command line --------------------------------------------------------------------------------------------------
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
    if _is_remote(opts.src):
        raise ConfigError(f"--in: {opts.src} is a URL; the converter reads local inputs (download them first)")
    if not Path(opts.src).exists():
        raise ConfigError(f"--in: nothing at {opts.src}")
    if not _is_remote(opts.out):
        src, out = Path(opts.src).resolve(), Path(opts.out).resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ConfigError(f"--out: {opts.out} and --in {opts.src} must not contain one another")
    if _is_remote(opts.out):
        from streaming.base.storage.upload import UPLOADERS

        scheme = urllib.parse.urlparse(opts.out).scheme
        if scheme not in UPLOADERS:
            raise ConfigError(
                f"--out: Streaming cannot write to {scheme}:// (schemes: "
                f"{', '.join(s for s in UPLOADERS if s and ':' not in s)})"
            )
    return opts


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
