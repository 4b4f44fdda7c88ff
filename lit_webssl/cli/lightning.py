"""Command line: ``python -m lit_webssl {fit,validate,plan,data,checkpoint,objectives,compare}`` (LightningCLI).

``fit``/``validate``/``test`` are LightningCLI's own subcommands over :class:`LitWebSSL` and any LightningDataModule;
``plan`` parses the same config and builds the model on the meta device; ``data`` holds the dataset tools;
``objectives`` lists the objectives registered by short name (built-in and plugins,
:mod:`lit_webssl.objectives.registry`);
``checkpoint convert`` makes one fp32 file of a sharded checkpoint (:mod:`lit_webssl.checkpoint`);
``compare`` trains several objectives on one shared config block and tabulates them (:mod:`lit_webssl.cli.compare`).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from jsonargparse import Namespace, set_parsing_settings
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_webssl.errors import ConfigError
from lit_webssl.objectives.registry import available_objectives, objectives_main, resolve_objective_args
from lit_webssl.training.module import LitWebSSL

RUNS_DIR = "runs"
set_parsing_settings(docstring_parse_attribute_docstrings=True)  # config fields document themselves in --help

_LOGGERS = [
    {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": RUNS_DIR, "name": "run"}},
    {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": RUNS_DIR, "name": "run"}},
]
_CALLBACKS = [
    {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
    {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"save_last": True, "every_n_train_steps": 1000, "save_top_k": -1},
    },
]


class WebSSLCLI(LightningCLI):
    """LightningCLI with the project's defaults: loggers, checkpoints, progress bar, one run directory per run.

    Every run writes to ``<save_dir>/<name>/version_<n>/`` (TensorBoard, CSV, resolved ``config.yaml``, probe
    metrics); checkpoints go to ``<save_dir>/<name>/checkpoints/`` so ``fit --ckpt_path last`` finds the newest one
    across versions.
    """

    def __init__(self, *args: Any, plan: bool = False, **kwargs: Any) -> None:
        self._plan = plan
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="Name of the run: logs go to <save_dir>/<run_name>/version_<n>, checkpoints to "
            "<save_dir>/<run_name>/checkpoints (sets the `name` of every logger).",
        )
        parser.set_defaults({"trainer.logger": _LOGGERS, "trainer.callbacks": _CALLBACKS})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Rewrite objective short names (``--model.objective simclr``, ``class_path: simclr`` in a config) into
        import paths, then parse as LightningCLI does."""
        if isinstance(args, (dict, Namespace)):  # parsed already: nothing to rewrite
            return super().parse_arguments(parser, args)
        given = list(sys.argv[1:] if args is None else args)
        if "-h" in given or "--help" in given:
            available_objectives()  # import the plugins so `--help` lists them among the known subclasses
        with tempfile.TemporaryDirectory(prefix="lit_webssl_config_") as tmp:
            resolved = resolve_objective_args(given, Path(tmp))
            super().parse_arguments(parser, args if resolved == given else resolved)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _assign_run_dirs(config.trainer, config.get("run_name"))

    def before_fit(self) -> None:
        """Refuse to train a config that continues earlier weights (``model.init_required``: the 378 and 518 px
        stages) from a random init; resuming its own checkpoint (``--ckpt_path``) is fine. Tell the model which
        checkpoint it resumes (``LitWebSSL.resume_from``: FSDP2 builds it at the stored position grid)."""
        model = self.model
        if hasattr(model, "resume_from"):
            model.resume_from = self.config["fit"].get("ckpt_path")
        if (
            getattr(model, "init_required", False)
            and model.init_from is None
            and not self.config["fit"].get("ckpt_path")
        ):
            raise ConfigError(
                "--model.init_from: this config continues from earlier weights (model.init_required); "
                "give the previous stage's converted checkpoint (python -m lit_webssl checkpoint "
                "convert CKPT OUT), or --ckpt_path to resume this run"
            )

    def instantiate_trainer(self, **kwargs: Any):
        if self._plan:  # planning needs the model and data settings only
            return None
        return super().instantiate_trainer(**kwargs)


