"""Build float/quantized pairs for the CLI: ``torchvision:NAME`` or ``package.module:factory``.

Runs are reproducible: ``seed`` seeds the random weights (torchvision's ``weights=None``
initialisation, or whatever a factory draws) as well as the data. A randomly initialised
torchvision model has BatchNorm statistics of a fresh layer (mean 0, variance 1) that do not
match its activations, so they shrink or blow up layer after layer (mobilenet_v2's output
falls to ~1e-10, and every SQNR reads 0 dB). :func:`calibrate_batchnorm` gives them the
statistics of seeded inputs, as training would, before the model is quantized.

``package.module:factory`` imports and runs your code (the factory); only name specs you trust.
Nothing here evaluates strings, and checkpoint files are read with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import copy
import importlib
import pickle
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import FxNumericWarning, InputError
from .progress import Progress
from .run import as_args, run_model

__all__ = ["QUANT_MODES", "TORCHAO_MODES", "torchao_config", "untied_linears", "build_variants",
           "load_float_model", "build_pair", "random_batches",
           "calibrate_batchnorm", "BuiltPair", "quantize_pt2e", "build_pt2e_pair",
           "PT2E_QUANTIZERS", "PT2E_MODES"]

TORCHAO_MODES = ("int8-weight-only", "int8-dynamic", "int4-weight-only")
"""torchao ``quantize_`` configs by name: ``Int8WeightOnlyConfig()``,
``Int8DynamicActivationInt8WeightConfig()``, ``IntxWeightOnlyConfig(int4, PerGroup(32))``."""
QUANT_MODES = ("static", "dynamic", "fx", *TORCHAO_MODES)
_BN_PASSES = 3
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


def load_float_model(spec: str, quant: str, *,
                     seed: int = 0) -> nn.Module | tuple[nn.Module, nn.Module]:
    """Resolve ``torchvision:NAME`` or ``package.module:factory`` (which runs that factory).

    The factory returns the float model, or a ``(float_model, quantized_model)`` pair. The
    global RNG is seeded with ``seed`` first, so random initial weights are reproducible.
    """
    torch.manual_seed(seed)
    if ":" not in spec:
        raise InputError(f"--model {spec!r} must look like torchvision:resnet18 or "
                         "package.module:factory")
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
        return _inference(made)
    pair = isinstance(made, (tuple, list)) and len(made) == 2
    if pair and all(isinstance(m, nn.Module) for m in made):
        return _inference(made[0]), _inference(made[1])
    if isinstance(made, (tuple, list)):  # what it holds, and which of it is no model
        held = ", ".join(type(m).__name__ for m in made)
        why = (f"{type(made).__name__} of {len(made)} ({held})" + (
            f": its item {next(i for i, m in enumerate(made) if not isinstance(m, nn.Module))}"
            " is not an nn.Module" if pair else ""))
    else:
        why = type(made).__name__
    raise InputError(f"{spec} returned a {why}; it must return a model or a (float, "
                     "quantized) pair of models. Fix: a factory of your own returning the "
                     "model alone (a (model, tokenizer) pair's model)")


def _inference(model: nn.Module) -> nn.Module:
    """``model`` in eval mode; a ``torch.export`` module refuses ``eval()`` (it is traced in
    inference form already) and is returned as it is."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def random_batches(shape: Sequence[int], count: int, *, seed: int = 0, dtype: str = "float",
                   high: int = 10) -> list[torch.Tensor]:
    """Seeded input batches: uniform floats, or integers in ``[0, high)`` for ``dtype='long'``."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == "long":
        return [torch.randint(0, high, tuple(shape), generator=gen) for _ in range(count)]
    return [torch.rand(*shape, generator=gen) for _ in range(count)]


def calibrate_batchnorm(model: nn.Module, shape: Sequence[int], *, seed: int = 0,
                        passes: int = _BN_PASSES, progress: bool | None = False) -> int:
    """Give every BatchNorm of ``model`` the statistics of seeded uniform inputs, in place.

    Runs ``passes`` forwards in train mode (under ``no_grad``; batches of at least 8 so
    that a 1x1 feature map still has a variance) with each BatchNorm averaging over all of
    them (``momentum=None``), then restores eval mode and the momenta. Returns the number of
    BatchNorm layers updated (0: nothing ran).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    gen = torch.Generator().manual_seed(seed)
    batch_shape = (max(int(shape[0]), 8), *shape[1:])
    with torch.no_grad(), Progress(passes, "BatchNorm statistics", progress, unit="pass") as bar:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the passes
        model.train()
        try:
            for _ in range(passes):
                run_model(model, torch.rand(*batch_shape, generator=gen),
                          which="float (BatchNorm statistics)")
                bar.update()
        finally:
            model.eval()
            for bn, momentum in zip(bns, momenta, strict=True):
                bn.momentum = momentum
    return len(bns)


