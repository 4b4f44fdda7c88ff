"""The CPU text scorers of ``data filter`` on the demo text set: kept fraction, precision, recall and images/s.

Scores every image of a split of the demo text set (``python -m lit_webssl data demo --text-set``: no text / some
text / documents, charts and tables, with a ``text_truth`` column) with each scorer, once for both levels, and
prints for ``--keep light`` (positives: ``light`` and ``heavy`` truth) and ``--keep heavy`` (positives: ``heavy``)
the kept fraction, precision and recall at the default thresholds, then recall per kind of text and the false
keeps per kind of text-free picture. ``ocr`` is the scorer as shipped (the classical prescreen first); ``ocr-all``
runs Tesseract on every image. ``--sweep`` also prints, on ``--calibrate`` (the train split by default), the
best-F1 threshold per scorer and level: how the defaults were chosen. Speed: images/s of decoding plus scoring
in ``--workers`` processes.

    python benchmarks/bench_text_filter.py                       # classical and ocr on data/demo_text/val
    python benchmarks/bench_text_filter.py --scorers classical --workers 2 --sweep
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from lit_webssl.datamodules.demo import CLASSES, build_text_dataset
from lit_webssl.datamodules.filter import (
    DEFAULT_THRESHOLDS,
    LEVELS,
    TRUTH_POSITIVE,
    iter_samples,
    make_scorer,
    read_index,
    score_encoded,
    scorer_pool,
)


def load_split(root: Path, split: str, limit: int | None) -> tuple[list[bytes], str, list[str], list[str]]:
    """Encoded images, their encoding, truths and captions of one split."""
    shards = read_index(root / split)
    encoding = dict(zip(shards[0]["column_names"], shards[0]["column_encodings"], strict=True))["image"]
    images, truths, captions = [], [], []
    for sample in iter_samples(root / split, shards):
        images.append(sample["image"])
        truths.append(sample["text_truth"].decode())
        captions.append(sample["caption"].decode())
        if limit and len(images) >= limit:
            break
    return images, encoding, truths, captions


def kind_of(truth: str, caption: str) -> str:
    """The kind of picture from the demo text set's caption (``sign``, ``table``, ``texture``, ``clutter``...)."""
    if truth == "heavy":
        return caption.removeprefix("a ")
    if truth == "light":
        return re.sub(r"^a ", "", caption.split(" with ", 1)[1].split(":", 1)[0])
    what = caption.split(",", 1)[0]
    return "texture" if what in CLASSES else what


def score_all(name: str, images: list[bytes], encoding: str, workers: int) -> tuple[list[dict[str, float]], float]:
    """Scores of every image (decoding included, in ``workers`` processes as ``data filter`` runs) and the
    images/s (the pool's start-up included)."""
    scorer = make_scorer(name.removesuffix("-all"), prescreen=not name.endswith("-all"))
    start = time.perf_counter()
    pool = scorer_pool(scorer, workers)
    try:
        scores = score_encoded(scorer, images, encoding, LEVELS, pool)
    finally:
        if pool is not None:
            pool.shutdown()
    return scores, len(images) / (time.perf_counter() - start)


def metrics(values: np.ndarray, positive: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """Kept fraction, precision and recall of keeping ``values >= threshold``."""
    kept = values >= threshold
    tp = int((kept & positive).sum())
    precision = tp / kept.sum() if kept.any() else float("nan")
    return float(kept.mean()), precision, tp / max(int(positive.sum()), 1)


def best_threshold(values: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """The threshold (among the values seen) with the best F1, and that F1 (ties: the lower threshold)."""
    best = (-1.0, 0.0)
    for t in np.unique(values):
        kept = values >= t
        f1 = 2 * (kept & positive).sum() / (kept.sum() + positive.sum())
        if f1 > best[0]:
            best = (float(f1), float(t))
    return best[1], best[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo_text", help="demo text set (built when missing)")
    parser.add_argument("--split", default="val", help="split reported (default: %(default)s)")
    parser.add_argument(
        "--scorers",
        nargs="+",
        default=["classical", "ocr"],
        choices=["classical", "ocr", "ocr-all"],
        help="ocr: with the classical prescreen (as shipped); ocr-all: Tesseract on every image",
    )
    parser.add_argument("--workers", type=int, default=1, help="scoring processes (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images")
    parser.add_argument("--sweep", action="store_true", help="also print best-F1 thresholds on --calibrate")
    parser.add_argument("--calibrate", default="train", help="split of the threshold sweep (default: %(default)s)")
    args = parser.parse_args()
    root = Path(args.data)
    if not (root / args.split / "index.json").is_file():
        build_text_dataset(root)
    images, encoding, truths, captions = load_split(root, args.split, args.limit)
    truth = np.array(truths)
    kinds = np.array([kind_of(t, c) for t, c in zip(truths, captions, strict=True)])
    counts = ", ".join(f"{(truth == t).sum()} {t}" for t in ("none", "light", "heavy"))
    print(f"{root}/{args.split}: {len(images)} images ({counts}), {args.workers} worker(s)")
    rows, detail = [], defaultdict(dict)
    for name in args.scorers:
        scores, speed = score_all(name, images, encoding, args.workers)
        row, thresholds = [name, f"{speed:.1f}"], DEFAULT_THRESHOLDS[name.removesuffix("-all")]
        for level in LEVELS:
            values = np.array([s[level] for s in scores])
            positive = np.isin(truth, TRUTH_POSITIVE[level])
            kept_fraction, precision, recall = metrics(values, positive, thresholds[level])
            row += [f"{thresholds[level]:g}", f"{100 * kept_fraction:.1f} %", f"{precision:.3f}", f"{recall:.3f}"]
            kept = values >= thresholds[level]
            for kind in sorted(set(kinds.tolist())):
                mask = kinds == kind
                detail[(level, kind, "keep" if positive[mask].all() else "false keep")][name] = (
                    f"{int(kept[mask].sum())}/{int(mask.sum())}"
                )
        rows.append(row)
        if args.sweep:
            cal_images, cal_encoding, cal_truths, _ = load_split(root, args.calibrate, args.limit)
            cal_scores, _ = score_all(name, cal_images, cal_encoding, args.workers)
            for level in LEVELS:
                values = np.array([s[level] for s in cal_scores])
                t, f1 = best_threshold(values, np.isin(np.array(cal_truths), TRUTH_POSITIVE[level]))
                print(f"sweep on {args.calibrate}: {name} {level}: best F1 {f1:.3f} at threshold {t:g}")
    header = [
        "scorer",
        "images/s",
        "light thr",
        "light kept",
        "light precision",
        "light recall",
        "heavy thr",
        "heavy kept",
        "heavy precision",
        "heavy recall",
    ]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\n| level | kind | count | " + " | ".join(args.scorers) + " |\n|" + "---|" * (3 + len(args.scorers)))
    for (level, kind, what), by in sorted(detail.items()):
        print(f"| {level} | {kind} | {what} | " + " | ".join(by[n] for n in args.scorers) + " |")


if __name__ == "__main__":
    main()