def _assign_run_dirs(trainer_cfg: Any, run_name: str | None) -> None:
    """Name the loggers, give those without a version the same next free ``version_<n>`` and point checkpoints
    without a ``dirpath`` at ``<save_dir>/<name>/checkpoints``."""
    loggers = trainer_cfg.logger if isinstance(trainer_cfg.logger, list) else [trainer_cfg.logger]
    loggers = [lg for lg in loggers if lg not in (None, True, False) and "init_args" in lg]
    if not loggers:
        return
    for lg in loggers:
        if run_name and "name" in _init_arg_names(lg["class_path"]):
            lg["init_args"]["name"] = run_name
    first = loggers[0]["init_args"]
    root = Path(first.get("save_dir") or RUNS_DIR) / (first.get("name") or "")
    taken = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    version = f"version_{max(taken, default=-1) + 1}"
    for lg in loggers:
        if lg["init_args"].get("version") is None and "version" in _init_arg_names(lg["class_path"]):
            lg["init_args"]["version"] = version
    callbacks = trainer_cfg.callbacks or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        if cb is not None and cb["class_path"].endswith("ModelCheckpoint") and not cb["init_args"].get("dirpath"):
            cb["init_args"]["dirpath"] = str(root / "checkpoints")


def _init_arg_names(class_path: str) -> set[str]:
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    return set(inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters)


def _cli(args: list[str], **kwargs: Any) -> WebSSLCLI:
    return WebSSLCLI(
        LitWebSSL,
        subclass_mode_data=True,
        seed_everything_default=0,
        args=args,
        **kwargs,
    )


def plan_main(argv: list[str]) -> None:
    """``plan --config FILE [--devices N] [--nodes M] [--device-memory GIB] [--detail]``: per-device memory plan."""
    from lit_webssl.planner.plan import plan_main as run_plan

    run_plan(argv, lambda rest: _cli(rest, run=False, plan=True))


DATA_COMMANDS = {
    "demo": ("lit_webssl.datamodules.demo", "build the demo dataset as MDS shards"),
    "convert": ("lit_webssl.datamodules.convert", "image folder / webdataset tars / parquet -> MDS (local or remote)"),
    "filter": ("lit_webssl.datamodules.filter", "score text density and write the kept subset as MDS"),
}


def data_main(argv: list[str]) -> None:
    """``data {demo,convert,filter} ...``: dataset tools, each a module with a ``main(argv)``."""
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name}: {text}" for name, (_, text) in DATA_COMMANDS.items()]
        print(f"usage: python -m lit_webssl data {{{','.join(DATA_COMMANDS)}}} [options]\n" + "\n".join(lines))
        return
    if argv[0] not in DATA_COMMANDS:
        raise SystemExit(f"error: unknown data command {argv[0]!r}; choose from: {', '.join(DATA_COMMANDS)}")
    import importlib

    importlib.import_module(DATA_COMMANDS[argv[0]][0]).main(argv[1:])


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m lit_webssl`` and the ``lit-webssl`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "plan":
            return plan_main(argv[1:])
        if argv and argv[0] == "data":
            return data_main(argv[1:])
        if argv and argv[0] == "checkpoint":
            from lit_webssl.checkpoint import main as checkpoint_main

            return checkpoint_main(argv[1:])
        if argv and argv[0] == "objectives":
            return objectives_main(argv[1:])
        if argv and argv[0] == "compare":
            from lit_webssl.cli.compare import main as compare_main

            code = compare_main(argv[1:])
            if code:
                raise SystemExit(code)
            return None
        _cli(argv)
    except Exception as err:  # bad input: one line, no traceback (jsonargparse wraps errors from constructors)
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, (ConfigError, MisconfigurationException)):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
