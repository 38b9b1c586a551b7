"""Reading configuration values: type coercion by annotation, and YAML/JSON config files."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


def field_types(config_class: type) -> dict[str, str]:
    """Field name → annotation string (``"int"``, ``"float | None"``, ...) of a configuration
    dataclass, the annotations :func:`coerce` converts to."""
    return {f.name: str(f.type) for f in dataclasses.fields(config_class)}


def coerce(name: str, annotation: str, value: Any) -> Any:
    """``value`` converted to the type named by ``annotation`` (``"int"``, ``"float | None"``,
    ``"dict[str, Any]"``, ...), as the fields of a configuration dataclass declare it.

    Raises:
        ValueError: naming the key and the value when the conversion fails.
    """
    if value is None and "None" in annotation:
        return None
    kind = annotation.split("|")[0].split("[")[0].strip()
    try:
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, bool):
                return value
            raise TypeError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind == "dict":
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be of type {annotation}. "
                         f"Received: {name}={value!r}") from None


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping stored in a ``.yaml``/``.yml`` or ``.json`` file.

    Raises:
        ValueError: on another extension, a parse error or a file that is not a mapping.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".yaml", ".yml", ".json"):
        raise ValueError(f"`config` must be a .yaml, .yml or .json file. Received: config={path!r}")
    try:
        with open(path, encoding="utf-8") as handle:
            if ext == ".json":
                values = json.load(handle)
            else:
                import yaml

                values = yaml.safe_load(handle)
    except OSError as err:
        raise ValueError(f"Cannot read config file {path!r}: {err.strerror}") from None
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        raise ValueError(f"Cannot parse config file {path!r}: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path!r} must hold a mapping of keys to values. "
                         f"Received: {type(values).__name__}")
    return values
