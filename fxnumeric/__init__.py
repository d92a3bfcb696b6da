"""fxnumeric: find where a quantized PyTorch model loses accuracy.

The pipeline, one module per stage::

    trace -> match -> instrument -> run -> compare -> report

``match`` builds one :class:`GraphView` per side and keeps both in the :class:`Matching`;
every later stage reads them. :func:`instrument` is the one building block that attaches
observers (loggers, comparators, shadows) to pairs.

The eager Numeric Suite API (``compare_weights``, ``compare_model_outputs``, ...) is a thin
layer on top, so ``import fxnumeric as ns`` runs the PyTorch Numeric Suite tutorial.
"""

from .advice.diagnose import Diagnosis, diagnose
from .advice.search import Advice, Sensitivity, advise, sensitivity
from .capture import trace
from .compare import compare
from .eager import (
    NON_LEAF_MODULE_TO_ADD_OBSERVER_ALLOW_LIST,
    compare_model_outputs,
    compare_model_stub,
    compare_weights,
    get_default_compare_output_module_list,
    get_logger_dict,
    get_matching_activations,
    prepare_model_outputs,
    prepare_model_with_stubs,
    remove_instrumentation,
)
from .errors import (
    FxNumericError,
    FxNumericWarning,
    InputError,
    InstrumentationError,
    InternalError,
    MatchError,
    TraceError,
)
from .instrument import Instrumented, add_loggers, add_shadows, instrument, loggers_of
from .loggers import Logger, OutputLogger, Shadow, ShadowLogger
from .match import Matching, Pair, Unmatched, match
from .metrics import cosine, max_abs_error, mse, sqnr
from .ops import register_op, unregister_op
from .report import CheckResult, MetricChange, Report, ReportDiff, ReportRow, Thresholds
from .view import GraphView
from .weights import extract_weights

__version__ = "0.1.0"

__all__ = [
    # eager-compatible API
    "compare_weights",
    "compare_model_outputs",
    "prepare_model_outputs",
    "get_matching_activations",
    "compare_model_stub",
    "prepare_model_with_stubs",
    "get_logger_dict",
    "get_default_compare_output_module_list",
    "NON_LEAF_MODULE_TO_ADD_OBSERVER_ALLOW_LIST",
    "Logger",
    "OutputLogger",
    "ShadowLogger",
    "Shadow",
    "remove_instrumentation",
    # graph-native API
    "trace",
    "match",
    "Matching",
    "Pair",
    "Unmatched",
    "GraphView",
    "instrument",
    "Instrumented",
    "add_loggers",
    "add_shadows",
    "loggers_of",
    "extract_weights",
    "register_op",
    "unregister_op",
    # metrics and reports
    "compare",
    # what to do: sensitivity, float-fallback advice, why a layer is bad
    "sensitivity",
    "Sensitivity",
    "advise",
    "Advice",
    "diagnose",
    "Diagnosis",
    "Report",
    "ReportRow",
    # reports over time: saved, diffed, gated (fxnumeric.testing has the pytest helpers)
    "ReportDiff",
    "MetricChange",
    "Thresholds",
    "CheckResult",
    "sqnr",
    "cosine",
    "mse",
    "max_abs_error",
    # errors
    "FxNumericError",
    "TraceError",
    "MatchError",
    "InstrumentationError",
    "InternalError",
    "InputError",
    "FxNumericWarning",
]
