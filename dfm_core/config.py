"""Settings as dataclasses, read from TOML or JSON with clear errors for unknown keys and wrong types.

Every app keeps its settings (model, path, training) in dataclasses; :func:`load_config` reads one from a
file (or one ``[section]`` of it) and :func:`config_from_dict` builds one from a mapping, so a config
file's ``steps = "two"`` fails with a message naming the key rather than deep inside a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["config_from_dict", "find_config", "load_config"]

C = TypeVar("C")


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Build the dataclass ``cls`` from ``data``, rejecting unknown keys and values of the wrong type with
    a clear error (a config file's ``steps = "two"`` must not surface as a TypeError deep in training).

    Lists become tuples for tuple-typed fields (TOML and JSON have no tuples); whole floats become ints for
    int fields and ints become floats for float fields.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__} settings must be a table of key = value, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} key(s): {', '.join(unknown)}; valid keys are: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {key: _typed_value(f"{cls.__name__}.{key}", hints[key], value) for key, value in data.items()}
    return cls(**kwargs)


def _typed_value(name: str, hint: Any, value: Any) -> Any:
    """``value`` checked (and mildly converted) against the simple type ``hint``; other hints pass through."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{name} needs a value, got none")
    problems = []
    for option in (o for o in options if o is not type(None)):
        origin = typing.get_origin(option)
        if option is bool:
            if isinstance(value, bool):
                return value
            problems.append("true or false")
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append("a whole number")
        elif option is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            problems.append("a number")
        elif option is str:
            if isinstance(value, str):
                return value
            problems.append("text")
        elif origin is typing.Literal:
            if value in typing.get_args(option):
                return value
            problems.append("one of " + ", ".join(repr(a) for a in typing.get_args(option)))
        elif origin is tuple or option is tuple:
            if isinstance(value, list | tuple):
                return tuple(value)
            problems.append("a list")
        elif dataclasses.is_dataclass(option):
            if isinstance(value, Mapping | option):
                return value
            problems.append(f"a [{name.split('.')[-1]}] table")
        else:
            return value  # dicts, Any, ...: the dataclass checks them itself
    raise ValueError(f"{name} must be {' or '.join(problems)}, got {value!r}")


def find_config(path: str | os.PathLike, shipped: Path | None = None) -> Path:
    """The config file ``path`` names: the file itself, else (for a relative path) the file of that name
    in ``shipped``, an app's own ``configs/`` folder that installs with it; a bare name such as
    ``small_cpu`` gets ``.toml``. So ``--config app/configs/x.toml``, written for a source tree, also
    works from any folder with an installed package.

    Raises:
        FileNotFoundError: neither, naming the configs that ship.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if shipped is not None and not path.is_absolute():
        for name in (path.name, f"{path.name}.toml"):
            if (shipped / name).is_file():
                return shipped / name
        names = sorted(p.stem for p in shipped.glob("*.toml")) if shipped.is_dir() else []
        if names:
            raise FileNotFoundError(
                f"config file not found: {path} (the shipped configs are: {', '.join(names)})"
            )
    raise FileNotFoundError(f"config file not found: {path}")


def load_config(
    path: str | os.PathLike, cls: type[C], section: str | None = None, shipped: Path | None = None
) -> C:
    """Load a dataclass config from a ``.toml`` or ``.json`` file.

    Args:
        path: the file (see :func:`find_config`).
        cls: the dataclass (e.g. :class:`TrainConfig`).
        section: read only this top-level table (e.g. ``"train"`` in a file with ``[train]`` and
            ``[model]`` tables); None for the whole file.
        shipped: the app's own configs folder, where a relative ``path`` not found is looked up by name.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown suffix, unknown keys, or a missing section.
    """
    path = find_config(path, shipped)
    if path.suffix == ".toml":
        import tomllib

        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    else:
        raise ValueError(f"config must be a .toml or .json file, got {path}")
    if section is not None:
        if section not in data:
            raise ValueError(f"{path} has no [{section}] section (it has: {', '.join(data) or 'none'})")
        data = data[section]
    try:
        return config_from_dict(cls, data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
