r"""The gate: does a report meet its thresholds? For CI, from the shell or from pytest.

``fxnumeric check REPORT.json`` and :func:`fxnumeric.testing.check_report` both call
:func:`check_report`. Thresholds come from a TOML file, from keywords (``--min-shadow-sqnr``
flags), or both (keywords win)::

    [model_output]            # the model's final output: min_<key> / max_<key> of any key
    min_sqnr = 25.0           # of Report.model_output: sqnr, cosine, kl, top1_agreement ...
    max_kl = 0.05

    [layers]                  # every layer
    min_shadow_sqnr = 20.0    # the error a layer adds by itself
    min_output_sqnr = 10.0    # the error accumulated up to the layer
    min_weight_sqnr = 30.0
    min_output_cosine = 0.99
    max_below_floor = 3.0     # dB a layer's shadow SQNR may sit below its floor_sqnr

    [layers."layer4.*"]       # the layers whose name matches this glob
    min_shadow_sqnr = 25.0

    [layers.'re:features\.1[0-9]']     # "re:" and a regular expression (re.fullmatch);
    min_shadow_sqnr = 22.0            # 'single quotes' keep TOML from reading the backslash

Each threshold is checked on every layer its section covers; a layer where the metric was not
measured (no weights, not shadowable, ``floor_sqnr`` unknown) is passed over, but a threshold
that no layer can answer fails ("not measured"), and so does a pattern that matches no layer:
a gate that silently checks nothing is worse than none. A ``nan`` value fails every threshold.
Layers whose float signal collapsed (:attr:`fxnumeric.ReportRow.degenerate`) are not judged:
the result lists them in ``skipped``.

A report of several quantized variants (:attr:`fxnumeric.Report.variants`) is checked variant
by variant, every threshold on every variant: each failure names its variant
(``FAIL dynamic: [layers] min_shadow_sqnr = 20: fc1 ...``). A layer threshold that a variant
cannot answer (its pattern matches none of its layers, or none has the metric: a layer one
recipe leaves in float) fails only when no variant answers it.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..numbers import shown, unit
from .data import Report, ReportRow

__all__ = ["Thresholds", "CheckFailure", "CheckResult", "check_report", "LAYER_THRESHOLDS",
           "ALL_LAYERS"]

ALL_LAYERS = "*"
"""The pattern of the ``[layers]`` section itself: every layer."""


def _below_floor(row: ReportRow) -> float | None:
    if row.floor_sqnr is None or row.shadow_sqnr is None:
        return None
    if math.isinf(row.shadow_sqnr) and row.shadow_sqnr > 0:
        return -math.inf  # no error at all: nothing below any floor (inf - inf read nan)
    return row.floor_sqnr - row.shadow_sqnr


LAYER_THRESHOLDS: dict[str, tuple[str, Callable[[ReportRow], float | None], str]] = {
    # key: (what it reads, how to read it off a row, unit)
    "min_shadow_sqnr": ("shadow SQNR", lambda r: r.shadow_sqnr, " dB"),
    "min_output_sqnr": ("output SQNR", lambda r: r.output_sqnr, " dB"),
    "min_weight_sqnr": ("weight SQNR", lambda r: r.weight_sqnr, " dB"),
    "min_output_cosine": ("output cosine", lambda r: r.cosine, ""),
    "max_below_floor": ("shadow SQNR below its floor_sqnr by", _below_floor, " dB"),
}
"""Every key a ``[layers]`` section takes."""

_KEYWORDS = {  # check_report / CLI keyword: (section, key)
    "min_output_sqnr": ("model_output", "min_sqnr"),
    "min_output_cosine": ("model_output", "min_cosine"),
    "max_kl": ("model_output", "max_kl"),
    "min_top1_agreement": ("model_output", "min_top1_agreement"),
    "min_shadow_sqnr": ("layers", "min_shadow_sqnr"),
    "min_layer_output_sqnr": ("layers", "min_output_sqnr"),
    "min_weight_sqnr": ("layers", "min_weight_sqnr"),
    "max_below_floor": ("layers", "max_below_floor"),
}
_FIX = "Fix: see the threshold file format in docs/ci.md"


def _limit(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InputError(f"{where} must be a number, got {value!r}. {_FIX}")
    return float(value)


def _pattern(text: str) -> Callable[[str], bool]:
    """``re:REGEX`` (full match) or a glob (``fnmatch``, case-sensitive) on a layer name."""
    if text.startswith("re:"):
        try:
            regex = re.compile(text[3:])
        except re.error as exc:
            raise InputError(f"[layers.{text!r}]: not a regular expression ({exc}). "
                             f"{_FIX}") from None
        return lambda name: regex.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, text)


@dataclass(frozen=True)
class Thresholds:
    """Limits a report must meet: for the model output, and per layer pattern.

    ``model_output`` maps ``min_<key>`` / ``max_<key>`` to a limit on ``Report.model_output[key]``;
    ``layers`` maps a pattern (a glob, ``re:`` and a regex, or :data:`ALL_LAYERS`) to
    ``{key: limit}`` with keys from :data:`LAYER_THRESHOLDS`.

    Example:
        >>> t = Thresholds.from_dict({"model_output": {"min_sqnr": 25},
        ...                           "layers": {"min_shadow_sqnr": 20,
        ...                                      "layer4.*": {"min_shadow_sqnr": 25}}})
        >>> t.model_output
        {'min_sqnr': 25.0}
        >>> t.layers
        {'*': {'min_shadow_sqnr': 20.0}, 'layer4.*': {'min_shadow_sqnr': 25.0}}
    """

    model_output: dict[str, float] = field(default_factory=dict)
    layers: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in self.model_output:
            if not re.fullmatch(r"(min|max)_\w+", key):
                raise InputError(f"[model_output] {key!r}: keys are min_<metric> or "
                                 f"max_<metric> (min_sqnr, min_cosine, max_kl, "
                                 f"min_top1_agreement). {_FIX}")
        for pattern, limits in self.layers.items():
            _pattern(pattern)
            for key in limits:
                if key not in LAYER_THRESHOLDS:
                    section = "[layers]" if pattern == ALL_LAYERS else f"[layers.{pattern!r}]"
                    raise InputError(f"{section} {key!r}: not a layer threshold; they are "
                                     f"{', '.join(LAYER_THRESHOLDS)}. {_FIX}")

    def __len__(self) -> int:
        return len(self.model_output) + sum(len(v) for v in self.layers.values())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "thresholds") -> Thresholds:
        """Thresholds from the TOML file's structure (``[model_output]``, ``[layers]``,
        ``[layers."PATTERN"]``).

        Raises:
            InputError: an unknown section or key, a value that is not a number.
        """
        unknown = set(data) - {"model_output", "layers"}
        if unknown:
            raise InputError(f"{where}: unknown section [{sorted(unknown)[0]}]; the sections "
                             f"are [model_output] and [layers] (with [layers.\"PATTERN\"]). "
                             f"{_FIX}")
        model, sections = data.get("model_output", {}), data.get("layers", {})
        for name, section in (("model_output", model), ("layers", sections)):
            if not isinstance(section, Mapping):
                raise InputError(f"{where}: {name} must be a table ([{name}]), got "
                                 f"{section!r}. {_FIX}")
        layers: dict[str, dict[str, float]] = {}
        for key, value in sections.items():
            if isinstance(value, Mapping):
                section = layers.setdefault(key, {})
                section.update({k: _limit(v, f"[layers.{key!r}] {k}") for k, v in value.items()})
            else:
                layers.setdefault(ALL_LAYERS, {})[key] = _limit(value, f"[layers] {key}")
        return cls({k: _limit(v, f"[model_output] {k}") for k, v in model.items()}, layers)

    @classmethod
    def from_toml(cls, path: str | Path) -> Thresholds:
        """Read a thresholds file (TOML; ``tomllib``, or ``tomli`` before Python 3.11).

        Raises:
            InputError: the file is missing or not TOML, or :meth:`from_dict` refuses it.
        """
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise InputError(f"reading {path} needs tomllib (Python 3.11 and later) or "
                                 "tomli. Fix: use Python 3.11+, or pip install tomli") from None
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise InputError(f"no thresholds file {str(path)!r}. {_FIX}") from None
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{path} is not TOML: {exc}. {_FIX}") from None
        return cls.from_dict(data, str(path))

    def merged(self, other: Thresholds) -> Thresholds:
        """These thresholds with ``other``'s added (``other`` wins where both set a key)."""
        layers = {p: dict(v) for p, v in self.layers.items()}
        for pattern, limits in other.layers.items():
            layers.setdefault(pattern, {}).update(limits)
        return Thresholds({**self.model_output, **other.model_output}, layers)

    @classmethod
    def from_keywords(cls, **limits: float | None) -> Thresholds:
        """Thresholds from :func:`check_report`'s keywords (the CLI's flags); None is unset."""
        sections: dict[str, dict[str, float]] = {"model_output": {}, "layers": {}}
        for name, value in limits.items():
            if name not in _KEYWORDS:
                raise InputError(f"unknown threshold {name!r}; they are {', '.join(_KEYWORDS)}")
            if value is not None:
                section, key = _KEYWORDS[name]
                sections[section][key] = _limit(value, name)
        return cls(sections["model_output"],
                   {ALL_LAYERS: sections["layers"]} if sections["layers"] else {})


