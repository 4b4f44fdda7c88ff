"""MDS shards -> uint8 views: the training dataset, the kNN probe dataset and the Lightning datamodule.

MDS sample schema: ``image`` (``bytes``: encoded JPEG/PNG), optional ``label`` (``int``), optional ``caption``
(``str``; also tokenized in the workers when the objective gives a text transform). Splits are subdirectories of the
dataset root (``<root>/train``, ``<root>/val``), each with its own ``index.json``. An undecodable image never stops a
run: it is logged once and replaced by the next sample.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lit_webssl.datamodules.loader import ResumableStreamingLoader
from lit_webssl.datamodules.transforms import EvalTransform, MultiViewTransform, decode_image
from lit_webssl.objectives.base import ViewSpec
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.local import LocalDataset
from streaming.base.world import World
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lit_webssl.errors import ConfigError

log = logging.getLogger(__name__)
MAX_SUBSTITUTIONS = 16
"""Consecutive undecodable samples tolerated before a sample fails for good."""
DEMO_HINT = "run `python -m lit_webssl data demo` to build the demo set, or point --data.local at MDS shards"

__all__ = ["DataConfigError", "LocalMDSDataset", "MultiViewStreamingDataset", "WebSSLDataModule"]


class DataConfigError(ConfigError):
    """A data setting (flag or path) that cannot work; the one-line message names the flag."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentation draws: a function of (seed, epoch, sample index) only."""
    return ((seed * 1_000_003 + epoch) * 2_654_435_761 + index) % (2**63)


def describe_sample(reader: Any, index: int) -> str:
    """Where sample ``index`` lives: ``#J of shard PATH`` for a ``StreamingDataset`` or ``LocalDataset``."""
    try:
        shard_id, offset = reader.spanner[index]
        shard = reader.shards[shard_id]
        return f"#{offset} of shard {os.path.join(shard.dirname, shard.split, shard.file_pairs[0][0].basename)}"
    except (AttributeError, IndexError, KeyError, TypeError):
        return f"dataset {type(reader).__name__}"


def fetch_decodable(reader: Any, index: int, image_key: str, warned: set[int],
                    max_tries: int = MAX_SUBSTITUTIONS) -> tuple[dict[str, Any], Tensor, int]:
    """Read sample ``index`` of a map-style MDS ``reader`` and decode its image; undecodable samples are replaced
    by the following ones (logged once each: ``warned`` holds the indices already logged).

    Returns:
        The raw sample used, its decoded uint8 image ``(3, H, W)`` and the number of samples skipped.

    Raises:
        RuntimeError: ``max_tries`` consecutive samples were undecodable.
    """
    for skipped in range(max_tries):
        current = (index + skipped) % reader.size
        try:
            sample = reader.get_item(current)
            return sample, decode_image(sample[image_key]), skipped
        except (ValueError, KeyError, TypeError) as err:
            if current not in warned:
                warned.add(current)
                log.warning("skipping sample %d (%s): %s", current, describe_sample(reader, current), err)
    raise RuntimeError(f"{max_tries} consecutive undecodable samples from sample {index} "
                       f"({describe_sample(reader, index)})")


def _label(sample: dict[str, Any], label_key: str | None) -> Tensor:
    value = sample.get(label_key) if label_key else None
    return torch.tensor(-1 if value is None else int(value), dtype=torch.int64)


class MultiViewStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` whose samples are the views an objective declares.

    Each sample is ``{"views": {name: uint8 (count, 3, S, S)}, "label": int64 scalar (-1 without labels),
    "index": int, "corrupt": int}`` plus ``"caption": str`` when ``caption_key`` is set (and ``"text"``, the caption
    through ``text_transform``, when that is given too). ``corrupt`` counts the
    undecodable samples that were replaced by following ones. Augmentation draws are seeded from
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

    def __init__(self, *, views: Sequence[ViewSpec] | None = None, transform: Callable[[Tensor], Any] | None = None,
                 image_key: str = "image", label_key: str | None = "label", caption_key: str | None = None,
                 text_transform: Callable[[str], Any] | None = None, **kwargs: Any) -> None:
        if (views is None) == (transform is None):
            raise ValueError("give exactly one of views and transform")
        super().__init__(**kwargs)
        self.transform = transform if transform is not None else MultiViewTransform(views)
        self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
        self.text_transform = text_transform
        self._warned: set[int] = set()

    def __getitem__(self, idx: int) -> dict[str, Any]:
        sample, image, skipped = fetch_decodable(self, int(idx), self.image_key, self._warned)
        epoch = max(int(getattr(self, "next_epoch", 1)) - 1, 0)
        with torch.random.fork_rng(devices=[]):  # CPU generator only: device RNGs of the run stay untouched
            torch.default_generator.manual_seed(sample_seed(self.shuffle_seed, epoch, int(idx)))
            views = self.transform(image)
        out = {"views": views, "label": _label(sample, self.label_key), "index": int(idx), "corrupt": skipped}
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

    def __init__(self, local: str, split: str, transform: Callable[[Tensor], Tensor], image_key: str = "image",
                 label_key: str | None = "label") -> None:
        self.reader, self.transform = LocalDataset(local, split), transform
        self.image_key, self.label_key = image_key, label_key
        self._warned: set[int] = set()

    @property
    def column_names(self) -> list[str]:
        """Columns of the split (from its first shard)."""
        return list(self.reader.shards[0].column_names) if self.reader.shards else []

    def __len__(self) -> int:
        return int(self.reader.size)

    def __getitem__(self, idx: int) -> dict[str, Tensor]:
        sample, image, _ = fetch_decodable(self.reader, int(idx), self.image_key, self._warned)
        return {"image": self.transform(image), "label": _label(sample, self.label_key)}


class WebSSLDataModule(L.LightningDataModule):
    """MDS shards read with MosaicML Streaming; every sample becomes the views the objective declares.

    Per-rank partitioning (``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE`` from the environment), shuffling and
    mid-epoch resume are Streaming's. Batches stay uint8 on the host; ``LitWebSSL`` normalizes them on the device.

    Args:
        local: Dataset root directory (splits are its subdirectories); with ``remote``, the local cache directory.
        remote: Object-storage root (``s3://bucket/prefix``, ``gs://...``) read through Streaming's own clients;
            ``None`` reads ``local`` directly.
        train_split: Split to train on (also the kNN probe's labelled bank).
        val_split: Split to validate on (the objective's loss) and the kNN probe's queries; ``None`` disables both.
        batch_size: Samples per device per step (Streaming partitions the data by it too).
        num_workers: Loader worker processes per device.
        shuffle: Shuffle the training split (Streaming's ``py1e`` shuffle).
        shuffle_seed: Seed of the shuffle and of the per-sample augmentation draws.
        image_key: Column holding the encoded image bytes.
        label_key: Column holding an integer label (used by probes only); ``None`` when the data has none.
        caption_key: Column holding a caption, for objectives that need text; ``None``: no captions.
        knn_train_samples: Cap on the kNN probe's bank (first N samples of ``train_split``); ``None``: all.
        knn_val_samples: Cap on the kNN probe's queries (first N samples of ``val_split``); ``None``: all.
        pin_memory: Pin host memory of batches (only when CUDA is available).
        drop_last: Drop the last incomplete training batch.
        persistent_workers: Keep loader workers alive between epochs.
    """

    def __init__(
        self,
        local: str,
        remote: str | None = None,
        train_split: str = "train",
        val_split: str | None = "val",
        batch_size: int = 64,
        num_workers: int = 2,
        shuffle: bool = True,
        shuffle_seed: int = 9176,
        image_key: str = "image",
        label_key: str | None = "label",
        caption_key: str | None = None,
        knn_train_samples: int | None = None,
        knn_val_samples: int | None = None,
        pin_memory: bool = True,
        drop_last: bool = True,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        for flag, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                 ("knn_train_samples", knn_train_samples, 1), ("knn_val_samples", knn_val_samples, 1)):
            if value is not None and value < low:
                raise DataConfigError(f"--data.{flag} must be >= {low}, got {value}")
        self.local, self.remote = str(local), remote
        self.train_split, self.val_split = train_split, val_split
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle, self.shuffle_seed = shuffle, shuffle_seed
        self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
        self.knn_train_samples, self.knn_val_samples = knn_train_samples, knn_val_samples
        self.pin_memory, self.drop_last, self.persistent_workers = pin_memory, drop_last, persistent_workers
        self.views: list[ViewSpec] | None = None
        self.text_transform: Callable[[str], Any] | None = None

    def set_views(self, views: Sequence[ViewSpec]) -> None:
        """Set the crops to produce (otherwise taken from the attached module's ``objective.views()``)."""
        self.views = list(views)

    def set_text_transform(self, transform: Callable[[str], Any] | None) -> None:
        """Set the per-sample caption transform (otherwise the attached objective's ``text_transform()``)."""
        self.text_transform = transform

    # -- checks -------------------------------------------------------------------------------------------------
    def _check_split(self, split: str, flag: str) -> None:
        """One-line error naming the flag when a local split has no MDS index or lacks the image/caption column."""
        if self.remote is not None:
            return
        root = Path(self.local)
        if not root.is_dir():
            raise DataConfigError(f"--data.local: no dataset directory at {root} ({DEMO_HINT})")
        index = root / split / "index.json"
        if not index.is_file():
            found = sorted(p.parent.name for p in root.glob("*/index.json"))
            if not found:
                raise DataConfigError(f"--data.local: no MDS index at {index} ({DEMO_HINT})")
            raise DataConfigError(f"{flag}: no MDS index at {index} (splits under {root}: {', '.join(found)})")
        columns = LocalDataset(self.local, split).shards[0].column_names
        for key_flag, key in (("--data.image_key", self.image_key), ("--data.caption_key", self.caption_key)):
            if key is not None and key not in columns:
                raise DataConfigError(f"{key_flag}: split {split!r} has no column {key!r} in its MDS index {index} "
                                      f"(columns: {', '.join(columns)})")

    def setup(self, stage: str | None = None) -> None:
        """Check the splits and columns, and take the views from the attached objective unless set."""
        splits = [(self.train_split, "--data.train_split")]
        if self.val_split is not None:
            splits.append((self.val_split, "--data.val_split"))
        for split, flag in splits:
            self._check_split(split, flag)
        objective = getattr(self.trainer.lightning_module, "objective", None) if self.trainer is not None else None
        if self.views is None and objective is not None:
            self.set_views(objective.views())
        if objective is not None and getattr(objective, "needs_text", False):
            if self.caption_key is None:
                raise DataConfigError(f"--data.caption_key: {type(objective).__name__} needs captions; name the "
                                      f"caption column of the data at {self.local}")
            make_transform = getattr(objective, "text_transform", None)
            if self.text_transform is None and callable(make_transform):
                self.set_text_transform(make_transform())

    # -- training and validation ------------------------------------------------------------------------------
    def _stream_loader(self, split: str, shuffle: bool, drop_last: bool) -> StreamingDataLoader:
        if self.views is None:
            raise DataConfigError("--data: no views set; attach the datamodule to a trainer or call set_views()")
        dataset = MultiViewStreamingDataset(
            views=self.views, image_key=self.image_key, label_key=self.label_key, caption_key=self.caption_key,
            text_transform=self.text_transform, local=self.local, remote=self.remote, split=split, shuffle=shuffle,
            shuffle_seed=self.shuffle_seed, batch_size=self.batch_size,
        )
        return ResumableStreamingLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, drop_last=drop_last,
            pin_memory=self._pin,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_dataloader(self) -> StreamingDataLoader:
        """Shuffled (``shuffle``) multi-view batches of ``train_split``, a new ``StreamingDataset`` per call."""
        return self._stream_loader(self.train_split, self.shuffle, self.drop_last)

    def val_dataloader(self) -> StreamingDataLoader | list:
        """Multi-view batches of ``val_split`` in order; ``[]`` (no validation) when ``val_split`` is ``None``."""
        if self.val_split is None:
            return []
        return self._stream_loader(self.val_split, shuffle=False, drop_last=False)

    # -- kNN probe ------------------------------------------------------------------------------------------------
    def _probe_root(self, split: str, cap: int | None) -> str:
        """Local root holding ``split``: ``local`` itself, or for remote data ``<local>/_knn_cache`` with the shards
        the probe reads downloaded (plain downloads: no shared memory and no collective, so rank 0 alone may call)."""
        if self.remote is None:
            return self.local
        cache = os.path.join(self.local, "_knn_cache")
        stream = Stream(remote=self.remote, local=cache, split=split, download_retry=2, download_timeout=60.0,
                        keep_zip=False)
        needed = float("inf") if cap is None else cap
        for shard in stream.get_shards(World.detect(), allow_unsafe_types=False):
            if needed <= 0:
                break
            stream.prepare_shard(shard)
            needed -= shard.samples
        return cache

    def _probe_set(self, split: str, flag: str, size: int, cap: int | None) -> Dataset:
        self._check_split(split, flag)
        dataset = LocalMDSDataset(self._probe_root(split, cap), split, EvalTransform(size), self.image_key,
                                  self.label_key)
        if self.label_key not in dataset.column_names:
            raise DataConfigError(f"--data.label_key: split {split!r} has no label column {self.label_key!r} "
                                  f"(columns: {dataset.column_names})")
        return Subset(dataset, range(min(cap, len(dataset)))) if cap is not None else dataset

    def knn_dataloaders(self, size: int, batch_size: int) -> tuple[DataLoader, DataLoader]:
        """Loaders of the kNN probe: (bank = labelled ``train_split``, queries = ``val_split``).

        Both go through the deterministic :class:`EvalTransform` in order, keep the last partial batch, and are
        capped by ``knn_train_samples`` / ``knn_val_samples``. Batches: ``{"image": uint8 (B, 3, size, size),
        "label": int64 (B,)}``.

        Args:
            size: Side length of the probe crops.
            batch_size: Images per batch.

        Raises:
            DataConfigError: No ``val_split``, no ``label_key``, or a split without the label column.
        """
        if self.val_split is None:
            raise DataConfigError("--data.val_split: the kNN probe needs a labelled validation split")
        if self.label_key is None:
            raise DataConfigError("--data.label_key: the kNN probe needs labels; name the label column")
        sets = (self._probe_set(self.train_split, "--data.train_split", size, self.knn_train_samples),
                self._probe_set(self.val_split, "--data.val_split", size, self.knn_val_samples))
        bank, queries = (DataLoader(s, batch_size=batch_size, shuffle=False, drop_last=False,
                                    num_workers=self.num_workers, pin_memory=self._pin) for s in sets)
        return bank, queries

    @property
    def _pin(self) -> bool:
        return self.pin_memory and torch.cuda.is_available()
