"""Model Explorer overlays: a :class:`~fxnumeric.Report` as node data on the float graph.

`Model Explorer <https://github.com/google-ai-edge/model-explorer>`_ colours the nodes of a
graph by per-node values given as *node data*: a JSON file ::

    {"graph": {"name": "output SQNR (dB)",
               "results": {"conv2d_1": {"value": 34.7}, "batch_norm_1": {"value": 34.7}, ...},
               "gradient": [{"stop": 0, "bgColor": "#d62728"}, ..., {"stop": 1, ...}]}}

keyed by graph id (``"graph"`` for a PyTorch ``ExportedProgram``) and node id (the FX node
names of the exported program). :func:`write_model_explorer` writes one such file per overlay
(:data:`OVERLAYS`), giving every float node of a pair that pair's value, so a BN-folded
``conv2d`` and its ``batch_norm`` show the same colour. Load them with
``model_explorer.visualize_pytorch(name, exported_program, node_data=[...])``; see
``docs/pt2e.md``.

A module called twice has a report row per call site (``layer1.0.relu``, ``layer1.0.relu#2``),
each listing its own nodes, so both call sites are coloured with their own values.

Values Model Explorer cannot show are mapped, not dropped: ``inf`` (an exact match) becomes
the overlay's largest finite value, ``-inf`` its smallest; rows whose value is ``nan`` or
absent (a pair without a shadow), and rows whose float signal collapsed (their SQNR measures
nothing, :attr:`ReportRow.degenerate`), get no entry, so those nodes stay uncoloured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .data import Report, ReportRow

__all__ = ["OVERLAYS", "GRADIENT", "node_data", "write_model_explorer"]

OVERLAYS: dict[str, str] = {
    "output_sqnr": "output SQNR (dB)",
    "shadow_sqnr": "shadow SQNR (dB)",
}
"""Overlay file stem -> display name; the stem is also the :class:`ReportRow` attribute read."""

GRADIENT: tuple[dict[str, float | str], ...] = (
    {"stop": 0.0, "bgColor": "#d62728"},  # lowest SQNR: red
    {"stop": 0.5, "bgColor": "#ffdd57"},
    {"stop": 1.0, "bgColor": "#2ca02c"},  # highest: green
)
"""Model Explorer gradient: stop 0 is the overlay's minimum value, stop 1 its maximum."""


def node_data(report: Report, overlay: str, *, graph_id: str = "graph") -> dict:
    """One overlay of ``report`` as Model Explorer node data (a JSON-ready dict).

    Args:
        report: a :func:`fxnumeric.compare` result.
        overlay: a key of :data:`OVERLAYS` (``"output_sqnr"`` or ``"shadow_sqnr"``).
        graph_id: Model Explorer's graph id; ``"graph"`` for a PyTorch ExportedProgram.
    """
    if overlay not in OVERLAYS:
        from ..errors import InputError

        raise InputError(f"unknown overlay {overlay!r}; choose from {', '.join(OVERLAYS)}")
    values: dict[str, float] = {}
    for row in report.rows:
        value = _value(row, overlay)
        if value is not None:
            for node in row.float_nodes:
                values[node] = value
    finite = [v for v in values.values() if math.isfinite(v)]
    high, low = max(finite, default=0.0), min(finite, default=0.0)
    results = {
        node: {"value": high if v == math.inf else low if v == -math.inf else v}
        for node, v in values.items()
    }
    return {graph_id: {"name": OVERLAYS[overlay], "results": results,
                       "gradient": [dict(g) for g in GRADIENT]}}


def _value(row: ReportRow, overlay: str) -> float | None:
    """The row's value to colour its nodes with; ``None`` where it measures nothing (``nan``,
    absent, or a row whose float signal collapsed: its 0 dB would read as the worst layer)."""
    value = getattr(row, overlay)
    return None if value is None or math.isnan(value) or row.degenerate else float(value)


def write_model_explorer(report: Report, directory: str | Path, *,
                         graph_id: str = "graph") -> dict[str, Path]:
    """Write ``<directory>/<overlay>.json`` for each of :data:`OVERLAYS`; for a report of
    several variants, ``<directory>/<variant>/<overlay>.json`` for each variant, named
    ``output SQNR (dB), fx`` and so on.

    Returns:
        ``{display name: path}``, ready for ``visualize_pytorch(..., node_data=[{"name": n,
        "node_data_path": str(p)} for n, p in paths.items()])``.
    """
    if report.variants:
        return {f"{label}, {name}": path for name, variant in report.variants.items()
                for label, path in write_model_explorer(variant, Path(directory) / name,
                                                        graph_id=graph_id).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for overlay, label in OVERLAYS.items():
        path = directory / f"{overlay}.json"
        path.write_text(json.dumps(node_data(report, overlay, graph_id=graph_id), indent=1) + "\n")
        written[label] = path
    return written
