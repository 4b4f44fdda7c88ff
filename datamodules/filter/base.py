"""The text levels, the scorers' names and default thresholds, and the interface every text scorer implements."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LEVELS = ("light", "heavy")

SCORERS = ("classical", "ocr", "vlm")

DEFAULT_SCORER = {"light": "classical", "heavy": "ocr"}
"""The scorer of each ``--keep`` level when ``--scorer`` is not given: the better one measured on the demo text set
(benchmarks/bench_text_filter.py; docs/filter.md)."""

DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "classical": {"light": 5.0, "heavy": 5.0},  # regions in words / words (best F1 on the demo text set's train)
    "ocr": {"light": 1.0, "heavy": 6.0},  # confident words (same)
    "vlm": {"light": 0.5, "heavy": 0.5},  # P(yes)
}
"""Keep an image when its score for the level is at least this (``--threshold`` replaces the ``--keep`` level's)."""


class TextScorer:
    """Scores the text in RGB images; subclasses implement :meth:`score_one` (and :meth:`score` when batched).

    Attributes:
        name: The ``--scorer`` name.
        batched: Scores batches in this process (:meth:`score`; the VLM) rather than one image per task in worker
            processes (:meth:`score_one`; must then be picklable).
    """

    name = ""
    batched = False

    def score_one(self, image: np.ndarray) -> dict[str, float]:
        """Scores of one uint8 RGB image ``(H, W, 3)``, by level."""
        raise NotImplementedError

    def score(self, images: Sequence[np.ndarray], levels: Sequence[str]) -> list[dict[str, float]]:
        """Scores of several images, by level, for (at least) ``levels``."""
        return [self.score_one(image) for image in images]


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
