"""Model Explorer overlays written from a Report, validated with Model Explorer's own classes."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torchao")

import _pt2e_models as M  # noqa: E402

import fxnumeric as fxn  # noqa: E402
from fxnumeric.report.overlays import OVERLAYS, node_data  # noqa: E402


@pytest.fixture(scope="module")
def resnet_report():
    ep, _, quant = M.pt2e_pair("resnet18")
    return ep, fxn.compare(ep, quant, M.batches("resnet18", 1))


def test_overlays_cover_the_exported_graph_nodes(resnet_report, tmp_path):
    ep, report = resnet_report
    paths = report.to_model_explorer(tmp_path)
    assert sorted(paths) == sorted(OVERLAYS.values())
    exported = {n.name for n in ep.graph.nodes}
    output = json.loads(paths["output SQNR (dB)"].read_text())["graph"]
    assert output["name"] == "output SQNR (dB)" and output["gradient"][0]["stop"] == 0
    assert set(output["results"]) <= exported  # node ids are the exported program's names
    conv = report.row("layer1.0.conv1")
    # the BN-folded pair colours both of its float nodes with the pair's value
    assert output["results"]["conv2d_1"] == output["results"]["batch_norm_1"] == {
        "value": conv.output_sqnr}
    shadow = json.loads(paths["shadow SQNR (dB)"].read_text())["graph"]["results"]
    finite = [r.shadow_sqnr for r in report.rows if math.isfinite(r.shadow_sqnr)]
    # an exact shadow (inf) shows as the overlay's best value, not as invalid JSON
    assert report.row("layer1.0.add").shadow_sqnr == math.inf
    assert shadow["add_"]["value"] == max(finite)


def test_overlay_loads_with_model_explorer_classes(resnet_report):
    me = pytest.importorskip("model_explorer")
    from model_explorer.node_data_builder import (
        GradientItem,
        GraphNodeData,
        ModelNodeData,
        NodeDataResult,
    )
    from model_explorer.pytorch_exported_program_adapter_impl import (
        PytorchExportedProgramAdapterImpl,
    )

    ep, report = resnet_report
    data = node_data(report, "shadow_sqnr")
    graph = data["graph"]
    rebuilt = ModelNodeData(graphsData={"graph": GraphNodeData(
        name=graph["name"],
        results={k: NodeDataResult(**v) for k, v in graph["results"].items()},
        gradient=[GradientItem(**g) for g in graph["gradient"]],
    )})
    loaded = json.loads(rebuilt.to_json_string())["graph"]
    # every field fxnumeric writes is one of Model Explorer's, with the same value
    assert {k: loaded[k] for k in graph} == graph
    adapter = PytorchExportedProgramAdapterImpl(ep, {"const_element_count_limit": 0})
    me_graph = adapter.convert()["graphs"][0]
    assert me_graph.id == "graph"
    assert set(graph["results"]) <= {n.id for n in me_graph.nodes}
    assert callable(me.visualize_pytorch)


def test_cli_writes_model_explorer_overlays(tmp_path, capsys):
    from fxnumeric.cli import main

    code = main(["report", "--model", "torchvision:resnet18", "--quant", "pt2e",
                 "--input-shape", "1,3,32,32", "--batches", "1", "--no-progress",
                 "--format", "model-explorer", "-o", str(tmp_path / "overlays")])
    assert code == 0 and "shadow_sqnr.json" in capsys.readouterr().out
    results = json.loads((tmp_path / "overlays" / "output_sqnr.json").read_text())["graph"]
    assert "conv2d" in results["results"]


def test_a_row_whose_float_signal_collapsed_is_left_uncoloured():
    # its 0 dB measures nothing; coloured, it read as the worst layer, and -inf elsewhere
    # mapped onto that same 0 dB
    from fxnumeric.report import Report, ReportRow

    def row(name, output, shadow, float_rms=1.0):
        return ReportRow(name, "linear", True, 40.0, {"sqnr": output}, {"sqnr": shadow},
                         float_nodes=(name,), float_rms=float_rms, reference_rms=1.0)

    report = Report((row("a", 35.0, 35.0), row("dead", 0.0, 0.0, float_rms=1e-12),
                     row("b", -math.inf, math.inf), row("c", 30.0, 30.0)),
                    ("sqnr",), ("weights", "outputs", "shadows"), 2, {"sqnr": 30.0},
                    model_output_rms=1.0)
    assert [r.degenerate for r in report.rows] == [False, True, False, False]
    outputs = node_data(report, "output_sqnr")["graph"]["results"]
    assert outputs == {"a": {"value": 35.0}, "b": {"value": 30.0}, "c": {"value": 30.0}}
    shadows = node_data(report, "shadow_sqnr")["graph"]["results"]
    assert shadows == {"a": {"value": 35.0}, "b": {"value": 35.0}, "c": {"value": 30.0}}
