"""The command table of ``python -m lit_webssl``: name -> (``"module:function"`` or callable, one-line help).

Each function takes the arguments after its command name. A command is imported only when it runs, so
``python -m lit_webssl --help`` lists them without importing Lightning or torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from lit_webssl.errors import ConfigError

Command = str | Callable[[list[str]], Any]
"""``"module:function"`` (imported when the command runs) or the function itself."""

PROG = "python -m lit_webssl"

DATA_COMMANDS: dict[str, tuple[Command, str]] = {
    "demo": ("lit_webssl.datamodules.demo:main", "build the demo dataset as MDS shards"),
    "convert": (
        "lit_webssl.datamodules.convert:main",
        "image folder / webdataset tars / parquet -> MDS (local or remote)",
    ),
    "filter": ("lit_webssl.datamodules.filter:main", "score text density and write the kept subset as MDS"),
}
"""``data`` subcommands: each a module of :mod:`lit_webssl.datamodules` with a ``main(argv)``."""


def data_main(argv: list[str]) -> Any:
    """``data {demo,convert,filter} ...``: the dataset tools."""
    return dispatch(DATA_COMMANDS, argv, f"{PROG} data", "Dataset tools, each with its own --help.")


def compare_main(argv: list[str]) -> None:
    """``compare``: its exit status is 1 when one of the runs failed."""
    from lit_webssl.cli.compare import main

    code = main(argv)
    if code:
        raise SystemExit(code)


COMMANDS: dict[str, tuple[Command, str]] = {
    "fit": (
        "lit_webssl.cli.lightning:fit_main",
        "train (--config FILE, any field as a flag; --ckpt_path last resumes)",
    ),
    "validate": ("lit_webssl.cli.lightning:validate_main", "validation loss of a checkpoint (--ckpt_path PATH)"),
    "plan": (
        "lit_webssl.cli.lightning:plan_main",
        "build the model on the meta device, print a per-device memory plan",
    ),
    "data": (data_main, f"dataset tools: {', '.join(DATA_COMMANDS)} (MDS shards)"),
    "checkpoint": ("lit_webssl.checkpoint:main", "convert: one fp32 file of a sharded checkpoint folder"),
    "objectives": (
        "lit_webssl.objectives.registry:objectives_main",
        "list the objectives --model.objective takes by short name (built-in and plugins)",
    ),
    "compare": (compare_main, "train several objectives on one shared config block and tabulate them"),
}
"""Every command of ``python -m lit_webssl``, in the order ``--help`` lists them."""


def usage(table: dict[str, tuple[Command, str]], prog: str, description: str) -> str:
    """The help text of a command table: usage line, description, one line per command."""
    width = max(len(name) for name in table)
    lines = [f"usage: {prog} {{{','.join(table)}}} ...", "", description, "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in table.items()]
    lines += ["", f"`{prog} <command> --help` shows a command's options."]
    return "\n".join(lines)


def resolve(command: Command) -> Callable[[list[str]], Any]:
    """The function of a table entry, importing its module when it is given as ``"module:function"``."""
    if callable(command):
        return command
    module, _, name = command.partition(":")
    return getattr(importlib.import_module(module), name)


def dispatch(table: dict[str, tuple[Command, str]], argv: list[str], prog: str, description: str) -> Any:
    """Run the command ``argv[0]`` of ``table`` on the rest; with no command or ``-h``/``--help``, print the table.

    Raises:
        ConfigError: Unknown command (the message names it and the choices).
    """
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(table, prog, description))
        return None
    name, rest = argv[0], argv[1:]
    if name not in table:
        raise ConfigError(f"{prog}: unknown command {name!r}; choose one of: {', '.join(table)}")
    return resolve(table[name][0])(rest)