@dataclass(frozen=True)
class CheckFailure:
    """One threshold a report did not meet.

    ``section`` is where the threshold sits in the TOML file (``model_output``, ``layers``,
    ``layers."layer4.*"``), ``layer`` the row it failed on (None: the model output or the
    section as a whole), ``value`` what was measured (None: not measured).
    """

    section: str
    key: str = ""
    limit: float | None = None
    layer: str | None = None
    value: float | None = None
    what: str = ""
    unit: str = ""
    reason: str = ""
    variant: str | None = None
    """The quantized variant it failed in (multi-variant reports), else ``None``."""

    def __str__(self) -> str:
        where = (f"{self.variant}: " if self.variant is not None else "") + f"[{self.section}]"
        if self.key and self.limit is not None:
            where += f" {self.key} = {self.limit:g}"
        if self.reason:
            return f"{where}: {self.reason}"
        subject = "model output" if self.layer is None else self.layer
        op = "<" if self.key.startswith("min_") else ">"
        return (f"{where}: {subject} {self.what} {_value(self.value, self.limit)}{self.unit} "
                f"{op} {self.limit:g}{self.unit}")


def _value(v: float | None, limit: float | None) -> str:
    """``v`` with the digits it takes not to read as ``limit`` (29.9996 against 30 read
    "30 dB < 30 dB")."""
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    return shown(v) if limit is None else shown(v, limit)


