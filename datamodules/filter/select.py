"""Scoring the images of a split (in worker processes) and writing the kept ones with their score and level."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from lit_webssl.compat.streaming import write_encoded
from lit_webssl.datamodules.filter.base import DEFAULT_SCORER, DEFAULT_THRESHOLDS, LEVELS, TextScorer
from lit_webssl.datamodules.filter.mds import decode_or_none, find_splits, iter_samples, open_writer, read_index
from lit_webssl.datamodules.filter.scorers import make_scorer
from lit_webssl.errors import ConfigError

SCORE_COLUMNS = {"text_score": "float64", "text_level": "str"}

TRUTH_POSITIVE = {"light": ("light", "heavy"), "heavy": ("heavy",)}
"""Truth values that count as positives of each level (the ``text_truth`` column of the demo text set)."""

SUMMARY = "filter.json"

CHUNK = 64  # images decoded and scored together

_WORKER_SCORER: list[TextScorer] = []  # the scorer of a worker process, set once by _init_worker


def _init_worker(scorer: TextScorer) -> None:
    _WORKER_SCORER[:] = [scorer]


def _score_encoded(data: bytes, encoding: str) -> dict[str, float] | None:
    """Decode and score one image in a worker process (``None``: undecodable)."""
    image = decode_or_none(data, encoding)
    return None if image is None else _WORKER_SCORER[0].score_one(image)


def score_encoded(
    scorer: TextScorer, data: Sequence[bytes], encoding: str, levels: Sequence[str], pool: Executor | None = None
) -> list[dict[str, float] | None]:
    """Decode and score encoded images: in ``pool``'s worker processes (set up by :func:`scorer_pool`) when given,
    else here; a batched scorer (the VLM) scores here in batches. ``None`` marks an undecodable image."""
    if pool is not None and not scorer.batched:
        return list(pool.map(_score_encoded, data, itertools.repeat(encoding), chunksize=4))
    images = [decode_or_none(d, encoding) for d in data]
    valid = [i for i, image in enumerate(images) if image is not None]
    scores: list[dict[str, float] | None] = [None] * len(images)
    for i, score in zip(valid, scorer.score([images[i] for i in valid], levels), strict=True):
        scores[i] = score
    return scores


def scorer_pool(scorer: TextScorer, workers: int) -> Executor | None:
    """``workers`` processes that each hold a copy of ``scorer`` (``None`` for one worker or a batched scorer).

    Processes, not threads: the classical detector spends much of its time in Python. They are forked where the
    platform allows (as a ``DataLoader``'s workers are), so the scorer is not imported anew.
    """
    if workers <= 1 or scorer.batched:
        return None
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_init_worker, initargs=(scorer,))


def decide(scores: dict[str, float], thresholds: dict[str, float]) -> str:
    """The highest level (``heavy``, ``light``, else ``none``) whose threshold the scores pass, among those scored."""
    for level in reversed(LEVELS):
        if level in scores and scores[level] >= thresholds[level]:
            return level
    return "none"


def filter_split(
    src: Path,
    dst: Path,
    scorer: TextScorer,
    keep: str,
    thresholds: dict[str, float],
    pool: Executor | None,
    image_key: str = "image",
    truth_key: str | None = "text_truth",
) -> dict[str, Any]:
    """Filter one MDS split ``src`` into ``dst``; returns its counts (and precision/recall against ``truth_key``).

    Args:
        src: Split directory holding ``index.json`` and the shards.
        dst: Output directory (created).
        scorer: Text scorer.
        keep: ``light`` or ``heavy``.
        thresholds: Threshold per level.
        pool: Worker processes from :func:`scorer_pool` (``None``: score in this process).
        image_key: Column holding the image.
        truth_key: Column holding ``none``/``light``/``heavy`` truth, if the data has one.
    """
    shards = read_index(src)
    if not shards:  # an empty split stays empty
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "index.json", dst / "index.json")
        return {"samples": 0, "kept": 0, "kept_fraction": 0.0, "undecodable": 0, "seconds": 0.0, "images_per_s": 0.0}
    names, encodings = shards[0]["column_names"], shards[0]["column_encodings"]
    columns = dict(zip(names, encodings, strict=True))
    if image_key not in columns:
        raise ConfigError(
            f"--image-key: {src / 'index.json'} has no column {image_key!r} (columns: {', '.join(names)})"
        )
    truth_key = truth_key if truth_key in columns and columns[truth_key] == "str" else None
    levels = list(LEVELS) if scorer.name != "vlm" else [keep]
    raw = set(columns) - set(SCORE_COLUMNS)
    total = kept = undecodable = 0
    counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    start = time.perf_counter()

    with open_writer(dst, {**columns, **SCORE_COLUMNS}, shards[0]) as writer:
        samples = iter_samples(src, shards)
        while chunk := list(itertools.islice(samples, CHUNK)):
            scores = score_encoded(scorer, [s[image_key] for s in chunk], columns[image_key], levels, pool)
            for sample, score in zip(chunk, scores, strict=True):
                total += 1
                undecodable += score is None
                level = decide(score or {}, thresholds)
                keep_it = score is not None and score[keep] >= thresholds[keep]
                if truth_key:
                    positive = sample[truth_key].decode() in TRUTH_POSITIVE[keep]
                    counts[("tp" if positive else "fp") if keep_it else ("fn" if positive else "tn")] += 1
                if keep_it:
                    kept += 1
                    kept_sample = {**{k: sample[k] for k in raw}, "text_score": float(score[keep]), "text_level": level}
                    write_encoded(writer, kept_sample)  # the original columns as their encoded bytes
    seconds = time.perf_counter() - start
    summary: dict[str, Any] = {
        "samples": total,
        "kept": kept,
        "kept_fraction": kept / max(total, 1),
        "undecodable": undecodable,
        "seconds": round(seconds, 3),
        "images_per_s": round(total / max(seconds, 1e-9), 2),
    }
    if truth_key:
        tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
        summary.update(
            truth_key=truth_key,
            precision=tp / (tp + fp) if tp + fp else math.nan,
            recall=tp / (tp + fn) if tp + fn else math.nan,
            **counts,
        )
    return summary


def filter_dataset(
    src: str | Path,
    dst: str | Path,
    keep: str,
    scorer: TextScorer | str | None = None,
    threshold: float | None = None,
    workers: int = 1,
    image_key: str = "image",
    truth_key: str | None = "text_truth",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score every image of the MDS dataset ``src`` and write those kept for ``keep`` to ``dst`` (same layout).

    The output is built in ``<dst>.partial`` and renamed when complete; ``<dst>/filter.json`` holds the returned
    summary. Top-level files of a split layout other than ``index.json`` (e.g. ``classes.json``) are copied.

    Args:
        src: Dataset directory (``<src>/index.json`` or ``<src>/<split>/index.json``).
        dst: Output directory.
        keep: ``light`` (any text) or ``heavy`` (text-dense).
        scorer: A scorer or its name (``classical``, ``ocr``; ``vlm`` needs a :class:`VLMScorer`); default
            :data:`DEFAULT_SCORER` of ``keep``.
        threshold: Threshold of the ``keep`` level (default :data:`DEFAULT_THRESHOLDS`).
        workers: Processes that decode and score images (not the VLM's, which batches on its device).
        image_key: Column holding the image.
        truth_key: Column with ``none``/``light``/``heavy`` truth; when present, precision and recall are reported.
        overwrite: Replace an existing ``dst`` that an earlier filter wrote (it holds ``filter.json``).

    Returns:
        The summary: settings and, per split, ``samples``, ``kept``, ``kept_fraction``, ``undecodable``,
        ``seconds``, ``images_per_s`` (and ``precision``, ``recall``, ``tp``, ``fp``, ``fn`` with truth).

    Raises:
        ConfigError: A setting or path that cannot work (the message names the flag).
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if keep not in LEVELS:
        raise ConfigError(f"--keep must be one of {', '.join(LEVELS)}, got {keep!r}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if scorer is None or isinstance(scorer, str):
        scorer = make_scorer(scorer or DEFAULT_SCORER[keep])
    thresholds = dict(DEFAULT_THRESHOLDS[scorer.name])
    if threshold is not None:
        if not math.isfinite(threshold) or threshold < 0 or (scorer.name == "vlm" and threshold > 1):
            bound = "in [0, 1] for --scorer vlm" if scorer.name == "vlm" else ">= 0"
            raise ConfigError(f"--threshold must be {bound}, got {threshold}")
        thresholds[keep] = float(threshold)
    if not src.is_dir():
        raise ConfigError(f"--in: {src} is not a directory")
    splits = find_splits(src)
    if src.resolve() == dst.resolve() or {src.resolve(), dst.resolve()} & {
        *src.resolve().parents,
        *dst.resolve().parents,
    }:
        raise ConfigError(f"--out: {dst} and --in {src} must not contain one another")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        if not overwrite:
            raise ConfigError(f"--out: {dst} exists and is not empty; pass --overwrite to replace it")
        if not (dst / SUMMARY).is_file():
            raise ConfigError(
                f"--out: {dst} is not the output of an earlier filter (no {SUMMARY}); --overwrite "
                "replaces only those, remove it yourself"
            )
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    summary: dict[str, Any] = {
        "source": str(src),
        "keep": keep,
        "scorer": scorer.name,
        "thresholds": thresholds,
        "columns": SCORE_COLUMNS,
        "splits": {},
    }
    pool = scorer_pool(scorer, workers)
    try:
        for split in splits:
            result = filter_split(src / split, partial / split, scorer, keep, thresholds, pool, image_key, truth_key)
            summary["splits"][split or "."] = result
            print(describe_result(split or str(src), result))
    finally:
        if pool is not None:
            pool.shutdown()
    if splits != [""]:
        for extra in src.iterdir():
            if extra.is_file() and extra.name not in ("index.json", SUMMARY):
                shutil.copy2(extra, partial / extra.name)
    (partial / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    partial.rename(dst)
    return summary


def describe_result(split: str, r: dict[str, Any]) -> str:
    line = (
        f"{split}: kept {r['kept']} of {r['samples']} ({100 * r['kept_fraction']:.1f} %) in {r['seconds']:.1f} s "
        f"({r['images_per_s']:.1f} images/s)"
    )
    if r["undecodable"]:
        line += f"; {r['undecodable']} undecodable dropped"
    if "precision" in r:
        line += f"; against {r['truth_key']}: precision {r['precision']:.3f}, recall {r['recall']:.3f}"
    return line
