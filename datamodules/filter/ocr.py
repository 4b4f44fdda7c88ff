"""The Tesseract OCR scorer (the ``tesseract`` binary, one single-threaded process per image), prescreened by the
classical detector."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import numpy as np
from PIL import Image, ImageOps

from lit_webssl.datamodules.filter.base import TextScorer
from lit_webssl.datamodules.filter.classical import ClassicalScorer
from lit_webssl.errors import ConfigError


class OCRScorer(TextScorer):
    """The Tesseract OCR engine through its command line (``tesseract stdin stdout --psm 11 tsv``).

    Small images are scaled up (bicubic) so that their longer side is at least ``min_side`` (at most 3x), and every
    image gets a white border (Tesseract misses text touching the edge). Each call runs one single-threaded
    ``tesseract`` process, so ``--workers`` processes run that many at once. Scores: ``light`` = ``heavy`` = the number
    of words read with confidence >= ``min_conf`` that have two or more letters or digits.

    With ``prescreen`` (default), the classical detector looks first, more than ten times faster: an image in which
    it finds no word (three characters side by side) scores 0 without running Tesseract. On the demo text set every
    text-dense image passes the prescreen; on web data, where about half of the images hold no text, it halves the
    OCR calls.

    Args:
        binary: The ``tesseract`` executable.
        lang: Tesseract language(s), e.g. ``eng`` or ``eng+deu`` (traineddata must be installed).
        psm: Page segmentation mode; 11 (sparse text) finds scattered words as well as pages.
        min_conf: Smallest word confidence (0-100) that counts.
        min_side: Images whose longer side is smaller are scaled up to it.
        timeout: Seconds allowed per image.
        prescreen: Skip Tesseract on images where :class:`ClassicalScorer` finds no word.
    """

    name = "ocr"

    def __init__(
        self,
        binary: str = "tesseract",
        lang: str = "eng",
        psm: int = 11,
        min_conf: float = 60.0,
        min_side: int = 448,
        timeout: float = 120.0,
        prescreen: bool = True,
    ) -> None:
        path = shutil.which(binary)
        if path is None:
            raise ConfigError(
                f"--scorer ocr needs the {binary!r} binary on PATH (Debian/Ubuntu: apt-get install tesseract-ocr)"
            )
        self.command = [path, "stdin", "stdout", "--psm", str(psm), "-l", lang, "tsv"]
        self.min_conf, self.min_side, self.timeout = min_conf, min_side, timeout
        self._env = {**os.environ, "OMP_THREAD_LIMIT": "1"}  # one core per process: --workers sets the parallelism
        self.prescreen = ClassicalScorer() if prescreen else None

    def read_words(self, image: np.ndarray) -> list[tuple[float, str]]:
        """``(confidence, text)`` of every word Tesseract reads in a uint8 RGB image."""
        picture = Image.fromarray(image)
        factor = min(max(self.min_side / max(picture.size), 1.0), 3.0)
        if factor > 1.0:
            picture = picture.resize((round(picture.width * factor), round(picture.height * factor)), Image.BICUBIC)
        picture = ImageOps.expand(picture, border=max(round(10 * factor), 10), fill=(255, 255, 255))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", compress_level=1)
        done = subprocess.run(
            self.command, input=buffer.getvalue(), capture_output=True, env=self._env, timeout=self.timeout, check=False
        )
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"tesseract exited with {done.returncode}: {message[-1] if message else ''}")
        words = []
        for line in done.stdout.decode(errors="replace").splitlines()[1:]:
            fields = line.split("\t")
            if len(fields) == 12 and fields[0] == "5" and fields[11].strip():
                words.append((float(fields[10]), fields[11].strip()))
        return words

    def score_one(self, image: np.ndarray) -> dict[str, float]:
        if self.prescreen is not None and self.prescreen.score_one(image)["heavy"] < 1:
            return {"light": 0.0, "heavy": 0.0}
        confident = [t for c, t in self.read_words(image) if c >= self.min_conf and sum(ch.isalnum() for ch in t) >= 2]
        return {"light": float(len(confident)), "heavy": float(len(confident))}
