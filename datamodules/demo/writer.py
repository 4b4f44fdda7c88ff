"""Writing the demo sets as MDS shards: ``<out>/{train,val}`` and ``<out>/classes.json``, built in
``<out>.partial`` and renamed when complete; a complete build with the same arguments is kept."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from lit_webssl.datamodules.demo.lettering import text_fonts
from lit_webssl.datamodules.demo.text import TEXT_TRUTHS, render_text_image
from lit_webssl.datamodules.demo.textures import CLASSES, render

SPLITS = (("train", 0), ("val", 1))

SHARD_BYTES = 1 << 23


def encode_jpeg(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_split(path: Path, n: int, size: int, rng: np.random.Generator) -> None:
    from streaming import MDSWriter

    labels = rng.permutation(np.arange(n) % len(CLASSES))
    columns = {"image": "bytes", "label": "int", "caption": "str"}
    with MDSWriter(out=str(path), columns=columns, size_limit=SHARD_BYTES, progress_bar=False) as writer:
        for label in labels.tolist():
            picture, caption = render(label, rng, size)
            writer.write({"image": encode_jpeg(picture), "label": label, "caption": caption})


def is_complete(out: Path, meta: dict) -> bool:
    marker = out / "classes.json"
    if not marker.is_file() or any(not (out / s / "index.json").is_file() for s, _ in SPLITS):
        return False
    try:
        return json.loads(marker.read_text()) == meta
    except json.JSONDecodeError:
        return False


def build_demo_dataset(
    out: str | Path = "data/demo",
    n_train: int = 10000,
    n_val: int = 2000,
    image_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the demo set: ``<out>/train`` and ``<out>/val`` (MDS shards) and ``<out>/classes.json``.

    Balanced classes, deterministic given the arguments. A complete build with the same arguments is kept
    (unless ``overwrite``); the build goes to ``<out>.partial`` and is renamed when done.

    Args:
        out: Output directory.
        n_train: Training images.
        n_val: Validation images.
        image_size: Side length of the images in pixels.
        seed: Random seed.
        overwrite: Rebuild even when a complete build exists, and replace a directory that is not one.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        FileExistsError: ``out`` holds something other than a demo build and ``overwrite`` is false.
    """
    out = Path(out)
    meta = {"classes": list(CLASSES), "n_train": n_train, "n_val": n_val, "image_size": image_size, "seed": seed}
    if not overwrite and is_complete(out, meta):
        print(f"demo dataset already complete at {out} (pass --overwrite to rebuild)")
        return out
    if out.exists() and any(out.iterdir()) and not overwrite and not (out / "classes.json").is_file():
        raise FileExistsError(f"--out: {out} exists and is not a demo dataset; pass --overwrite to replace it")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for split, stream in SPLITS:
        _write_split(
            partial / split, n_train if split == "train" else n_val, image_size, np.random.default_rng([seed, stream])
        )
    (partial / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    print(f"demo dataset: {n_train} train + {n_val} val images ({image_size} px, {len(CLASSES)} classes) at {out}")
    return out


def _write_text_split(path: Path, n: int, size: int, rng: np.random.Generator) -> None:
    from streaming import MDSWriter

    truths = rng.permutation(np.arange(n) % len(TEXT_TRUTHS))
    columns = {"image": "bytes", "label": "int", "caption": "str", "text_truth": "str", "text_content": "str"}
    with MDSWriter(out=str(path), columns=columns, size_limit=SHARD_BYTES, progress_bar=False) as writer:
        for label in truths.tolist():
            picture, caption, content = render_text_image(TEXT_TRUTHS[label], rng, size)
            writer.write(
                {
                    "image": encode_jpeg(picture),
                    "label": label,
                    "caption": caption,
                    "text_truth": TEXT_TRUTHS[label],
                    "text_content": content,
                }
            )


def build_text_dataset(
    out: str | Path = "data/demo_text",
    n_train: int = 300,
    n_val: int = 300,
    image_size: int = 224,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the text-density demo set: ``<out>/{train,val}`` (MDS) and ``<out>/classes.json``.

    Columns: ``image``, ``label`` (index into :data:`TEXT_TRUTHS`), ``caption``, ``text_truth`` (``none``,
    ``light``, ``heavy``) and ``text_content`` (the words drawn). Balanced truths, deterministic given the arguments
    and the fonts installed (DejaVu from ``fonts-dejavu-core``, else Pillow's built-in font; recorded in
    ``classes.json``). Rebuild rules as :func:`build_demo_dataset`.

    Args:
        out: Output directory.
        n_train: Images of the ``train`` split (used to choose thresholds).
        n_val: Images of the ``val`` split (used to report).
        image_size: Side length of the images in pixels.
        seed: Random seed.
        overwrite: Rebuild even when a complete build exists, and replace a directory that is not one.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        FileExistsError: ``out`` holds something other than a demo build and ``overwrite`` is false.
    """
    out = Path(out)
    meta = {
        "classes": list(TEXT_TRUTHS),
        "kind": "text",
        "n_train": n_train,
        "n_val": n_val,
        "image_size": image_size,
        "seed": seed,
        "fonts": [Path(f).name for f in text_fonts()] or ["pillow"],
    }
    if not overwrite and is_complete(out, meta):
        print(f"demo text set already complete at {out} (pass --overwrite to rebuild)")
        return out
    if out.exists() and any(out.iterdir()) and not overwrite and not (out / "classes.json").is_file():
        raise FileExistsError(f"--out: {out} exists and is not a demo dataset; pass --overwrite to replace it")
    if not text_fonts():
        print("demo text set: no DejaVu fonts found (apt-get install fonts-dejavu-core); using Pillow's built-in font")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for split, stream in SPLITS:
        _write_text_split(
            partial / split,
            n_train if split == "train" else n_val,
            image_size,
            np.random.default_rng([seed, stream, 1]),
        )
    (partial / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    print(f"demo text set: {n_train} train + {n_val} val images ({image_size} px; none/light/heavy text) at {out}")
    return out
