"""``python -m lit_webssl compare``: the paper's controlled comparison in miniature.

Every objective is trained by the real ``fit`` command on the same shared block (data, backbone, trainer, budget,
probe) composed with its own objective block through LightningCLI's repeated ``--config``; each run is a separate
process, so one objective's memory, threads or failure cannot touch the next. The figures come from the runs'
``metrics.json`` (written by ``KNNProbe`` and ``ThroughputMonitor``) and the wall time of each process.

    python -m lit_webssl compare --config configs/demo/compare/base.yaml --objectives dino mae clip
    python -m lit_webssl compare --config base.yaml --objectives dino my_block.yaml --trainer.max_steps 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lit_webssl.cli.rundirs import RUNS_DIR, newest_version
from lit_webssl.errors import ConfigError

COLUMNS = (
    ("objective", "objective"),
    ("knn_top1", "kNN top-1"),
    ("wall_s", "wall time"),
    ("peak_memory_gib", "peak memory"),
    ("images_per_sec", "images/s"),
)


@dataclass
class Row:
    """One objective's result; ``None`` where its run did not produce the figure."""

    objective: str
    block: str
    run_dir: str | None
    exit_code: int
    wall_s: float
    knn_top1: float | None = None
    knn_top1_pixel: float | None = None
    knn_top1_random_init: float | None = None
    images_per_sec: float | None = None
    peak_memory_gib: float | None = None
    peak_memory_kind: str | None = None


def resolve_blocks(base: Path, names: list[str]) -> dict[str, Path]:
    """Objective name -> block file: ``<dir of base>/<name>.yaml``, or ``name`` itself when it is a YAML path."""
    if not base.is_file():
        raise ConfigError(f"--config: {base} does not exist")
    blocks: dict[str, Path] = {}
    for name in names:
        path = Path(name) if name.endswith((".yaml", ".yml")) else base.parent / f"{name}.yaml"
        if not path.is_file():
            choices = sorted(p.stem for p in base.parent.glob("*.yaml") if p != base)
            raise ConfigError(f"--objectives: no block {path} for {name!r}; beside {base}: {', '.join(choices)}")
        label = path.stem if name.endswith((".yaml", ".yml")) else name
        if label in blocks:
            raise ConfigError(f"--objectives: {label!r} given twice")
        blocks[label] = path
    return blocks


def run_one(
    objective: str, base: Path, block: Path, run_name: str, overrides: list[str], runs_dir: Path, quiet: bool
) -> Row:
    """Train one objective with ``fit`` in a child process and collect its figures."""
    cmd = [
        sys.executable,
        "-m",
        "lit_webssl",
        "fit",
        "--config",
        str(base),
        "--config",
        str(block),
        "--run_name",
        run_name,
        *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode and proc.stderr:
        print(proc.stderr.strip().splitlines()[-1], file=sys.stderr)
    elif not quiet and proc.stderr:
        print(proc.stderr, file=sys.stderr, end="")
    run_dir = newest_version(runs_dir / run_name)
    row = Row(objective, str(block), str(run_dir) if run_dir else None, proc.returncode, wall)
    metrics_file = run_dir / "metrics.json" if run_dir else None
    if proc.returncode == 0 and metrics_file is not None and metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        for key in (
            "knn_top1",
            "knn_top1_pixel",
            "knn_top1_random_init",
            "images_per_sec",
            "peak_memory_gib",
            "peak_memory_kind",
        ):
            setattr(row, key, metrics.get(key))
    return row


def _cell(row: Row, key: str) -> str:
    value = getattr(row, key)
    if key == "objective":
        return value if row.exit_code == 0 else f"{value} (failed, exit {row.exit_code})"
    if value is None:
        return "-"
    if key == "knn_top1":
        return f"{100 * value:.2f} %"
    if key == "wall_s":
        return f"{value:.0f} s"
    if key == "peak_memory_gib":
        return f"{value:.2f} GiB"
    return f"{value:.0f}"


def markdown(rows: list[Row], base: Path, overrides: list[str]) -> str:
    """The comparison as a markdown table, with the shared baselines and settings under it."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, key) for key, _ in COLUMNS) + " |" for r in rows]
    baselines = {r.objective: (r.knn_top1_pixel, r.knn_top1_random_init) for r in rows if r.knn_top1_pixel is not None}
    if len(set(baselines.values())) == 1:
        pixel, random_init = next(iter(baselines.values()))
        lines.append(
            f"\nBaselines on the same probe: pixels {100 * pixel:.2f} %, random-init encoder "
            f"{100 * (random_init or 0):.2f} %."
        )
    elif baselines:  # objectives that normalize pixels differently (CLIP: OpenAI's mean/std) see other baselines
        lines.append(
            "\nBaselines on the same probe, per objective (their pixel normalizations differ): "
            + "; ".join(
                f"{name} pixels {100 * p:.2f} %, random init {100 * (r or 0):.2f} %"
                for name, (p, r) in baselines.items()
            )
            + "."
        )
    kinds = sorted({r.peak_memory_kind for r in rows if r.peak_memory_kind})
    if kinds:
        lines.append(f"Peak memory: {', '.join(kinds)} (largest rank). Wall time: the whole `fit` process.")
    lines.append(f"Shared block: `{base}`" + (f"; overrides: `{' '.join(overrides)}`" if overrides else "") + ".")
    return "\n".join(lines) + "\n"


def _print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Controlled comparison: same data, backbone and budget")
    for key, title in COLUMNS:
        table.add_column(title, justify="left" if key == "objective" else "right")
    for row in rows:
        table.add_row(*(_cell(row, key) for key, _ in COLUMNS))
    Console().print(table)


def main(argv: list[str]) -> int:
    """Parse ``compare`` arguments, train each objective, print and save the table; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m lit_webssl compare",
        description="Train several objectives on one shared config block and tabulate kNN top-1, wall time, peak "
        "memory and images/s. Arguments it does not know (e.g. --trainer.max_steps 50) go to every fit.",
    )
    parser.add_argument(
        "--config", required=True, type=Path, help="shared block: data, backbone, trainer, budget and probe"
    )
    parser.add_argument(
        "--objectives",
        required=True,
        nargs="+",
        metavar="NAME",
        help="objective blocks: NAME means <dir of --config>/NAME.yaml; a .yaml path is used as is",
    )
    parser.add_argument(
        "--name", default=None, help="prefix of the run names and the output directory (default: compare_<date>_<time>)"
    )
    parser.add_argument("--quiet", action="store_true", help="hide the runs' own output (progress bars, logs)")
    args, overrides = parser.parse_known_args(argv)
    blocks = resolve_blocks(args.config, args.objectives)
    name = args.name or time.strftime("compare_%Y%m%d_%H%M%S")
    runs_dir = Path(RUNS_DIR)
    rows = []
    for objective, block in blocks.items():
        print(f"== {objective}: fit --config {args.config} --config {block}", flush=True)
        rows.append(run_one(objective, args.config, block, f"{name}_{objective}", overrides, runs_dir, args.quiet))
    _print_table(rows)
    out = runs_dir / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    (out / "compare.md").write_text(markdown(rows, args.config, overrides))
    print(f"table written to {out / 'compare.md'} and {out / 'compare.json'}")
    return 0 if all(r.exit_code == 0 for r in rows) else 1
