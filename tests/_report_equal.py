"""Field-by-field comparison of two reports (or any frozen dataclasses), floats to a relative
tolerance: the oracle of the offload and data-parallel tests."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def differences(a: Any, b: Any, rel: float = 1e-6, path: str = "report") -> list[str]:
    """Every place where ``a`` and ``b`` differ: ``path: a != b``. Floats are equal within
    ``rel`` (relative, or absolute below 1), NaN equals NaN, infinities must match exactly."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        if type(a) is not type(b):
            return [f"{path}: {type(a).__name__} != {type(b).__name__}"]
        out = []
        for f in dataclasses.fields(a):
            out += differences(getattr(a, f.name), getattr(b, f.name), rel, f"{path}.{f.name}")
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return [f"{path}: keys {list(a)} != {list(b)}"]
        return [d for k in a for d in differences(a[k], b[k], rel, f"{path}[{k!r}]")]
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, rel, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (float, int)) and not isinstance(b, bool):
        if math.isnan(a) and math.isnan(b):
            return []
        if math.isinf(a) or math.isinf(b):
            return [] if a == b else [f"{path}: {a} != {b}"]
        return [] if math.isclose(a, b, rel_tol=rel, abs_tol=rel) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]
