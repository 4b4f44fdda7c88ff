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
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from lit_webssl.errors import ConfigError

__all__ = ["ClassicalScorer", "OCRScorer", "TextScorer", "VLMScorer", "filter_dataset", "main", "make_scorer"]

log = logging.getLogger(__name__)

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
VLM_PROMPTS = {
    "light": "Does this image contain any readable text? Answer yes or no.",
    "heavy": "Does this image contain a chart, table, document, or other text-dense content? Answer yes or no.",
}
"""docs/recipe.md section 7's reconstruction of the paper's SmolVLM2 questions (the exact prompts are unpublished)."""
YES_WORDS = ("yes", "Yes", "YES", " yes", " Yes", " YES")
NO_WORDS = ("no", "No", "NO", " no", " No", " NO")
SCORE_COLUMNS = {"text_score": "float64", "text_level": "str"}
TRUTH_POSITIVE = {"light": ("light", "heavy"), "heavy": ("heavy",)}
"""Truth values that count as positives of each level (the ``text_truth`` column of the demo text set)."""
SUMMARY = "filter.json"
CHUNK = 64  # images decoded and scored together


# --------------------------------------------------------------------------------------------------------- scorers
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


class ClassicalScorer(TextScorer):
    """Language-free text detection with OpenCV: character-like MSER regions chained into words.

    Regions are kept when their height, aspect ratio, fill ratio and stroke width (twice the largest distance to the
    region's border, at most ``max_stroke`` of the height: filled dots are not letters) are those of a character;
    nested duplicates are merged. Characters of similar height whose vertical centres line up and whose gap is at
    most ``max_gap`` of their height are chained; a chain of three or more is a word unless its members are all of
    one width and fill (a periodic pattern such as crosses or dots). Scores: ``light`` = character-like regions in
    words (the holes of letters count too), ``heavy`` = words (a line with narrow spaces chains into one).

    Args:
        max_side: Larger images are scaled down to this side first (speed; text stays above the minimum height).
        min_height: Smallest character height in pixels.
        max_height: Largest character height, as a fraction of the image height.
        max_stroke: Largest stroke width, as a fraction of the character height.
        max_gap: Largest gap between characters of a word, as a fraction of their height.
    """

    name = "classical"

    def __init__(
        self,
        max_side: int = 1024,
        min_height: int = 6,
        max_height: float = 0.3,
        max_stroke: float = 0.45,
        max_gap: float = 0.6,
    ) -> None:
        try:
            import cv2  # noqa: F401
        except ImportError as err:
            raise ConfigError("--scorer classical needs OpenCV: pip install opencv-python-headless") from err
        self.max_side, self.min_height, self.max_height = max_side, min_height, max_height
        self.max_stroke, self.max_gap = max_stroke, max_gap

    def characters(self, gray: np.ndarray) -> np.ndarray:
        """Character-like regions of a grayscale image: rows ``(x, y, w, h, fill)``, float64."""
        import cv2

        height, width = gray.shape
        mser = cv2.MSER_create(delta=4, min_area=10, max_area=max(int(0.02 * height * width), 11), max_variation=0.5)
        regions, boxes = mser.detectRegions(gray)
        if len(regions) == 0:
            return np.zeros((0, 5))
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        w, h = boxes[:, 2], boxes[:, 3]
        areas = np.array([len(r) for r in regions])
        fill = areas / (w * h)
        ok = (h >= self.min_height) & (h <= self.max_height * height) & (w <= 2.0 * h) & (w >= 0.1 * h)
        ok &= (fill >= 0.15) & (fill <= 0.9)
        found = []
        for k in np.flatnonzero(ok):
            x, y, bw, bh = boxes[k].tolist()
            pts = regions[k]
            mask = np.zeros((bh + 2, bw + 2), np.uint8)
            mask[pts[:, 1] - y + 1, pts[:, 0] - x + 1] = 1
            if 2.0 * float(cv2.distanceTransform(mask, cv2.DIST_L2, 3).max()) <= self.max_stroke * bh:
                found.append((x, y, bw, bh, fill[k]))
        found.sort(key=lambda box: -box[2] * box[3])
        b = np.array([box[:4] for box in found]).reshape(-1, 4)
        near = np.all(np.abs(b[:, None, :] - b[None, :, :]) <= np.array([2, 2, 3, 3]), axis=-1)
        unique = np.ones(len(found), dtype=bool)
        for i in range(len(found)):  # MSER reports a stroke at several levels: keep the largest box per place
            if unique[i]:
                unique[i + 1 :] &= ~near[i, i + 1 :]
        found = [box for box, u in zip(found, unique, strict=True) if u]
        return np.array(found, dtype=np.float64).reshape(-1, 5)

    def words(self, chars: np.ndarray) -> list[np.ndarray]:
        """Chains of three or more characters side by side (rows of :meth:`characters`), periodic ones dropped."""
        chars = chars[np.argsort(chars[:, 0], kind="stable")]
        parent = list(range(len(chars)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, (xi, yi, wi, hi, _) in enumerate(chars):
            for j in range(i + 1, len(chars)):
                xj, yj, wj, hj, _ = chars[j]
                tall = max(hi, hj)
                if xj > xi + wi + self.max_gap * tall:
                    break
                gap = xj - (xi + wi)
                if (
                    0.6 <= hj / hi <= 1.6
                    and abs(yi + hi / 2 - yj - hj / 2) <= 0.4 * tall
                    and -0.3 * min(wi, wj) <= gap <= self.max_gap * tall
                ):
                    parent[root(j)] = root(i)
        groups: dict[int, list[int]] = {}
        for i in range(len(chars)):
            groups.setdefault(root(i), []).append(i)
        words = []
        for members in groups.values():
            word = chars[members]
            if len(word) < 3:
                continue
            widths = word[:, 2]
            if widths.std() < 0.08 * widths.mean() and word[:, 4].std() < 0.03:  # identical marks: a pattern
                continue
            words.append(word)
        return words

    def score_one(self, image: np.ndarray) -> dict[str, float]:
        import cv2

        gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
        if max(gray.shape) > self.max_side:
            factor = self.max_side / max(gray.shape)
            gray = cv2.resize(
                gray, (round(gray.shape[1] * factor), round(gray.shape[0] * factor)), interpolation=cv2.INTER_AREA
            )
        words = self.words(self.characters(gray))
        return {"light": float(sum(len(w) for w in words)), "heavy": float(len(words))}


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


class VLMScorer(TextScorer):
    """A vision-language model from a local directory (SmolVLM2) asked a yes/no question per level.

    The chat is one user turn (the image, then :data:`VLM_PROMPTS` of the level) with the generation prompt; one
    forward pass gives the logits of the first answer token, and the score is P(yes) / (P(yes) + P(no)), the
    probabilities summed over the tokens that start "yes"/"Yes"/" yes"... and "no"/"No"/" no"... Batches are
    left-padded (with position ids counting real tokens only), so the last position is the answer's for every image
    and an image scores the same alone or in any batch.

    Args:
        model_path: Directory holding the weights, config and processor (``save_pretrained`` layout).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        batch_size: Images per forward pass.
        image_splitting: Let the processor split large images into tiles (SmolVLM's default; ``False``: one global
            view per image, several times fewer image tokens, small text missed more often).
        prompts: Question per level (default :data:`VLM_PROMPTS`).

    Raises:
        ConfigError: ``transformers`` is missing, or ``model_path`` holds no loadable model (message names
            ``--vlm-model``).
    """

    name = "vlm"
    batched = True

    def __init__(
        self,
        model_path: str | Path,
        device: str = "auto",
        batch_size: int = 8,
        image_splitting: bool = True,
        prompts: dict[str, str] | None = None,
    ) -> None:
        try:
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor
        except ImportError as err:
            raise ConfigError(
                f"--vlm-model: the VLM scorer needs transformers ({err}); pip install transformers"
            ) from err
        path = Path(model_path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"--vlm-model: {path} is not a local model directory (no config.json); download the "
                "weights first, e.g. huggingface-cli download HuggingFaceTB/SmolVLM2-2.2B-Instruct "
                f"--local-dir {path}"
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
        except ImportError as err:  # e.g. SmolVLM's processor needs num2words
            raise ConfigError(
                f"--vlm-model: loading {path} needs a missing package ({_first_line(err)}); "
                "pip install 'lit_webssl[vlm]'"
            ) from err
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(
                f"--vlm-model: cannot load a model and processor from {path}: {_first_line(err)}"
            ) from err
        self.model.to(device).eval()
        self.device, self.batch_size = device, batch_size
        image_processor = getattr(self.processor, "image_processor", None)
        if not image_splitting and hasattr(image_processor, "do_image_splitting"):
            image_processor.do_image_splitting = False
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        self.yes_ids = self._first_token_ids(YES_WORDS)
        self.no_ids = self._first_token_ids(NO_WORDS)
        if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
            raise ConfigError(f"--vlm-model: the tokenizer of {path} has no distinct first tokens for yes and no")
        self.prompts = {level: self.chat(text) for level, text in (prompts or VLM_PROMPTS).items()}
        forward = _parameters(self.model.forward)
        self._keep_last, self._positions = "logits_to_keep" in forward, "position_ids" in forward

    def _first_token_ids(self, words: Sequence[str]) -> list[int]:
        ids = {
            self.tokenizer.encode(word, add_special_tokens=False)[0]
            for word in words
            if self.tokenizer.encode(word, add_special_tokens=False)
        }
        unknown = getattr(self.tokenizer, "unk_token_id", None)
        return sorted(i for i in ids if i != unknown)

    def chat(self, question: str) -> str:
        """The prompt text for one image and ``question``: the processor's chat template with the generation
        prompt (a plain ``User:<image>question\\nAssistant:`` when it has none)."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image_token = getattr(self.processor, "image_token", "<image>")
        return f"User:{image_token}{question}\nAssistant:"

    def yes_probability(self, images: Sequence[np.ndarray], level: str) -> list[float]:
        """P(yes) / (P(yes) + P(no)) of the first answer token for each image, for the question of ``level``."""
        import torch

        pictures = [Image.fromarray(image) for image in images]
        inputs = self.processor(
            text=[self.prompts[level]] * len(pictures),
            images=[[p] for p in pictures],
            return_tensors="pt",
            padding=True,
        )
        inputs = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        if self._positions and "attention_mask" in inputs:  # left padding: positions count real tokens only
            extra["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(**inputs, **extra).logits[:, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        yes = torch.logsumexp(logp[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logp[:, self.no_ids], dim=-1)
        return torch.sigmoid(yes - no).tolist()

    def score(self, images: Sequence[np.ndarray], levels: Sequence[str]) -> list[dict[str, float]]:
        out: list[dict[str, float]] = [{} for _ in images]
        for level in levels:
            for start in range(0, len(images), self.batch_size):
                batch = images[start : start + self.batch_size]
                for k, p in enumerate(self.yes_probability(batch, level)):
                    out[start + k][level] = p
        return out

    def score_one(self, image: np.ndarray) -> dict[str, float]:
        return self.score([image], list(self.prompts))[0]


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _parameters(fn: Callable) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


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


# ------------------------------------------------------------------------------------------------------ MDS access
def find_splits(root: Path) -> list[str]:
    """The splits of an MDS dataset directory: ``[""]`` for ``<root>/index.json``, else the names of the
    subdirectories that hold an ``index.json``."""
    if (root / "index.json").is_file():
        return [""]
    splits = (
        sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "index.json").is_file()) if root.is_dir() else []
    )
    if not splits:
        raise ConfigError(f"--in: {root} holds no MDS dataset (no index.json there or in a split subdirectory)")
    return splits


def read_index(split_dir: Path) -> list[dict[str, Any]]:
    """The shard entries of ``<split_dir>/index.json``, checked to be MDS with one column layout."""
    index = split_dir / "index.json"
    try:
        shards = json.loads(index.read_text())["shards"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"--in: cannot read the MDS index {index}: {err}") from err
    for info in shards:
        if info.get("format") != "mds":
            raise ConfigError(f"--in: {index} lists a {info.get('format')!r} shard; only MDS shards are filtered")
        if (info["column_names"], info["column_encodings"]) != (
            shards[0]["column_names"],
            shards[0]["column_encodings"],
        ):
            raise ConfigError(f"--in: the shards of {index} do not share one column layout")
    return shards


def _shard_bytes(split_dir: Path, info: dict[str, Any]) -> bytes:
    raw = split_dir / info["raw_data"]["basename"]
    if raw.is_file():
        return raw.read_bytes()
    zipped = info.get("zip_data")
    if zipped and (split_dir / zipped["basename"]).is_file():
        from streaming.base.compression import decompress

        return decompress(info["compression"], (split_dir / zipped["basename"]).read_bytes())
    raise ConfigError(f"--in: shard {raw} is missing")


def iter_samples(split_dir: Path, shards: list[dict[str, Any]]) -> Iterator[dict[str, bytes]]:
    """Every sample of a split in order, as ``{column: encoded bytes}`` (the MDS sample layout: the sizes of the
    variable-size columns as uint32, then the columns' bytes in ``column_names`` order)."""
    for info in shards:
        data = _shard_bytes(split_dir, info)
        n, names, sizes = info["samples"], info["column_names"], info["column_sizes"]
        offsets = np.frombuffer(data, np.uint32, count=n + 1, offset=4).tolist()
        n_var = sum(size is None for size in sizes)
        for begin, end in zip(offsets[:-1], offsets[1:], strict=True):
            head = np.frombuffer(data, np.uint32, count=n_var, offset=begin).tolist()
            pos, var, sample = begin + 4 * n_var, 0, {}
            for name, size in zip(names, sizes, strict=True):
                if size is None:
                    size, var = head[var], var + 1
                sample[name] = data[pos : pos + size]
                pos += size
            if pos != end:
                raise ConfigError(
                    f"--in: a sample of {split_dir / info['raw_data']['basename']} does not match its column layout"
                )
            yield sample


def _mds_writer(out: Path, columns: dict[str, str], raw: set[str], info: dict[str, Any]) -> Any:
    """An ``MDSWriter`` that copies the columns in ``raw`` as the encoded bytes given and encodes the others."""
    from streaming import MDSWriter
    from streaming.base.format.mds.encodings import mds_encode

    class PassThroughWriter(MDSWriter):
        def encode_sample(self, sample: dict[str, Any]) -> bytes:
            sizes, data = [], []
            for key, encoding, size in zip(self.column_names, self.column_encodings, self.column_sizes, strict=True):
                datum = sample[key] if key in raw else mds_encode(encoding, sample[key])
                if size is None:
                    sizes.append(len(datum))
                data.append(datum)
            return np.array(sizes, np.uint32).tobytes() + b"".join(data)

    return PassThroughWriter(
        out=str(out),
        columns=columns,
        compression=info.get("compression"),
        hashes=info.get("hashes") or None,
        size_limit=info.get("size_limit") or 1 << 26,
        progress_bar=False,
    )


def decode_rgb(data: bytes, encoding: str) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` of an image column's encoded bytes (``bytes``, ``jpeg``, ``png``, ``pil``...)."""
    if encoding == "pil":
        from streaming.base.format.mds.encodings import mds_decode

        return np.asarray(mds_decode(encoding, data).convert("RGB"))
    from lit_webssl.datamodules.transforms import decode_image

    return decode_image(data).permute(1, 2, 0).numpy()


def _decode_or_none(data: bytes, encoding: str) -> np.ndarray | None:
    try:
        return decode_rgb(data, encoding)
    except (ValueError, OSError) as err:
        log.warning("dropping an undecodable image: %s", err)
        return None


# ------------------------------------------------------------------------------------------------------- filtering
_WORKER_SCORER: list[TextScorer] = []  # the scorer of a worker process, set once by _init_worker


def _init_worker(scorer: TextScorer) -> None:
    _WORKER_SCORER[:] = [scorer]


def _score_encoded(data: bytes, encoding: str) -> dict[str, float] | None:
    """Decode and score one image in a worker process (``None``: undecodable)."""
    image = _decode_or_none(data, encoding)
    return None if image is None else _WORKER_SCORER[0].score_one(image)


def score_encoded(
    scorer: TextScorer, data: Sequence[bytes], encoding: str, levels: Sequence[str], pool: Executor | None = None
) -> list[dict[str, float] | None]:
    """Decode and score encoded images: in ``pool``'s worker processes (set up by :func:`scorer_pool`) when given,
    else here; a batched scorer (the VLM) scores here in batches. ``None`` marks an undecodable image."""
    if pool is not None and not scorer.batched:
        return list(pool.map(_score_encoded, data, itertools.repeat(encoding), chunksize=4))
    images = [_decode_or_none(d, encoding) for d in data]
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

    with _mds_writer(dst, {**columns, **SCORE_COLUMNS}, raw, shards[0]) as writer:
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
                    writer.write({**{k: sample[k] for k in raw}, "text_score": float(score[keep]), "text_level": level})
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
            print(_describe(split or str(src), result))
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


def _describe(split: str, r: dict[str, Any]) -> str:
    line = (
        f"{split}: kept {r['kept']} of {r['samples']} ({100 * r['kept_fraction']:.1f} %) in {r['seconds']:.1f} s "
        f"({r['images_per_s']:.1f} images/s)"
    )
    if r["undecodable"]:
        line += f"; {r['undecodable']} undecodable dropped"
    if "precision" in r:
        line += f"; against {r['truth_key']}: precision {r['precision']:.3f}, recall {r['recall']:.3f}"
    return line


# ------------------------------------------------------------------------------------------------------------- CLI
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
