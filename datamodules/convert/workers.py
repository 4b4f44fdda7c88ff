"""Converting chunks: one chunk into its MDS sub-dataset and marker, in this process or in a pool of worker
processes reporting progress."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from lit_webssl.compat.streaming import written_shards
from lit_webssl.datamodules.convert.folder import read_folder
from lit_webssl.datamodules.convert.images import prepare_image
from lit_webssl.datamodules.convert.output import Output, part_name
from lit_webssl.datamodules.convert.parquet import read_parquet
from lit_webssl.datamodules.convert.plan import (
    MARKER,
    REPORT_EVERY,
    Chunk,
    ChunkResult,
    ConvertError,
    ConvertOptions,
    Record,
    Skip,
)
from lit_webssl.datamodules.convert.wds import read_wds


def records(chunk: Chunk, root: str, options: ConvertOptions) -> Iterator[Record]:
    if chunk.kind == "folder":
        return read_folder(chunk, root)
    if chunk.kind == "wds":
        return read_wds(chunk, options)
    return read_parquet(chunk, options)


_report: Callable[[int], None] = lambda n: None  # noqa: E731  (set per worker process)


def _init_worker(queue: Any, environ: dict[str, str]) -> None:
    """Worker set-up: progress reports go to ``queue``; the environment is the parent's now (a forkserver started
    earlier in the same process would otherwise hand out its own, e.g. without credentials set since)."""
    global _report
    _report = queue.put
    os.environ.clear()
    os.environ.update(environ)


def convert_chunk(chunk: Chunk, root: str, out: str, options: ConvertOptions) -> ChunkResult:
    """Convert one chunk into the sub-dataset ``<out>/part.<index>`` and mark it complete.

    Any earlier partial output of the chunk is replaced. The marker ``convert.done`` is written last (after the
    shards and the sub-index are stored), so a chunk with a marker is complete.

    Args:
        chunk: The inputs.
        root: The input root (``--in``).
        out: The output root (directory or URL).
        options: Output settings.

    Returns:
        Counts, the skipped inputs and the shard entries of the sub-index.
    """
    from streaming import MDSWriter

    output = Output(out)
    part = part_name(chunk.index)
    result = ChunkResult(chunk.index)
    staging = None
    if output.remote:
        staging = tempfile.mkdtemp(prefix=f"lit_webssl_{part}_")
        target: str | tuple[str, str] = (os.path.join(staging, part), output.join(part))
    else:
        shutil.rmtree(output.join(part), ignore_errors=True)
        target = output.join(part)
    writer = MDSWriter(
        out=target,
        columns=options.columns,
        size_limit=options.shard_size,
        progress_bar=False,
        exist_ok=False,
        keep_local=False,
    )
    pending = 0
    try:
        for record in records(chunk, root, options):
            result.inputs += 1
            pending += 1
            if pending >= REPORT_EVERY:
                _report(pending)
                pending = 0
            try:
                if record.image is None:
                    raise Skip(record.reason, record.detail)
                data, reencoded = prepare_image(record.image, options.min_size)
            except Skip as skip:
                result.skipped.append({"source": record.source, "reason": skip.reason, "detail": skip.detail})
                continue
            sample: dict[str, Any] = {"image": data, "source": record.source}
            if options.caption:
                sample["caption"] = record.caption or ""
            if options.label:
                sample["label"] = -1 if record.label is None else int(record.label)
            writer.write(sample)
            result.samples += 1
            result.reencoded += int(reencoded)
        writer.finish()
    except BaseException:
        writer.cancel_future_jobs()
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    _report(pending)
    result.shards = written_shards(writer)
    output.write_text(f"{part}/{MARKER}", json.dumps(asdict(result), sort_keys=True) + "\n")
    return result


def _convert_chunk_star(args: tuple) -> ChunkResult:
    return convert_chunk(*args)


def run_inline(args: list[tuple], results: dict[int, ChunkResult], advance: Callable[[int], None]) -> None:
    """Convert chunks one after the other in this process."""
    global _report
    previous, _report = _report, advance
    try:
        for item in args:
            results[item[0].index] = convert_chunk(*item)
            advance(0)
    finally:
        _report = previous


def run_pool(args: list[tuple], workers: int, results: dict[int, ChunkResult], advance: Callable[[int], None]) -> None:
    """Convert chunks in ``workers`` processes (forkserver: no fork of a threaded parent), reporting progress."""
    import queue as queue_module

    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([__name__, "lit_webssl.datamodules.transforms", "streaming"])
    updates = ctx.Queue()
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(updates, dict(os.environ)))
    try:
        jobs = {item[0].index: pool.apply_async(_convert_chunk_star, (item,)) for item in args}
        while jobs:
            try:
                advance(updates.get(timeout=0.1))
            except queue_module.Empty:
                pass
            for index in [i for i, job in jobs.items() if job.ready()]:
                job = jobs.pop(index)
                try:
                    results[index] = job.get()
                    advance(0)
                except Exception as err:
                    raise ConvertError(
                        f"chunk {index} ({part_name(index)}) failed: {type(err).__name__}: {err}; "
                        "complete chunks are kept: rerun with --resume"
                    ) from err
        while True:  # progress reported after the last result arrived
            try:
                advance(updates.get_nowait())
            except queue_module.Empty:
                break
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
