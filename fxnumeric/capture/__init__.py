"""Stage 1, capture: turn the user's models into what the matcher pairs.

Where ``torch.fx`` traces a whole model, the result is one GraphModule per model
(:func:`trace`, :mod:`fxnumeric.capture.fx`). Where it cannot, :mod:`fxnumeric.capture.tree`
keeps the failing module whole and goes inside it: its children are traced as graphs of
their own, or descended into in turn, and the leaf modules reached that way pair through
the module tree. Such a model is instrumented region by region
(:mod:`fxnumeric.instrument.assemble`): a copy of its module tree with each traced region
replaced by its instrumented GraphModule (the user's models are never touched).
:mod:`fxnumeric.capture.export` captures with ``torch.export`` instead
(``match(..., capture="export")``): ATen graphs named after the user's modules, read by the
pt2e flow.
"""

from .fx import (
    FUNCTIONAL_METHODS,
    LeafSpec,
    TraceFailure,
    fixed_arguments,
    graph_module,
    is_functional,
    is_leaf,
    kwargs_only,
    leaf_graph,
    method_graph,
    single_call_graph,
    takes_var_kwargs,
    trace,
    trace_submodule,
)
from .wrappers import unwrap, wrapped_at

__all__ = [
    "trace", "LeafSpec", "TraceFailure", "is_leaf", "trace_submodule", "single_call_graph",
    "leaf_graph", "graph_module", "FUNCTIONAL_METHODS", "is_functional", "method_graph",
    "fixed_arguments", "kwargs_only", "takes_var_kwargs", "unwrap", "wrapped_at",
]
