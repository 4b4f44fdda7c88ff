"""The whole conversion: plan, check the output, convert the pending chunks, write the manifest and the index."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from lit_webssl.datamodules.convert.folder import plan_folder
from lit_webssl.datamodules.convert.output import Output, check_output, load_completed, merged_index
from lit_webssl.datamodules.convert.parquet import plan_parquet
from lit_webssl.datamodules.convert.plan import (
    INDEX,
    MANIFEST,
    PLAN,
    ConvertError,
    ConvertSummary,
)
from lit_webssl.datamodules.convert.wds import plan_wds
from lit_webssl.datamodules.convert.workers import run_inline, run_pool
from lit_webssl.errors import ConfigError


def progress_bar(enabled: bool) -> Any:
    """A rich progress bar over input images (rate and chunk count in the last text column)."""
    from rich import progress as rp

    return rp.Progress(
        rp.TextColumn("{task.description}"),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        rp.TextColumn("{task.fields[rate]}"),
        rp.TimeElapsedColumn(),
        rp.TimeRemainingColumn(),
        disable=not enabled,
    )


def convert(source: str, src: str | Path, out: str, opts: argparse.Namespace) -> ConvertSummary:
    """Convert ``src`` (a ``source`` input) to the MDS dataset ``out``; see the module docstring.

    Args:
        source: ``folder``, ``wds`` or ``parquet``.
        src: Input directory or file.
        out: Output directory or URL.
        opts: Parsed options (``workers``, ``min_size``, ``shard_size``, ``chunk_size``, ``resume``, ``overwrite``,
            ``sidecar``, ``class_folders``, ``image_field``, ``caption_field``, ``label_field``, ``manifest``,
            ``progress``).

    Returns:
        The counts of the run.

    Raises:
        ConfigError: An option or input that cannot work (names the flag).
        ConvertError: A chunk failed (complete chunks are kept: rerun with ``--resume``).
    """
    started = time.perf_counter()
    root = Path(src).absolute()
    planner = {"folder": plan_folder, "wds": plan_wds, "parquet": plan_parquet}[source]
    plan = planner(root, opts)
    if not plan.chunks:
        raise ConfigError(f"--in: no input images under {root} (--from {source})")
    output = Output(out)
    try:
        files = check_output(output, plan, opts.resume, opts.overwrite)
    except ConfigError:
        raise
    except Exception as err:  # the object store refused (no bucket, no credentials, no endpoint...)
        raise ConfigError(f"--out: cannot list {output.root}: {type(err).__name__}: {err}") from None
    done = load_completed(output, plan, files) if files else {}
    if not files:
        output.write_text(PLAN, json.dumps(plan.record(), indent=2, sort_keys=True) + "\n")
    pending = [c for c in plan.chunks if c.index not in done]
    base = str(root if root.is_dir() else root.parent)
    results = dict(done)
    progress = progress_bar(opts.progress)
    with progress:
        task = progress.add_task(f"{source} -> MDS", total=plan.total, rate="")
        progress.update(task, completed=sum(r.inputs for r in done.values()))
        first_time, first_done = time.perf_counter(), sum(r.inputs for r in done.values())

        def advance(n: int) -> None:
            progress.advance(task, n)
            seen = progress.tasks[0].completed - first_done
            elapsed = max(time.perf_counter() - first_time, 1e-6)
            progress.update(task, rate=f"{seen / elapsed:.0f} img/s, chunks {len(results)}/{len(plan.chunks)}")

        args = [(chunk, base, output.root, plan.options) for chunk in pending]
        try:
            if opts.workers == 1 or len(pending) <= 1:
                run_inline(args, results, advance)
            else:
                run_pool(args, min(opts.workers, len(pending)), results, advance)
        except KeyboardInterrupt:
            raise ConvertError(
                f"interrupted: {len(results)} of {len(plan.chunks)} chunks complete in "
                f"{output.root}; rerun with --resume to finish"
            ) from None
    skipped = plan.skipped + [s for i in sorted(results) for s in results[i].skipped]
    manifest = "".join(json.dumps(s, sort_keys=True) + "\n" for s in skipped)
    output.write_text(MANIFEST, manifest)
    local_manifest = opts.manifest or (output.join(MANIFEST) if not output.remote else MANIFEST)
    if local_manifest != output.join(MANIFEST):
        Path(local_manifest).parent.mkdir(parents=True, exist_ok=True)
        Path(local_manifest).write_text(manifest)
    samples = sum(r.samples for r in results.values())
    if samples == 0:
        raise ConvertError(f"no decodable image in {root} (every input was skipped: see {local_manifest})")
    output.write_text(INDEX, json.dumps(merged_index(list(results.values())), sort_keys=True))
    return ConvertSummary(
        out=output.root,
        samples=samples,
        skipped=len(skipped),
        reencoded=sum(r.reencoded for r in results.values()),
        chunks=len(plan.chunks),
        resumed=len(done),
        manifest=str(local_manifest),
        seconds=time.perf_counter() - started,
    )
