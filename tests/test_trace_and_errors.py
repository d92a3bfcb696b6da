"""Stage 1, trace, and the error family: every user mistake gets a message that helps."""

from __future__ import annotations

import copy
import re

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
    f, _ = _dynamic_pair()
    with pytest.raises(ns.TraceError) as info:
        ns.trace(f, which="float")
    msg = str(info.value)
    assert "float model in `gate` (_Gate)" in msg
    assert "if x.sum() > 0" in msg and "test_trace_and_errors.py" in msg
    assert 'leaf_modules=["gate"]' in msg


def test_match_keeps_an_untraceable_submodule_whole_without_being_told():
    f, q = _dynamic_pair()
    m = ns.match(f, q)
    assert [(p.name, p.found_by) for p in m.pairs] == [("fc", "graph"), ("gate", "graph")]
    (path, reason), = m.untraced
    assert path == "gate" and "if x.sum() > 0" in reason
    assert "kept whole" in m.table() and "`gate`" in m.table()
    report = ns.compare(f, q, [torch.randn(2, 4)])
    assert [r.name for r in report.rows] == ["fc", "gate"]
    assert [u for u in f.modules() if u._forward_hooks] == []


@pytest.mark.parametrize("leaf", ["gate", _Gate])
def test_leaf_modules_make_it_traceable(leaf):
    f, q = _dynamic_pair()
    m = ns.match(f, q, leaf_modules=[leaf])
    assert [p.name for p in m.pairs] == ["fc", "gate"]
    acts = ns.compare_model_outputs(f, q, torch.randn(2, 4), leaf_modules=[leaf])
    assert list(acts) == ["fc.stats"]


def test_a_leaf_name_of_no_module_is_refused():
    """A typo in leaf_modules kept nothing whole and said nothing (compare, the eager API and
    the CLI's --leaf-modules alike)."""
    f, q = _dynamic_pair()
    x = torch.randn(2, 4)
    with pytest.raises(ns.InputError, match=r"leaf_modules names 'gates', which is no module "
                                            r"of the float or the quantized model\. Fix:"):
        ns.compare(f, q, [x], leaf_modules=["gates"])
    with pytest.raises(ns.InputError, match=r"'fc.gate'.*similar: gate"):
        ns.compare_model_outputs(f, q, x, leaf_modules=["fc.gate"])
    # a path of either model is a module: the quantized one's names count too
    assert [p.name for p in ns.match(f, q, leaf_modules=["gate"]).pairs] == ["fc", "gate"]


def test_bad_leaf_spec():
    with pytest.raises(ns.TraceError, match="leaf_modules entries must be"):
        ns.trace(nn.ReLU(), leaf_modules=[3])


def test_not_a_module():
    # a wrong argument, not a model torch.fx failed to trace (a TraceError before)
    with pytest.raises(ns.InputError, match="quant_model is a function, not a model: pass an "
                                            "nn.Module"):
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


def _lin():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    return f, torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})


def _case_untraceable():
    f, _ = _dynamic_pair()
    ns.trace(f, which="float")


def _case_unsupported_op():
    f, q = _lin()
    q.add_module("2", torch.ao.nn.quantized.Quantize(0.1, 0, torch.quint8))
    q.add_module("3", torch.ao.nn.quantized.Hardswish(0.1, 0))  # a quantized op the float model lacks
    ns.compare_model_outputs(f, q, torch.randn(2, 4))


def _case_unrelated():
    f, _ = _lin()
    other = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 2), nn.Sigmoid()).eval(), {nn.Linear})
    ns.compare_model_outputs(f, other, torch.randn(2, 4))


def _case_shape():
    f, q = _lin()
    ns.compare(f, q, [torch.randn(2, 5)])


def _case_dtype():
    f, q = _lin()
    ns.compare(f, q, [torch.randint(0, 3, (2, 4))])


def _case_input_device():
    f, q = _lin()
    ns.compare(f, q, [torch.randn(2, 4, device="meta")])


def _case_model_devices():
    f, q = _lin()
    ns.compare_model_outputs(f.to("meta"), q, torch.randn(2, 4))


def _case_empty():
    f, q = _lin()
    ns.compare(f, q, iter(()))


def _case_logger_not_a_logger():
    f, q = _lin()
    ns.compare_model_outputs(f, q, torch.randn(2, 4), logger_cls=nn.ReLU)


def _case_logger_needs_arguments():
    class Needy(ns.Logger):
        def __init__(self, path):
            super().__init__()

    f, q = _lin()
    ns.prepare_model_outputs(f, q, Needy)


