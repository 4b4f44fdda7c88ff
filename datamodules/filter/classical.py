"""The classical text detector (OpenCV, CPU): character-like MSER regions chained into words."""

from __future__ import annotations

import numpy as np

from lit_webssl.datamodules.filter.base import TextScorer
from lit_webssl.errors import ConfigError


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
