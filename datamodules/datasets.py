"""The map-style datasets over MDS shards: the training views of a ``StreamingDataset`` (one dataset or a mixture)
and the labelled images of the kNN probe. An undecodable image never stops a run: it is logged once and replaced by
the next sample of the same stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from streaming import LocalDataset, StreamingDataset
from torch import Tensor
from torch.utils.data import Dataset

from lit_webssl.compat.streaming import epoch_of, sample_location, shuffle_seed, stream_of, stream_span
from lit_webssl.datamodules.remotes import INDEX
from lit_webssl.datamodules.streams import index_columns
from lit_webssl.datamodules.transforms import MultiViewTransform, decode_image
from lit_webssl.objectives.base import ViewSpec

__all__ = ["LocalMDSDataset", "MultiViewStreamingDataset", "fetch_decodable", "sample_seed"]

log = logging.getLogger(__name__)
MAX_SUBSTITUTIONS = 16
"""Consecutive undecodable samples tolerated before a sample fails for good."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentation draws: a function of (seed, epoch, sample index) only."""
    return ((seed * 1_000_003 + epoch) * 2_654_435_761 + index) % (2**63)


def describe_sample(reader: Any, index: int) -> str:
    """Where sample ``index`` lives: ``#J of shard PATH`` for a ``StreamingDataset`` or ``LocalDataset``."""
    return sample_location(reader, index) or f"dataset {type(reader).__name__}"


def fetch_decodable(
    reader: Any,
    index: int,
    image_key: str,
    warned: set[int],
    max_tries: int = MAX_SUBSTITUTIONS,
    span: tuple[int, int] | None = None,
) -> tuple[dict[str, Any], Tensor, int]:
    """Read sample ``index`` of a map-style MDS ``reader`` and decode its image; undecodable samples are replaced
    by the following ones (logged once each: ``warned`` holds the indices already logged).

    Args:
        reader: A ``StreamingDataset`` or ``LocalDataset``.
        index: Sample to read.
        image_key: Column holding the encoded image bytes.
        warned: Indices already logged as undecodable (updated).
        max_tries: Consecutive undecodable samples tolerated.
        span: Sample range ``[lo, hi)`` the replacements wrap around in (a stream of a mixture, so a replacement
            comes from the same stream); ``None``: the whole reader.

    Returns:
        The raw sample used, its decoded uint8 image ``(3, H, W)`` and the number of samples skipped.

    Raises:
        RuntimeError: ``max_tries`` consecutive samples were undecodable.
    """
    lo, hi = span if span is not None else (0, reader.size)
    for skipped in range(min(max_tries, hi - lo)):
        current = lo + (index - lo + skipped) % (hi - lo)
        try:
            sample = reader.get_item(current)
            return sample, decode_image(sample[image_key]), skipped
        except (ValueError, KeyError, TypeError) as err:
            if current not in warned:
                warned.add(current)
                log.warning("skipping sample %d (%s): %s", current, describe_sample(reader, current), err)
    raise RuntimeError(
        f"{max_tries} consecutive undecodable samples from sample {index} ({describe_sample(reader, index)})"
    )


def _label(sample: dict[str, Any], label_key: str | None) -> Tensor:
    value = sample.get(label_key) if label_key else None
    return torch.tensor(-1 if value is None else int(value), dtype=torch.int64)


class MultiViewStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` whose samples are the views an objective declares.

    Each sample is ``{"views": {name: uint8 (count, 3, S, S)}, "label": int64 scalar (-1 without labels),
    "index": int, "stream": int, "corrupt": int}`` plus ``"caption": str`` when ``caption_key`` is set (and ``"text"``,
    the caption through ``text_transform``, when that is given too). ``index`` is the sample's id over the
    concatenated streams, ``stream`` the position of its stream in ``streams`` (0 without a mixture), ``corrupt``
    counts the undecodable samples that were replaced by following ones of the same stream. Augmentation draws are
    seeded from
    ``(shuffle_seed, epoch, sample index)``, so a sample's views do not depend on worker count, worker or resume.

    Args:
        views: Views to produce (builds a :class:`MultiViewTransform`); give this or ``transform``.
        transform: Callable uint8 ``(3, H, W)`` -> views dict, instead of ``views``.
        image_key: Column holding the encoded image bytes.
        label_key: Column holding an integer label; ``None``: no labels (``-1``).
        caption_key: Column holding a caption string; ``None``: no captions.
        text_transform: Per-sample ``caption -> tensor`` (e.g. CLIP's tokenizer), output as ``"text"``.
        **kwargs: Passed to ``StreamingDataset`` (``local``, ``remote``, ``split``, ``shuffle``, ``batch_size``...).
    """

    def __init__(
        self,
        *,
        views: Sequence[ViewSpec] | None = None,
        transform: Callable[[Tensor], Any] | None = None,
        image_key: str = "image",
        label_key: str | None = "label",
        caption_key: str | None = None,
        text_transform: Callable[[str], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if (views is None) == (transform is None):
            raise ValueError("give exactly one of views and transform")
        super().__init__(**kwargs)
        self.transform = transform if transform is not None else MultiViewTransform(views)
        self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
        self.text_transform = text_transform
        self._warned: set[int] = set()

    def stream_of(self, idx: int) -> int:
        """Position in ``streams`` of the stream holding sample ``idx``."""
        return stream_of(self, idx)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        idx = int(idx)
        stream = self.stream_of(idx)
        sample, image, skipped = fetch_decodable(
            self, idx, self.image_key, self._warned, span=stream_span(self, stream)
        )
        epoch = epoch_of(self)
        with torch.random.fork_rng(devices=[]):  # CPU generator only: device RNGs of the run stay untouched
            torch.default_generator.manual_seed(sample_seed(shuffle_seed(self), epoch, idx))
            views = self.transform(image)
        out = {
            "views": views,
            "label": _label(sample, self.label_key),
            "index": idx,
            "stream": stream,
            "corrupt": skipped,
        }
        if self.caption_key:
            out["caption"] = str(sample.get(self.caption_key) or "")
            if self.text_transform is not None:
                out["text"] = self.text_transform(out["caption"])
        return out


class LocalMDSDataset(Dataset):
    """Map-style reader of one MDS split for probes: ``{"image": uint8 (3, S, S), "label": int64 scalar}``.

    Reads local shards directly (no shared memory, so it can sit beside a training ``StreamingDataset`` over the
    same directory); undecodable images are replaced by following samples, as in training.

    Args:
        local: Dataset root directory.
        split: Split subdirectory.
        transform: Deterministic uint8 image transform (e.g. ``EvalTransform``).
        image_key: Column holding the encoded image bytes.
        label_key: Column holding the integer label.
    """

    def __init__(
        self,
        local: str,
        split: str,
        transform: Callable[[Tensor], Tensor],
        image_key: str = "image",
        label_key: str | None = "label",
    ) -> None:
        self.reader, self.transform = LocalDataset(local, split), transform
        self.image_key, self.label_key = image_key, label_key
        self.column_names = index_columns(Path(local) / split / INDEX)
        """Columns of the split (from the first shard of its index)."""
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return int(self.reader.size)

    def __getitem__(self, idx: int) -> dict[str, Tensor]:
        sample, image, _ = fetch_decodable(self.reader, int(idx), self.image_key, self._warned)
        return {"image": self.transform(image), "label": _label(sample, self.label_key)}
