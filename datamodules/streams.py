"""The datasets of a mixture (``--data.streams``) and the checks of their settings, made before any index is read."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lit_webssl.datamodules.errors import DataConfigError
from lit_webssl.datamodules.remotes import INDEX, check_remote

__all__ = ["INDEX", "WEIGHTS", "StreamSpec", "check_weights", "index_columns", "stream_specs"]

WEIGHTS = ("proportion", "repeat", "choose")
"""A stream's weight fields (at most one per stream; Streaming's rules)."""


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


def stream_specs(
    local: str | None, remote: str | None, streams: Sequence[StreamSpec | dict[str, Any]] | None
) -> list[StreamSpec]:
    """The streams of the datamodule: one from ``local``/``remote``, or those of ``streams`` (dicts checked for
    unknown keys), each with its own ``local`` directory and no credentials in its remote."""
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


def check_weights(streams: Sequence[StreamSpec], epoch_size: int | None) -> None:
    """Streaming's weighting rules, checked before any index is read, each failure naming the flag."""
    given = [[w for w in WEIGHTS if getattr(s, w) is not None] for s in streams]
    for i, (stream, names) in enumerate(zip(streams, given, strict=True)):
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
    if all(relative) and sum(s.proportion for s in streams) <= 0:
        raise DataConfigError("--data.streams: the proportions sum to 0; give at least one a positive proportion")
    absolute = [i for i, names in enumerate(given) if names and not relative[i]]
    if epoch_size is not None and absolute:
        name = given[absolute[0]][0]
        raise DataConfigError(
            f"--data.epoch_size: only with proportions or unweighted streams; "
            f"--data.streams[{absolute[0]}].{name} fixes the epoch size itself"
        )


def index_columns(index: Path) -> list[str]:
    """Column names of an MDS split, from the first shard of its ``index.json``."""
    shards = json.loads(index.read_text()).get("shards") or [{}]
    return list(shards[0].get("column_names", []))
