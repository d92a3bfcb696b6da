"""Stage 6, report: what :func:`fxnumeric.compare` found, as data and for people.

* :mod:`.data`: the frozen :class:`Report` and :class:`ReportRow` (they hold data only);
* :mod:`.verdict`: the rule that names a culprit only when one layer stands out;
* :mod:`.variants`: several quantized variants in one report: the best one, where each
  loses, their layers aligned;
* :mod:`.render`: every table, CSV, HTML page and SVG chart fxnumeric draws, for reports,
  matchings and sensitivities, in one place;
* :mod:`.overlays`: Model Explorer node data (per-node SQNR overlays on an exported graph);
* :mod:`.persist`: the exact JSON encoding behind ``Report.to_json`` / ``Report.from_json``;
* :mod:`.diff`: :class:`ReportDiff`, what changed between two reports (``Report.diff``);
* :mod:`.check`: the gate, :class:`Thresholds` and :func:`check_report` (``fxnumeric check``).
"""

from .check import CheckFailure, CheckResult, Thresholds, check_report
from .data import (
    BELOW_FLOOR_DB,
    DEGENERATE_RMS_RATIO,
    TABLE_FORMATS,
    BlockRow,
    Report,
    ReportRow,
    Spread,
    Verdict,
    WeightHistogram,
    activation_scale,
)
from .diff import MetricChange, ReportDiff

__all__ = ["Report", "ReportRow", "BlockRow", "WeightHistogram", "TABLE_FORMATS",
           "DEGENERATE_RMS_RATIO", "activation_scale", "BELOW_FLOOR_DB", "Spread", "Verdict",
           "ReportDiff", "MetricChange", "Thresholds", "CheckResult", "CheckFailure",
           "check_report"]
