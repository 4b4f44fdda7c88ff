"""Objectives by short name: the ``lit_webssl.objectives`` entry-point group (built-ins and installed plugins).

A package registers its :class:`~lit_webssl.objectives.base.Objective` subclasses in its ``pyproject.toml``::

    [project.entry-points."lit_webssl.objectives"]
    simclr = "lit_webssl_simclr:SimCLR"

Once it is installed, ``class_path: simclr`` in YAML and ``--model.objective simclr`` on the command line select it
(a full import path such as ``lit_webssl_simclr.SimCLR`` works with or without an entry point). Nothing is imported
to resolve a name except the one objective chosen, so a plugin that fails to import breaks only its own runs;
``python -m lit_webssl objectives`` lists it with the reason.

jsonargparse resolves a ``class_path`` only from an import path or the bare name of a subclass already imported
(``resolve_class_path_by_name``), and offers no public hook for other names: a custom loader (``set_loader``) sees a
value without knowing its key, and registering the plugins' classes would import every plugin up front. So
:func:`resolve_objective_args` rewrites the short names in the arguments before jsonargparse parses them, in memory:
a config file that needs a change is handed over as its resolved content (JSON text), and no file is written.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lit_webssl.errors import ConfigError

GROUP = "lit_webssl.objectives"
"""The entry-point group that objectives are registered in."""
FLAG = "--model.objective"
"""The flag that errors about the objective's name point at."""
BUILTIN = "built-in"
"""Source of the objectives that lit_webssl itself registers."""

_OBJECTIVE_FLAGS = ("--model.objective", "--model.objective.class_path", "--model.objective.help")
_MODEL_FLAG = "--model"
_CONFIG_FLAGS = ("-c", "--config")
_SUBCOMMANDS = ("fit", "validate")
_BARE_NAME = re.compile(r"[A-Za-z_][\w-]*")


@dataclass(frozen=True)
class ObjectiveEntry:
    """One objective of the entry-point group, as ``python -m lit_webssl objectives`` lists it."""

    name: str
    """Short name: the entry point's name (``mae``, ``dino``, ``simclr``)."""
    class_path: str
    """Import path ``module.Class``: what ``class_path`` in YAML takes."""
    source: str
    """``built-in``, or the name of the installed distribution that registers it."""
    description: str = ""
    """First line of the class docstring."""
    error: str | None = None
    """Why the entry point cannot be used (``None`` when it loads and is an Objective subclass)."""


def _class_path(value: str) -> str:
    """``module:Class`` (entry-point syntax) -> ``module.Class`` (import path)."""
    module, _, attr = value.partition(":")
    return f"{module.strip()}.{attr.strip()}" if attr.strip() else module.strip()


def _source(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None)
    if name is None:
        return BUILTIN if _class_path(ep.value).startswith("lit_webssl.") else "unknown"
    return BUILTIN if re.sub(r"[-_.]+", "_", name).lower() == "lit_webssl" else name


def _entry_points() -> dict[str, Any]:
    """Entry points of the group by name, without importing them; a built-in wins over a plugin of the same name."""
    found: dict[str, Any] = {}
    for ep in importlib.metadata.entry_points(group=GROUP):
        taken = found.get(ep.name)
        if taken is None:
            found[ep.name] = ep
            continue
        keep, drop = (ep, taken) if _source(ep) == BUILTIN and _source(taken) != BUILTIN else (taken, ep)
        found[ep.name] = keep
        if keep.value != drop.value:
            warnings.warn(
                f"objective name {ep.name!r} is registered twice: {keep.value} ({_source(keep)}) is used, "
                f"{drop.value} ({_source(drop)}) is ignored",
                stacklevel=2,
            )
    return found


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _load(ep: Any) -> tuple[type | None, str | None]:
    """``(class, None)``, or ``(None, reason)`` when the entry point cannot be imported or is no Objective."""
    from lit_webssl.objectives.base import Objective

    if ":" not in ep.value:
        return None, f"entry point {ep.value!r} names a module; it must name a class (module:Class)"
    try:
        obj = ep.load()
    except (Exception, SystemExit) as err:  # a broken plugin is reported, never fatal
        return None, _one_line(err)
    if not (isinstance(obj, type) and issubclass(obj, Objective)):
        return None, f"{_class_path(ep.value)} is not a subclass of lit_webssl.objectives.Objective"
    return obj, None


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def available_objectives() -> dict[str, ObjectiveEntry]:
    """Every registered objective by short name, built-ins first; imports each to read its docstring.

    An entry point that fails to import (or is not an Objective subclass) is listed with ``error`` set.
    """
    entries = []
    for name, ep in _entry_points().items():
        cls, error = _load(ep)
        entries.append(
            ObjectiveEntry(
                name=name,
                class_path=_class_path(ep.value),
                source=_source(ep),
                description=_first_line(cls.__doc__) if cls else "",
                error=error,
            )
        )
    entries.sort(key=lambda e: (e.source != BUILTIN, e.name))
    return {e.name: e for e in entries}


