"""Streaming datamodule: MDS shards (local or object storage) -> decoded uint8 views declared by the objective.

MDS sample schema: ``image`` (``bytes``: encoded JPEG/PNG), optional ``label`` (``int``), optional ``caption``
(``str``). Splits are subdirectories (``<root>/train``, ``<root>/val``) with their own ``index.json``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lit_webssl.datamodules.transforms import decode
from streaming import StreamingDataset
from streaming.base.local import LocalDataset
from torch.utils.data import Dataset

from lit_webssl.errors import ConfigError

log = logging.getLogger(__name__)
MAX_SUBSTITUTIONS = 16


class DataConfigError(ConfigError):
    """A data setting (flag or path) that cannot work; the message names the flag."""


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((int(seed) * 1_000_003 + int(epoch)) * 2_654_435_761 + int(index)) % (2**63)


class _ViewsMixin:
    """Decoding with substitution of undecodable samples, and per-sample seeded augmentation.

    Each sample's random draws are seeded from ``(seed, epoch, sample index)``, so the views of a sample do not
    depend on the number of workers, on which worker reads it, or on whether the run was resumed.
    """

    transform: Callable[[torch.Tensor], Any]
    output_key: str
    image_key: str
    label_key: str | None
    caption_key: str | None
    seed: int

    def _raw(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def _epoch(self) -> int:
        return 0

    def _num(self) -> int:
        raise NotImplementedError

    def _decode_with_substitution(self, index: int) -> tuple[dict[str, Any], torch.Tensor, int]:
        for tries in range(MAX_SUBSTITUTIONS):
            current = (index + tries) % self._num()
            sample = self._raw(current)
            try:
                return sample, decode(sample[self.image_key]), tries
            except (ValueError, KeyError, TypeError) as err:
                log.warning("skipping sample %d of %s: %s", current, self._where(), err)
        raise RuntimeError(f"{MAX_SUBSTITUTIONS} consecutive undecodable samples from index {index} in {self._where()}")

    def _where(self) -> str:
        return "dataset"

    def _build(self, index: int) -> dict[str, Any]:
        sample, image, substitutions = self._decode_with_substitution(index)
        with torch.random.fork_rng(devices=[]):
            seed = _sample_seed(self.seed, self._epoch(), index)
            torch.manual_seed(seed)
            state = random.getstate()
            random.seed(seed)
            try:
                views = self.transform(image)
            finally:
                random.setstate(state)
        label = sample.get(self.label_key, -1) if self.label_key else -1
        result = {self.output_key: views, "label": torch.tensor(int(label), dtype=torch.int64),
                  "index": torch.tensor(index), "corrupt": torch.tensor(substitutions)}
        if self.caption_key:
            result["caption"] = str(sample.get(self.caption_key, ""))
        return result


class MultiViewStreamingDataset(_ViewsMixin, StreamingDataset):
    """A ``StreamingDataset`` whose samples are ``{"views": {name: uint8 (count, 3, S, S)}, "label", ...}``."""

    def __init__(self, *, transform: Callable, image_key: str = "image", label_key: str | None = "label",
                 caption_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.transform, self.output_key = transform, "views"
        self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
        self.seed = kwargs.get("shuffle_seed", 9176)

    def _raw(self, index: int) -> dict[str, Any]:
        return StreamingDataset.__getitem__(self, index)

    def _num(self) -> int:
        return self.num_samples

    def _epoch(self) -> int:
        return max(int(self.next_epoch) - 1, 0)

    def _where(self) -> str:
        return ", ".join(str(s.remote or s.local) for s in self.streams)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._build(index)


class LocalMDSDataset(_ViewsMixin, Dataset):
    """Map-style reader of one local MDS split (no shared memory; used for probes beside a training stream)."""

    def __init__(self, local: str, split: str, transform: Callable, image_key: str = "image",
                 label_key: str | None = "label", seed: int = 0) -> None:
        self.reader = LocalDataset(local, split)
        self.path = str(Path(local) / split)
        self.transform, self.output_key = transform, "image"
        self.image_key, self.label_key, self.caption_key = image_key, label_key, None
        self.seed = seed

    def __len__(self) -> int:
        return len(self.reader)

    def _num(self) -> int:
        return len(self.reader)

    def _raw(self, index: int) -> dict[str, Any]:
        return self.reader[index]

    def _where(self) -> str:
        return self.path

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._build(index)
