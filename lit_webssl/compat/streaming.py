"""MosaicML Streaming internals this package relies on (``mosaicml-streaming`` >=0.13,<0.14).

What has no public API in Streaming:

* the world (ranks, nodes, workers) Streaming reads from the environment: ``streaming.base.world.World`` is an
  internal class, and ``Stream.get_shards`` wants one (:func:`world_ranks`, :func:`stream_shards`);
* where a sample of a ``StreamingDataset`` lives: its shard, the shard's file and the stream holding it (the
  ``spanner``, ``shards``, ``stream_per_shard``, ``sample_offset_per_stream`` and ``samples_per_stream``
  attributes; :func:`sample_location`, :func:`stream_of`, :func:`stream_span`);
* the epoch a dataset is in and the seed and replication it was built with (``next_epoch``, ``shuffle_seed``,
  ``replication``: arguments and state kept as undocumented attributes; :func:`epoch_of`, :func:`shuffle_seed`,
  :func:`replication`);
* how a ``StreamingDataLoader`` counts the samples of a batch for its resume state (the private
  ``_get_batch_size``; :class:`SampleCountingLoader`);
* the shard entries an ``MDSWriter`` wrote (its ``shards`` attribute; :func:`written_shards`), the URL schemes it
  can upload to (the ``UPLOADERS`` table; :func:`uploader_schemes`), and that a column given as ``bytes`` is stored
  as given whatever its encoding (:func:`write_encoded`).

``tests/compat/test_streaming.py`` checks each of these on the installed release.
"""

from __future__ import annotations

import os
from typing import Any

from streaming import Stream, StreamingDataLoader

from lit_webssl.compat import require

VERSION = require("mosaicml-streaming", "0.13", "0.14")


# -- the world ------------------------------------------------------------------------------------------------------
def world_ranks() -> int:
    """Ranks of the world Streaming partitions over, as it reads them from the environment (``WORLD_SIZE``...).

    Missing public API: ``streaming.base.world.World`` is internal; nothing public reports the world a dataset
    partitions over."""
    from streaming.base.world import World

    return int(World.detect().num_ranks)


def stream_shards(stream: Stream) -> list[Any]:
    """The shard readers of ``stream`` (its index downloaded if needed), in index order; unsafe encodings refused.

    Missing public API: ``Stream.get_shards`` takes an internal ``World`` (streaming.base.world)."""
    from streaming.base.world import World

    return list(stream.get_shards(World.detect(), allow_unsafe_types=False))


# -- where a sample lives -------------------------------------------------------------------------------------------
def sample_location(reader: Any, index: int) -> str | None:
    """``#J of shard PATH`` for sample ``index`` of a ``StreamingDataset`` or ``LocalDataset``; ``None`` when the
    reader keeps no such record.

    Missing public API: the ``spanner`` (sample -> shard, offset) and ``shards`` (readers with ``dirname``, ``split``
    and ``file_pairs``) attributes are undocumented."""
    try:
        shard_id, offset = reader.spanner[index]
        shard = reader.shards[shard_id]
        return f"#{offset} of shard {os.path.join(shard.dirname, shard.split, shard.file_pairs[0][0].basename)}"
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def stream_of(dataset: Any, index: int) -> int:
    """Position in ``streams`` of the stream holding sample ``index`` of a ``StreamingDataset``.

    Missing public API: ``stream_per_shard`` and ``spanner`` are undocumented attributes."""
    return int(dataset.stream_per_shard[dataset.spanner[index][0]])


def stream_span(dataset: Any, stream: int) -> tuple[int, int]:
    """Sample range ``[lo, hi)`` of stream ``stream`` in a ``StreamingDataset``'s concatenated sample ids.

    Missing public API: ``sample_offset_per_stream`` and ``samples_per_stream`` are undocumented attributes."""
    lo = int(dataset.sample_offset_per_stream[stream])
    return lo, lo + int(dataset.samples_per_stream[stream])


def epoch_of(dataset: Any) -> int:
    """The epoch a ``StreamingDataset`` is yielding (0 before its first iteration).

    Missing public API: the dataset keeps the epoch its next iteration starts as the undocumented ``next_epoch``
    (1 once the first has begun)."""
    return max(int(getattr(dataset, "next_epoch", 1)) - 1, 0)


def shuffle_seed(dataset: Any) -> int:
    """The ``shuffle_seed`` a ``StreamingDataset`` was built with.

    Missing public API: the argument is kept as an undocumented attribute."""
    return int(dataset.shuffle_seed)


def replication(dataset: Any) -> int:
    """The ``replication`` a ``StreamingDataset`` was built with (1 when none, or for another dataset).

    Missing public API: the argument is kept as an undocumented attribute."""
    return int(getattr(dataset, "replication", None) or 1)


# -- the loader -----------------------------------------------------------------------------------------------------
class SampleCountingLoader(StreamingDataLoader):
    """A ``StreamingDataLoader`` whose resume state counts a batch's samples by :meth:`samples_in`.

    Missing public API: Streaming counts a yielded batch with the private ``_get_batch_size`` (a dict batch by the
    length of its first value) and offers no hook to count it otherwise.
    """

    def samples_in(self, batch: Any) -> int | None:
        """Samples in ``batch``; ``None``: Streaming's own count."""
        return None

    def _get_batch_size(self, batch: Any) -> int:
        count = self.samples_in(batch)
        return super()._get_batch_size(batch) if count is None else int(count)


# -- writing --------------------------------------------------------------------------------------------------------
def written_shards(writer: Any) -> list[dict[str, Any]]:
    """The index entries of the shards an ``MDSWriter`` has finished (``index.json``'s ``shards``).

    Missing public API: the writer keeps them in the undocumented ``shards`` attribute."""
    return list(writer.shards)


def uploader_schemes() -> list[str]:
    """URL schemes Streaming's writers upload to (``s3``, ``gs``, ``oci``...).

    Missing public API: the undocumented ``UPLOADERS`` table of ``streaming.base.storage.upload``."""
    from streaming.base.storage.upload import UPLOADERS

    return [scheme for scheme in UPLOADERS if scheme and ":" not in scheme]


def write_encoded(writer: Any, sample: dict[str, Any]) -> None:
    """Write ``sample`` with an ``MDSWriter``: a ``bytes`` value is stored as given, already encoded in its column's
    encoding (``jpeg``, ``int``, ``str``...), others are encoded by the writer.

    Missing public API: no documented way to write already-encoded columns; ``mds_encode`` passes ``bytes`` through
    unchanged whatever the encoding."""
    writer.write(sample)