def resolve_objective(name_or_path: str) -> str:
    """The import path of an objective given by short name (``simclr``) or class name (``SimCLR``).

    An import path (anything with a dot) is returned unchanged: jsonargparse checks it. A name that is registered
    is loaded, so a broken plugin stops here with its reason.

    Raises:
        ConfigError: Unknown name (the message lists the choices), ambiguous class name, or a plugin that fails
            to load.
    """
    name = name_or_path.strip()
    if "." in name:
        return name
    eps = _entry_points()
    ep = eps.get(name)
    if ep is None:
        by_class = [e for e in eps.values() if _class_path(e.value).rsplit(".", 1)[-1] == name]
        if len(by_class) > 1:
            paths = ", ".join(_class_path(e.value) for e in by_class)
            raise ConfigError(f"{FLAG}: class name {name!r} is ambiguous ({paths}); give its short name or path")
        ep = by_class[0] if by_class else None
    if ep is None:
        choices = ", ".join(sorted(eps)) or "none registered"
        raise ConfigError(
            f"{FLAG}: unknown objective {name!r}; choose one of: {choices}, or an import path such as "
            "my_package.MyObjective (a plugin's short name needs its package installed; "
            "`python -m lit_webssl objectives` lists them)"
        )
    _, error = _load(ep)
    if error:
        raise ConfigError(f"{FLAG}: objective {ep.name!r} ({ep.value}, from {_source(ep)}) cannot be loaded: {error}")
    return _class_path(ep.value)


def _resolve_spec(spec: Any) -> Any:
    """An objective value from YAML (a name, or a dict with ``class_path``) with its short name resolved."""
    if isinstance(spec, str) and _BARE_NAME.fullmatch(spec):
        return resolve_objective(spec)
    if isinstance(spec, dict) and isinstance(spec.get("class_path"), str) and _BARE_NAME.fullmatch(spec["class_path"]):
        return {**spec, "class_path": resolve_objective(spec["class_path"])}
    return spec


def _resolve_config(cfg: Any) -> Any:
    """A whole config (``model.objective``, also under a subcommand key) with the objective's short name resolved."""
    if not isinstance(cfg, dict):
        return cfg
    out = dict(cfg)
    model = out.get("model")
    if isinstance(model, dict) and "objective" in model:
        out["model"] = {**model, "objective": _resolve_spec(model["objective"])}
    for sub in _SUBCOMMANDS:
        if isinstance(out.get(sub), dict):
            out[sub] = _resolve_config(out[sub])
    return out


def _read_yaml(value: str) -> Any:
    """The content of a value that names a YAML file or holds YAML text; ``None`` if neither."""
    try:
        is_file = Path(value).is_file()
    except (OSError, ValueError):  # e.g. YAML text too long to be a file name
        is_file = False
    try:
        return yaml.safe_load(Path(value).read_text() if is_file else value)
    except (OSError, ValueError, yaml.YAMLError):  # jsonargparse reports unreadable input itself
        return None


def _rewrite_value(flag: str, value: str) -> str:
    """One flag's value with the objective's short name resolved; a file that needs a change becomes its resolved
    content (JSON text), which jsonargparse reads like the file."""
    is_objective = flag in _OBJECTIVE_FLAGS
    if is_objective and _BARE_NAME.fullmatch(value.strip()):
        return resolve_objective(value)
    content = _read_yaml(value)
    if not isinstance(content, dict):
        return value
    if flag == _MODEL_FLAG:  # the model's own block: ``objective`` at its top
        resolved = _resolve_config({"model": content})["model"]
    elif is_objective:
        resolved = _resolve_spec(content) if flag != "--model.objective.help" else _resolve_config(content)
    else:
        resolved = _resolve_config(content)
    return value if resolved == content else json.dumps(resolved)


def resolve_objective_args(argv: list[str]) -> list[str]:
    """Command-line arguments with objective short names replaced by import paths, before jsonargparse parses them.

    Covers ``--model.objective NAME`` (also ``.class_path`` and ``.help``, with ``=`` or a separate value, or a
    YAML/JSON value with ``class_path: NAME``), ``objective`` in a ``--model`` block (file or text) and
    ``model.objective`` in files given with ``--config``/``-c``. A file that needs a change is replaced by its
    resolved content (in memory, nothing is written); others are passed on untouched.
    """
    flags = (*_OBJECTIVE_FLAGS, _MODEL_FLAG, *_CONFIG_FLAGS)
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if flag not in flags or (not eq and i + 1 >= len(argv)):
            out.append(arg)
        elif eq:
            out.append(f"{flag}={_rewrite_value(flag, value)}")
        else:
            out += [arg, _rewrite_value(flag, argv[i + 1])]
            i += 1
        i += 1
    return out


def format_objectives(entries: dict[str, ObjectiveEntry]) -> str:
    """An aligned text table: short name, class path, source, and the description or the load error."""
    rows = [("name", "class path", "source", "description")]
    for e in entries.values():
        rows.append((e.name, e.class_path, e.source, f"FAILED TO LOAD: {e.error}" if e.error else e.description))
    widths = [max(len(r[col]) for r in rows) for col in range(3)]
    lines = ["  ".join([*(r[col].ljust(widths[col]) for col in range(3)), r[3]]).rstrip() for r in rows]
    return "\n".join(lines)


def objectives_main(argv: list[str]) -> None:
    """``python -m lit_webssl objectives``: list the registered objectives (built-in and plugins)."""
    if argv and argv[0] in ("-h", "--help"):
        print(
            "usage: python -m lit_webssl objectives\n  list the objectives that --model.objective accepts by short "
            f"name (entry-point group {GROUP!r}): built-in and installed plugins"
        )
        return
    if argv:
        raise ConfigError(f"objectives: unexpected arguments {' '.join(argv)!r}")
    entries = available_objectives()
    print(format_objectives(entries))
    print(f"\nselect one with `class_path: <name>` under model.objective, or {FLAG} <name>; see docs/plugins.md")
