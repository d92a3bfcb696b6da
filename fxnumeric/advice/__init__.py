"""From "where" to "what to do": hybrid models, sensitivity, float-fallback advice, diagnosis.

* :mod:`.hybrid`: float/quantized hybrids built from a :class:`fxnumeric.Matching`'s graphs,
  with the quantized model's own qparams (nothing is re-quantized);
* :mod:`.search`: :func:`sensitivity` (each layer alone, and all but each layer) and
  :func:`advise` (the smallest verified set of layers to keep float);
* :mod:`.diagnose`: why a layer is bad, with the usual fix for each flag.
"""

from .diagnose import Diagnosis, LayerDiagnosis, annotate, diagnose
from .search import Advice, LayerSensitivity, Sensitivity, advise, min_cosine, sensitivity

__all__ = [
    "sensitivity", "advise", "Sensitivity", "LayerSensitivity", "Advice", "min_cosine",
    "diagnose", "annotate", "Diagnosis", "LayerDiagnosis",
]
