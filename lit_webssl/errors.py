"""Errors for bad input: the CLI prints their message as one line (it names the flag, file or sample) and exits 2."""


class ConfigError(ValueError):
    """A setting that cannot work; the message names the offending flag or path."""
