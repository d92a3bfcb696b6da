"""Build float/quantized pairs for the CLI: ``torchvision:NAME`` or ``package.module:factory``.

``package.module:factory`` imports and runs your code (the factory); only name specs you trust.
Nothing here evaluates strings, and checkpoint files are read with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .run import run_model

__all__ = ["QUANT_MODES", "load_float_model", "build_pair", "random_batches"]

QUANT_MODES = ("static", "dynamic", "fx")
_TORCHVISION_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}


def _quantizable_names() -> list[str]:
    import inspect

    import torchvision

    q = torchvision.models.quantization
    return sorted(n for n in dir(q) if not n.startswith("_") and inspect.isfunction(getattr(q, n)))


def _torchvision_model(name: str, quant: str) -> nn.Module:
    import torchvision

    kwargs = dict(_TORCHVISION_KWARGS.get(name, {}), weights=None)
    if quant == "static":
        factory = getattr(torchvision.models.quantization, name, None)
        if factory is None:
            raise InputError(
                f"torchvision has no quantizable {name!r} for --quant static; quantizable models: "
                f"{', '.join(_quantizable_names())}. "
                "Use --quant fx for other models."
            )
        return factory(quantize=False, **kwargs).eval()
    factory = getattr(torchvision.models, name, None)
    if factory is None or not callable(factory):
        raise InputError(f"torchvision.models has no model {name!r}")
    return factory(**kwargs).eval()


def load_float_model(spec: str, quant: str) -> nn.Module | tuple[nn.Module, nn.Module]:
    """Resolve ``torchvision:NAME`` or ``package.module:factory`` (which runs that factory).

    The factory returns the float model, or a ``(float_model, quantized_model)`` pair.
    """
    if ":" not in spec:
        raise InputError(f"--model {spec!r} must look like torchvision:resnet18 or package.module:factory")
    module_name, _, attr = spec.partition(":")
    if module_name == "torchvision":
        return _torchvision_model(attr, quant)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot import {module_name!r} from --model {spec!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise InputError(f"{module_name!r} has no callable {attr!r} (from --model {spec!r})")
    try:
        made = factory()
    except Exception as exc:
        raise InputError(f"{spec} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(made, nn.Module):
        return made.eval()
    if isinstance(made, (tuple, list)) and len(made) == 2 and all(isinstance(m, nn.Module) for m in made):
        return made[0].eval(), made[1].eval()
    raise InputError(f"{spec} returned {type(made).__name__}; it must return a model or a (float, quantized) pair")


def random_batches(shape: Sequence[int], count: int, *, seed: int = 0, dtype: str = "float", high: int = 10) -> list[torch.Tensor]:
    """Seeded input batches: uniform floats, or integers in ``[0, high)`` for ``dtype='long'``."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == "long":
        return [torch.randint(0, high, tuple(shape), generator=gen) for _ in range(count)]
    return [torch.rand(*shape, generator=gen) for _ in range(count)]


def _quantize(float_model: nn.Module, quant: str, batches: list[Any]) -> nn.Module:
    from torch.ao import quantization as tq

    if quant == "dynamic":
        return tq.quantize_dynamic(copy.deepcopy(float_model), {nn.Linear, nn.LSTM, nn.GRU}, dtype=torch.qint8)
    if quant == "fx":
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        try:
            prepared = prepare_fx(copy.deepcopy(float_model), tq.get_default_qconfig_mapping("x86"), (batches[0],))
        except Exception as exc:  # torch.fx / prepare_fx raise many types
            raise InputError(f"prepare_fx failed on the float model: {type(exc).__name__}: {exc}") from exc
        for b in batches:
            run_model(prepared, b, which="float (calibration)")
        return convert_fx(prepared)
    model = copy.deepcopy(float_model)
    if not any(isinstance(m, tq.QuantStub) for m in model.modules()):
        model = tq.QuantWrapper(model)
    if hasattr(model, "fuse_model"):
        model.fuse_model()
    model.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(model, inplace=True)
    for b in batches:
        run_model(model, b, which="float (calibration)")
    return tq.convert(model, inplace=True)


def build_pair(spec: str, quant: str, batches: list[Any], *, float_weights: str | Path | None = None) -> tuple[nn.Module, nn.Module]:
    """The float model named by ``spec`` and its quantized counterpart (calibrated on ``batches``)."""
    if quant not in QUANT_MODES:
        raise InputError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {quant!r}")
    made = load_float_model(spec, quant)
    if isinstance(made, tuple):
        return made
    if float_weights is not None:
        try:
            state = torch.load(float_weights, map_location="cpu", weights_only=True)
            made.load_state_dict(state)
        except (OSError, RuntimeError, KeyError) as exc:
            raise InputError(f"cannot load --float-weights {str(float_weights)!r}: {exc}") from exc
    return made, _quantize(made, quant, batches)
