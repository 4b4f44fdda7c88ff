"""Text filtering of an MDS dataset: score how much text each image holds and keep the ``light`` or ``heavy`` subset.

    python -m lit_webssl data filter --in data/demo_text --out data/demo_text_light --keep light
    python -m lit_webssl data filter --in data/web --out data/web_heavy --keep heavy --workers 16
    python -m lit_webssl data filter --in data/web --out data/web_light --keep light --vlm-model ~/SmolVLM2-2.2B

The paper's filtered MC-2B subsets (docs/recipe.md section 7): *light* keeps the images that contain any text (50.3 %),
*heavy* those that are text-dense: charts, documents, tables (1.3 %). Scorers (``--scorer``; the defaults are the
better CPU scorer of each level as measured on the demo text set, docs/filter.md):

* ``classical`` (default of ``--keep light``): a language-free text detector on the CPU (OpenCV). Maximally stable
  extremal regions that look like characters (size, aspect, fill and stroke width) are chained into words (three or
  more characters side by side of similar height; periodic patterns are rejected). Light score: character-like
  regions in words; heavy score: number of words.
* ``ocr`` (default of ``--keep heavy``): the Tesseract OCR engine (``tesseract`` binary, sparse-text mode) on the
  images where the classical detector sees at least one word. Light and heavy score: number of confidently read
  words (confidence >= 60, two or more letters or digits).
* ``vlm``: a vision-language model (SmolVLM2, as the paper did) asked the yes/no questions of
  docs/recipe.md section 7; the score is
  P(yes) from the first answer token's logits, renormalized over the yes and no tokens. Local weights only
  (``--vlm-model PATH``).

Input: an MDS dataset directory, either one dataset (``<in>/index.json``, also a merged index of sub-datasets) or
splits (``<in>/<split>/index.json``, as the demo sets): every split is filtered into ``<out>/<split>``. Output: the
kept samples in their original order with every original column copied byte for byte, plus ``text_score``
(``float64``: the score compared with the threshold) and ``text_level`` (``str``: ``heavy``, ``light`` or ``none``,
the highest level whose threshold the image passes among the levels scored; the VLM scores only the ``--keep``
level). ``<out>/filter.json`` records the settings and, per split, the counts, the kept fraction and the speed; when
the data has a ``text_truth`` column (``data demo --text-set``), also precision and recall.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lit_webssl.datamodules.filter.base import DEFAULT_SCORER, DEFAULT_THRESHOLDS, LEVELS, SCORERS, TextScorer
from lit_webssl.datamodules.filter.classical import ClassicalScorer
from lit_webssl.datamodules.filter.mds import decode_rgb, find_splits, iter_samples, read_index
from lit_webssl.datamodules.filter.ocr import OCRScorer
from lit_webssl.datamodules.filter.scorers import make_scorer
from lit_webssl.datamodules.filter.select import (
    SCORE_COLUMNS,
    SUMMARY,
    TRUTH_POSITIVE,
    decide,
    filter_dataset,
    filter_split,
    score_encoded,
    scorer_pool,
)
from lit_webssl.datamodules.filter.vlm import NO_WORDS, VLM_PROMPTS, YES_WORDS, VLMScorer
from lit_webssl.errors import ConfigError

__all__ = [
    "DEFAULT_SCORER",
    "DEFAULT_THRESHOLDS",
    "LEVELS",
    "NO_WORDS",
    "SCORERS",
    "SCORE_COLUMNS",
    "SUMMARY",
    "TRUTH_POSITIVE",
    "VLM_PROMPTS",
    "YES_WORDS",
    "ClassicalScorer",
    "OCRScorer",
    "TextScorer",
    "VLMScorer",
    "decide",
    "decode_rgb",
    "filter_dataset",
    "filter_split",
    "find_splits",
    "iter_samples",
    "main",
    "make_scorer",
    "read_index",
    "score_encoded",
    "scorer_pool",
]


def _cpus() -> int:
    """CPUs this process may run on (the affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line :class:`ConfigError` (the CLI prints them and exits 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(re.sub(r"^argument ", "", message))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m lit_webssl data filter",
        description="Score the text in every image of an MDS dataset and write the kept subset as MDS "
        "(original columns plus text_score and text_level).",
    )
    p.add_argument(
        "--in", dest="src", required=True, help="MDS dataset directory (<in>/index.json or <in>/<split>/index.json)"
    )
    p.add_argument("--out", required=True, help="output directory (same layout as --in)")
    p.add_argument("--keep", required=True, choices=LEVELS, help="light: any text; heavy: documents, charts, tables")
    p.add_argument(
        "--scorer",
        choices=SCORERS,
        default=None,
        help="text scorer (default: classical for --keep light, ocr for --keep heavy; vlm when --vlm-model is given)",
    )
    p.add_argument(
        "--no-prescreen",
        action="store_true",
        help="ocr: run Tesseract on every image, also where the classical detector finds no word",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="keep images scoring at least this for --keep (defaults: "
        + "; ".join(f"{s} {t['light']:g}/{t['heavy']:g}" for s, t in DEFAULT_THRESHOLDS.items())
        + " for light/heavy)",
    )
    p.add_argument("--vlm-model", default=None, help="local SmolVLM2 directory (weights, config, processor)")
    p.add_argument("--vlm-device", default="auto", help="device of the VLM (default: %(default)s)")
    p.add_argument("--vlm-batch-size", type=int, default=8, help="images per VLM forward (default: %(default)s)")
    p.add_argument(
        "--vlm-no-split",
        action="store_true",
        help="one global view per image instead of SmolVLM's tiles (several times faster, misses more small text)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(_cpus(), 16),
        help="processes decoding and scoring images, not used by the vlm scorer (default: CPU count, "
        "at most 16: %(default)s)",
    )
    p.add_argument("--image-key", default="image", help="column holding the image (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m lit_webssl data filter --in SRC --out DST --keep {light,heavy} [--scorer ...] [--threshold T]
    [--vlm-model PATH] [--workers N]``."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    scorer_name = args.scorer or ("vlm" if args.vlm_model else DEFAULT_SCORER[args.keep])
    if args.vlm_model and scorer_name != "vlm":
        raise ConfigError(f"--vlm-model is only used with --scorer vlm (got --scorer {scorer_name})")
    if args.vlm_batch_size < 1:
        raise ConfigError(f"--vlm-batch-size must be >= 1, got {args.vlm_batch_size}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if not Path(args.src).expanduser().is_dir():
        raise ConfigError(f"--in: {args.src} is not a directory")
    find_splits(Path(args.src).expanduser())  # fail on bad input before loading a model
    scorer = (
        make_scorer(
            scorer_name,
            args.vlm_model,
            device=args.vlm_device,
            batch_size=args.vlm_batch_size,
            image_splitting=not args.vlm_no_split,
        )
        if scorer_name == "vlm"
        else make_scorer(scorer_name, prescreen=not args.no_prescreen)
    )
    summary = filter_dataset(
        args.src, args.out, args.keep, scorer, args.threshold, args.workers, args.image_key, overwrite=args.overwrite
    )
    print(
        f"wrote {args.out} ({summary['scorer']} scorer, --keep {args.keep}, threshold "
        f"{summary['thresholds'][args.keep]:g}); summary in {Path(args.out) / SUMMARY}"
    )
    return summary
