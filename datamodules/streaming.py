"""The Lightning datamodule: MDS shards -> uint8 views for training and validation, labelled images for the kNN probe.

MDS sample schema: ``image`` (``bytes``: encoded JPEG/PNG), optional ``label`` (``int``), optional ``caption``
(``str``; also tokenized in the workers when the objective gives a text transform). Splits are subdirectories of the
dataset root (``<root>/train``, ``<root>/val``), each with its own ``index.json``. An undecodable image never stops a
run: it is logged once and replaced by the next sample of the same stream.

Several datasets mix through ``streams`` (one :class:`StreamSpec` each, with a ``proportion``, ``repeat`` or ``choose``
weight, as Streaming's ``Stream``). See ``docs/mixtures.md`` for mixtures, exact resume, corrupt samples and remotes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from streaming import Stream, StreamingDataLoader
from torch.utils.data import DataLoader, Dataset, Subset

from lit_webssl.compat.streaming import stream_shards
from lit_webssl.datamodules.datasets import LocalMDSDataset, MultiViewStreamingDataset
from lit_webssl.datamodules.errors import DEMO_HINT, DataConfigError
from lit_webssl.datamodules.loader import ResumableStreamingLoader
from lit_webssl.datamodules.remotes import INDEX, fetch_indices
from lit_webssl.datamodules.streams import WEIGHTS, StreamSpec, check_weights, index_columns, stream_specs
from lit_webssl.datamodules.transforms import EvalTransform
from lit_webssl.objectives.base import ViewSpec

__all__ = ["DataConfigError", "LocalMDSDataset", "MultiViewStreamingDataset", "StreamSpec", "WebSSLDataModule"]


class WebSSLDataModule(L.LightningDataModule):
    """MDS shards read with MosaicML Streaming; every sample becomes the views the objective declares.

    One dataset (``local``, optionally cached from ``remote``) or a mixture (``streams``, each with its own
    ``proportion``, ``repeat`` or ``choose``). Per-rank partitioning, shuffling and mid-epoch resume are Streaming's;
    the loader's position is saved in Lightning checkpoints and restored on every rank and worker. Batches stay uint8
    on the host; ``LitWebSSL`` normalizes them on the device.

    Args:
        local: Dataset root directory (splits are its subdirectories); with ``remote``, the local cache directory.
            ``None`` with ``streams``.
        remote: Object-storage root (``s3://bucket/prefix``, ``gs://...``) read through Streaming's own clients;
            ``None`` reads ``local`` directly. Credentials come from the client's environment, never from here.
        streams: A mixture of datasets, each ``{local, remote, proportion | repeat | choose}``, instead of
            ``local``/``remote``. Validation reads every sample of every stream once; the kNN probe the first stream.
        epoch_size: Samples per epoch over all streams (Streaming's ``epoch_size``); only with ``proportion``
            weights or none (streams are then drawn in proportion to their size). ``None``: the streams' own total.
        download_retry: Tries per file fetched from a remote (index and shards) before the run stops, at least 1.
        download_timeout: Seconds allowed per file fetched from a remote.
        train_split: Split to train on (also the kNN probe's labelled bank).
        val_split: Split to validate on (the objective's loss) and the kNN probe's queries; ``None`` disables both.
        batch_size: Samples per device per step (Streaming partitions the data by it too).
        num_workers: Loader worker processes per device.
        shuffle: Shuffle the training split (Streaming's ``py1e`` shuffle).
        shuffle_seed: Seed of the shuffle, of the mixture's draws and of the per-sample augmentation draws.
        num_canonical_nodes: Streaming's number of canonical nodes, which fixes the global sample order whatever the
            number of physical nodes (``None``: Streaming's default, which depends on the node count, so a run
            resumed or repeated on another number of nodes sees another order). Set it (e.g. to the largest node
            count the run will use) to keep one order across node counts.
        image_key: Column holding the encoded image bytes.
        label_key: Column holding an integer label (used by probes only); ``None`` when the data has none.
        caption_key: Column holding a caption, for objectives that need text; ``None``: no captions.
        knn_train_samples: Cap on the kNN probe's bank (first N samples of ``train_split``); ``None``: all.
        knn_val_samples: Cap on the kNN probe's queries (first N samples of ``val_split``); ``None``: all.
        pin_memory: Pin host memory of batches (only when CUDA is available).
        drop_last: Drop the last incomplete training batch.
        persistent_workers: Keep loader workers alive between epochs.
        views: The crops to produce, as the objective declares them (its ``views()``); the CLI may fill it, else
            :meth:`set_views` sets them. ``None``: not set yet.
    """

    def __init__(
        self,
        local: str | None = None,
        remote: str | None = None,
        streams: list[StreamSpec] | None = None,
        epoch_size: int | None = None,
        download_retry: int = 2,
        download_timeout: float = 60.0,
        train_split: str = "train",
        val_split: str | None = "val",
        batch_size: int = 64,
        num_workers: int = 2,
        shuffle: bool = True,
        shuffle_seed: int = 9176,
        num_canonical_nodes: int | None = None,
        image_key: str = "image",
        label_key: str | None = "label",
        caption_key: str | None = None,
        knn_train_samples: int | None = None,
        knn_val_samples: int | None = None,
        pin_memory: bool = True,
        drop_last: bool = True,
        persistent_workers: bool = False,
        views: list[ViewSpec] | None = None,
    ) -> None:
        super().__init__()
        for flag, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("knn_train_samples", knn_train_samples, 1),
            ("knn_val_samples", knn_val_samples, 1),
            ("epoch_size", epoch_size, 1),
            ("download_retry", download_retry, 1),
        ):
            if value is not None and value < low:
                raise DataConfigError(f"--data.{flag} must be >= {low}, got {value}")
        if not download_timeout > 0:
            raise DataConfigError(f"--data.download_timeout must be > 0 seconds, got {download_timeout}")
        self.local, self.remote = (str(local) if local is not None else None), remote
        self.streams = stream_specs(self.local, remote, streams)
        self.mixture = streams is not None
        check_weights(self.streams, epoch_size)
        self.epoch_size = epoch_size
        self.download_retry, self.download_timeout = download_retry, float(download_timeout)
        self.train_split, self.val_split = train_split, val_split
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle, self.shuffle_seed = shuffle, shuffle_seed
        if num_canonical_nodes is not None and num_canonical_nodes < 1:
            raise DataConfigError(f"--data.num_canonical_nodes must be >= 1, got {num_canonical_nodes}")
        self.num_canonical_nodes = num_canonical_nodes
        self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
        self.knn_train_samples, self.knn_val_samples = knn_train_samples, knn_val_samples
        self.pin_memory, self.drop_last, self.persistent_workers = pin_memory, drop_last, persistent_workers
        self.views: list[ViewSpec] | None = list(views) if views is not None else None
        """The crops to produce (:meth:`set_views`); ``None`` until handed over."""
        self.text_transform: Callable[[str], Any] | None = None
        """Per-sample caption transform (:meth:`set_text_transform`)."""
        self.captions_required_by: str | None = None
        """What needs captions (:meth:`set_text_transform`); ``None``: captions are optional."""

    # -- streams --------------------------------------------------------------------------------------------------
    def _flag(self, i: int, field: str) -> str:
        """The flag of ``field`` of stream ``i``: ``--data.local`` without a mixture, else ``--data.streams[i].x``."""
        return f"--data.streams[{i}].{field}" if self.mixture else f"--data.{field}"

    def _streams(self, split: str, weighted: bool) -> list[Stream]:
        """Streaming ``Stream`` objects of ``split``; ``weighted=False`` reads every sample once (validation)."""
        out = []
        for spec in self.streams:
            weights = {w: getattr(spec, w) for w in WEIGHTS if weighted and getattr(spec, w) is not None}
            out.append(
                Stream(
                    local=spec.local,
                    remote=spec.remote,
                    split=split,
                    download_retry=self.download_retry,
                    download_timeout=self.download_timeout,
                    **weights,
                )
            )
        return out

    # -- what the objective asks for (handed over from outside) ---------------------------------------------------
    def set_views(self, views: Sequence[ViewSpec]) -> None:
        """Set the crops to produce: the objective's ``views()``, which the CLI hands over (in a script:
        ``datamodule.set_views(objective.views())``)."""
        self.views = list(views)

    def set_text_transform(self, transform: Callable[[str], Any] | None, required_by: str | None = None) -> None:
        """Set the per-sample caption transform (e.g. ``objective.text_transform()``, output as ``batch["text"]``).

        Args:
            transform: ``caption -> tensor``, run in the loader workers; ``None``: captions stay strings.
            required_by: Name of what needs the captions (e.g. ``"CLIP"``): ``setup`` then stops with one line
                naming ``--data.caption_key`` when no caption column is set. ``None``: captions are optional.
        """
        self.text_transform = transform
        self.captions_required_by = required_by

    # -- world and remotes ----------------------------------------------------------------------------------------
    def _export_world(self) -> None:
        """Give Streaming the trainer's world: it partitions by ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
        ``LOCAL_WORLD_SIZE`` from the environment, and Lightning's own launcher (``devices: N``) sets only some of them,
        so every rank would read itself as rank 0 of its own node (duplicated data, clashing shared memory)."""
        trainer = self.trainer
        if not isinstance(trainer, L.Trainer):
            return
        world = {
            "RANK": trainer.global_rank,
            "WORLD_SIZE": trainer.world_size,
            "LOCAL_RANK": trainer.local_rank,
            "LOCAL_WORLD_SIZE": trainer.num_devices,
        }
        unset = {"RANK": 0, "WORLD_SIZE": 1, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1}  # what Streaming assumes
        for key, value in world.items():  # only what differs: a single-process run leaves the environment alone
            if os.environ.get(key, str(unset[key])) != str(value):
                os.environ[key] = str(value)

    # -- checks -------------------------------------------------------------------------------------------------
    def _check_split(self, split: str, flag: str) -> None:
        """One-line error naming the flag when a split has no MDS index or lacks the image/caption column."""
        for i, spec in enumerate(self.streams):
            root = Path(spec.local)
            if spec.remote is None and not root.is_dir():
                raise DataConfigError(f"{self._flag(i, 'local')}: no dataset directory at {root} ({DEMO_HINT})")
            index = root / split / INDEX
            if not index.is_file():
                if spec.remote is not None:
                    raise DataConfigError(
                        f"{self._flag(i, 'remote')}: no MDS index of split {split!r} fetched to "
                        f"{index} (call setup() first)"
                    )
                found = sorted(p.parent.name for p in root.glob(f"*/{INDEX}"))
                if not found:
                    raise DataConfigError(f"{self._flag(i, 'local')}: no MDS index at {index} ({DEMO_HINT})")
                raise DataConfigError(f"{flag}: no MDS index at {index} (splits under {root}: {', '.join(found)})")
            columns = index_columns(index)
            for key_flag, key in (("--data.image_key", self.image_key), ("--data.caption_key", self.caption_key)):
                if key is not None and key not in columns:
                    raise DataConfigError(
                        f"{key_flag}: split {split!r} has no column {key!r} in its MDS index "
                        f"{index} (columns: {', '.join(columns)})"
                    )

    def setup(self, stage: str | None = None) -> None:
        """Give Streaming the trainer's world, fetch remote indices, check the splits and columns, and stop with one
        line when captions are required (:meth:`set_text_transform`) but ``caption_key`` is ``None``."""
        self._export_world()
        splits = [(self.train_split, "--data.train_split")]
        if self.val_split is not None:
            splits.append((self.val_split, "--data.val_split"))
        fetch_indices(
            [(self._flag(i, "remote"), spec) for i, spec in enumerate(self.streams)],
            [split for split, _ in splits],
            self.download_retry,
            self.download_timeout,
        )
        for split, flag in splits:
            self._check_split(split, flag)
        if self.captions_required_by is not None and self.caption_key is None:
            where = ", ".join(s.local for s in self.streams)
            raise DataConfigError(
                f"--data.caption_key: {self.captions_required_by} needs captions; name the caption column of the "
                f"data at {where}"
            )

    # -- training and validation ------------------------------------------------------------------------------
    def _stream_loader(self, split: str, shuffle: bool, drop_last: bool, weighted: bool) -> StreamingDataLoader:
        if self.views is None:
            raise DataConfigError(
                "--data: no views set; the CLI hands the objective's views over, in a script call "
                "datamodule.set_views(objective.views())"
            )
        dataset = MultiViewStreamingDataset(
            views=self.views,
            image_key=self.image_key,
            label_key=self.label_key,
            caption_key=self.caption_key,
            text_transform=self.text_transform,
            streams=self._streams(split, weighted),
            epoch_size=self.epoch_size if weighted else None,
            shuffle=shuffle,
            shuffle_seed=self.shuffle_seed,
            batch_size=self.batch_size,
            num_canonical_nodes=self.num_canonical_nodes,
        )
        return ResumableStreamingLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            drop_last=drop_last,
            pin_memory=self._pin,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_dataloader(self) -> StreamingDataLoader:
        """Shuffled (``shuffle``) multi-view batches of ``train_split`` drawn by the streams' weights, a new
        ``StreamingDataset`` per call."""
        return self._stream_loader(self.train_split, self.shuffle, self.drop_last, weighted=True)

    def val_dataloader(self) -> StreamingDataLoader | list:
        """Multi-view batches of ``val_split`` in order, every sample of every stream once; ``[]`` (no validation)
        when ``val_split`` is ``None``."""
        if self.val_split is None:
            return []
        return self._stream_loader(self.val_split, shuffle=False, drop_last=False, weighted=False)

    # -- kNN probe ------------------------------------------------------------------------------------------------
    def _probe_root(self, split: str, cap: int | None) -> str:
        """Local root holding ``split`` of the first stream: its ``local`` itself, or for remote data
        ``<local>/_knn_cache`` with the shards the probe reads downloaded (plain downloads: no shared memory and no
        collective, so rank 0 alone may call)."""
        spec = self.streams[0]
        if spec.remote is None:
            return spec.local
        cache = os.path.join(spec.local, "_knn_cache")
        stream = Stream(
            remote=spec.remote,
            local=cache,
            split=split,
            download_retry=self.download_retry,
            download_timeout=self.download_timeout,
            keep_zip=False,
        )
        needed = float("inf") if cap is None else cap
        for shard in stream_shards(stream):
            if needed <= 0:
                break
            stream.prepare_shard(shard)
            needed -= shard.samples
        return cache

    def _probe_set(self, split: str, flag: str, size: int, cap: int | None) -> Dataset:
        self._check_split(split, flag)
        dataset = LocalMDSDataset(
            self._probe_root(split, cap), split, EvalTransform(size), self.image_key, self.label_key
        )
        if self.label_key not in dataset.column_names:
            raise DataConfigError(
                f"--data.label_key: split {split!r} has no label column {self.label_key!r} "
                f"(columns: {dataset.column_names})"
            )
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
        sets = (
            self._probe_set(self.train_split, "--data.train_split", size, self.knn_train_samples),
            self._probe_set(self.val_split, "--data.val_split", size, self.knn_val_samples),
        )
        bank, queries = (
            DataLoader(
                s,
                batch_size=batch_size,
                shuffle=False,
                drop_last=False,
                num_workers=self.num_workers,
                pin_memory=self._pin,
            )
            for s in sets
        )
        return bank, queries

    @property
    def _pin(self) -> bool:
        return self.pin_memory and torch.cuda.is_available()
