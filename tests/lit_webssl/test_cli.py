"""The real CLI: the command table, every shipped YAML parses, plan, demo configs fit, resume is exact, bad input is
one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import CONFIGS, fast_overrides, load_weights, run_cli, tiny_demo

from lit_webssl.cli import WebSSLCLI, main
from lit_webssl.cli.commands import COMMANDS, DATA_COMMANDS
from lit_webssl.training.module import LitWebSSL

COMPARE = CONFIGS / "demo" / "compare"  # blocks: base.yaml + one objective block, composed by repeated --config
DATA = CONFIGS / "data"  # data blocks, given after a model config
STRATEGY = CONFIGS / "strategy"  # strategy blocks, given after a model config
BLOCK_DIRS = (COMPARE, DATA, STRATEGY)
ALL_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent not in BLOCK_DIRS)
COMPARE_BLOCKS = sorted(p for p in COMPARE.glob("*.yaml") if p.name != "base.yaml")
DATA_BLOCKS = sorted(DATA.glob("*.yaml"))
STRATEGY_BLOCKS = sorted(STRATEGY.glob("*.yaml"))
DEMO_CONFIGS = sorted((CONFIGS / "demo").glob("*.yaml"))


EVERY_COMMAND = ["fit", "validate", "plan", "data", "checkpoint", "objectives", "compare"]
ARGS_WARNING = "args parameter is intended"  # LightningCLI's warning when given args while sys.argv has some too


# -- the command table ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["-h"], []], ids=["help", "h", "none"])
def test_top_level_help_lists_every_command_with_its_line(argv, capsys):
    main(argv)
    out = capsys.readouterr().out
    assert list(COMMANDS) == EVERY_COMMAND
    for name, (_, text) in COMMANDS.items():
        assert any(line.split() == [name, *text.split()] for line in out.splitlines()), name


def test_top_level_help_imports_neither_torch_nor_lightning():
    code = (
        "import sys; from lit_webssl.cli import main; main(['--help']); "
        "print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [["fitt"], ["test"], ["predict"], ["--config", "x.yaml"]], ids=lambda a: a[0])
def test_an_unknown_command_is_one_line_naming_it_and_the_choices(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: python -m lit_webssl: unknown command {argv[0]!r}; choose one of: {', '.join(EVERY_COMMAND)}"
    ]


@pytest.mark.parametrize(
    "argv",
    [["plan", "--help"], ["data", "--help"], ["data", "demo", "--help"], ["checkpoint", "--help"]]
    + [["objectives", "--help"], ["compare", "--help"], ["validate", "--help"]],
    ids=lambda a: " ".join(a),
)
def test_each_command_has_its_own_help(argv, capsys):
    try:
        main(argv)
    except SystemExit as stop:  # argparse and LightningCLI exit after printing their help
        assert stop.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m lit_webssl") or "usage:" in out.splitlines()[0], out[:200]
    if argv[0] == "data" and len(argv) == 2:
        assert all(name in out for name in DATA_COMMANDS)


def test_unknown_data_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "nope"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: python -m lit_webssl data: unknown command 'nope'; choose one of: demo, convert, filter"
    ]


def test_lightning_offers_fit_and_validate_only(capsys):
    assert set(WebSSLCLI.subcommands()) == {"fit", "validate"}
    from lit_webssl.cli.lightning import build_cli as _cli

    with pytest.raises(SystemExit):
        _cli(["--help"])
    out = capsys.readouterr().out
    assert "{fit,validate}" in out and "predict" not in out


# -- LightningCLI over the project ----------------------------------------------------------------------------------


def _parse(*configs: Path) -> WebSSLCLI:
    args = [arg for config in configs for arg in ("--config", str(config))]
    cli = WebSSLCLI(LitWebSSL, subclass_mode_data=True, args=args, run=False, plan=True)
    assert isinstance(cli.model, LitWebSSL)
    assert cli.datamodule.batch_size > 0
    assert cli.model.optim.base_lr > 0
    return cli


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_yaml_parses_with_the_real_cli(config):
    _parse(config)


@pytest.mark.parametrize("block", COMPARE_BLOCKS, ids=lambda p: p.stem)
def test_every_comparison_block_composes_with_the_shared_block(block):
    cli = _parse(COMPARE / "base.yaml", block)
    assert (
        cli.model.backbone_overrides
        == yaml.safe_load((COMPARE / "base.yaml").read_text())["model"]["backbone_overrides"]
    )  # the objective block does not touch the shared backbone


@pytest.mark.parametrize("block", DATA_BLOCKS, ids=lambda p: p.stem)
def test_every_data_block_composes_with_a_model_config(block):
    cli = _parse(CONFIGS / "webdino" / "vit_2b.yaml", block)
    assert cli.datamodule.streams, "a data block gives the streams of a mixture"


@pytest.mark.parametrize("model", ["webdino/vit_7b.yaml", "mae/vit_3b.yaml", "clip/vit_7b.yaml"])
@pytest.mark.parametrize("block", STRATEGY_BLOCKS, ids=lambda p: p.stem)
def test_every_strategy_block_composes_with_every_objective(block, model):
    cli = _parse(CONFIGS / model, block)
    strategy = cli.config.trainer.strategy
    expected = yaml.safe_load(block.read_text())["trainer"]["strategy"]
    assert strategy.class_path == expected["class_path"]
    assert cli.config.trainer.precision == "bf16-mixed"
    assert cli.model.backbone_overrides["grad_checkpointing"] is True  # the activation-checkpointing switch
    base = yaml.safe_load((CONFIGS / model).read_text())["model"].get("backbone_overrides") or {}
    assert {k: v for k, v in cli.model.backbone_overrides.items() if k != "grad_checkpointing"} == base


@pytest.mark.parametrize("block", STRATEGY_BLOCKS, ids=lambda p: p.stem)
def test_plan_reads_the_strategy_block(block, capsys):
    main(
        [
            "plan",
            "--config",
            str(CONFIGS / "webdino" / "vit_7b.yaml"),
            "--config",
            str(block),
            "--devices",
            "8",
            "--nodes",
            "1",
            "--device-memory",
            "80",
        ]
    )
    out = capsys.readouterr().out
    assert "ZeRO-3" in out or "FSDP" in out


def test_plan_builds_on_meta_and_prints_the_parameter_count(capsys):
    main(["plan", "--config", str(CONFIGS / "mae" / "vit_3b.yaml")])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("backbone parameters:"))
    assert int(line.split(":")[1]) == pytest.approx(2.948e9, rel=5e-3)


def test_fit_help_documents_constructor_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m lit_webssl [options] fit")
    assert "Backbone preset name" in out
    assert "Unit of ``warmup`` and ``total``" in out
    # LightningCLI's automatic optimizer groups would replace the model's parameter groups and schedules
    assert "--optimizer" not in out and "--lr_scheduler" not in out
    assert "--model.optim.base_lr" in out


def test_the_datamodule_gets_the_objectives_views_and_caption_transform():
    cli = _parse(CONFIGS / "demo" / "clip_tiny.yaml")
    assert cli.datamodule.views is None and cli.datamodule.text_transform is None
    cli.hand_over_views()
    assert cli.datamodule.views == list(cli.model.objective.views())
    assert cli.datamodule.text_transform is not None  # CLIP reads captions
    assert getattr(cli.datamodule, "captions_required_by", "CLIP") == "CLIP"
    mine = SimpleNamespace()  # a user's own datamodule without set_views: left alone
    cli.datamodule = mine
    cli.hand_over_views()
    assert vars(mine) == {}


@pytest.mark.slow  # whole fits in this process: the full suite, not the fast tier
@pytest.mark.parametrize("config", DEMO_CONFIGS, ids=lambda p: p.name)
def test_demo_config_fits_three_steps_and_reports_knn(config, tmp_path, monkeypatch, recwarn, capsys):
    data = tiny_demo(tmp_path)
    # as from the command line: the arguments in sys.argv, main() reads them
    monkeypatch.setattr(sys, "argv", ["lit-webssl", "fit", "--config", str(config), *fast_overrides(data, 3, "fit3")])
    main()
    assert not [w for w in recwarn if ARGS_WARNING in str(w.message)]
    assert ARGS_WARNING not in capsys.readouterr().err
    run = Path("runs/fit3")
    metrics = json.loads((run / "version_0" / "metrics.json").read_text())
    assert {"knn_top1", "knn_top1_pixel", "knn_top1_random_init"} <= set(metrics)
    assert metrics["step"] == 3
    assert (run / "version_0" / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()


def _config_with_checkpoint_every(steps: int, path: Path, source: str = "mae_tiny.yaml") -> str:
    config = yaml.safe_load((CONFIGS / "demo" / source).read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = steps
        if callback["class_path"].endswith("KNNProbe"):
            callback["init_args"]["at_fit_end"] = False
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow  # whole fits in this process: the full suite, not the fast tier
@pytest.mark.parametrize("source", ["mae_tiny.yaml", "dino_tiny.yaml"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(source, tmp_path):
    data = tiny_demo(tmp_path)
    config = _config_with_checkpoint_every(3, tmp_path / "resume.yaml", source)
    # One schedule length for all three runs (it would follow --trainer.max_steps otherwise: 3 vs 6).
    fixed = ["--model.optim.total", "100"]
    main(["fit", "--config", config, *fast_overrides(data, steps=6, run_name="straight"), *fixed])
    main(["fit", "--config", config, *fast_overrides(data, steps=3, run_name="resumed"), *fixed])
    main(["fit", "--config", config, *fast_overrides(data, steps=6, run_name="resumed"), *fixed, "--ckpt_path", "last"])
    straight = load_weights(Path("runs/straight/checkpoints/last.ckpt"))
    resumed = load_weights(Path("runs/resumed/checkpoints/last.ckpt"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.backbone", "vit_typo"], "--model.backbone: unknown preset 'vit_typo'"),
        (["--model.objective.init_args.crop_size", "30"], "--model.objective.init_args.crop_size=30"),
        (["--data.init_args.local", "no/such/dir"], "--data.local: no dataset directory at no/such/dir"),
        (["--data.init_args.batch_size", "lots"], "batch_size"),
        (["--trainer.enable_progress_bar", "false"], "enable_progress_bar=False"),
    ],
    ids=["preset", "crop", "data_dir", "yaml_type", "lightning_misconfiguration"],
)
def test_bad_input_stops_with_one_clear_line(override, expected, tmp_path):
    data = tiny_demo(tmp_path, n_train=20, n_val=20)
    config = str(CONFIGS / "demo" / "mae_tiny.yaml")
    proc = run_cli("fit", "--config", config, *fast_overrides(data, steps=1), *override)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.objective.init_args.local_crops_number", "0"], "--model.objective.init_args.dino_local_weight"),
        (
            ["--model.objective.init_args.momentum_teacher", "1.5"],
            "--model.objective.init_args.momentum_teacher must be in [0, 1]",
        ),
        (
            ["--model.objective.init_args.local_crop_size", "18"],
            "--model.objective.init_args.local_crop_size=18 is not divisible by the patch size 4",
        ),
    ],
    ids=["local_weight_without_local_crops", "momentum", "local_crop"],
)
def test_dino_contradictions_stop_with_one_clear_line(override, expected, tmp_path):
    data = tiny_demo(tmp_path, n_train=20, n_val=20)
    proc = run_cli(
        "fit", "--config", str(CONFIGS / "demo" / "dino_tiny.yaml"), *fast_overrides(data, steps=1), *override
    )
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("stage", ["vit_7b_378.yaml", "vit_7b_518.yaml"])
def test_a_high_resolution_stage_without_its_start_weights_stops_instead_of_starting_at_random(stage, tmp_path):
    proc = run_cli(
        "fit", "--config", str(CONFIGS / "webdino" / stage), "--trainer.devices", "1", "--trainer.num_nodes", "1"
    )
    assert proc.returncode != 0
    assert "--model.init_from: this config continues from earlier weights" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # whole fits in this process: the full suite, not the fast tier
def test_validate_a_checkpoint_and_print_config(tmp_path, capsys, recwarn):
    data = tiny_demo(tmp_path)
    config = str(CONFIGS / "demo" / "mae_tiny.yaml")
    main(["fit", "--config", config, *fast_overrides(data, steps=2, run_name="val")])
    main(
        [
            "validate",
            "--config",
            config,
            *fast_overrides(data, run_name="val"),
            "--ckpt_path",
            "runs/val/checkpoints/last.ckpt",
        ]
    )
    assert "val/loss" in capsys.readouterr().out
    assert not [w for w in recwarn if ARGS_WARNING in str(w.message)]  # args handed in-process, under pytest's argv
    with pytest.raises(SystemExit):
        main(["fit", "--config", config, "--print_config"])
    assert "class_path: lit_webssl.objectives.MAE" in capsys.readouterr().out
