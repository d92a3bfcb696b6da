"""Quantization accuracy as a test in your own suite: the ``fxnumeric check`` gate as functions.

:func:`check_report` is the very function behind ``fxnumeric check`` (thresholds from a TOML
file and keywords; see ``docs/ci.md``); :func:`assert_report` raises ``AssertionError`` with
one line per failed threshold, so pytest shows what failed::

    from fxnumeric.testing import assert_report

    def test_quantized_model_is_accurate():
        report = fxnumeric.compare(float_model, quant_model, batches)
        assert_report(report, "quant.toml", min_output_sqnr=25)
"""

from __future__ import annotations

from pathlib import Path

from .report.check import CheckFailure, CheckResult, Thresholds, check_report
from .report.data import Report

__all__ = ["check_report", "assert_report", "CheckResult", "CheckFailure", "Thresholds"]


def assert_report(report: Report | str | Path, thresholds: Thresholds | str | Path | None = None,
                  **limits: float | None) -> CheckResult:
    """Check a report like :func:`check_report`; raise ``AssertionError`` if a threshold fails.

    Args:
        report: a :class:`~fxnumeric.Report`, or the path of a saved one.
        thresholds: a :class:`Thresholds`, or the path of a TOML thresholds file.
        **limits: :func:`check_report`'s keywords (``min_output_sqnr=25``, ...).

    Returns:
        The :class:`CheckResult`, when every threshold is met.

    Raises:
        AssertionError: one ``FAIL`` line per failed threshold, then ``n of m checks failed``.
        InputError: no threshold, or a file that cannot be read (a mistake in the test, not a
            failed check).

    Example:
        >>> from fxnumeric.report import Report, ReportRow
        >>> row = ReportRow("fc", "linear", True, 40.0, {"sqnr": 30.0}, {"sqnr": 18.5})
        >>> report = Report((row,), ("sqnr",), ("outputs", "shadows"), 1, {"sqnr": 30.0})
        >>> assert_report(report, min_shadow_sqnr=18).passed
        True
        >>> assert_report(report, min_shadow_sqnr=20)
        Traceback (most recent call last):
        AssertionError: FAIL [layers] min_shadow_sqnr = 20: fc shadow SQNR 18.5 dB < 20 dB
        1 of 1 checks failed
    """
    result = check_report(report, thresholds, **limits)
    if not result.passed:
        raise AssertionError(result.text())
    return result
