"""A ``StreamingDataLoader`` that counts the samples of our nested batches, so mid-epoch resume is exact.

Streaming's loader counts a dict batch by the length of its first value. Our batches start with ``views``, a dict of
view names, so the stock loader would count 1 per batch and a resumed run would restart near the start of the epoch
with a different sample order. Here the count is taken from the ``index`` (or ``label``) tensor.
"""

from __future__ import annotations

from typing import Any

from streaming import StreamingDataLoader


class ResumableStreamingLoader(StreamingDataLoader):
    """``StreamingDataLoader`` whose resume state counts samples, not view names."""

    def _get_batch_size(self, batch: Any) -> int:
        if isinstance(batch, dict):
            for key in ("index", "label"):
                if key in batch:
                    return len(batch[key])
        return super()._get_batch_size(batch)