def torchao_config(mode: str) -> Any:
    """The torchao config a :data:`TORCHAO_MODES` name stands for."""
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            PerGroup,
        )
    except ImportError as exc:
        raise InputError(f"--quant {mode} needs torchao ({exc}). Fix: pip install "
                         "'fxnumeric[torchao]'") from exc
    if mode == "int8-weight-only":
        return Int8WeightOnlyConfig()
    if mode == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if mode == "int4-weight-only":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))
    raise InputError(f"unknown torchao mode {mode!r}; choose from {', '.join(TORCHAO_MODES)}")


INT4_GROUP = 32
"""The group size of ``int4-weight-only`` (``IntxWeightOnlyConfig``'s ``PerGroup(32)``)."""


def _whole_groups(model: nn.Module, keep: Any, group: int) -> Any:
    """``keep`` less the Linears whose input features do not split into groups of ``group``
    (torchao refuses them with an AssertionError); those stay float, and a warning names them."""
    ragged = [f"{fqn} ({module.in_features} input features)"
              for fqn, module in model.named_modules()
              if keep(module, fqn) and module.in_features % group]
    if ragged:
        warnings.warn(
            f"int4-weight-only quantizes weights in groups of {group} input features; "
            f"{len(ragged)} Linear{'s' if len(ragged) != 1 else ''} cannot be grouped so and "
            f"stay{'s' if len(ragged) == 1 else ''} float: {', '.join(ragged[:5])}"
            f"{' ...' if len(ragged) > 5 else ''}", FxNumericWarning, stacklevel=3)
    return lambda module, fqn: keep(module, fqn) and module.in_features % group == 0


