"""Stage 6, report: what :func:`fxnumeric.compare` found, as data and for people.

* :mod:`.data`: the frozen :class:`Report` and :class:`ReportRow` (they hold data only);
* :mod:`.verdict`: the rule that names a culprit only when one layer stands out;
* :mod:`.render`: every table, CSV, HTML page and SVG chart fxnumeric draws, for reports,
  matchings and sensitivities, in one place;
* :mod:`.overlays`: Model Explorer node data (per-node SQNR overlays on an exported graph).
"""

from .data import (
    BELOW_FLOOR_DB,
    DEGENERATE_RMS,
    TABLE_FORMATS,
    Report,
    ReportRow,
    Spread,
    Verdict,
    WeightHistogram,
)

__all__ = ["Report", "ReportRow", "WeightHistogram", "TABLE_FORMATS", "DEGENERATE_RMS",
           "BELOW_FLOOR_DB", "Spread", "Verdict"]
