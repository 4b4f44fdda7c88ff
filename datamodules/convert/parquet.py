"""``--from parquet``: parquet files, one chunk per row group (image column binary or a ``{bytes, path}`` struct)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lit_webssl.datamodules.convert.plan import (
    CAPTION_FIELDS,
    IMAGE_FIELDS,
    LABEL_FIELDS,
    Chunk,
    ConvertOptions,
    Plan,
    Record,
    input_files,
    make_options,
    pick_field,
)
from lit_webssl.errors import ConfigError


def parquet_image_column(schema: Any, chosen: str | None, where: str) -> str:
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


def plan_parquet(root: Path, opts: argparse.Namespace) -> Plan:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = input_files(root, (".parquet",), "parquet")
    base = root if root.is_dir() else root.parent
    schema = pq.read_schema(files[0])
    where = f"parquet {files[0]}"
    image_field = parquet_image_column(schema, opts.image_field, where)
    caption_field = pick_field(
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
    label_field = pick_field(
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
    options = make_options(
        opts,
        caption=caption_field is not None,
        label=label_field is not None,
        image_field=image_field,
        caption_field=caption_field,
        label_field=label_field,
    )
    return Plan("parquet", str(root.absolute()), chunks, options, [])


def read_parquet(chunk: Chunk, options: ConvertOptions) -> Iterator[Record]:
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
