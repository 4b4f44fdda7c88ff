"""Object-storage remotes: refusing credentials in a URL, redacting one for messages, and fetching the MDS indices
of remote streams up front so that an unreachable remote stops the run at once with one line naming it."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Sequence
from typing import Any

import torch
from streaming.base.storage import CloudDownloader
from streaming.base.util import retry

from lit_webssl.datamodules.errors import DataConfigError

__all__ = ["INDEX", "check_remote", "fetch_indices", "one_line", "redact_remote"]

INDEX = "index.json"
"""The index file of an MDS split."""


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


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def fetch_index(flag: str, local: str, remote: str, split: str, retries: int, timeout: float) -> str | None:
    """Download ``<remote>/<split>/index.json`` into ``<local>/<split>``; the error line on failure.

    Args:
        flag: The flag naming ``remote`` in messages.
        local: The stream's cache directory.
        remote: The stream's object-storage root.
        split: Split whose index to fetch.
        retries: Tries before giving up.
        timeout: Seconds allowed per try.
    """
    target = os.path.join(local, split, INDEX)
    tmp = target + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    source = os.path.join(remote, split, INDEX)
    shown = redact_remote(remote)
    try:
        downloader = CloudDownloader.get(remote)
    except ValueError as err:
        return f"{flag}: cannot read {shown}: {one_line(err)}"
    try:
        retry(clean_up_fn=downloader.clean_up, num_attempts=retries)(
            lambda: downloader.download(source, tmp, timeout)
        )()
        os.replace(tmp, target)
    except Exception as err:  # noqa: BLE001 - any client error means the same to the user: it cannot be read
        if isinstance(err, FileNotFoundError) or "not found" in str(err).lower():  # reached, but no such object
            return f"{flag}: no MDS index at {redact_remote(source)} ({one_line(err)})"
        tries = f"{retries} {'try' if retries == 1 else 'tries'}"
        return f"{flag} {shown} unreachable after {tries}: {one_line(err)}"
    finally:
        downloader.clean_up()
    return None


def fetch_indices(
    streams: Sequence[tuple[str, Any]], splits: Sequence[str], retries: int, timeout: float, collective: bool = True
) -> None:
    """Fetch the index of every remote stream's ``splits`` before anything is built, so an unreachable remote
    stops the run at once, on every rank, with one line naming it. The first rank of each node downloads; with
    ``collective`` and a remote stream, the ranks then exchange their errors (which also makes the others wait
    for the download), so every rank must call.

    Args:
        streams: ``(flag of its remote, stream)`` per stream; a stream has ``local`` and ``remote`` (``None``: local).
        splits: Splits whose indices are needed.
        retries: Tries per index before giving up.
        timeout: Seconds allowed per try.
        collective: Exchange the errors between the ranks of an initialized process group.

    Raises:
        DataConfigError: An index could not be fetched (on every rank, with ``collective``).
    """
    error = None
    first_on_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
    for flag, spec in streams:
        for split in splits:
            missing = not os.path.isfile(os.path.join(spec.local, split, INDEX))
            if spec.remote is not None and missing and first_on_node and error is None:
                error = fetch_index(flag, spec.local, spec.remote, split, retries, timeout)
    dist = torch.distributed
    remote = any(spec.remote is not None for _, spec in streams)
    if collective and remote and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise DataConfigError(error)
