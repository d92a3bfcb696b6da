"""What the LLM benchmark scripts share: a quantized model's LLM metrics on some batches."""

from __future__ import annotations

from typing import Any

import torch

from fxnumeric.llm_metrics import LogitsAccumulator


def llm_metrics(float_model: Any, quant_model: Any, batches: list[dict]) -> dict[str, float]:
    """KL, top-1 agreement and perplexities of ``quant_model`` against ``float_model`` over the
    real tokens of ``batches`` (dicts with ``input_ids`` and ``attention_mask``), each model
    run without a KV cache."""
    acc = LogitsAccumulator()
    with torch.no_grad():
        for b in batches:
            acc.update(float_model(**b, use_cache=False).logits,
                       quant_model(**b, use_cache=False).logits,
                       attention_mask=b["attention_mask"], input_ids=b["input_ids"])
    return acc.values()