@dataclass(frozen=True)
class CheckResult:
    """What :func:`check_report` found: how many checks ran, the failures, what was skipped.

    Example:
        >>> from fxnumeric.report import Report, ReportRow
        >>> row = ReportRow("fc", "linear", True, 40.0, {"sqnr": 30.0}, {"sqnr": 18.5})
        >>> report = Report((row,), ("sqnr",), ("outputs", "shadows"), 1, {"sqnr": 30.0})
        >>> result = check_report(report, min_output_sqnr=25, min_shadow_sqnr=20)
        >>> result.passed, result.checks
        (False, 2)
        >>> print(result)
        FAIL [layers] min_shadow_sqnr = 20: fc shadow SQNR 18.5 dB < 20 dB
        1 of 2 checks failed
    """

    checks: int
    failures: tuple[CheckFailure, ...] = ()
    skipped: tuple[str, ...] = ()
    """Layers not judged because their float signal collapsed."""

    @property
    def passed(self) -> bool:
        """Whether every threshold was met."""
        return not self.failures

    def text(self) -> str:
        """One ``FAIL`` line per failure, then a summary line."""
        lines = [f"FAIL {f}" for f in self.failures]
        if self.failures:
            lines.append(f"{len(self.failures)} of {self.checks} checks failed")
        else:
            lines.append(f"all {self.checks} checks passed")
        if self.skipped:
            lines[-1] += (f" ({len(self.skipped)} layers with a collapsed float signal not "
                          f"judged: {', '.join(self.skipped[:5])}"
                          + (" ...)" if len(self.skipped) > 5 else ")"))
        return "\n".join(lines)

    __str__ = text


def _fails(key: str, value: float, limit: float) -> bool:
    """Whether ``value`` breaks the limit (``nan`` breaks every limit)."""
    return not (value >= limit) if key.startswith("min_") else not (value <= limit)


def check(report: Report, thresholds: Thresholds) -> CheckResult:
    """Check ``report`` against ``thresholds`` (see the module docstring)."""
    if report.variants:
        return _check_variants(report, thresholds)
    failures: list[CheckFailure] = []
    checks = 0
    for key, limit in thresholds.model_output.items():
        metric = key[4:]
        checks += 1
        value = report.model_output.get(metric)
        if value is None:
            held = ", ".join(report.model_output) or "nothing"
            failures.append(CheckFailure("model_output", key, limit, reason=(
                f"model output {metric} not measured in this report (it holds {held})")))
        elif _fails(key, value, limit):
            what = "SQNR" if metric == "sqnr" else metric
            failures.append(CheckFailure("model_output", key, limit, None, value, what,
                                         unit(metric)))
    skipped: dict[str, None] = {}
    for pattern, limits in thresholds.layers.items():
        section = _section(pattern)
        matches = _pattern(pattern)
        rows = [r for r in report.rows if matches(r.name)]
        if not rows:
            checks += 1
            failures.append(CheckFailure(section, reason=(
                f"the pattern {pattern!r} matches no layer of the report")))
            continue
        skipped.update((r.name, None) for r in rows if r.degenerate)
        for key, limit in limits.items():
            what, read, units = LAYER_THRESHOLDS[key]
            measured = [(r, read(r)) for r in rows if not r.degenerate]
            measured = [(r, v) for r, v in measured if v is not None]
            if not measured:
                checks += 1
                failures.append(CheckFailure(section, key, limit, reason=(
                    f"no layer{'' if pattern == ALL_LAYERS else ' it matches'} has {what} "
                    f"measured (comparisons: {', '.join(report.comparisons)})")))
                continue
            for row, value in measured:
                checks += 1
                if _fails(key, value, limit):
                    failures.append(CheckFailure(section, key, limit, row.name, value, what,
                                                 units))
    return CheckResult(checks, tuple(failures), tuple(skipped))