def _case_read_before_prepare():
    f, q = _lin()
    ns.get_matching_activations(f, q)


def _case_read_before_forward():
    f, q = _lin()
    ns.prepare_model_outputs(f, q)
    ns.get_matching_activations(f, q)


def _case_unknown_pair():
    f, q = _lin()
    ns.add_loggers(f, q, select=["decoder"])


def _case_bad_metric():
    f, q = _lin()
    ns.compare(f, q, [torch.randn(2, 4)], metrics=[lambda ref, actual: 1 / 0])


def _case_variants_as_a_list():
    f, q = _lin()
    ns.compare(f, [q, q], [torch.randn(2, 4)])


def _case_advise_variants_as_a_list():
    f, q = _lin()
    ns.advise(f, [q, q], [torch.randn(2, 4)], metric="sqnr", target=30)


def _case_state_dicts_of_none():
    ns.compare_weights(None, None)


def _case_prepare_none():
    f, _ = _lin()
    ns.prepare_model_outputs(f, None)


def _case_logger_dict_of_none():
    ns.get_logger_dict(None)


def _case_stub_without_swap_list():
    f, q = _lin()
    ns.compare_model_stub(f, q, None, torch.randn(2, 4))


@pytest.mark.parametrize("case, error, message", [
    (_case_untraceable, ns.TraceError, r"in `gate` \(_Gate\).*if x.sum\(\) > 0.*leaf_modules="),
    (_case_unsupported_op, ns.MatchError, r"quantized `_3` \(hardswish\): no float op of kind `hardswish` consumes the float counterpart `_1`"),
    (_case_unrelated, ns.MatchError, r"could not pair the float and quantized models"),
    (_case_shape, ns.InputError, r"float model failed on the input \(Tensor\[2, 5\] float32 on cpu\)"),
    (_case_dtype, ns.InputError, r"float model failed on the input \(Tensor\[2, 4\] int64 on cpu\)"),
    (_case_input_device, ns.InputError, r"must be on one device, but the float model on cpu; input on meta"),
    (_case_model_devices, ns.InputError, r"but the float model on meta; input on cpu"),
    (_case_empty, ns.InputError, r"data yielded no batches"),
    (_case_logger_not_a_logger, ns.InstrumentationError, r"ReLU is not a logger: subclass fxnumeric.Logger"),
    (_case_logger_needs_arguments, ns.InstrumentationError, r"could not build a logger with Needy\(\)"),
    (_case_read_before_prepare, ns.InstrumentationError, r"not prepared: call fxnumeric.prepare_model_outputs"),
    (_case_read_before_forward, ns.InstrumentationError, r"run a forward pass of both prepared models"),
    (_case_unknown_pair, ns.InstrumentationError, r"no pair is named \['decoder'\]"),
    (_case_bad_metric, ns.InputError, r"custom metric '<lambda>' failed: ZeroDivisionError"),
    (_case_variants_as_a_list, ns.InputError, r"quant_model is a list, not a model.*a dict, \{name"),
    (_case_advise_variants_as_a_list, ns.InputError, r"quant_model is a list, not a model"),
    (_case_state_dicts_of_none, ns.InputError, r"two state dicts .* got a NoneType and a NoneType"),
    (_case_prepare_none, ns.InputError, r"q_module is a NoneType, not a model"),
    (_case_logger_dict_of_none, ns.InputError, r"mod is a NoneType, not a model"),
    (_case_stub_without_swap_list, ns.InputError, r"module_swap_list is a NoneType: pass a list"),
])
def test_user_reachable_failures(case, error, message):
    with pytest.raises(error) as info:
        case()
    assert isinstance(info.value, ns.FxNumericError)
    assert re.search(message, str(info.value), re.S), str(info.value)


def test_a_custom_metric_failure_is_reported_as_itself_not_as_a_model_failure():
    with pytest.raises(ns.InputError) as info:
        _case_bad_metric()
    assert str(info.value).startswith("custom metric '<lambda>' failed")
    assert "model failed on the input" not in str(info.value)


def test_a_bug_in_fxnumerics_own_observers_is_not_blamed_on_the_input(monkeypatch):
    # an error raised by fxnumeric's code inside the instrumented forward is fxnumeric's
    # (before: "InputError: the quantized model failed on the input ...")
    import fxnumeric.metrics as metrics

    monkeypatch.setattr(metrics, "energy", None)  # a TypeError in Accumulator.update
    f, q = _lin()
    with pytest.raises(ns.InstrumentationError, match=r"fxnumeric's own code failed inside "
                       r"the (float|quantized) model's instrumented forward: TypeError"):
        ns.compare(f, q, [torch.randn(2, 4)], progress=False)