def untied_linears(model: nn.Module) -> Any:
    """A ``quantize_`` filter: every ``nn.Linear`` except one whose weight another module
    shares (a language model's ``lm_head`` tied to its embedding: quantizing it would untie
    them, and the embedding stays float)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1

    def keep(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and owners.get(id(module.weight), 0) <= 1

    return keep


def _quantize(float_model: nn.Module, quant: str, batches: list[Any],
              progress: bool | None = False) -> nn.Module:
    from torch.ao import quantization as tq

    if quant in TORCHAO_MODES:
        from torchao.quantization import quantize_

        model = copy.deepcopy(float_model)
        keep = untied_linears(model)
        if quant == "int4-weight-only":  # groups of 32 input features: torchao asserts them
            keep = _whole_groups(model, keep, INT4_GROUP)
        quantize_(model, torchao_config(quant), filter_fn=keep)
        return model
    if quant == "dynamic":
        return tq.quantize_dynamic(copy.deepcopy(float_model), {nn.Linear, nn.LSTM, nn.GRU},
                                   dtype=torch.qint8)
    if quant == "fx":
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        try:
            prepared = prepare_fx(copy.deepcopy(float_model), tq.get_default_qconfig_mapping("x86"),
                                  (batches[0],))
        except Exception as exc:  # torch.fx / prepare_fx raise many types
            raise InputError(f"prepare_fx failed on the float model: {type(exc).__name__}: "
                             f"{exc}") from exc
        _calibrate(prepared, batches, progress)
        return convert_fx(prepared)
    model = copy.deepcopy(float_model)
    if not any(isinstance(m, tq.QuantStub) for m in model.modules()):
        model = tq.QuantWrapper(model)
    if hasattr(model, "fuse_model"):
        model.fuse_model()
    model.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(model, inplace=True)
    _calibrate(model, batches, progress)
    with warnings.catch_warnings():
        # An observer that never ran belongs to a module the forward never calls (torchvision's
        # mobilenet_v2 has a skip_add in every block and uses it only in some): the module is
        # not in the computation, so torch's "must run observer" warning is noise here.
        warnings.filterwarnings("ignore", message="must run observer before calling")
        return tq.convert(model, inplace=True)


def _calibrate(model: nn.Module, batches: list[Any], progress: bool | None) -> None:
    with Progress(len(batches), "calibrating", progress) as bar:
        for b in batches:
            run_model(model, b, which="float (calibration)")
            bar.update()


@dataclass(frozen=True)
class BuiltPair:
    """A float model, its quantized counterpart, and what a report should say about them."""

    float_model: nn.Module
    quant_model: nn.Module
    notes: tuple[str, ...] = ()


def build_pair(spec: str, quant: str, batches: list[Any], *,
               float_weights: str | Path | None = None, seed: int = 0,
               progress: bool | None = False) -> BuiltPair:
    """The float model named by ``spec`` and its quantized counterpart (calibrated on ``batches``).

    A torchvision model without ``float_weights`` has random weights (seeded by ``seed``) and
    BatchNorm statistics from :func:`calibrate_batchnorm`; ``notes`` says so.
    """
    if quant not in QUANT_MODES:
        raise InputError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {quant!r}")
    made, notes = _prepared_float(spec, quant, batches, float_weights=float_weights, seed=seed,
                                  progress=progress)
    if isinstance(made, tuple):
        return BuiltPair(*made)
    return BuiltPair(made, _quantize(made, quant, batches, progress), notes)


def _prepared_float(spec: str, quant: str, batches: list[Any], *,
                    float_weights: str | Path | None, seed: int, progress: bool | None,
                    ) -> tuple[nn.Module | tuple[nn.Module, nn.Module], tuple[str, ...]]:
    """The float model as :func:`build_pair` prepares it (``quant`` picks torchvision's
    quantizable model for ``static``), or a factory's ``(float, quantized)`` pair; and the
    notes a report should carry."""
    made = load_float_model(spec, quant, seed=seed)
    if isinstance(made, tuple):
        if float_weights is not None:
            raise InputError(
                f"--float-weights {str(float_weights)!r} is for a float model fxnumeric "
                f"quantizes, and {spec} returns a (float, quantized) pair, quantized from the "
                "weights it holds.\nFix: load the weights in the factory, before it quantizes")
        return made, ()
    notes: tuple[str, ...] = ()
    if float_weights is not None:
        _load_float_weights(made, float_weights)
    elif spec.startswith("torchvision:"):
        shape = tuple(batches[0].shape) if batches and isinstance(batches[0], torch.Tensor) else ()
        run_model(made, batches[0], which="float (calibration)")  # the input fits, in its shape
        calibrated = (calibrate_batchnorm(made, shape, seed=seed, progress=progress)
                      if len(shape) > 1 and batches[0].is_floating_point() else 0)
        notes = (f"random weights (torchvision weights=None, seed {seed}"
                 + (f"; BatchNorm statistics from {_BN_PASSES} seeded batches"
                    if calibrated else "")
                 + "): these numbers describe an untrained model; pass --float-weights FILE "
                 "for a trained one",)
    return made, notes


def _load_float_weights(model: nn.Module, path: str | Path) -> None:
    """Load the state_dict file ``path`` (``--float-weights``) into ``model``, in place.

    Raises:
        InputError: when ``torch.load(weights_only=True)`` refuses the file or the model its
            keys or shapes, with the reason and what file to pass instead.
    """
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"cannot load --float-weights {str(path)!r}: {first}\nFix: a state_dict saved "
            "with torch.save(model.state_dict(), path) for this model"
        ) from exc


def build_variants(spec: str, quants: list[str], batches: list[Any], *,
                   float_weights: str | Path | None = None, seed: int = 0,
                   progress: bool | None = False) -> tuple[nn.Module, dict[str, nn.Module],
                                                          tuple[str, ...]]:
    """One float model named by ``spec`` and a quantized variant of it per mode in ``quants``:
    ``(float_model, {mode: quantized model}, notes)``.

    The float model is loaded once and every variant is made from it: torchvision's
    quantizable model when ``static`` is among the modes, whatever their order (eager static
    quantization needs its ``FloatFunctional`` adds and stubs; the plain model's ``out +=
    identity`` would add quantized tensors), else the plain one. Both hold the same weights
    for a seed and compute the same float function, so the other variants are quantized from
    the same float model either way. A factory
    that returns a ``(float, quantized)`` pair gives the one variant (with one mode only). The
    modes of :data:`PT2E_MODES` export the float ``nn.Module`` and quantize it with pt2e
    (:func:`quantize_pt2e`); the float model stays the ``nn.Module``, which torch.fx captures
    for every variant alike (pt2e's graph pairs with it by module path).
    """
    if len(set(quants)) != len(quants):
        raise InputError(f"--quant names a mode twice: {', '.join(quants)}")
    unknown = [q for q in quants if q not in QUANT_MODES and q not in PT2E_MODES]
    if unknown:
        raise InputError(f"--quant must be among {', '.join((*QUANT_MODES, *PT2E_MODES))}, got "
                         f"{unknown[0]!r}")
    made, notes = _prepared_float(spec, _float_mode(quants), batches,
                                  float_weights=float_weights, seed=seed, progress=progress)
    variants: dict[str, nn.Module] = {}
    if isinstance(made, tuple) and len(quants) > 1:
        raise InputError(
            f"{spec} returns a (float, quantized) pair: its quantized model is the one compared, "
            f"whatever --quant says, so several modes ({', '.join(quants)}) would name it after "
            "the first. Return the float model alone to compare the modes, or pass one --quant")
    if isinstance(made, tuple):  # a factory's pair: its quantized model is the variant
        float_model, variants[quants[0]] = made
    else:
        float_model = made
    for quant in quants:
        if quant in variants:
            continue
        if quant in PT2E_MODES:
            variants[quant] = quantize_pt2e(float_model, batches, quantizer=PT2E_MODES[quant])[1]
        else:
            variants[quant] = _quantize(float_model, quant, batches, progress)
    return float_model, variants, notes


def _float_mode(quants: list[str]) -> str:
    """The mode whose float model :func:`build_variants` loads for all of ``quants``: ``static``
    when it is among them (only torchvision's quantizable model quantizes eagerly)."""
    if "static" in quants:
        return "static"
    return quants[0] if quants[0] in QUANT_MODES else "pt2e"


# --- building a pt2e pair (the CLI's --quant pt2e) -------------------------------------------

PT2E_QUANTIZERS = ("xnnpack", "x86")
"""Quantizers :func:`quantize_pt2e` knows: XNNPACK symmetric (default), x86 inductor."""

PT2E_MODES = {"pt2e": "xnnpack", "pt2e-x86": "x86"}
"""The CLI's pt2e ``--quant`` modes and the quantizer each one uses."""


def _quantizer(name: str) -> Any:
    if name == "xnnpack":
        from torchao.testing.pt2e._xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        return XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
    if name == "x86":
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    raise InputError(f"unknown pt2e quantizer {name!r}; choose from {', '.join(PT2E_QUANTIZERS)}")


def quantize_pt2e(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    quantizer: str = "xnnpack",
    fold_quantize: bool = True,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Export ``model`` and quantize it with pt2e: ``(exported float, converted quantized)``.

    Args:
        model: the float model (not modified; exported in eval mode).
        calibration: batches (tensors or tuples of inputs); the first one is the example input
            for ``torch.export``.
        quantizer: ``"xnnpack"`` (symmetric, per-tensor) or ``"x86"`` (x86 inductor default).
        fold_quantize: passed to ``convert_pt2e``.

    Raises:
        InputError: when torchao is missing or export, prepare or convert fails.
    """
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise InputError(
            f"pt2e quantization needs torchao ({exc}). Fix: pip install 'fxnumeric[torchao]'"
        ) from exc
    batches = list(calibration)
    if not batches:
        raise InputError("quantize_pt2e needs at least one calibration batch")
    try:
        exported = torch.export.export(copy.deepcopy(model).eval(), as_args(batches[0]))
    except Exception as exc:  # torch.export raises many types; all mean "cannot export"
        raise InputError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    float_gm = exported.module()
    chosen = _quantizer(quantizer)
    try:
        prepared = prepare_pt2e(exported.module(), chosen)
    except Exception as exc:  # a quantizer that cannot annotate this graph
        raise InputError(
            f"prepare_pt2e with the {quantizer} quantizer failed on {type(model).__name__}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            f"Fix: try the other quantizer: {_other_pt2e(quantizer)}"
        ) from exc
    for batch in batches:
        run_model(prepared, batch, which="prepared (calibration)")
    return float_gm, convert_pt2e(prepared, fold_quantize=fold_quantize)


def _other_pt2e(quantizer: str) -> str:
    """The pt2e quantizers but ``quantizer``, as the CLI's --quant modes and by name."""
    return ", ".join(f"--quant {mode} (quantizer={name!r})" for mode, name in PT2E_MODES.items()
                     if name != quantizer)


def build_pt2e_pair(spec: str, calibration: list[Any], *, float_weights: str | None = None,
                    seed: int = 0, quantizer: str = "xnnpack",
                    progress: bool | None = False) -> BuiltPair:
    """The CLI's ``--quant pt2e``: the model named by ``spec``, exported and pt2e-quantized.

    The float model is prepared as :func:`build_pair` prepares it (weights from
    ``float_weights``, else seeded random weights with BatchNorm statistics from
    :func:`calibrate_batchnorm`; ``float_weights`` refused for a factory's pair); returns a
    ``BuiltPair`` whose float model is the exported program's ``.module()``, so overlays name
    the exported nodes.
    """
    made, notes = _prepared_float(spec, "pt2e", calibration, float_weights=float_weights,
                                  seed=seed, progress=progress)
    if isinstance(made, tuple):
        return BuiltPair(*made)
    float_gm, quant = quantize_pt2e(made, calibration, quantizer=quantizer)
    return BuiltPair(float_gm, quant, notes)
