"""The demo set: ten texture classes drawn procedurally (numpy and PIL, no downloads) and written as MDS shards.

The class is the pattern: stripes in three orientations, checkerboard, polka dots, concentric rings, grid, zigzag,
blotches, crosses. Everything else is a nuisance drawn independently of it: the two colours (any hue, saturation
and value, kept apart enough to see the pattern), the period (13-25 % of the image side), phase, a small tilt, the
duty cycle, an illumination gradient and sensor noise. Nearest neighbours in pixel space therefore match colours
rather than patterns, and a randomly initialized encoder is no better, while an encoder that learned from the images
alone what stays put under crops and colour changes (DINO) or what continues a pattern (MAE) separates the classes:
the kNN probe shows what self-supervision learned. The classes are closed under horizontal flips and the patterns
survive the recipes' crop scales, so no augmentation of a demo config turns one class into another.

    python -m lit_webssl data demo --out data/demo      # 10k train + 2k val, 64 px, about 15 s
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lit_webssl.datamodules.demo.dense import HEAVY_KINDS
from lit_webssl.datamodules.demo.lettering import WORDS, text_fonts
from lit_webssl.datamodules.demo.text import TEXT_TRUTHS, render_text_image
from lit_webssl.datamodules.demo.textures import CLASSES, HUE_NAMES, colour_name, ink, render
from lit_webssl.datamodules.demo.writer import SHARD_BYTES, SPLITS, build_demo_dataset, build_text_dataset

__all__ = [
    "CLASSES",
    "HEAVY_KINDS",
    "HUE_NAMES",
    "SHARD_BYTES",
    "SPLITS",
    "TEXT_TRUTHS",
    "WORDS",
    "build_demo_dataset",
    "build_text_dataset",
    "colour_name",
    "ink",
    "main",
    "render",
    "render_text_image",
    "text_fonts",
]


def main(argv: list[str] | None = None) -> Path:
    """``python -m lit_webssl data demo [--out DIR] [--train N] [--val N] [--size PX] [--seed S] [--overwrite]
    [--text-set]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lit_webssl data demo", description="Build the procedurally drawn demo dataset as MDS shards."
    )
    parser.add_argument(
        "--out", default=None, help="output directory (default: data/demo; data/demo_text with --text-set)"
    )
    parser.add_argument("--train", type=int, default=None, help="training images (default: 10000; 300 with --text-set)")
    parser.add_argument("--val", type=int, default=None, help="validation images (default: 2000; 300 with --text-set)")
    parser.add_argument(
        "--size", type=int, default=None, help="image side in pixels (default: 64; 224 with --text-set)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if a complete build exists")
    parser.add_argument(
        "--text-set",
        action="store_true",
        help="build the text-density set instead (no text / some text / documents, charts, tables, "
        "with a text_truth column), for `data filter`",
    )
    args = parser.parse_args(argv)
    if args.text_set:
        return build_text_dataset(
            args.out or "data/demo_text",
            300 if args.train is None else args.train,
            300 if args.val is None else args.val,
            args.size or 224,
            args.seed,
            args.overwrite,
        )
    return build_demo_dataset(
        args.out or "data/demo",
        10000 if args.train is None else args.train,
        2000 if args.val is None else args.val,
        args.size or 64,
        args.seed,
        args.overwrite,
    )