def test_match_checks_example_inputs():
    f, q = _lin()
    assert ns.match(f, q, example_inputs=torch.randn(2, 4)).coverage == 1.0
    with pytest.raises(ns.InputError, match=r"float model failed on the input \(Tensor\[2, 3\]"):
        ns.match(f, q, example_inputs=torch.randn(2, 3))


class _Nested(nn.Module):
    """Parents several levels deep, a parameter, buffers (one not persistent) and a
    plain attribute read by get_attr."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
                                  nn.Sequential(nn.Linear(4, 4)))
        self.head = nn.Linear(4, 2)
        self.register_buffer("shift", torch.ones(4))
        self.body[1].register_buffer("scale", torch.full((4,), 2.0), persistent=False)
        self.offset = 0.5

    def forward(self, x):
        return self.head(self.body(x + self.shift))


def _targets_graph(order):
    """A graph reading ``order``'s targets (get_attr for dotted non-module names)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    out = x
    for op, target in order:
        node = (graph.get_attr(target) if op == "get_attr"
                else graph.call_module(target, (out,)))
        out = node if op == "call_module" else graph.call_function(torch.add, (out, node))
    graph.output(out)
    return graph


def _tree(gm, model):
    """Every module, parameter and buffer of ``gm``: the model's own object, or an empty
    parent (by its children), with buffer persistence."""
    own = {id(m): n for n, m in model.named_modules()}
    modules = {name: own.get(id(m), ("empty", type(m).__name__, sorted(m._modules)))
               for name, m in gm.named_modules(remove_duplicate=False)}
    params = {n: id(p) for n, p in gm.named_parameters(remove_duplicate=False)}
    buffers = {n: id(b) for n, b in gm.named_buffers(remove_duplicate=False)}
    return modules, params, buffers, sorted(gm.state_dict()), gm.training


@pytest.mark.parametrize("order", [
    [("call_module", "body.0.0"), ("call_module", "body.0.1"), ("call_module", "body.1.0"),
     ("call_module", "head")],
    # a node under a module read before the module itself, then one under it again
    [("get_attr", "body.0.0.weight"), ("call_module", "body.0.0"),
     ("get_attr", "body.0.0.bias"), ("call_module", "body.1")],
    [("get_attr", "shift"), ("get_attr", "body.1.scale"), ("call_module", "body.1.0"),
     ("get_attr", "head.weight"), ("get_attr", "offset"), ("call_module", "body"),
     ("call_module", "body.0.1")],
    [("get_attr", "body.1.scale"), ("get_attr", "shift"), ("call_module", "head")],
], ids=["modules", "attr-before-module", "buffers-and-whole-parent", "buffers"])
def test_graph_module_holds_what_torchs_constructor_gives(order):
    from fxnumeric.capture.fx import graph_module

    model = _Nested().eval()
    graph = _targets_graph(order)
    ours = graph_module(model, graph, class_name="Nested")
    theirs = torch.fx.GraphModule(model, _targets_graph(order), class_name="Nested")
    assert _tree(ours, model) == _tree(theirs, model)
    assert type(ours).__name__ == "Nested" and ours.graph is graph
    assert ours.code == theirs.code


def test_traced_nodes_keep_torchs_module_stack():
    """The tracer's faster copies of its module stack give the meta torch.fx's would."""
    model = _Nested()
    gm = ns.trace(model)
    reference = torch.fx.symbolic_trace(model)
    ours = {n.name: n.meta.get("nn_module_stack") for n in gm.graph.nodes}
    theirs = {n.name: n.meta.get("nn_module_stack") for n in reference.graph.nodes}
    assert ours == theirs and any(ours.values())
    assert all(type(s) is type(theirs[n]) for n, s in ours.items())


# ------------------------------------------------------------- where a model failed


def _raising_module_by_hooks(model: nn.Module, x: torch.Tensor) -> tuple[str, nn.Module]:
    """The oracle: the innermost module entered (a forward pre-hook) and not left (a forward
    hook) when ``model(x)`` raised, on the plain model."""
    entered: list[tuple[str, nn.Module]] = []
    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(
            lambda m, a, path=path: entered.append((path, m))))
        handles.append(module.register_forward_hook(
            lambda m, a, out: entered.pop() and None))  # None: the output is kept
    try:
        with pytest.raises(Exception):  # noqa: B017, PT011 - any failure of the model
            with torch.no_grad():
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return entered[-1]


