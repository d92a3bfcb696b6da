"""Reports as JSON, exactly: a generic encoding of frozen dataclasses, driven by type hints.

:meth:`fxnumeric.Report.to_json` and :meth:`fxnumeric.Report.from_json` call :func:`to_data`,
:func:`dumps` and :func:`load`. Nothing here knows the report's fields: the encoding walks
``dataclasses.fields`` and each field's type hint, so a field added to a report dataclass
later (``ReportRow.floor_sqnr``, ``Report.variants: dict[str, Report]``) is saved and loaded
with no code here. The rules, by type hint:

==========================  ==================================================================
``float``                   a JSON number (``repr`` digits, so bit-exact; ``-0.0`` kept), or
                            the string ``"inf"``, ``"-inf"``, ``"nan"`` (``"-nan"`` when the
                            sign bit is set): the JSON stays strict
``int``, ``str``, ``bool``  themselves
``X | None``                ``null`` or ``X``
``tuple[X, ...]``           a list (a fixed ``tuple[A, B, C]`` too)
``dict[str, X]``            an object
a dataclass                 an object, one key per field, plus the class's derived keys
==========================  ==================================================================

Field ``metadata`` adjusts a field: ``{"json": False}`` leaves it out (a default is used when
loading: ``ReportRow.activations`` holds raw tensors), ``{"json": "layers"}`` renames its key,
``{"json_items": ("node", "side", "reason")}`` writes each fixed-length tuple of a
sequence as an object with those keys, ``{"json_choices": (...)}`` refuses to load any
other value (``Report.logits_per``), ``{"json_min": 0}`` any number below it
(``Report.batches``), ``{"json_omit_default": True}`` leaves the key out while
the field holds its default (``Report.variants``: a report of one quantized model is saved as
it was before variants existed). A class's ``_JSON_DERIVED`` (``{key: function}``) adds
read-only keys for people and scripts (``summary``, ``degenerate``); loading ignores them, and
a function returning :data:`OMIT` leaves its key out.

Loading is strict: a missing key without a default, a key no field or derived value claims, a
value of the wrong type or a newer :data:`SCHEMA` is an :class:`~fxnumeric.errors.InputError`
naming the key's path (``layers[3].output.sqnr``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["SCHEMA", "OMIT", "to_data", "from_data", "dumps", "load"]

SCHEMA = 2
"""The report JSON schema this fxnumeric writes and the newest it reads. Bumped when a key is
renamed or removed or changes meaning; a field added with a default keeps it (older files
load, the field takes its default). An older file is brought to this layout by the
``upgrades`` :func:`load` is given, one schema at a time.

