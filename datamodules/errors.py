"""The error of a data setting that cannot work."""

from __future__ import annotations

from lit_webssl.errors import ConfigError

DEMO_HINT = "run `python -m lit_webssl data demo` to build the demo set, or point --data.local at MDS shards"
"""What to do when no dataset is found."""


class DataConfigError(ConfigError):
    """A data setting (flag or path) that cannot work; the one-line message names the flag."""
