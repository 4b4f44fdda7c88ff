"""Command line: ``python -m lit_webssl {fit,validate,plan,data,checkpoint,objectives,compare}``.

The commands and their one-line help are one table (:data:`lit_webssl.cli.commands.COMMANDS`): ``fit`` and
``validate`` are LightningCLI's over :class:`~lit_webssl.training.module.LitWebSSL` and any LightningDataModule
(:mod:`lit_webssl.cli.lightning`); ``plan`` parses the same config and builds the model on the meta device; ``data``
holds the dataset tools; ``checkpoint convert`` makes one fp32 file of a sharded checkpoint; ``objectives`` lists the
objectives registered by short name; ``compare`` trains several objectives on one shared block
(:mod:`lit_webssl.cli.compare`). Bad input stops with one line, ``error: ...`` on stderr, and exit status 2.
"""

from __future__ import annotations

import sys
from typing import Any

from lit_webssl.errors import ConfigError

DESCRIPTION = "Language-free visual representation learning (Web-DINO, Web-MAE, CLIP) on PyTorch Lightning."


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m lit_webssl`` and the ``lit-webssl`` script; ``argv`` defaults to the command line."""
    from lit_webssl.cli.commands import COMMANDS, PROG, dispatch

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        dispatch(COMMANDS, argv, PROG, DESCRIPTION)
    except Exception as err:  # bad input: one line, no traceback (jsonargparse wraps errors from constructors)
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, _one_line_errors()):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def _one_line_errors() -> tuple[type[BaseException], ...]:
    """ConfigError, and Lightning's MisconfigurationException once Lightning is imported (it cannot be raised
    before), so that an error of a tool that never imports Lightning does not import it."""
    if "lightning.fabric.utilities.exceptions" not in sys.modules:
        return (ConfigError,)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return (ConfigError, MisconfigurationException)


def __getattr__(name: str) -> Any:
    """``WebSSLCLI`` and ``RUNS_DIR`` from their modules, imported on first use."""
    if name == "WebSSLCLI":
        from lit_webssl.cli.lightning import WebSSLCLI

        return WebSSLCLI
    if name == "RUNS_DIR":
        from lit_webssl.cli.rundirs import RUNS_DIR

        return RUNS_DIR
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