2: a row's ``degenerate`` is judged against ``reference_rms`` (the activations upstream of
it), not an absolute RMS of 1e-6 (:func:`fxnumeric.report.data._upgrade_schema_1`)."""

OMIT: Any = object()
"""Returned by a ``_JSON_DERIVED`` function: leave the key out (a derived value that only some
reports have, such as ``best_variant``)."""

_FIX = ("Fix: pass a file written by Report.to_json() or `fxnumeric report --json FILE`, "
        "unedited")
_SPECIAL = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan, "-nan": -math.nan}


class _Unsupported(TypeError):
    """A type hint this encoding does not cover (a programming error in a report class)."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _options(hint: Any) -> tuple[Any, ...] | None:
    """The members of a union hint (``float | None``), or None for any other hint."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return None


def _encode_float(x: float) -> float | str:
    x = float(x)
    if math.isnan(x):
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _is(value: Any, hint: Any) -> bool:
    """Whether ``value`` can be encoded as ``hint`` (to pick a union member)."""
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    origin = typing.get_origin(hint) or hint
    return isinstance(value, origin) if isinstance(origin, type) else False


def to_data(value: Any, hint: Any = None, *, items: tuple[str, ...] | None = None) -> Any:
    """``value`` as JSON-safe plain data, following its type ``hint`` (its class by default).

    Example:
        >>> to_data((1.5, float("inf")), tuple[float, ...])
        [1.5, 'inf']
    """
    if hint is None:
        hint = type(value)
    options = _options(hint)
    if options is not None:
        for option in options:
            if _is(value, option):
                return to_data(value, option, items=items)
        raise _Unsupported(f"{value!r} is none of {hint}")
    if dataclasses.is_dataclass(hint):
        return _encode_dataclass(value)
    if hint is float:
        return _encode_float(value)
    if hint in (int, str, bool):
        return hint(value)
    if hint is type(None):
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return [to_data(v, args[0], items=items) for v in value]
        if items is not None:
            return {name: to_data(v, a) for name, v, a in zip(items, value, args, strict=True)}
        return [to_data(v, a) for v, a in zip(value, args, strict=True)]
    if origin is list and args:
        return [to_data(v, args[0]) for v in value]
    if origin is dict and args and args[0] is str:
        return {str(k): to_data(v, args[1]) for k, v in value.items()}
    raise _Unsupported(f"cannot save a value of type {hint} ({value!r:.60}): annotate the field "
                       "with a type this encoding covers, or exclude it with metadata "
                       "{'json': False}")


def _json_fields(cls: type) -> list[tuple[dataclasses.Field, str]]:
    """The fields saved, each with its JSON key."""
    out = []
    for f in dataclasses.fields(cls):
        key = f.metadata.get("json", f.name)
        if key is not False:
            out.append((f, key))
    return out


def _is_default(f: dataclasses.Field, value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return bool(value == f.default)
    if f.default_factory is not dataclasses.MISSING:
        return bool(value == f.default_factory())
    return False


def _encode_dataclass(obj: Any) -> dict[str, Any]:
    cls = type(obj)
    hints = _hints(cls)
    data = {key: value for key, fn in getattr(cls, "_JSON_DERIVED", {}).items()
            if (value := fn(obj)) is not OMIT}
    for f, key in _json_fields(cls):
        if f.metadata.get("json_omit_default") and _is_default(f, getattr(obj, f.name)):
            continue
        try:
            data[key] = to_data(getattr(obj, f.name), hints[f.name],
                                items=f.metadata.get("json_items"))
        except _Unsupported as exc:
            raise _Unsupported(f"{cls.__name__}.{f.name}: {exc}") from None
    return data


# ---------------------------------------------------------------- loading


def _fail(where: str, message: str) -> InputError:
    return InputError(f"{where}: {message}" if where else message)


def _kind(data: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             type(None): "null", int: "a number", float: "a number"}
    return f"{names.get(type(data), type(data).__name__)} ({json.dumps(data)[:40]})"


def from_data(hint: Any, data: Any, where: str = "") -> Any:
    """Rebuild a value of type ``hint`` from :func:`to_data`'s plain data.

    Raises:
        InputError: naming the path of the first key whose value does not fit (``where``
            is the path so far).

    Example:
        >>> from_data(tuple[float, ...], [1.5, "inf"])
        (1.5, inf)
    """
    options = _options(hint)
    if options is not None:
        if data is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return from_data(option, data, where)
            except InputError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise _fail(where, f"expected {hint}, got {_kind(data)}")
    if dataclasses.is_dataclass(hint):
        return _decode_dataclass(hint, data, where)
    if hint is float:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            try:
                return float(data)
            except OverflowError:  # an integer of 309 digits or more
                raise _fail(where, "an integer too large for a float (above 1.8e308; "
                            "infinity is \"inf\")") from None
        if isinstance(data, str) and data in _SPECIAL:
            return _SPECIAL[data]
        raise _fail(where, f"expected a number (or \"inf\", \"-inf\", \"nan\"), got {_kind(data)}")
    if hint in (int, str, bool):
        if type(data) is not hint:
            raise _fail(where, f"expected {hint.__name__}, got {_kind(data)}")
        return data
    if hint is type(None):
        if data is not None:
            raise _fail(where, f"expected null, got {_kind(data)}")
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list) and args:
        if not isinstance(data, list):
            raise _fail(where, f"expected a list, got {_kind(data)}")
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            out = [from_data(args[0], v, f"{where}[{i}]") for i, v in enumerate(data)]
            return out if origin is list else tuple(out)
        if len(data) != len(args):
            raise _fail(where, f"expected {len(args)} items, got {len(data)}")
        return tuple(from_data(a, v, f"{where}[{i}]")
                     for i, (a, v) in enumerate(zip(args, data, strict=True)))
    if origin is dict and args and args[0] is str:
        if not isinstance(data, dict):
            raise _fail(where, f"expected an object, got {_kind(data)}")
        return {k: from_data(args[1], v, f"{where}.{k}") for k, v in data.items()}
    raise _Unsupported(f"{where}: cannot load a value of type {hint}")


def _decode_dataclass(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise _fail(where, f"expected an object ({cls.__name__}), got {_kind(data)}")
    hints = _hints(cls)
    fields = _json_fields(cls)
    known = {key for _, key in fields} | set(getattr(cls, "_JSON_DERIVED", {}))
    unknown = [k for k in data if k not in known and not (k == "schema" and not where)]
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r} for a {cls.__name__} (this fxnumeric "
                    f"knows {', '.join(sorted(known))}): the file is from a newer fxnumeric, "
                    f"or was edited. Fix: upgrade fxnumeric, or regenerate the file")
    kwargs = {}
    for f, key in fields:
        path = f"{where}.{key}" if where else key
        if key not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _fail(path, f"missing (a {cls.__name__} needs it). {_FIX}")
            continue
        value = data[key]
        items = f.metadata.get("json_items")
        if items is not None:
            kwargs[f.name] = _decode_items(hints[f.name], value, items, path)
        else:
            kwargs[f.name] = from_data(hints[f.name], value, path)
        choices = f.metadata.get("json_choices")
        if choices is not None and kwargs[f.name] not in choices:
            raise _fail(path, f"expected one of {', '.join(map(repr, choices))}, got "
                        f"{_kind(value)}")
        least = f.metadata.get("json_min")
        if least is not None and kwargs[f.name] < least:
            raise _fail(path, f"expected a count of at least {least}, got {value!r}")
    return cls(**kwargs)


def _decode_items(hint: Any, value: Any, items: tuple[str, ...], where: str) -> Any:
    """``[{"node": n, "side": s, ...}]`` back to ``((n, s, ...), ...)`` (``hint`` is
    ``tuple[tuple[A, B, ...], ...]``), a value's path named by its key
    (``unmatched[0].reason``)."""
    if not isinstance(value, list):
        return from_data(hint, value, where)  # says what is wrong
    members = typing.get_args(typing.get_args(hint)[0])
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != set(items):
            raise _fail(f"{where}[{i}]", f"expected an object with keys {', '.join(items)}, "
                        f"got {_kind(item)}")
        out.append(tuple(from_data(member, item[name], f"{where}[{i}].{name}")
                         for name, member in zip(items, members, strict=True)))
    return tuple(out)


# ---------------------------------------------------------------- text


def dumps(data: Any, indent: int | None = 2) -> str:
    """Strict JSON text of plain data; lists of numbers or strings stay on one line.

    Example:
        >>> print(dumps({"counts": [1, 2, 3], "rows": [{"a": 1}]}))
        {
          "counts": [1, 2, 3],
          "rows": [
            {
              "a": 1
            }
          ]
        }
    """
    if indent is None:
        return json.dumps(data, allow_nan=False)

    def text(value: Any, level: int) -> str:
        pad, inner = " " * (indent * level), " " * (indent * (level + 1))
        if isinstance(value, dict) and value:
            body = ",\n".join(f"{inner}{json.dumps(k)}: {text(v, level + 1)}"
                              for k, v in value.items())
            return "{\n" + body + "\n" + pad + "}"
        if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            return "[\n" + ",\n".join(inner + text(v, level + 1) for v in value) + "\n" + pad + "]"
        return json.dumps(value, allow_nan=False)

    return text(data, 0)


def _read(source: str | Path) -> tuple[str, str]:
    """(text, name for messages) of JSON text or a path to a file holding it."""
    if isinstance(source, str) and source.lstrip().startswith("{"):
        return source, "report"
    if isinstance(source, str) and not source.strip():  # Path("") is "." (a directory)
        raise InputError(f"no report given: an empty string is neither JSON nor a path. {_FIX}")
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except FileNotFoundError:
        raise InputError(f"no report file {str(path)!r}. {_FIX}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a report: not UTF-8 text. {_FIX}") from None
    except OSError as exc:
        raise InputError(f"cannot read report {str(path)!r}: {exc.strerror or exc}") from None


def load(cls: type, source: str | Path | dict[str, Any],
         upgrades: Mapping[int, Callable[[dict[str, Any]], dict[str, Any]]] | None = None) -> Any:
    """A ``cls`` (a report dataclass) from JSON text, a JSON file or :func:`to_data`'s dict.

    ``upgrades[n]`` turns data of schema ``n`` into schema ``n + 1``'s layout (a new dict);
    an older file goes through each in turn, a schema with none is taken as it is.

    Raises:
        InputError: the file is missing, not JSON, not a report, from a newer fxnumeric
            (``schema`` above :data:`SCHEMA`), or a value does not fit its field.
    """
    name = "report"
    if isinstance(source, dict):
        data = source
    else:
        text, name = _read(source)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name} is not JSON ({exc.msg} at line {exc.lineno}, column "
                             f"{exc.colno}). {_FIX}") from None
        except ValueError as exc:  # an integer past Python's int-string limit (4300 digits)
            raise InputError(f"{name}: a number in it cannot be read ({exc}). {_FIX}") from None
    if not isinstance(data, dict):
        raise InputError(f"{name} is not an fxnumeric report: it holds {_kind(data)}, not an "
                         f"object. {_FIX}")
    schema = data.get("schema")
    if schema is None:
        raise InputError(f"{name} is not an fxnumeric report: it has no \"schema\" key (reports "
                         "written before fxnumeric could load them have none). Fix: rerun "
                         "`fxnumeric report --json FILE` or Report.to_json()")
    if type(schema) is not int or schema < 1:
        raise InputError(f"{name}: \"schema\" must be a positive integer, got {_kind(schema)}. "
                         f"{_FIX}")
    if schema > SCHEMA:
        raise InputError(f"{name} was written by a newer fxnumeric (report schema {schema}; this "
                         f"one reads schema {SCHEMA} and older). Fix: upgrade fxnumeric "
                         "(pip install -U fxnumeric)")
    for older in range(schema, SCHEMA):
        upgrade = (upgrades or {}).get(older)
        if upgrade is not None:
            data = upgrade(data)
    try:
        return from_data(cls, data)
    except InputError as exc:
        message = str(exc) if "Fix:" in str(exc) else f"{exc}. {_FIX}"
        raise InputError(f"{name}: {message}") from None
