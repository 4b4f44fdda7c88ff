"""Private APIs of our dependencies, in one guarded place (one module per dependency).

Every use of a name that a dependency does not promise to keep (a leading underscore, an internal module, an
undocumented attribute) lives in one of these modules and nowhere else, with a comment saying which public API is
missing. Each module checks, when it is imported, that the installed release is one the test suite has passed on
(:func:`require`), and stops with one line otherwise; ``tests/compat/`` checks that each private behaviour relied on
still holds, so an upgrade that changes one breaks loudly there instead of silently in a run.

The version ranges here match the pins in ``pyproject.toml``.
"""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version


class UnsupportedVersion(RuntimeError):
    """An installed dependency outside the range whose private behaviour this package relies on."""


def require(distribution: str, minimum: str, below: str) -> str:
    """The installed version of ``distribution``; raises :class:`UnsupportedVersion` (one line naming the package,
    the version and the range) unless ``minimum <= version < below``."""
    try:
        installed = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise UnsupportedVersion(f"{distribution} is not installed (lit_webssl needs >={minimum},<{below})") from err
    if not Version(minimum) <= Version(installed) < Version(below):
        raise UnsupportedVersion(
            f"{distribution} {installed} is not supported: lit_webssl relies on its private behaviour as of "
            f">={minimum},<{below} (lit_webssl/compat/); install a release in that range"
        )
    return installed
