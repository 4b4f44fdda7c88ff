"""A ``StreamingDataLoader`` whose saved position is exact: it counts the samples of our nested batches, and an epoch
that has no full batch left is saved as the start of the next one.

Streaming's loader counts a dict batch by the length of its first value. Our batches start with ``views``, a dict of
view names, so the stock loader would count 1 per batch and a resumed run would restart near the start of the epoch
with a different sample order. Here the count is taken from the ``index`` (or ``label``) tensor.

Lightning saves ``state_dict()`` in every checkpoint (``loops.fit_loop.state_dict.combined_loader``, rank 0's; the
position is global, ``samples per rank x ranks``) and calls ``load_state_dict`` on every rank when a fit resumes;
Streaming hands the position to the loader workers through shared memory when iteration starts.
"""

from __future__ import annotations

from typing import Any

from lit_webssl.compat.streaming import SampleCountingLoader, replication, world_ranks


class ResumableStreamingLoader(SampleCountingLoader):
    """``StreamingDataLoader`` whose resume state counts samples, not view names, and rolls a finished epoch over."""

    def samples_in(self, batch: Any) -> int | None:
        """Samples in a batch: the length of its ``index`` (or ``label``) tensor; ``None`` (Streaming's count) for
        other batches."""
        if isinstance(batch, dict):
            for key in ("index", "label"):
                if key in batch:
                    return len(batch[key])
        return None

    def state_dict(self) -> dict[str, Any] | None:
        """Streaming's state (``epoch``, ``sample_in_epoch`` over all ranks, shuffle settings); when this rank has no
        full batch left in the epoch (a checkpoint taken on an epoch's last step), the start of the next epoch.

        Without the roll-over a run resumed from such a checkpoint spends one Lightning epoch on the empty rest of the
        old one, and Lightning's epoch counter ends one ahead of the data's.
        """
        state = super().state_dict()
        if state is None:
            return None
        ranks = world_ranks() // replication(self.dataset)
        left = len(self.dataset) - state["sample_in_epoch"] // max(ranks, 1)  # samples this rank has not yielded
        smallest = (self.batch_size or 1) if self.drop_last else 1  # the fewest samples that still make a batch
        if left < smallest:
            state = {**state, "epoch": state["epoch"] + 1, "sample_in_epoch": 0}
        return state