def _failing_node_by_interpreter(model: nn.Module, x: torch.Tensor) -> torch.fx.Node:
    """The oracle for a graph: the node an fx Interpreter was running when it raised."""
    failed: list[torch.fx.Node] = []

    class Recording(torch.fx.Interpreter):
        def run_node(self, n):
            try:
                return super().run_node(n)
            except Exception:
                failed.append(n)
                raise

    with pytest.raises(Exception):  # noqa: B017, PT011
        Recording(torch.fx.symbolic_trace(model)).run(x)
    return failed[0]


def _shape_bug_pair():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                      nn.Linear(12, 2)).eval()  # 16 features into a Linear of 12
    return f, torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})


@pytest.mark.parametrize("api", ["compare", "compare_model_outputs"])
def test_a_float_model_failing_inside_names_the_module_that_raised(api):
    f, q = _shape_bug_pair()
    x = torch.randn(3, 8)
    path, module = _raising_module_by_hooks(f, x)
    assert path == "4"
    with pytest.raises(ns.InputError) as info:
        if api == "compare":
            ns.compare(f, q, [x], progress=False)
        else:
            ns.compare_model_outputs(f, q, x)
    message = str(info.value)
    # what callers read stays: which model, the input, the torch error on the first line
    assert message.startswith(f"the float model failed on the input (Tensor[3, 8] float32 on "
                              f"cpu) in module `{path}` ({type(module).__name__}): "
                              "RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    assert "Check the input shape" in message  # no other model ran on it before


class _MissingDeQuantStub(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm([4, 6, 6])  # left float, fed the quantized conv's output
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.norm(self.conv(self.quant(x))))


def test_a_quantized_model_failing_inside_names_the_module_not_the_input():
    """The classic missing DeQuantStub: the quantized model cannot run, and fxnumeric said
    "the quantized model failed on the input ... Check the input shape, dtype and device"."""
    torch.backends.quantized.engine = "fbgemm"
    torch.manual_seed(0)
    f = _MissingDeQuantStub().eval()
    f.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    f.norm.qconfig = None
    prepared = torch.ao.quantization.prepare(copy.deepcopy(f))
    prepared(torch.rand(2, 3, 8, 8))
    q = torch.ao.quantization.convert(prepared)
    x = torch.rand(2, 3, 8, 8)
    path, module = _raising_module_by_hooks(q, x)
    assert path == "norm"
    where = f"failed on the input (Tensor[2, 3, 8, 8] float32 on cpu) in module `{path}` " \
            f"({type(module).__name__}): NotImplementedError"
    with pytest.raises(ns.InputError) as info:
        ns.compare_model_outputs(f, q, x)
    assert f"the quantized model {where}" in str(info.value)
    assert (f"The float model ran on this same input, so the cause is in the quantized model "
            f"in module `{path}`") in str(info.value)
    assert "Check the input shape" not in str(info.value)
    with pytest.raises(ns.InputError) as info:  # the float model does not run there
        ns.compare_model_stub(f, q, [nn.Conv2d], x)
    assert f"the quantized model {where}" in str(info.value)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(6, 6))  # 8 features into a 6x6 matmul

    def forward(self, x):
        return torch.matmul(self.q(x), self.w)


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(8, 8), _Attention()),
                                    nn.Linear(8, 8))

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize("api", ["compare", "compare_model_outputs", "compare_model_stub"])
def test_a_functional_op_failing_in_the_graph_names_its_node_and_module(api, capfd):
    """A function (not a module) raising in the traced graph: its node, what it calls and the
    module of the user's model whose forward holds it. The generated code's line is mapped to
    the node (torch.fx's line map), which torch.fx's wrapper of a GraphModule's call used to
    drop with the traceback."""
    torch.manual_seed(0)
    f = _Blocks().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    x = torch.randn(2, 8)
    path, module = _raising_module_by_hooks(f, x)
    node = _failing_node_by_interpreter(f, x)
    assert (path, type(module), node.target) == ("layers.0.1", _Attention, torch.matmul)
    with pytest.raises(ns.InputError) as info:
        if api == "compare":
            ns.compare(f, q, [x], progress=False)
        elif api == "compare_model_outputs":
            ns.compare_model_outputs(f, q, x)
        else:
            ns.compare_model_stub(f, q, [nn.Linear], x)
    message = str(info.value)
    assert re.search(r"failed on the input \(Tensor\[2, 8\] float32 on cpu\) at node `\w+` "
                     rf"\(torch\.matmul\) of module `{re.escape(path)}`: RuntimeError", message)
    # torch.fx's wrapper printed the generated code to stderr; the library prints nothing
    assert "FX-traced Module" not in capfd.readouterr().err
