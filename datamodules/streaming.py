"""MDS shards -> uint8 views: the training dataset, the kNN probe dataset and the Lightning datamodule.

MDS sample schema: ``image`` (``bytes``: encoded JPEG/PNG), optional ``label`` (``int``), optional ``caption``
(``str``; also tokenized in the workers when the objective gives a text transform). Splits are subdirectories of the
dataset root (``<root>/train``, ``<root>/val``), each with its own ``index.json``. An undecodable image never stops a
run: it is logged once and replaced by the next sample of the same stream.

Several datasets mix through ``streams`` (one :class:`StreamSpec` each, with a ``proportion``, ``repeat`` or ``choose``
weight, as Streaming's ``Stream``). See ``docs/mixtures.md`` for mixtures, exact resume, corrupt samples and remotes.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.local import LocalDataset
from streaming.base.storage import CloudDownloader
from streaming.base.util import retry
from streaming.base.world import World
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lit_webssl.datamodules.loader import ResumableStreamingLoader
from lit_webssl.datamodules.transforms import EvalTransform, MultiViewTransform, decode_image
from lit_webssl.errors import ConfigError
from lit_webssl.objectives.base import ViewSpec

log = logging.getLogger(__name__)
MAX_SUBSTITUTIONS = 16
"""Consecutive undecodable samples tolerated before a sample fails for good."""
DEMO_HINT = "run `python -m lit_webssl data demo` to build the demo set, or point --data.local at MDS shards"

__all__ = ["DataConfigError", "LocalMDSDataset", "MultiViewStreamingDataset", "StreamSpec", "WebSSLDataModule"]


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
        return int(self.stream_per_shard[self.spanner[idx][0]])

    def __getitem__(self, idx: int) -> dict[str, Any]:
        idx = int(idx)
        stream = self.stream_of(idx)
        lo = int(self.sample_offset_per_stream[stream])
        span = (lo, lo + int(self.samples_per_stream[stream]))
        sample, image, skipped = fetch_decodable(self, idx, self.image_key, self._warned, span=span)
        epoch = max(int(getattr(self, "next_epoch", 1)) - 1, 0)
        with torch.random.fork_rng(devices=[]):  # CPU generator only: device RNGs of the run stay untouched
            torch.default_generator.manual_seed(sample_seed(self.shuffle_seed, epoch, idx))
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


WEIGHTS = ("proportion", "repeat", "choose")
"""A stream's weight fields (at most one per stream; Streaming's rules)."""
INDEX = "index.json"


@dataclass
class StreamSpec:
    """One dataset of a mixture (``--data.streams``): MDS shards at ``local``, or cached there from ``remote``.

    At most one weight per stream. ``proportion`` is relative, so either every stream has one or none has;
    ``repeat`` and ``choose`` are absolute and may be mixed with each other and with unweighted streams (read once
    per epoch). These are Streaming's rules (``streaming.Stream``); the datamodule checks them up front.
    """

    local: str | None = None
    """Dataset root of this stream (splits are its subdirectories); with ``remote``, its local cache. Required, and
    distinct for every stream."""
    remote: str | None = None
    """Object-storage root of this stream (``s3://bucket/prefix``, ``gs://...``); credentials come from the storage
    client's environment or config files, never from this string."""
    proportion: float | None = None
    """Relative share of every epoch drawn from this stream (normalized over the streams; needs ``proportion`` on
    every stream)."""
    repeat: float | None = None
    """Draws per sample and epoch (absolute): 2 reads every sample twice, 0.5 a random half (redrawn each epoch)."""
    choose: int | None = None
    """Samples drawn from this stream per epoch (absolute)."""


def redact_remote(remote: str) -> str:
    """``remote`` with any ``user:secret@`` and ``?query`` replaced by ``***`` (safe to print)."""
    parts = urllib.parse.urlsplit(remote)
    if not parts.scheme or ("@" not in parts.netloc and not parts.query):
        return remote
    host = parts.netloc.rpartition("@")[2]
    netloc = f"***@{host}" if "@" in parts.netloc else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def check_remote(flag: str, remote: str) -> None:
    """Refuse a remote that embeds credentials (``scheme://key:secret@...``, a token in ``?query``): they would
    end up in every run's saved ``config.yaml``, in logs and in error messages."""
    parts = urllib.parse.urlsplit(remote)
    if not parts.scheme or len(parts.scheme) == 1:  # a local path (or a Windows drive letter)
        return
    user_allowed = parts.scheme == "sftp" and parts.password is None  # sftp://user@host names an account, no secret
    if parts.query or ("@" in parts.netloc and not user_allowed):
        raise DataConfigError(
            f"{flag}: {redact_remote(remote)} embeds credentials; remove them and give them to the storage client "
            "through its environment or config files (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
            "GOOGLE_APPLICATION_CREDENTIALS, ...): lit_webssl takes and stores no credentials"
        )


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _index_columns(index: Path) -> list[str]:
    """Column names of an MDS split, from the first shard of its ``index.json``."""
    shards = json.loads(index.read_text()).get("shards") or [{}]
    return list(shards[0].get("column_names", []))


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
        self.streams = self._stream_specs(self.local, remote, streams)
        self.mixture = streams is not None
        self._check_weights(epoch_size)
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
        self.views: list[ViewSpec] | None = None
        self.text_transform: Callable[[str], Any] | None = None

    # -- streams --------------------------------------------------------------------------------------------------
    def _flag(self, i: int, field: str) -> str:
        """The flag of ``field`` of stream ``i``: ``--data.local`` without a mixture, else ``--data.streams[i].x``."""
        return f"--data.streams[{i}].{field}" if self.mixture else f"--data.{field}"

    @staticmethod
    def _stream_specs(
        local: str | None, remote: str | None, streams: Sequence[StreamSpec | dict[str, Any]] | None
    ) -> list[StreamSpec]:
        if streams is None:
            if local is None:
                raise DataConfigError("--data.local: give the dataset directory (or --data.streams for a mixture)")
            if remote is not None:
                check_remote("--data.remote", remote)
            return [StreamSpec(local=local, remote=remote)]
        if local is not None or remote is not None:
            raise DataConfigError(
                "--data.streams: give either --data.local/--data.remote or --data.streams, not both "
                "(a mixture config sets local: null and remote: null)"
            )
        if not streams:
            raise DataConfigError("--data.streams: empty; give at least one stream (or --data.local)")
        known = [f.name for f in fields(StreamSpec)]
        specs, seen = [], {}
        for i, stream in enumerate(streams):
            if isinstance(stream, dict):
                unknown = sorted(set(stream) - set(known))
                if unknown:
                    raise DataConfigError(f"--data.streams[{i}]: unknown key {unknown[0]!r} (keys: {', '.join(known)})")
                stream = StreamSpec(**stream)
            if not stream.local:
                raise DataConfigError(
                    f"--data.streams[{i}].local: every stream needs its own local directory (its "
                    "shards, or with a remote their cache)"
                )
            key = os.path.abspath(stream.local)
            if key in seen:
                raise DataConfigError(
                    f"--data.streams[{i}].local: {stream.local} is also --data.streams[{seen[key]}]"
                    ".local; every stream needs its own directory"
                )
            seen[key] = i
            if stream.remote is not None:
                check_remote(f"--data.streams[{i}].remote", stream.remote)
            specs.append(stream)
        return specs

    def _check_weights(self, epoch_size: int | None) -> None:
        """Streaming's weighting rules, checked before any index is read, each failure naming the flag."""
        given = [[w for w in WEIGHTS if getattr(s, w) is not None] for s in self.streams]
        for i, (stream, names) in enumerate(zip(self.streams, given, strict=True)):
            if len(names) > 1:
                raise DataConfigError(
                    f"--data.streams[{i}]: give at most one of proportion, repeat, choose (got {' and '.join(names)})"
                )
            for name in names:
                if getattr(stream, name) < 0:
                    raise DataConfigError(f"--data.streams[{i}].{name} must be >= 0, got {getattr(stream, name)}")
        relative = ["proportion" in names for names in given]
        if any(relative) and not all(relative):
            i = relative.index(False)
            j = relative.index(True)
            other = f"has {given[i][0]}" if given[i] else "has no weight"
            raise DataConfigError(
                f"--data.streams[{i}].proportion: proportions are relative, so every stream needs one"
                f" or none does (--data.streams[{j}] has a proportion, --data.streams[{i}] {other})"
            )
        if all(relative) and sum(s.proportion for s in self.streams) <= 0:
            raise DataConfigError("--data.streams: the proportions sum to 0; give at least one a positive proportion")
        absolute = [i for i, names in enumerate(given) if names and not relative[i]]
        if epoch_size is not None and absolute:
            name = given[absolute[0]][0]
            raise DataConfigError(
                f"--data.epoch_size: only with proportions or unweighted streams; "
                f"--data.streams[{absolute[0]}].{name} fixes the epoch size itself"
            )

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

    def set_views(self, views: Sequence[ViewSpec]) -> None:
        """Set the crops to produce (otherwise taken from the attached module's ``objective.views()``)."""
        self.views = list(views)

    def set_text_transform(self, transform: Callable[[str], Any] | None) -> None:
        """Set the per-sample caption transform (otherwise the attached objective's ``text_transform()``)."""
        self.text_transform = transform

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

    def _fetch_index(self, i: int, spec: StreamSpec, split: str) -> str | None:
        """Download ``<remote>/<split>/index.json`` into the stream's cache; the error line on failure."""
        target = os.path.join(spec.local, split, INDEX)
        tmp = target + ".tmp"
        if os.path.exists(tmp):
            os.remove(tmp)
        source = os.path.join(spec.remote, split, INDEX)
        flag, shown = self._flag(i, "remote"), redact_remote(spec.remote)
        try:
            downloader = CloudDownloader.get(spec.remote)
        except ValueError as err:
            return f"{flag}: cannot read {shown}: {_one_line(err)}"
        try:
            retry(clean_up_fn=downloader.clean_up, num_attempts=self.download_retry)(
                lambda: downloader.download(source, tmp, self.download_timeout)
            )()
            os.replace(tmp, target)
        except Exception as err:  # noqa: BLE001 - any client error means the same to the user: it cannot be read
            if isinstance(err, FileNotFoundError) or "not found" in str(err).lower():  # reached, but no such object
                return f"{flag}: no MDS index at {redact_remote(source)} ({_one_line(err)})"
            tries = f"{self.download_retry} {'try' if self.download_retry == 1 else 'tries'}"
            return f"{flag} {shown} unreachable after {tries}: {_one_line(err)}"
        finally:
            downloader.clean_up()
        return None

    def _fetch_indices(self, splits: Sequence[str], collective: bool = True) -> None:
        """Fetch the index of every remote stream's ``splits`` before anything is built, so an unreachable remote
        stops the run at once, on every rank, with one line naming it. The first rank of each node downloads; with
        ``collective`` and a remote stream, the ranks then exchange their errors (which also makes the others wait
        for the download), so every rank must call (``setup`` does, on every rank)."""
        error = None
        first_on_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
        for i, spec in enumerate(self.streams):
            for split in splits:
                missing = not os.path.isfile(os.path.join(spec.local, split, INDEX))
                if spec.remote is not None and missing and first_on_node and error is None:
                    error = self._fetch_index(i, spec, split)
        dist = torch.distributed
        remote = any(spec.remote is not None for spec in self.streams)
        if collective and remote and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            errors: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e), None)
        if error:
            raise DataConfigError(error)

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
            columns = _index_columns(index)
            for key_flag, key in (("--data.image_key", self.image_key), ("--data.caption_key", self.caption_key)):
                if key is not None and key not in columns:
                    raise DataConfigError(
                        f"{key_flag}: split {split!r} has no column {key!r} in its MDS index "
                        f"{index} (columns: {', '.join(columns)})"
                    )

    def setup(self, stage: str | None = None) -> None:
        """Give Streaming the trainer's world, fetch remote indices, check the splits and columns, and take the
        views from the attached objective unless set."""
        self._export_world()
        splits = [(self.train_split, "--data.train_split")]
        if self.val_split is not None:
            splits.append((self.val_split, "--data.val_split"))
        self._fetch_indices([split for split, _ in splits])
        for split, flag in splits:
            self._check_split(split, flag)
        objective = getattr(self.trainer.lightning_module, "objective", None) if self.trainer is not None else None
        if self.views is None and objective is not None:
            self.set_views(objective.views())
        if objective is not None and getattr(objective, "needs_text", False):
            if self.caption_key is None:
                where = ", ".join(s.local for s in self.streams)
                raise DataConfigError(
                    f"--data.caption_key: {type(objective).__name__} needs captions; name the "
                    f"caption column of the data at {where}"
                )
            make_transform = getattr(objective, "text_transform", None)
            if self.text_transform is None and callable(make_transform):
                self.set_text_transform(make_transform())

    # -- training and validation ------------------------------------------------------------------------------
    def _stream_loader(self, split: str, shuffle: bool, drop_last: bool, weighted: bool) -> StreamingDataLoader:
        if self.views is None:
            raise DataConfigError("--data: no views set; attach the datamodule to a trainer or call set_views()")
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
        for shard in stream.get_shards(World.detect(), allow_unsafe_types=False):
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
