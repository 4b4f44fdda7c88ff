"""``compare``: each objective trained by the real ``fit`` on one shared block, figures tabulated; the
throughput callback and the shared ``metrics.json`` writer it relies on."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import CONFIGS, tiny_demo

from lit_webssl.callbacks.metrics_file import run_log_dir, update_metrics_file
from lit_webssl.callbacks.throughput import ThroughputMonitor, _batch_images
from lit_webssl.cli.compare import main, resolve_blocks
from lit_webssl.errors import ConfigError

BASE = CONFIGS / "demo" / "compare" / "base.yaml"


def _overrides(data: Path, steps: int) -> list[str]:
    return [
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(steps - 1),
        "--trainer.limit_val_batches",
        "1",
        "--data.init_args.local",
        str(data),
        "--data.init_args.batch_size",
        "16",
        "--data.init_args.num_workers",
        "0",
    ]


@pytest.mark.slow  # whole fits in this process: the full suite, not the fast tier
def test_compare_trains_each_objective_and_keeps_going_past_a_failure(tmp_path, monkeypatch, capsys):
    data = tiny_demo(tmp_path)
    broken = tmp_path / "broken.yaml"  # a block whose fit stops on bad input: its row says so, the others are kept
    broken.write_text(
        (CONFIGS / "demo" / "compare" / "mae.yaml").read_text().replace("mask_ratio: 0.75", "mask_ratio: 1.5")
    )
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "--config",
            str(BASE),
            "--objectives",
            "dino",
            "mae",
            str(broken),
            "--name",
            "cmp",
            "--quiet",
            *_overrides(data, steps=7),
        ]
    )
    assert code == 1  # one run failed
    rows = {r["objective"]: r for r in json.loads((tmp_path / "runs" / "cmp" / "compare.json").read_text())}
    assert list(rows) == ["dino", "mae", "broken"]
    for name in ("dino", "mae"):
        row = rows[name]
        assert row["exit_code"] == 0 and row["wall_s"] > 0
        assert 0.0 <= row["knn_top1"] <= 1.0 and row["knn_top1_pixel"] is not None
        assert row["images_per_sec"] > 0 and row["peak_memory_gib"] > 0
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert metrics["step"] == 7 and metrics["timed_steps"] == 2  # both callbacks wrote to one file
    assert rows["broken"]["exit_code"] == 2 and rows["broken"]["knn_top1"] is None
    table = (tmp_path / "runs" / "cmp" / "compare.md").read_text()
    assert "| dino |" in table and "broken (failed, exit 2)" in table and "Baselines on the same probe" in table
    assert "mask_ratio" in capsys.readouterr().err  # the failing run's one-line reason reaches the user


def test_blocks_resolve_by_name_or_path_and_bad_names_list_the_choices(tmp_path):
    block = tmp_path / "mine.yaml"
    block.write_text("model: {}\n")
    blocks = resolve_blocks(BASE, ["dino", str(block)])
    assert blocks == {"dino": BASE.parent / "dino.yaml", "mine": block}
    with pytest.raises(ConfigError, match=r"--objectives: no block .*nope\.yaml.*dino.*mae"):
        resolve_blocks(BASE, ["nope"])
    with pytest.raises(ConfigError, match="given twice"):
        resolve_blocks(BASE, ["dino", "dino"])
    with pytest.raises(ConfigError, match="--config: .* does not exist"):
        resolve_blocks(tmp_path / "missing.yaml", ["dino"])


def test_metrics_file_merges_and_is_replaced_atomically(tmp_path):
    trainer = SimpleNamespace(log_dir=str(tmp_path / "run"), default_root_dir=str(tmp_path))
    update_metrics_file(run_log_dir(trainer), {"knn_top1": 0.5, "step": 3})
    path = update_metrics_file(run_log_dir(trainer), {"images_per_sec": 10.0, "step": 4})
    assert json.loads(path.read_text()) == {"knn_top1": 0.5, "step": 4, "images_per_sec": 10.0}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_throughput_counts_images_of_every_rank_after_warmup():
    monitor = ThroughputMonitor(warmup_steps=1, log_every_n_steps=100)
    module = SimpleNamespace(device=torch.device("cpu"))
    trainer = SimpleNamespace(world_size=2)
    batch = {"views": {"global1": torch.zeros(4, 3, 8, 8)}, "label": torch.zeros(4)}
    for _ in range(3):
        monitor.on_train_batch_start(trainer, module, batch, 0)
        monitor.on_train_batch_end(trainer, module, None, batch, 0)
    figures = monitor.figures(module)
    assert monitor._images == 2 * 4 * 2 and figures["images_per_sec"] > 0 and figures["peak_memory_gib"] > 0
    assert _batch_images({"label": torch.zeros(5)}) == 5
    with pytest.raises(TypeError, match="cannot tell the batch size"):
        _batch_images({"caption": ["a"]})
    with pytest.raises(ConfigError, match="warmup_steps"):
        ThroughputMonitor(warmup_steps=-1)


def test_the_cli_dispatches_compare_and_bad_input_is_one_line(tmp_path, capsys):
    from lit_webssl.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["compare", "--config", str(tmp_path / "missing.yaml"), "--objectives", "dino"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: --config: {tmp_path / 'missing.yaml'} does not exist"


def test_table_lists_baselines_per_objective_only_when_they_differ():
    from lit_webssl.cli.compare import Row, markdown

    same = [Row("a", "a.yaml", None, 0, 1.0, 0.5, 0.3, 0.1), Row("b", "b.yaml", None, 0, 1.0, 0.6, 0.3, 0.1)]
    assert "pixels 30.00 %, random-init encoder 10.00 %." in markdown(same, BASE, [])
    other = [*same, Row("clip", "clip.yaml", None, 0, 1.0, 0.7, 0.31, 0.12)]
    table = markdown(other, BASE, ["--trainer.max_steps", "5"])
    assert "per objective" in table and "clip pixels 31.00 %, random init 12.00 %" in table
    assert "overrides: `--trainer.max_steps 5`" in table
