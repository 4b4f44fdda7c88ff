"""``fit`` and ``validate``: LightningCLI over :class:`LitWebSSL` and any LightningDataModule; ``plan`` parses the same
config (:mod:`lit_webssl.planner.plan`).

LightningCLI's ``test`` and ``predict`` are not offered (LitWebSSL has no test or predict step), nor its automatic
``--optimizer``/``--lr_scheduler`` groups, which would replace the model's own parameter groups and schedules
(``LitWebSSL.configure_optimizers``, ``--model.optim``).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_webssl.cli.rundirs import RUNS_DIR, assign_run_dirs
from lit_webssl.errors import ConfigError
from lit_webssl.objectives.registry import available_objectives, resolve_objective_args
from lit_webssl.training.module import LitWebSSL

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
    across versions (:mod:`lit_webssl.cli.rundirs`). Before ``fit`` and ``validate`` the datamodule is handed the
    views (and caption transform) of the model's objective.

    Args:
        plan: Build the model and datamodule only, no trainer (``python -m lit_webssl plan``).
        kwargs: LightningCLI's; ``auto_configure_optimizers`` defaults to ``False``.
    """

    def __init__(self, *args: Any, plan: bool = False, **kwargs: Any) -> None:
        self._plan = plan
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate``: LightningCLI's own minus ``test`` and ``predict``, with the arguments they skip."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

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
        """Parse ``args`` (``None``: the command line, ``sys.argv[1:]``) with objective short names
        (``--model.objective simclr``, ``class_path: simclr`` in a config) resolved into import paths.

        The arguments are parsed here rather than by LightningCLI's own ``parse_arguments``: that one warns whenever
        it is given ``args`` while ``sys.argv`` holds arguments too, which is how ``python -m lit_webssl`` always
        calls it (:func:`lit_webssl.cli.main` reads the command line and hands each command its part).
        """
        if isinstance(args, (dict, Namespace)):  # parsed already: nothing to resolve
            self.config = parser.parse_object(args)
            return
        given = list(sys.argv[1:] if args is None else args)
        if "-h" in given or "--help" in given:
            available_objectives()  # import the plugins so `--help` lists them among the known subclasses
        self.config = parser.parse_args(resolve_objective_args(given))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        assign_run_dirs(config.trainer, config.get("run_name"))

    def before_fit(self) -> None:
        """Refuse to train a config that continues earlier weights (``model.init_required``: the 378 and 518 px
        stages) from a random init; resuming its own checkpoint (``--ckpt_path``) is fine. Tell the model which
        checkpoint it resumes (``LitWebSSL.resume_from``: a sharded run is built at the stored position grid)."""
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
        self.hand_over_views()

    def before_validate(self) -> None:
        self.hand_over_views()

    def hand_over_views(self) -> None:
        """Give the datamodule the crops the objective declares (``objective.views()``) and, when the objective
        reads captions (``needs_text``), its caption transform: through the datamodule's ``set_views`` and
        ``set_text_transform``, where it has them (a user's own LightningDataModule may not), and only where it has
        none set already. ``set_text_transform`` is told which objective needs the captions (``required_by``) when
        it takes that, so ``setup`` can name ``--data.caption_key`` if no caption column is set; the transform is
        not built then."""
        objective, data = getattr(self.model, "objective", None), self.datamodule
        if objective is None or data is None:
            return
        if callable(getattr(data, "set_views", None)) and getattr(data, "views", None) is None:
            data.set_views(list(objective.views()))
        set_text_transform = getattr(data, "set_text_transform", None)
        if not (getattr(objective, "needs_text", False) and callable(set_text_transform)):
            return
        transform = getattr(data, "text_transform", None)
        if transform is None and getattr(data, "caption_key", "") is not None:
            transform = objective.text_transform()
        if "required_by" in inspect.signature(set_text_transform).parameters:
            set_text_transform(transform, required_by=type(objective).__name__)
        elif transform is not getattr(data, "text_transform", None):
            set_text_transform(transform)

    def instantiate_trainer(self, **kwargs: Any):
        if self._plan:  # planning needs the model and data settings only
            return None
        return super().instantiate_trainer(**kwargs)


def build_cli(args: list[str] | None, **kwargs: Any) -> WebSSLCLI:
    """The project's CLI over ``args`` (``None``: the command line): LitWebSSL, any datamodule, seed 0."""
    kwargs.setdefault("parser_kwargs", {"prog": "python -m lit_webssl"})
    return WebSSLCLI(LitWebSSL, subclass_mode_data=True, seed_everything_default=0, args=args, **kwargs)


def fit_main(argv: list[str]) -> None:
    """``fit [--config FILE ...] [--ckpt_path PATH|last] [--print_config] ...``: train."""
    build_cli(["fit", *argv])


def validate_main(argv: list[str]) -> None:
    """``validate --config FILE --ckpt_path PATH ...``: the validation loss of a checkpoint."""
    build_cli(["validate", *argv])


def plan_main(argv: list[str]) -> None:
    """``plan --config FILE [--devices N] [--nodes M] [--device-memory GIB] [--detail]``: per-device memory plan."""
    from lit_webssl.planner.plan import plan_main as run_plan

    run_plan(argv, lambda rest: build_cli(rest, run=False, plan=True))
