"""A scorer by its ``--scorer`` name."""

from __future__ import annotations

from typing import Any

from lit_webssl.datamodules.filter.base import SCORERS, TextScorer
from lit_webssl.datamodules.filter.classical import ClassicalScorer
from lit_webssl.datamodules.filter.ocr import OCRScorer
from lit_webssl.datamodules.filter.vlm import VLMScorer
from lit_webssl.errors import ConfigError


def make_scorer(name: str, vlm_model: str | None = None, prescreen: bool = True, **vlm_options: Any) -> TextScorer:
    """The scorer called ``name`` (``classical``, ``ocr`` or ``vlm``; ``vlm`` needs ``vlm_model``).

    Args:
        name: Scorer name.
        vlm_model: Local model directory of the ``vlm`` scorer.
        prescreen: ``ocr``: skip Tesseract where the classical detector finds no word.
        **vlm_options: Further arguments of :class:`VLMScorer`.
    """
    if name == "classical":
        return ClassicalScorer()
    if name == "ocr":
        return OCRScorer(prescreen=prescreen)
    if name == "vlm":
        if not vlm_model:
            raise ConfigError("--scorer vlm needs --vlm-model PATH (a local SmolVLM2 directory)")
        return VLMScorer(vlm_model, **vlm_options)
    raise ConfigError(f"--scorer: unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
