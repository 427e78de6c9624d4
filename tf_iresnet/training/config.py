"""The resolved configuration of a run, written as `config.json` next to its checkpoints.

Binaries resolve flags into a typed config (a dataclass) and write it with `write_config` on
the chief, so a `model_dir` says how its checkpoints were made; export and evaluation tools read
it back with `read_config`, optionally into the dataclass again.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import pathlib
import socket
import types
import typing
import uuid
from collections.abc import Mapping
from typing import Any, TypeVar

import tensorflow as tf

CONFIG_FILENAME = "config.json"

T = TypeVar("T")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Converts a dataclass (possibly nested) or mapping to a JSON-compatible dict.

    Tuples become lists, enums their values, paths strings.

    Raises:
      TypeError: for values JSON cannot represent (the message names the field).
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if not isinstance(config, Mapping):
        raise TypeError(f"Expected a dataclass instance or a mapping, got {type(config)}.")
    return {str(k): _to_json(v, str(k)) for k, v in config.items()}


def _to_json(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    is_instance = dataclasses.is_dataclass(value) and not isinstance(value, type)
    if is_instance or isinstance(value, Mapping):
        return {k: _to_json(v, f"{where}.{k}") for k, v in config_to_dict(value).items()}
    if isinstance(value, list | tuple):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, enum.Enum):
        return _to_json(value.value, where)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalars
        return value.item()
    raise TypeError(f"Config field {where!r} has a value JSON cannot store: {value!r}.")


def write_config(model_dir: str, config: Any) -> str:
    """Writes `config` (dataclass or mapping) to `model_dir/config.json`; returns the path.

    The file is replaced atomically, so a reader never sees half of it. Call on the chief only.
    """
    tf.io.gfile.makedirs(model_dir)
    path = os.path.join(model_dir, CONFIG_FILENAME)
    text = json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n"
    atomic_write(path, text)
    return path


def atomic_write(path: str, data: str | bytes) -> None:
    """Writes `path` through `tf.io.gfile` so that a reader (or a killed writer) never leaves
    half a file: into a temporary file beside it, unique to this host and process, then
    renamed over `path`."""
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with tf.io.gfile.GFile(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    finally:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)


def read_config(model_dir: str, cls: type[T] | None = None) -> dict[str, Any] | T:
    """Reads `model_dir/config.json`.

    Args:
      model_dir: the run directory.
      cls: optional dataclass type to rebuild (nested dataclass fields and tuples included);
        fields missing from the file take their defaults.

    Returns:
      The dict, or an instance of `cls`.

    Raises:
      FileNotFoundError: no config.json in `model_dir`.
      ValueError: the file is not valid JSON, or holds keys that `cls` has no field for.
    """
    path = os.path.join(model_dir, CONFIG_FILENAME)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"No {CONFIG_FILENAME} in {model_dir}.")
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if cls is None:
        return data
    return _from_dict(cls, data, path)


def _from_dict(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"cls must be a dataclass type, got {cls!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(
            f"{where}: keys {unknown} are not fields of {cls.__name__}; the file was written by "
            "another version or for another configuration type."
        )
    kwargs = {k: _coerce(hints.get(k, Any), v, f"{where}:{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        candidates = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or len(candidates) != 1:
            return value
        hint, origin = candidates[0], typing.get_origin(candidates[0])
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return _from_dict(hint, value, where)
    if (origin is tuple or hint is tuple) and isinstance(value, list):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if args and len(args) == len(value):
            return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
        return tuple(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    return value
