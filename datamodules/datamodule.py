"""``WebSSLDataModule``: MosaicML Streaming over MDS shards, views from the objective's declaration."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lit_webssl.datamodules.streaming import DataConfigError, LocalMDSDataset, MultiViewStreamingDataset
from lit_webssl.datamodules.transforms import EvalTransform, MultiViewTransform
from lit_webssl.objectives.base import ViewSpec
from streaming import StreamingDataLoader
from torch.utils.data import DataLoader, Subset


class WebSSLDataModule(L.LightningDataModule):
    """MDS shards read with MosaicML Streaming; each sample becomes the views the objective declares.

    Per-rank sharding, shuffling and mid-epoch resume are Streaming's (the loader's state rides in Lightning
    checkpoints). Images stay uint8 on the CPU; ``LitWebSSL`` normalizes them on the device.

    Args:
        local: Dataset root directory (splits are its subdirectories); with ``remote``, the local cache directory.
        remote: Object-storage root (``s3://bucket/prefix``, ``gs://...``) read through Streaming's own clients;
            ``None`` reads ``local`` directly.
        train_split: Split used for training.
        val_split: Split used for validation (the objective's loss on its views) and as kNN queries; ``None``
            disables both.
        batch_size: Images per device per step.
        num_workers: Loader worker processes per device.
        shuffle: Shuffle the training split (Streaming's ``py1e`` shuffle).
        shuffle_seed: Seed of the shuffle and of the per-sample augmentation draws.
        image_key: Column holding the encoded image bytes.
        label_key: Column holding an integer label (probes only); ``None`` when the data has none.
        caption_key: Column holding a caption, for objectives that need text.
        knn_train_samples: Cap on the kNN bank (first N samples of ``train_split``); ``None``: all.
        knn_val_samples: Cap on the kNN queries (first N samples of ``val_split``); ``None``: all.
        pin_memory: Pin host memory of batches.
        drop_last: Drop the last incomplete training batch.
        persistent_workers: Keep loader workers alive between epochs.
        predownload: Samples per worker to download ahead (remote data); ``None``: Streaming's default.
        cache_limit: Local cache size limit for remote data (e.g. ``"100gb"``); ``None``: unlimited.
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
        predownload: int | None = None,
        cache_limit: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise DataConfigError(f"--data.batch_size must be > 0, got {batch_size}")
        if num_workers < 0:
            raise DataConfigError(f"--data.num_workers must be >= 0, got {num_workers}")
        self.local, self.remote = local, remote
        self.train_split, self.val_split = train_split, val_split
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle, self.shuffle_seed = shuffle, shuffle_seed
        self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
        self.knn_train_samples, self.knn_val_samples = knn_train_samples, knn_val_samples
        self.pin_memory, self.drop_last, self.persistent_workers = pin_memory, drop_last, persistent_workers
        self.predownload, self.cache_limit = predownload, cache_limit
        self.views: list[ViewSpec] | None = None

    def set_views(self, views: Sequence[ViewSpec]) -> None:
        """The crops to produce (normally taken from the attached module's objective)."""
        self.views = list(views)

    def _check_split(self, split: str, flag: str) -> None:
        if self.remote is not None:
            return
        index = Path(self.local) / split / "index.json"
        if not Path(self.local).is_dir():
            raise DataConfigError(
                f"--data.local: no dataset directory at {self.local} (run `python -m lit_webssl data demo` to build "
                "the demo set, or point --data.local at MDS shards)"
            )
        if not index.is_file():
            raise DataConfigError(f"{flag}: no MDS index at {index}")

    def setup(self, stage: str | None = None) -> None:
        self._check_split(self.train_split, "--data.train_split")
        if self.val_split is not None:
            self._check_split(self.val_split, "--data.val_split")
        if self.views is None and self.trainer is not None:
            self.set_views(self.trainer.lightning_module.objective.views())
        objective = getattr(self.trainer.lightning_module, "objective", None) if self.trainer else None
        if objective is not None and objective.needs_text and self.caption_key is None:
            raise DataConfigError(f"--data.caption_key: {type(objective).__name__} needs captions; name the column")

    def _stream_loader(self, split: str, shuffle: bool, drop_last: bool) -> StreamingDataLoader:
        if self.views is None:
            raise DataConfigError("--data: no views set; attach the datamodule to a trainer or call set_views()")
        local = self.local if self.remote is None else str(Path(self.local) / "_stream")
        dataset = MultiViewStreamingDataset(
            transform=MultiViewTransform(self.views), image_key=self.image_key, label_key=self.label_key,
            caption_key=self.caption_key, local=local, remote=self.remote, split=split, shuffle=shuffle,
            shuffle_seed=self.shuffle_seed, batch_size=self.batch_size, predownload=self.predownload,
            cache_limit=self.cache_limit,
        )
        return StreamingDataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
            drop_last=drop_last, persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_dataloader(self) -> StreamingDataLoader:
        return self._stream_loader(self.train_split, self.shuffle, self.drop_last)

    def val_dataloader(self) -> StreamingDataLoader | list:
        if self.val_split is None:
            return []
        return self._stream_loader(self.val_split, shuffle=False, drop_last=False)

    # -- probes -----------------------------------------------------------------------------------------------
    def _probe_set(self, split: str, size: int, cap: int | None, flag: str) -> Subset | LocalMDSDataset:
        if self.remote is not None:
            raise DataConfigError(f"{flag}: kNN probes read local MDS splits; remote probe data is not supported yet")
        self._check_split(split, flag)
        if self.label_key is None:
            raise DataConfigError("--data.label_key: the kNN probe needs labels; name the label column")
        columns = json.loads((Path(self.local) / split / "index.json").read_text())["shards"][0]["column_names"]
        if self.label_key not in columns:
            raise DataConfigError(f"--data.label_key: split {split!r} has no column {self.label_key!r} ({columns})")
        dataset = LocalMDSDataset(self.local, split, EvalTransform(size), self.image_key, self.label_key)
        return Subset(dataset, range(min(cap, len(dataset)))) if cap is not None else dataset

    def knn_dataloaders(self, size: int, batch_size: int) -> tuple[DataLoader, DataLoader]:
        """(bank, queries): the labelled train and val splits through a deterministic resize + center crop."""
        if self.val_split is None:
            raise DataConfigError("--data.val_split: the kNN probe needs a labelled validation split")
        sets = (self._probe_set(self.train_split, size, self.knn_train_samples, "--data.train_split"),
                self._probe_set(self.val_split, size, self.knn_val_samples, "--data.val_split"))
        return tuple(
            DataLoader(s, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                       collate_fn=_probe_collate)
            for s in sets
        )


def _probe_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    from torch.utils.data import default_collate

    return default_collate([{"image": s["image"], "label": s["label"]} for s in samples])
