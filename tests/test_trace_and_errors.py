"""Stage 1, trace, and the error family: every user mistake gets a message that helps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxnumeric as ns


class _Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return x * 2
        return x


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = _Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


def _dynamic_pair():
    torch.manual_seed(0)
    f = _Net().eval()
    return f, torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})


def test_untraceable_module_is_named_with_line_and_remedy():
    f, q = _dynamic_pair()
    with pytest.raises(ns.TraceError) as info:
        ns.match(f, q)
    msg = str(info.value)
    assert "float model in `gate` (_Gate)" in msg
    assert "if x.sum() > 0" in msg and "test_trace_and_errors.py" in msg
    assert 'leaf_modules=["gate"]' in msg


@pytest.mark.parametrize("leaf", ["gate", _Gate])
def test_leaf_modules_make_it_traceable(leaf):
    f, q = _dynamic_pair()
    m = ns.match(f, q, leaf_modules=[leaf])
    assert [p.name for p in m.pairs] == ["fc", "gate"]
    acts = ns.compare_model_outputs(f, q, torch.randn(2, 4), leaf_modules=[leaf])
    assert list(acts) == ["fc.stats"]


def test_bad_leaf_spec():
    with pytest.raises(ns.TraceError, match="leaf_modules entries must be"):
        ns.trace(nn.ReLU(), leaf_modules=[3])


def test_not_a_module():
    with pytest.raises(ns.TraceError, match="quantized model must be a torch.nn.Module"):
        ns.match(nn.ReLU(), lambda x: x)


def test_wrong_input_shape_names_the_model_and_shapes(make_resnet18_pair):
    float_model, qmodel, _ = make_resnet18_pair()
    with pytest.raises(ns.InputError, match=r"float model failed on the input \(Tensor\[2, 5\] float32 on cpu\)"):
        ns.compare_model_outputs(float_model, qmodel, torch.rand(2, 5))


def test_get_matching_activations_before_forward(make_resnet18_pair):
    float_model, qmodel, _ = make_resnet18_pair()
    ns.prepare_model_outputs(float_model, qmodel)
    with pytest.raises(ns.InstrumentationError, match="run a forward pass of both prepared models"):
        ns.get_matching_activations(float_model, qmodel)


def test_compare_weights_mixed_arguments():
    f, q = _dynamic_pair()
    with pytest.raises(ns.InputError, match="two state dicts or two models"):
        ns.compare_weights(f, q.state_dict())


def test_errors_share_one_family():
    for cls in (ns.TraceError, ns.MatchError, ns.InstrumentationError, ns.InputError):
        assert issubclass(cls, ns.FxNumericError)


def test_public_signatures_extend_torchs():
    """Every eager function keeps torch's parameters, in order; extras are keyword-only."""
    import inspect

    import torch.ao.ns._numeric_suite as torch_ns

    for name in ("compare_weights", "compare_model_outputs", "prepare_model_outputs",
                 "get_matching_activations", "compare_model_stub", "prepare_model_with_stubs",
                 "get_logger_dict"):
        theirs = list(inspect.signature(getattr(torch_ns, name)).parameters.values())
        ours = list(inspect.signature(getattr(ns, name)).parameters.values())
        assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs], name
        assert [p.kind for p in ours[: len(theirs)]] == [p.kind for p in theirs], name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs):]), name
    assert ns.NON_LEAF_MODULE_TO_ADD_OBSERVER_ALLOW_LIST == torch_ns.NON_LEAF_MODULE_TO_ADD_OBSERVER_ALLOW_LIST
    assert ns.get_default_compare_output_module_list() == torch_ns.get_default_compare_output_module_list()
