"""Plugin objectives: the entry-point registry, short names in the real CLI, and the example SimCLR package."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import CONFIGS, REPO, fast_overrides, run_cli, tiny_demo

from lit_webssl.cli import WebSSLCLI, main
from lit_webssl.errors import ConfigError
from lit_webssl.objectives import MAE, registry
from lit_webssl.objectives.registry import (
    available_objectives,
    format_objectives,
    resolve_objective,
    resolve_objective_args,
)
from lit_webssl.training.module import LitWebSSL

EXAMPLE = REPO / "examples" / "custom_objective"
for _path in (EXAMPLE, REPO / "tests" / "objectives"):  # the example's source and the shared objective contract
    if str(_path) not in sys.path:
        sys.path.append(str(_path))

from contract import ObjectiveContract  # noqa: E402
from lit_webssl_simclr import NTXentLoss, SimCLR  # noqa: E402

# -- the registry, with fake entry points --------------------------------------------------------------------------


@dataclass
class FakeEntryPoint:
    """What the registry reads of an ``importlib.metadata.EntryPoint``."""

    name: str
    value: str
    dist_name: str | None = None
    group: str = registry.GROUP

    @property
    def dist(self):
        return SimpleNamespace(name=self.dist_name) if self.dist_name else None

    def load(self):
        module, _, attr = self.value.partition(":")
        obj = __import__(module, fromlist=["_"])
        return getattr(obj, attr) if attr else obj


FAKES = [
    FakeEntryPoint("mae", "lit_webssl.objectives.mae:MAE", "lit_webssl"),
    FakeEntryPoint("simclr", "lit_webssl_simclr:SimCLR", "acme-simclr"),
    FakeEntryPoint("broken", "acme_missing_module:Thing", "acme-broken"),
    FakeEntryPoint("notobj", "collections:OrderedDict", "acme-misc"),
]


@pytest.fixture
def fake_entry_points(monkeypatch):
    def entry_points(group=None):
        return [ep for ep in FAKES if group is None or ep.group == group]

    monkeypatch.setattr("importlib.metadata.entry_points", entry_points)


def test_available_objectives_lists_sources_descriptions_and_errors(fake_entry_points):
    entries = available_objectives()
    assert list(entries) == ["mae", "broken", "notobj", "simclr"]  # built-ins first, then by name
    mae = entries["mae"]
    assert (mae.class_path, mae.source, mae.error) == ("lit_webssl.objectives.mae.MAE", "built-in", None)
    assert mae.description.startswith("Masked autoencoder (Web-MAE)")
    assert entries["simclr"].source == "acme-simclr"
    assert entries["simclr"].description.startswith("SimCLR: NT-Xent")
    assert entries["broken"].error == "ModuleNotFoundError: No module named 'acme_missing_module'"
    assert "not a subclass of lit_webssl.objectives.Objective" in entries["notobj"].error
    table = format_objectives(entries)
    assert "FAILED TO LOAD: ModuleNotFoundError" in table
    assert len(table.splitlines()) == 5


def test_resolve_short_names_class_names_and_paths(fake_entry_points):
    assert resolve_objective("simclr") == "lit_webssl_simclr.SimCLR"
    assert resolve_objective("SimCLR") == "lit_webssl_simclr.SimCLR"  # the class name, though not imported by path
    assert resolve_objective("my_pkg.MyLoss") == "my_pkg.MyLoss"  # an import path is jsonargparse's to check
    with pytest.raises(
        ConfigError,
        match=r"--model.objective: unknown objective 'simclrr'; choose one of: broken, "
        r"mae, notobj, simclr",
    ):
        resolve_objective("simclrr")
    with pytest.raises(
        ConfigError,
        match=r"--model.objective: objective 'broken' .* cannot be loaded: "
        r"ModuleNotFoundError",
    ):
        resolve_objective("broken")


def test_a_plugin_cannot_take_a_built_in_name(monkeypatch):
    eps = [
        FakeEntryPoint("mae", "lit_webssl_simclr:SimCLR", "acme"),
        FakeEntryPoint("mae", "lit_webssl.objectives.mae:MAE", "lit_webssl"),
    ]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: eps)
    with pytest.warns(UserWarning, match="registered twice"):
        assert resolve_objective("mae") == "lit_webssl.objectives.mae.MAE"


def test_command_line_and_config_files_are_rewritten_in_memory(fake_entry_points, tmp_path):
    argv = [
        "fit",
        "--model.objective",
        "simclr",
        "--model.objective.class_path=simclr",
        "--model.objective",
        '{"class_path": "simclr", "init_args": {"temperature": 0.3}}',
        "--model.objective",
        "my_pkg.MyLoss",
        "--trainer.max_steps",
        "simclr",
    ]
    assert resolve_objective_args(argv) == [
        "fit",
        "--model.objective",
        "lit_webssl_simclr.SimCLR",
        "--model.objective.class_path=lit_webssl_simclr.SimCLR",
        "--model.objective",
        '{"class_path": "lit_webssl_simclr.SimCLR", "init_args": {"temperature": 0.3}}',
        "--model.objective",
        "my_pkg.MyLoss",
        "--trainer.max_steps",
        "simclr",
    ]

    short = tmp_path / "short.yaml"
    short.write_text(
        yaml.safe_dump(
            {
                "model": {"objective": {"class_path": "simclr", "init_args": {"crop_size": 32}}},
                "trainer": {"max_steps": 3},
            }
        )
    )
    nested = tmp_path / "nested.yaml"
    nested.write_text(yaml.safe_dump({"fit": {"model": {"objective": "simclr"}}}))
    full = tmp_path / "full.yaml"
    full.write_text(yaml.safe_dump({"model": {"objective": {"class_path": "lit_webssl_simclr.SimCLR"}}}))
    model = tmp_path / "model.yaml"  # a --model block: the objective at its top
    model.write_text(yaml.safe_dump({"objective": {"class_path": "simclr"}, "backbone": "vit_tiny"}))
    before = sorted(tmp_path.iterdir())
    args = resolve_objective_args(
        ["fit", "--config", str(short), "-c", str(full), f"--config={nested}", "--model", str(model)]
    )
    assert args[3:5] == ["-c", str(full)]  # nothing to change: the user's file is passed on
    assert sorted(tmp_path.iterdir()) == before  # nothing written: the resolved content is handed over as text
    assert json.loads(args[2]) == {
        "model": {"objective": {"class_path": "lit_webssl_simclr.SimCLR", "init_args": {"crop_size": 32}}},
        "trainer": {"max_steps": 3},
    }
    assert args[5].startswith("--config=")
    assert json.loads(args[5].removeprefix("--config=")) == {
        "fit": {"model": {"objective": "lit_webssl_simclr.SimCLR"}}
    }
    assert args[6] == "--model"
    assert json.loads(args[7]) == {"objective": {"class_path": "lit_webssl_simclr.SimCLR"}, "backbone": "vit_tiny"}
    with pytest.raises(ConfigError, match="unknown objective 'nope'"):
        resolve_objective_args(["fit", "--model.objective", "nope"])


def test_short_names_in_a_config_and_a_model_block_reach_the_real_parser(tmp_path):
    config = yaml.safe_load((CONFIGS / "demo" / "mae_tiny.yaml").read_text())
    config["model"]["objective"]["class_path"] = "mae"  # the built-in entry point's short name
    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump(config))
    cli = WebSSLCLI(LitWebSSL, subclass_mode_data=True, args=["--config", str(short)], run=False, plan=True)
    assert type(cli.model.objective) is MAE
    assert cli.config.model.objective.init_args.mask_ratio == config["model"]["objective"]["init_args"]["mask_ratio"]
    model = tmp_path / "model.yaml"
    model.write_text(yaml.safe_dump(config["model"]))
    cli = WebSSLCLI(
        LitWebSSL,
        subclass_mode_data=True,
        args=["--config", str(CONFIGS / "demo" / "mae_tiny.yaml"), "--model", str(model)],
        run=False,
        plan=True,
    )
    assert type(cli.model.objective) is MAE


def test_unknown_short_name_stops_the_cli_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "demo" / "mae_tiny.yaml"), "--model.objective", "simclrr"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model.objective: unknown objective 'simclrr'; choose one of: ")
    assert "mae" in err and "dino" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


# -- the example package, installed into its own directory ----------------------------------------------------------


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """The example package pip-installed (from a copy: the build writes into its source) to a --target directory;
    the environment that puts it on the path of a subprocess."""
    root = tmp_path_factory.mktemp("plugin")
    source, site = root / "src", root / "site"
    subprocess.run(["cp", "-r", str(EXAMPLE), str(source)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert (site / "lit_webssl_simclr-0.1.0.dist-info" / "entry_points.txt").is_file()
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def test_objectives_command_lists_built_ins_and_the_installed_plugin(plugin_env):
    proc = run_cli("objectives", env=plugin_env)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert rows["mae"][1:3] == ["lit_webssl.objectives.mae.MAE", "built-in"]
    assert rows["dino"][1:3] == ["lit_webssl.objectives.dino.DINOv2", "built-in"]
    assert rows["simclr"][1:4] == ["lit_webssl_simclr.SimCLR", "lit_webssl_simclr", "SimCLR:"]


def test_fit_selects_the_plugin_by_short_name_in_yaml_and_on_the_command_line(plugin_env, tmp_path):
    data = tiny_demo(tmp_path)
    config = EXAMPLE / "configs" / "simclr_tiny.yaml"
    assert yaml.safe_load(config.read_text())["model"]["objective"]["class_path"] == "simclr"
    proc = run_cli(
        "fit",
        "--config",
        str(config),
        *fast_overrides(data, steps=3, run_name="short"),
        "--model.objective",
        "simclr",
        "--model.objective.init_args.temperature",
        "0.3",
        env=plugin_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = Path("runs/short/version_0")
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["step"] == 3 and {"knn_top1", "knn_top1_pixel", "knn_top1_random_init"} <= set(metrics)
    saved = yaml.safe_load((version / "config.yaml").read_text())["model"]["objective"]
    assert saved["class_path"] == "lit_webssl_simclr.SimCLR"
    assert saved["init_args"]["temperature"] == 0.3 and saved["init_args"]["crop_size"] == 32
    assert "val/ntxent" in (version / "metrics.csv").read_text().splitlines()[0]


def test_fit_selects_the_plugin_by_class_path(plugin_env, tmp_path):
    data = tiny_demo(tmp_path, n_train=40, n_val=20)
    config = yaml.safe_load((EXAMPLE / "configs" / "simclr_tiny.yaml").read_text())
    config["model"]["objective"]["class_path"] = "lit_webssl_simclr.SimCLR"
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "KNNProbe" not in c["class_path"]]
    path = tmp_path / "simclr_path.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_cli(
        "fit",
        "--config",
        str(path),
        *fast_overrides(data, steps=1, run_name="path"),
        "--trainer.limit_val_batches",
        "0",
        env=plugin_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path("runs/path/checkpoints/last.ckpt").is_file()


def test_help_of_the_plugin_by_short_name(plugin_env):
    proc = run_cli("fit", "--model.objective.help", "simclr", env=plugin_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--model.objective.temperature TEMPERATURE" in proc.stdout
    assert "NT-Xent temperature (> 0)." in proc.stdout


# -- the example's loss and objective ---------------------------------------------------------------------------------


def test_ntxent_matches_a_hand_computation():
    # Orthogonal views that agree: each embedding's positive has cosine 1, its two negatives cosine 0, so every
    # term is -log(e^(1/t) / (e^(1/t) + 2)) = log(1 + 2 e^(-1/t)).
    eye = torch.eye(2)
    assert NTXentLoss(temperature=0.5)(eye, eye).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)

    # a0 = (1, 0), a1 = (0, 1), b0 = (1, 1) / sqrt 2 (unnormalized on input), b1 = (-1, 0); t = 1, c = 1 / sqrt 2.
    z_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_b = torch.tensor([[3.0, 3.0], [-2.0, 0.0]])
    c = 1 / math.sqrt(2)
    terms = [
        -c + math.log(1 + math.exp(c) + math.exp(-1)),  # a0: positive b0 (c); negatives a1 (0), b1 (-1)
        math.log(1 + math.exp(c) + 1),  # a1: positive b1 (0); negatives a0 (0), b0 (c)
        -c + math.log(math.exp(c) + math.exp(c) + math.exp(-c)),  # b0: positive a0 (c); negatives a1 (c), b1 (-c)
        math.log(1 + math.exp(-1) + math.exp(-c)),  # b1: positive a1 (0); negatives a0 (-1), b0 (-c)
    ]
    assert NTXentLoss(temperature=1.0)(z_a, z_b).item() == pytest.approx(sum(terms) / 4, rel=1e-6)


def test_ntxent_matches_the_formula_term_by_term():
    gen = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    t = 0.2
    z = torch.nn.functional.normalize(torch.cat([z_a, z_b]).double(), dim=1).tolist()
    n, b = len(z), len(z) // 2

    def sim(i: int, k: int) -> float:
        return sum(x * y for x, y in zip(z[i], z[k], strict=True)) / t

    terms = [-sim(i, (i + b) % n) + math.log(sum(math.exp(sim(i, k)) for k in range(n) if k != i)) for i in range(n)]
    assert NTXentLoss(temperature=t)(z_a, z_b).item() == pytest.approx(sum(terms) / n, rel=1e-5)
    assert NTXentLoss(temperature=t)(z_b, z_a).item() == pytest.approx(sum(terms) / n, rel=1e-5)  # symmetric


def test_simclr_checks_its_arguments():
    with pytest.raises(ConfigError, match=r"--model.objective.init_args.temperature must be > 0"):
        SimCLR(temperature=0.0)
    with pytest.raises(ConfigError, match=r"--model.objective.init_args.proj_dim must be >= 1"):
        SimCLR(proj_dim=0)
    with pytest.raises(ConfigError, match="grayscale_p must be in"):
        SimCLR(grayscale_p=1.5)
    with pytest.raises(ConfigError, match=r"crop_size=30 is not divisible by the patch size"):
        SimCLR(crop_size=30).configure(SimpleNamespace(patch_size=4, embed_dim=8))


class TestSimCLRContract(ObjectiveContract):
    def make_objective(self, crop_size: int) -> SimCLR:
        return SimCLR(crop_size=crop_size, proj_hidden_dim=32, proj_dim=16)