def _section(pattern: str) -> str:
    """The thresholds file's section of a layer pattern."""
    return "layers" if pattern == ALL_LAYERS else f'layers."{pattern}"'


def _unanswered(failure: CheckFailure) -> bool:
    """A layer threshold the report cannot answer: no layer matches, none has the metric."""
    return failure.section != "model_output" and failure.layer is None and bool(failure.reason)


def _check_variants(report: Report, thresholds: Thresholds) -> CheckResult:
    """Every threshold on every variant (see the module docstring)."""
    results = {name: check(variant, thresholds) for name, variant in report.variants.items()}
    failures: list[CheckFailure] = []
    checks = 0
    keys = {_section(pattern): tuple(limits) for pattern, limits in thresholds.layers.items()}
    unanswered: dict[tuple[str, str], list[CheckFailure]] = {}
    for name, result in results.items():
        for failure in result.failures:
            if _unanswered(failure):
                # a pattern that matches no layer answers none of its section's keys, as a
                # layer without the metric answers none of its own
                for key in (failure.key,) if failure.key else keys[failure.section]:
                    unanswered.setdefault((failure.section, key), []).append(failure)
            else:
                failures.append(replace(failure, variant=name))
        checks += result.checks - sum(map(_unanswered, result.failures))
    reported: set[int] = set()
    for missed in unanswered.values():
        if len(missed) == len(results) and id(missed[0]) not in reported:  # no variant answers it
            reported.add(id(missed[0]))
            checks += 1
            failures.append(replace(missed[0], reason=missed[0].reason + " (in any variant)"))
    skipped = tuple(f"{name}: {layer}" for name, result in results.items()
                    for layer in result.skipped)
    return CheckResult(checks, tuple(failures), skipped)


def check_report(report: Report | str | Path, thresholds: Thresholds | str | Path | None = None,
                 *, min_output_sqnr: float | None = None, min_output_cosine: float | None = None,
                 max_kl: float | None = None, min_top1_agreement: float | None = None,
                 min_shadow_sqnr: float | None = None, min_layer_output_sqnr: float | None = None,
                 min_weight_sqnr: float | None = None, max_below_floor: float | None = None,
                 ) -> CheckResult:
    """Check a report (or a saved one) against thresholds from a TOML file and keywords.

    Args:
        report: a :class:`~fxnumeric.Report`, or the path of one saved with ``to_json``.
        thresholds: a :class:`Thresholds`, or the path of a TOML thresholds file.
        min_output_sqnr: the model output's SQNR, dB (``[model_output] min_sqnr``).
        min_output_cosine: the model output's cosine (``[model_output] min_cosine``).
        max_kl: the model output's ``kl`` (``[model_output] max_kl``).
        min_top1_agreement: the model output's ``top1_agreement``.
        min_shadow_sqnr: every layer's shadow (local) SQNR, dB (``[layers]``).
        min_layer_output_sqnr: every layer's output (cumulative) SQNR, dB
            (``[layers] min_output_sqnr``).
        min_weight_sqnr: every layer's weight SQNR, dB.
        max_below_floor: dB any layer's shadow SQNR may sit below its own ``floor_sqnr``.

    Keywords are added to the file's thresholds and win where both set one.

    Raises:
        InputError: no threshold at all, or a report or thresholds file that cannot be read.

    Example:
        >>> check_report("report.json", "quant.toml", min_output_sqnr=25)  # doctest: +SKIP
        CheckResult(checks=40, failures=(), skipped=())
    """
    keywords = Thresholds.from_keywords(
        min_output_sqnr=min_output_sqnr, min_output_cosine=min_output_cosine, max_kl=max_kl,
        min_top1_agreement=min_top1_agreement, min_shadow_sqnr=min_shadow_sqnr,
        min_layer_output_sqnr=min_layer_output_sqnr, min_weight_sqnr=min_weight_sqnr,
        max_below_floor=max_below_floor)
    if thresholds is None:
        limits = keywords
    elif isinstance(thresholds, Thresholds):
        limits = thresholds.merged(keywords)
    else:
        limits = Thresholds.from_toml(thresholds).merged(keywords)
    if not len(limits):
        raise InputError("nothing to check: no threshold given. Fix: pass a thresholds file "
                         "(--thresholds FILE) or a limit such as --min-output-sqnr 25")
    if not isinstance(report, Report):
        report = Report.from_json(report)
    return check(report, limits)
