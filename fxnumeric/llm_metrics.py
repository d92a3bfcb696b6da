"""What an LLM user reads about a quantized model's output: per-token KL, top-1, perplexity.

SQNR of logits says little to an LLM user (int4 g32 SmolLM2: 9.3 dB). They read, as
llama.cpp's ``llama-perplexity --kl-divergence`` prints them:

* ``kl``: mean over real tokens of KL(float || quantized) of the next-token distributions,
  in nats; ``kl_p99`` and ``kl_max``, its 99th percentile and maximum over tokens;
* ``top1_agreement``: the fraction of real tokens where both models' argmax agree;
* ``ppl_float`` / ``ppl_quantized``: perplexity of each model on the batch's next tokens,
  when the batch has labels (or, for a model known to predict the next token, input ids to
  shift: see :meth:`LogitsAccumulator.update_batch`).

"Real tokens" are those where ``attention_mask`` is 1; padding never counts. A float mask
holding negative values, or only zeros, is additive (0 for real tokens, a large negative
number for padding, as a model that adds it to its attention scores takes it): real tokens are
its zeros (:func:`real_tokens`). A mask that is
not one per logit row (a speech model's mask of its audio samples, against logits per frame)
is read through the model's own frame mask when it has one (:class:`LogitsReader`), else not
at all: every position counts, and :attr:`LogitsAccumulator.unfit_masks` says so.

Precision and memory. Logits are read in chunks of rows (``_CHUNK_ELEMENTS``, 512K logits)
whatever their dtype (bf16 included), computed in three float64 buffers of 4 MiB reused from
chunk to chunk, so a 512-token x 49152-vocabulary batch allocates 12 MiB (and a copy of a
chunk's rows when padding splits them), never a float32 or float64 copy of the whole logits.
Each token's KL comes from each side's logits minus its own maximum, exact in float64, so two
nearly equal models still get their small KL, whatever constant offsets the quantized logits:
against a float64 log-softmax oracle the mean KL of logits of scale 1 to 20, 1e-4 to 1 apart,
offset by 0 or 1000, float32 or bf16, was at most 6e-14 nats off (see ``_chunk``).
Sums over tokens are float64, so streaming over batches equals one big batch. The p99 needs
every token's KL: they are kept as float32, 4 bytes per real token (4 MB per million tokens);
everything else is a few scalars.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import flows
from ._tensors import after_loss
from .errors import InputError
from .rows import LinearRows, row_pick

__all__ = ["LogitsAccumulator", "LogitsState", "LogitsReader", "logits_reader",
           "looks_like_logits", "single_logit", "token_fields", "predicts_next_token",
           "is_encoder_decoder", "vocab_size", "real_tokens", "output_mask", "LLM_METRICS",
           "IGNORE_INDEX"]

LLM_METRICS = ("kl", "kl_p99", "kl_max", "top1_agreement", "ppl_float", "ppl_quantized")
"""Every key :meth:`LogitsAccumulator.values` can return (the ``ppl_*`` ones with labels only)."""

IGNORE_INDEX = -100
"""A label that is not a target (the Hugging Face and ``cross_entropy`` convention)."""

_CHUNK_ELEMENTS = 1 << 19  # logits per chunk of rows: 4 MiB in float64

_MIN_GUESSED_VOCAB = 1000


@dataclass(frozen=True)
class LogitsState:
    """What a :class:`LogitsAccumulator` has summed, picklable: counts, float64 sums and every
    real token's KL (float32, for the exact p99 after merging the states of several processes;
    on the CPU, whatever device the logits were on: a pickled CUDA tensor comes back on the
    device it left, and rank 0 of eight GPUs would concatenate tensors of cuda:0 to cuda:7).
    """

    tokens: int = 0
    targets: int = 0
    kl_sum: float = 0.0
    top1_agree: float = 0
    """Tokens whose argmaxes agree (``nan`` once a token's logits held NaN)."""
    nll_float: float = 0.0
    nll_quant: float = 0.0
    token_kls: torch.Tensor = field(default_factory=lambda: torch.zeros(0), repr=False)
    batches: int = 0
    """Model batches added (:meth:`LogitsAccumulator.update_batch`), real tokens or not."""
    logits_per: str = "token"
    """What a row of the last batch's logits predicts (:attr:`LogitsAccumulator.logits_per`)."""
    logits_per_batch: int = -1
    """The index of the batch :attr:`logits_per` was read from, -1 when not told."""
    unfit_masks: int = 0
    """Batches whose ``attention_mask`` did not fit the logits and was not used
    (:attr:`LogitsAccumulator.unfit_masks`)."""
    unfit_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    """The first such batch's mask shape and the logits' leading dims."""
    unfit_batch: int = -1
    """The index of the batch :attr:`unfit_shapes` was read from, -1 when not told."""
    labelled: int = 0
    """Batches that came with targets (labels, or input ids read as next tokens)."""
    unplaced: int = 0
    """Batches whose targets could not be lined up with their logits' positions
    (:attr:`LogitsAccumulator.unplaced`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_kls", self.token_kls.cpu())

    def merged(self, other: LogitsState) -> LogitsState:
        """Both states' tokens: counts and sums add, the token KLs of ``other`` follow,
        :attr:`logits_per` is the later batch's (``other``'s on a tie) and
        :attr:`unfit_shapes` the earlier batch's (``self``'s on a tie or when not told), as
        one process running every batch in order keeps them."""
        later = (other if other.batches and (not self.batches or other.logits_per_batch
                                             >= self.logits_per_batch) else self)
        first = (other if other.unfit_shapes is not None
                 and (self.unfit_shapes is None or 0 <= other.unfit_batch < self.unfit_batch)
                 else self)
        return LogitsState(
            self.tokens + other.tokens, self.targets + other.targets,
            self.kl_sum + other.kl_sum, self.top1_agree + other.top1_agree,
            self.nll_float + other.nll_float, self.nll_quant + other.nll_quant,
            torch.cat([self.token_kls, other.token_kls]), self.batches + other.batches,
            later.logits_per, later.logits_per_batch,
            self.unfit_masks + other.unfit_masks, first.unfit_shapes, first.unfit_batch,
            self.labelled + other.labelled, self.unplaced + other.unplaced,
        )


FrameMask = Callable[[int, torch.Tensor], torch.Tensor]
"""Called as ``frame_mask(frames, attention_mask)``: a model's mask of its ``frames`` output
positions from the mask of its input (Wav2Vec2's ``_get_feature_vector_attention_mask``)."""


@dataclass(frozen=True)
class LogitsReader:
    """How a model's logits line up with the fields of its batches: what
    :meth:`LogitsAccumulator.update_batch` reads them by (made by :func:`logits_reader`)."""

    vocab_size: int | None = None
    """The vocabulary :func:`looks_like_logits` compares a tensor's last dim with."""
    next_token: bool | None = None
    """Whether position ``t`` predicts token ``t + 1`` (:func:`predicts_next_token`): True
    makes the batch's labels or input ids a perplexity's targets, None its labels only."""
    encoder_decoder: bool = False
    """Whether the logits are an encoder-decoder's decoder's (:func:`is_encoder_decoder`),
    read against the batch's decoder inputs."""
    frame_mask: FrameMask | None = field(default=None, repr=False, compare=False)
    """The model's mask of its output frames, for a model whose output positions are not its
    input's (a speech model's frames from its audio samples); see :func:`logits_reader`."""


def logits_reader(model: Any, *others: Any) -> LogitsReader:
    """How ``model``'s logits line up with its batches; what ``model`` does not tell is asked
    of ``others`` (the other side of the pair) in turn.

    The frame mask is the ``_get_feature_vector_attention_mask`` of the first module that has
    one (Hugging Face's speech models with a feature extractor: Wav2Vec2, HuBERT, WavLM,
    Data2VecAudio, ...), a model of your own wrapping one included.
    """
    return LogitsReader(vocab_size(model), predicts_next_token(model, *others),
                        is_encoder_decoder(model, *others), _frame_mask(model, *others))


def _frame_mask(*candidates: Any) -> FrameMask | None:
    for candidate in candidates:
        if not isinstance(candidate, torch.nn.Module):
            continue
        for module in candidate.modules():
            frame_mask = getattr(module, "_get_feature_vector_attention_mask", None)
            if callable(frame_mask):
                return frame_mask
    return None


class LogitsAccumulator:
    """Streaming next-token metrics of a quantized model's logits against the float model's.

    Call :meth:`update` once per batch and :meth:`values` at any time; memory stays a few
    scalars plus one float32 per real token (for ``kl_p99``).

    Example:

        >>> acc = LogitsAccumulator()
        >>> f = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
        >>> acc.update(f, f.flip(-1), attention_mask=torch.tensor([[1, 0]]))
        >>> v = acc.values()
        >>> round(v["kl"], 4), v["top1_agreement"], acc.tokens
        (1.361, 0.0, 1)
    """

    def __init__(self) -> None:
        self.tokens = 0
        """Real tokens seen (where ``attention_mask`` is 1)."""
        self.targets = 0
        """Tokens with a next-token target (the perplexity's count)."""
        self.kl_sum = 0.0
        self.top1_agree: float = 0  # nan once a token's logits held NaN (see _chunk)
        self.nll_float = 0.0
        self.nll_quant = 0.0
        self._token_kls: list[torch.Tensor] = []
        self.batches = 0
        """Model batches added by :meth:`update_batch`, real tokens or not."""
        self.logits_per = "token"
        """What a row of the logits predicts: ``"token"``, or ``"sample"`` for ``(batch, n)``
        logits (a sequence or image classifier's), whose KL is one per sample; the last
        batch's (:meth:`update_batch`)."""
        self.logits_per_batch = -1
        self.unfit_masks = 0
        """Batches whose ``attention_mask`` holds padding and does not fit the logits'
        positions, with no mask of the model's own for them (:meth:`update_batch`): every
        position of their logits was read, padding included."""
        self.unfit_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        """The first such batch's mask shape and the logits' leading dims."""
        self.unfit_batch = -1  # that batch's index (update_batch(index)), for a merge
        self.labelled = 0
        """Batches that came with targets (``labels``, or ``input_ids`` read as next tokens):
        with none of their real tokens scored (labels all -100, sequences of one token),
        :attr:`targets` stays 0 and there is no perplexity."""
        self.unplaced = 0
        """Batches whose targets could not be lined up with their logits' positions (labels
        of another length, a ``logits_to_keep`` of scattered indices): with any, :meth:`values`
        gives no perplexity, which would read the other batches' tokens only."""

    def update(self, float_logits: torch.Tensor | LinearRows, quant_logits: torch.Tensor,
               attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
               input_ids: torch.Tensor | None = None, *, shift: bool = True) -> None:
        """Add one batch.

        Args:
            float_logits, quant_logits: ``(..., vocab)``, typically ``(batch, seq, vocab)``,
                any floating dtype; position ``t`` predicts token ``t + 1``. The float logits
                may be held as rows of an ``lm_head`` (:class:`~fxnumeric.rows.LinearRows`),
                computed a chunk at a time.
            attention_mask: ``logits.shape[:-1]``, 1 for real tokens; default all real.
            labels: ``logits.shape[:-1]`` token ids in the Hugging Face convention (aligned
                with the inputs, shifted here: position ``t`` is scored on ``labels[t+1]``),
                ``-100`` for no target. Enables ``ppl_float`` / ``ppl_quantized``.
            input_ids: used as ``labels`` when ``labels`` is not given.
            shift: False for ``labels`` already aligned with the logits (position ``t`` scored
                on ``labels[t]``): an encoder-decoder's labels, from which the model makes
                its ``decoder_input_ids`` by shifting them right.
        """
        f, q = _as_logits(float_logits, "float"), _as_logits(quant_logits, "quantized")
        if f.shape != q.shape:
            raise InputError(
                f"float logits {tuple(f.shape)} and quantized logits {tuple(q.shape)} differ in "
                "shape: the two models must see the same batch and share the vocabulary"
            )
        lead, vocab = f.shape[:-1], f.shape[-1]
        mask = _mask(attention_mask, lead, f.device)
        self.labelled += labels is not None or input_ids is not None
        targets = _targets(labels if labels is not None else input_ids, mask, lead, vocab,
                           shift=shift or labels is None)
        rows = mask.reshape(-1).nonzero().squeeze(1)  # real tokens only, as flat row indices
        q2 = q.reshape(-1, vocab)
        flat_targets = targets.reshape(-1)[rows] if targets is not None else None
        step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
        # logits held as rows (LinearRows) are computed a block of chunks at a time
        f_chunks = f.chunks(rows, step) if isinstance(f, LinearRows) else None
        f2 = f.reshape(-1, vocab) if f_chunks is None else None
        shape = (min(step, rows.numel()), vocab)
        buffers = (torch.empty(shape, dtype=torch.float64, device=f.device),
                   torch.empty(shape, dtype=torch.float64, device=f.device),
                   torch.empty(shape, dtype=torch.float64, device=f.device))
        kls, agree, targets_seen, nll_float, nll_quant = [], 0, 0, 0.0, 0.0
        with torch.no_grad():
            for start in range(0, rows.numel(), step):
                chunk_targets = None
                if flat_targets is not None:
                    chunk_targets = flat_targets[start:start + step]
                idx = rows[start:start + step]
                fc = next(f_chunks) if f_chunks is not None else _rows(f2, idx)
                qc = _rows(q2, idx)
                kl, chunk_agree, nll = _chunk(fc, qc, chunk_targets, buffers)
                kls.append(kl)
                agree += chunk_agree
                if nll is not None:
                    targets_seen += nll[0]
                    nll_float += nll[1]
                    nll_quant += nll[2]
        # the batch counts whole or not at all
        if kls:
            batch_kls = torch.cat(kls)
            # 4 bytes a token, for the p99; on the CPU, where states merge (LogitsState)
            self._token_kls.append(batch_kls.float().cpu())
            self.kl_sum += float(batch_kls.sum())
        self.tokens += rows.numel()
        self.top1_agree += agree
        self.targets += targets_seen
        self.nll_float += nll_float
        self.nll_quant += nll_quant

    def update_batch(self, float_logits: torch.Tensor, quant_logits: torch.Tensor, batch: Any,
                     reader: LogitsReader | None = None, index: int = -1) -> None:
        """Add the logits of one model batch (``index`` in the data: a merge keeps the later
        batch's :attr:`logits_per`), with the mask and targets ``batch`` holds
        (:func:`token_fields`) where they fit the logits; ``reader`` (:func:`logits_reader`)
        says what the model's logits are.

        * ``attention_mask`` counts where it is one per logit row (:func:`_fitted_mask`): its
          shape is the logits' leading dims; or the batch asks for the logits of the last
          positions only (``logits_to_keep`` / ``num_logits_to_keep``), or a causal LM returned
          fewer positions than it read (its last ones); or the model makes a mask of its output
          frames from it (``reader.frame_mask``, a speech model's). A sequence classifier's
          ``(batch, labels)`` logits are one prediction per row, every row real. Another mask
          is not used, and when it holds padding the batch is counted in
          :attr:`unfit_masks`: its KL and top-1 read every position.
        * Next-token targets (``labels``, else ``input_ids``) only for a model known to
          predict the next token: ``reader.next_token`` (:func:`predicts_next_token`) True. A
          masked LM's or a token classifier's labels are not next tokens and give no
          perplexity (False). A model of unknown kind (None) is scored on the ``labels`` the
          batch holds, read as a causal LM's (the user said what the targets are), when they
          are token ids of the logits' vocabulary; its ``input_ids`` are never made targets,
          since for a masked LM or a token classifier they are no next tokens. Targets of
          another shape than the logits' leading dims give no perplexity either, nor do
          logits without a sequence dim (one row per sample): there is no next position.
        * ``reader.encoder_decoder`` (:func:`is_encoder_decoder`): the logits are the
          decoder's, read against the decoder's side of a dict batch (:func:`_decoder_fields`);
          a tuple batch gives no mask and no targets (its positions differ from model to model).
        """
        reader = reader if reader is not None else LogitsReader()
        lead = tuple(float_logits.shape[:-1])
        next_token = reader.next_token
        if reader.encoder_decoder:
            mask, targets, shift = _decoder_fields(batch, lead)
        else:
            fields = token_fields(batch)
            mask, shift = fields.get("attention_mask"), True
            targets = fields.get("labels")
            if next_token:
                targets = fields.get("labels", fields.get("input_ids"))
            elif (next_token is None and targets is not None
                  and not _token_ids(targets, float_logits.shape[-1])):
                targets = None  # unknown kind: labels that are no token ids are no next tokens
        fitted = _fitted_mask(mask, lead, batch, reader)
        if _unfit(fitted, mask, lead):
            self.unfit_masks += 1  # padding that cannot be placed: say so, never guess
            if self.unfit_shapes is None:
                self.unfit_shapes, self.unfit_batch = (tuple(mask.shape), lead), index
        if targets is not None and len(lead) > 1 and tuple(targets.shape) != lead:
            placed = _kept_targets(batch, targets, lead, reader)  # the logits' positions'
            self.unplaced += placed is None and next_token is not False
            targets = placed
        if next_token is False or len(lead) < 2:
            targets = None  # not next tokens, or no sequence: no ppl
        self.update(float_logits, quant_logits, attention_mask=fitted, labels=targets,
                    shift=shift)
        self.batches += 1
        self.logits_per = "sample" if float_logits.dim() == 2 else "token"
        self.logits_per_batch = index

    def merge(self, other: LogitsAccumulator) -> None:
        """Add ``other``'s tokens to this one (for accumulators filled in separate processes)."""
        self.load(self.state().merged(other.state()))

    def state(self) -> LogitsState:
        """The sums and token KLs so far, as a picklable :class:`LogitsState`."""
        return LogitsState(self.tokens, self.targets, self.kl_sum, self.top1_agree,
                           self.nll_float, self.nll_quant, self.token_kls(), self.batches,
                           self.logits_per, self.logits_per_batch, self.unfit_masks,
                           self.unfit_shapes, self.unfit_batch, self.labelled, self.unplaced)

    def load(self, state: LogitsState) -> None:
        """Replace everything seen so far with ``state`` (:meth:`LogitsState.merged` of
        several processes' states, typically)."""
        self.tokens, self.targets = state.tokens, state.targets
        self.kl_sum, self.top1_agree = state.kl_sum, state.top1_agree
        self.nll_float, self.nll_quant = state.nll_float, state.nll_quant
        self._token_kls = [state.token_kls.float()] if state.token_kls.numel() else []
        self.batches, self.logits_per = state.batches, state.logits_per
        self.logits_per_batch = state.logits_per_batch
        self.unfit_masks, self.unfit_shapes = state.unfit_masks, state.unfit_shapes
        self.unfit_batch, self.labelled = state.unfit_batch, state.labelled
        self.unplaced = state.unplaced

    def token_kls(self) -> torch.Tensor:
        """Every real token's KL so far, float32, in the order seen."""
        if len(self._token_kls) > 1:
            self._token_kls = [torch.cat(self._token_kls)]
        return self._token_kls[0] if self._token_kls else torch.zeros(0)

    def values(self) -> dict[str, float]:
        """The metrics over every real token so far (``nan`` before any); ``ppl_float`` and
        ``ppl_quantized`` only once some token had a target, and every batch's targets
        could be lined up with its logits (:attr:`unplaced`)."""
        if self.tokens == 0:
            out = {name: math.nan for name in LLM_METRICS[:4]}
        else:
            kls = self.token_kls()
            out = {
                "kl": self.kl_sum / self.tokens,
                "kl_p99": _quantile(kls, 0.99),
                "kl_max": float(kls.max()),
                "top1_agreement": self.top1_agree / self.tokens,
            }
        if self.targets and not self.unplaced:
            out["ppl_float"] = _exp(self.nll_float / self.targets)
            out["ppl_quantized"] = _exp(self.nll_quant / self.targets)
        return out


def _rows(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of ``(rows, vocab)`` ``logits``: a view when they are consecutive
    (no padding in the chunk), else a copy, in the logits' dtype. Never written to."""
    return logits[row_pick(idx)]


def _chunk(f_rows: torch.Tensor, q_rows: torch.Tensor, targets: torch.Tensor | None,
           buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
           ) -> tuple[torch.Tensor, float, tuple[int, float, float] | None]:
    """Per-token KL (float64), argmax agreements and ``(targets, nll_float, nll_quant)`` of one
    chunk of rows of logits (any floating dtype, read only), computed in ``buffers``: three
    float64 tensors of at least as many rows, written over (reused from chunk to chunk: fresh
    ones cost page faults that took longer than the arithmetic).

    Each side's log-softmax up to its log-sum, ``l = x - max x``, is exact in float64 (the
    difference of two float32 or bf16 values), and ``KL(p || q) = sum_i e^lf_i (lf_i - lq_i)
    / S_f - log S_f + log S_q`` with ``S = sum e^l``: every rounding is float64's, relative
    1e-16 of terms of the order of the logits' range. Against a float64 log-softmax oracle
    (49152-word vocabulary, logits of scale 5, quantized ones 1e-3 off and offset by 0 to
    1000, a KL of 4e-7 nats): at most 6e-14 nats off per token, the same with any offset.
    The float32 arithmetic used before was 1.3e-8 off per token, and with an offset of 1000
    added ``ulp(1000)`` to every logit difference: 2.4e-5 off, the mean KL 12 times too
    big. Rows that come out NaN (``0 * inf`` from -inf logits, or NaN logits) are recomputed
    from log-softmaxes with ``0 log 0 = 0``.
    """
    lf, lq, e = (b[:f_rows.shape[0]] for b in buffers)
    lf.copy_(f_rows)
    lq.copy_(q_rows)
    m_f, top_f = lf.max(-1)
    m_q, top_q = lq.max(-1)
    # a row holding NaN has no top token (max picks the NaN): its agreement is NaN, as its KL
    # is, and poisons the sum alike, not a disagreement counted as a number
    agree = (math.nan if bool((m_f.isnan() | m_q.isnan()).any())
             else int((top_f == top_q).sum()))
    lf.sub_(m_f.unsqueeze(1))
    lq.sub_(m_q.unsqueeze(1))
    log_s_q = torch.exp(lq, out=e).sum(-1).log()
    s_f = torch.exp(lf, out=e).sum(-1)
    log_s_f = s_f.log()
    nll = None
    if targets is not None:
        has = targets != IGNORE_INDEX
        tc = targets.clamp(min=0).unsqueeze(1)  # gather every row, drop the non-targets after
        log_p = (lf.gather(1, tc).squeeze(1) - log_s_f)[has]
        log_q = (lq.gather(1, tc).squeeze(1) - log_s_q)[has]
        nll = (int(has.sum()), -float(log_p.sum()), -float(log_q.sum()))
    kl = torch.linalg.vecdot(e, lf.sub_(lq)) / s_f - log_s_f + log_s_q
    far = torch.isnan(kl)
    if bool(far.any()):
        kl[far] = _far_kl(f_rows[far].double(), q_rows[far].double())
    # KL >= 0: two nearly equal rows can round to -1e-16, which summed over tokens gave a
    # hybrid a negative mean KL (NaN stays NaN)
    kl.clamp_(min=0.0)
    return kl, agree, nll


def _far_kl(fc: torch.Tensor, qc: torch.Tensor) -> torch.Tensor:
    """KL of rows with -inf or NaN logits: sum of ``p (log p - log q)`` with ``0 log 0 = 0``
    (a token both models mask with -inf adds nothing); NaN logits stay NaN."""
    p = torch.softmax(fc, -1)
    terms = p * (torch.log_softmax(fc, -1) - torch.log_softmax(qc, -1))
    return torch.where(p == 0, 0.0, terms).sum(-1)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _quantile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolated quantile, as ``torch.quantile`` (which refuses over 16M values),
    except between two equal values: the value, where ``inf + (inf - inf) * w`` read NaN for
    two tokens of infinite KL at the top."""
    ordered = values.double().sort().values
    pos = q * (ordered.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, ordered.numel() - 1)
    low, high = float(ordered[lo]), float(ordered[hi])
    if low == high:
        return low
    return low + (high - low) * (pos - lo)


def _as_logits(x: Any, which: str) -> torch.Tensor | LinearRows:
    if isinstance(x, LinearRows):  # a large lm_head's float logits, computed when read
        return x
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else ""
        raise InputError(f"the {which} logits must be a floating tensor (..., vocab), got "
                         f"{type(x).__name__}{shape}")
    return x.detach()


def _mask(attention_mask: torch.Tensor | None, lead: torch.Size,
          device: torch.device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(lead, dtype=torch.bool, device=device)
    if tuple(attention_mask.shape) != tuple(lead):
        raise InputError(f"attention_mask {tuple(attention_mask.shape)} does not match the "
                         f"logits' leading dims {tuple(lead)}")
    return real_tokens(attention_mask.detach().to(device)) != 0


def real_tokens(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as 1 (or ``True``) for real tokens: an additive float mask (negative values,
    or only zeros: a batch without padding), whose zeros are the real tokens, as a boolean
    mask; any other mask (a sparse tensor read as one: a tuple batch's second input) as it is.

    Example:
        >>> real_tokens(torch.tensor([[0.0, 0.0, -1e4]])), real_tokens(torch.tensor([[1, 0]]))
        (tensor([[ True,  True, False]]), tensor([[1, 0]]))
    """
    if (mask.is_floating_point() and mask.layout == torch.strided and mask.numel()
            and (bool((mask < 0).any()) or not bool(mask.any()))):
        return mask == 0
    return mask


def _fitted_mask(mask: torch.Tensor | None, lead: tuple[int, ...], batch: Any,
                 reader: LogitsReader) -> torch.Tensor | None:
    """``mask`` (the batch's ``attention_mask``) as one value per logit row, or ``None``
    when it is not known to be one (see :meth:`LogitsAccumulator.update_batch`).

    A longer mask is cut to the logits' positions only when it is known where they sit: the
    batch's ``logits_to_keep`` (an int, the last positions; a 1-D tensor, their indices),
    else the model's own frame mask (``reader.frame_mask``), else a causal LM's last
    positions. The last positions of a speech model's mask of its audio samples are no
    frames: a right-padded utterance read as all padding there.
    """
    if mask is None or tuple(mask.shape) == lead:
        return mask
    if len(lead) < 2 or mask.dim() != len(lead) or tuple(mask.shape[:-1]) != lead[:-1]:
        return None  # one prediction per row (a classifier's), or no mask of these logits
    kept = _logits_to_keep(batch, mask, lead[-1])
    if kept is not None:
        return kept
    if reader.frame_mask is not None and not reader.encoder_decoder:
        try:
            frames = reader.frame_mask(lead[-1], mask)
        except (RuntimeError, TypeError, ValueError, IndexError):
            frames = None  # not a mask the model can read: the mask is not used
        if isinstance(frames, torch.Tensor) and tuple(frames.shape) == lead:
            return frames
    if reader.next_token and mask.shape[-1] > lead[-1]:
        return mask[..., -lead[-1]:]  # a causal LM's logits of its last positions
    return None


def _kept_targets(batch: Any, targets: torch.Tensor, lead: tuple[int, ...],
                  reader: LogitsReader) -> torch.Tensor | None:
    """``targets`` (one per input position) cut to the positions of the logits, as
    :func:`_fitted_mask` cuts the mask: the batch's ``logits_to_keep``, where its positions
    run in a row (position ``t`` is scored on the target after it, which a scattered index's
    next kept position is not), else a causal LM's last positions; ``None`` when they cannot
    be lined up."""
    if targets.dim() != len(lead) or tuple(targets.shape[:-1]) != lead[:-1]:
        return None
    kept = _logits_to_keep(batch, targets, lead[-1])
    if kept is not None:
        keep = batch.get("logits_to_keep", batch.get("num_logits_to_keep"))
        scattered = (isinstance(keep, torch.Tensor) and keep.dim() == 1
                     and not bool((keep.diff() == 1).all()))
        return None if scattered else kept
    if reader.next_token and targets.shape[-1] > lead[-1]:
        return targets[..., -lead[-1]:]  # a causal LM's logits of its last positions
    return None


def _unfit(fitted: torch.Tensor | None, mask: torch.Tensor | None,
           lead: tuple[int, ...]) -> bool:
    """Whether ``mask`` holds padding that could not be placed on rows ``lead`` (``fitted``
    is ``None``): outputs with a sequence dim only, a classifier's rows have no positions."""
    return fitted is None and mask is not None and len(lead) > 1 and bool((mask == 0).any())


def output_mask(output: torch.Tensor, batch: Any, reader: LogitsReader
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(real, unfit)`` for a model output, hidden states or logits, that compare's
    model-output metrics and the built-in end metrics of sensitivity and advise read:
    ``real``, a boolean mask of its rows (its leading dims but the last) that are real
    tokens, by the rule :meth:`LogitsAccumulator.update_batch` reads a batch's
    ``attention_mask`` with (:func:`_fitted_mask`; an encoder-decoder's output is its
    decoder's: :func:`_decoder_fields`), or ``None`` when the batch has no mask or it does
    not fit; ``unfit``, the batch's mask when it holds padding and does not fit.

    A tuple batch's second item is read as a mask only after integer ``input_ids``: a model
    of your own taking two float tensors is given no mask.

    Example:
        >>> hidden = torch.zeros(2, 3, 4)
        >>> real, unfit = output_mask(hidden, {"attention_mask": torch.tensor([[1, 1, 0],
        ...                                    [1, 1, 1]])}, LogitsReader())
        >>> real.tolist(), unfit
        ([[True, True, False], [True, True, True]], None)
    """
    lead = tuple(output.shape[:-1])
    if reader.encoder_decoder:
        mask = _decoder_fields(batch, lead)[0]
    else:
        fields = token_fields(batch)
        tokens = isinstance(batch, Mapping) or "input_ids" in fields
        mask = fields.get("attention_mask") if tokens else None
    fitted = _fitted_mask(mask, lead, batch, reader)
    if fitted is None:
        return None, (mask if _unfit(fitted, mask, lead) else None)
    return real_tokens(fitted.detach()).to(output.device) != 0, None


def _logits_to_keep(batch: Any, mask: torch.Tensor, positions: int) -> torch.Tensor | None:
    """The columns of ``mask`` the batch's ``logits_to_keep`` (``num_logits_to_keep``, its
    name before transformers 4.50) kept: the last ``k`` for an int ``k``, the indices of a
    1-D tensor; ``None`` when the batch has none or it does not give ``positions`` columns."""
    if not isinstance(batch, Mapping):
        return None
    keep = batch.get("logits_to_keep", batch.get("num_logits_to_keep"))
    if isinstance(keep, torch.Tensor) and keep.dim() == 0:
        keep = int(keep)
    if isinstance(keep, int) and not isinstance(keep, bool) and 0 < keep == positions:
        return mask[..., -keep:]
    if (isinstance(keep, torch.Tensor) and keep.dim() == 1 and keep.numel() == positions
            and _is_integer(keep)):
        return mask[..., keep.to(mask.device)]
    return None


def _targets(labels: torch.Tensor | None, mask: torch.Tensor, lead: torch.Size,
             vocab: int, shift: bool = True) -> torch.Tensor | None:
    """Position ``t``'s target: ``labels[t + 1]`` if both tokens are real (``labels[t]`` if
    it is real, with ``shift=False``), else IGNORE_INDEX."""
    if labels is None:
        return None
    if tuple(labels.shape) != tuple(lead) or len(lead) < 1:
        raise InputError(f"labels/input_ids {tuple(labels.shape)} do not match the logits' "
                         f"leading dims {tuple(lead)}")
    targets = torch.full(lead, IGNORE_INDEX, dtype=torch.long, device=mask.device)
    if not shift:
        aligned = labels.to(mask.device, torch.long)
        keep = mask & (aligned != IGNORE_INDEX)
        targets = torch.where(keep, aligned, targets)
    else:
        nxt = labels[..., 1:].to(mask.device, torch.long)
        keep = mask[..., 1:] & mask[..., :-1] & (nxt != IGNORE_INDEX)
        targets[..., :-1] = torch.where(keep, nxt, torch.full_like(nxt, IGNORE_INDEX))
    if not _token_ids(targets, vocab):
        scored = targets[targets != IGNORE_INDEX]
        raise InputError(f"labels/input_ids hold token ids outside the vocabulary [0, {vocab}) "
                         f"(min {int(scored.min())}, max {int(scored.max())}); use -100 for "
                         "positions that have no target")
    return targets


def _token_ids(labels: torch.Tensor, vocab: int) -> bool:
    """Whether every label is a token id of a ``vocab``-word vocabulary or ``IGNORE_INDEX``."""
    scored = labels[labels != IGNORE_INDEX]
    return not scored.numel() or (int(scored.min()) >= 0 and int(scored.max()) < vocab)


def vocab_size(model: Any) -> int | None:
    """A language model's vocabulary size (``model.config.vocab_size``), if it says: what
    :func:`looks_like_logits` compares a tensor's last dim with."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def predicts_next_token(model: Any, *others: Any) -> bool | None:
    """Whether ``model``'s logits at position ``t`` predict token ``t + 1``: a Hugging Face
    model says so by ``can_generate()`` (True for ``...ForCausalLM``, False for masked LMs and
    classifiers), and so does a model of your own that defines it; a graph torch.export made
    (an ``ExportedProgram``, its ``.module()``, a ``prepare_pt2e`` / ``convert_pt2e`` model)
    by the class it was traced from (:func:`fxnumeric.flows.traced_type`). ``None`` when
    nothing tells: then ``others`` (the other side of the pair) are asked in turn.

    >>> class Decoder(torch.nn.Module):
    ...     def can_generate(self):
    ...         return True
    >>> predicts_next_token(torch.nn.Linear(2, 2)), predicts_next_token(Decoder())
    (None, True)
    >>> predicts_next_token(torch.nn.Linear(2, 2), Decoder())
    True
    """
    for candidate in (model, *others):
        for source in (candidate, flows.traced_type(candidate)):
            can_generate = getattr(source, "can_generate", None)
            if not callable(can_generate):
                continue
            try:
                return bool(can_generate())
            except TypeError:  # a can_generate of another signature: not transformers'
                continue
    return None


def _decoder_fields(batch: Any, lead: tuple[int, ...]
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """``(mask, targets, shift)`` of an encoder-decoder's dict batch, whose logits (leading
    dims ``lead``) are its decoder's.

    Targets: the ``labels`` as they are (the model shifts them right into its decoder
    inputs), else the next ``decoder_input_ids``, else ``input_ids`` as they are when they fit
    the logits (BART makes its decoder inputs from them so). Real tokens: the
    ``decoder_attention_mask``, else the labels that are not ``-100`` (a seq2seq collator's
    padding), else, for decoder inputs made from ``input_ids``, the ``attention_mask``.
    """
    if not isinstance(batch, Mapping):
        return None, None, True

    def tensor(name: str) -> torch.Tensor | None:
        value = batch.get(name)
        return value if isinstance(value, torch.Tensor) else None

    labels, decoder_ids = tensor("labels"), tensor("decoder_input_ids")
    input_ids, decoder_mask = tensor("input_ids"), tensor("decoder_attention_mask")
    from_input_ids = (labels is None and decoder_ids is None and input_ids is not None
                      and tuple(input_ids.shape) == tuple(lead))
    if labels is not None:
        targets, shift = labels, False
    elif decoder_ids is not None:
        targets, shift = decoder_ids, True
    else:
        targets, shift = (input_ids, False) if from_input_ids else (None, True)
    if decoder_mask is not None:
        mask = decoder_mask
    elif labels is not None:
        mask = labels != IGNORE_INDEX
    else:
        mask = tensor("attention_mask") if from_input_ids else None
    return (None if mask is None else real_tokens(mask)), targets, shift


def is_encoder_decoder(model: Any, *others: Any) -> bool:
    """Whether ``model`` (or one of ``others``, the other side of the pair) is a Hugging Face
    encoder-decoder (T5, BART, Whisper: ``config.is_encoder_decoder``), whose logits are its
    decoder's. A graph torch.export made, which has no ``config``, answers by the default
    config of the class it was traced from."""
    for candidate in (model, *others):
        config = getattr(candidate, "config", None)
        if config is None:
            config = _default_config(flows.traced_type(candidate))
        if getattr(config, "is_encoder_decoder", False) is True:
            return True
    return False


def _default_config(model_type: type | None) -> Any:
    """A default instance of a Hugging Face model class's ``config_class``, or ``None``."""
    config_class = getattr(model_type, "config_class", None)
    if not callable(config_class):
        return None
    try:
        return config_class()
    except (TypeError, ValueError):  # a config that needs arguments: not known
        return None


def token_fields(batch: Any) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` of a batch, those it has.

    A dict batch (as a Hugging Face tokenizer returns) gives its keys of those names; a tuple
    or list is read as positional model inputs ``(input_ids, attention_mask, ...)``; a bare
    integer tensor is ``input_ids``. Only integer tensors count.
    """
    found: dict[str, Any] = {}
    if isinstance(batch, Mapping):
        found = {k: batch.get(k) for k in ("input_ids", "attention_mask", "labels")}
    elif isinstance(batch, (tuple, list)):
        # positional inputs; a batch may hold more than these two (or only input_ids)
        found = dict(zip(("input_ids", "attention_mask"), batch[:2], strict=False))
    elif isinstance(batch, torch.Tensor):
        found = {"input_ids": batch}
    fields = {}
    for name, value in found.items():
        if not isinstance(value, torch.Tensor):
            continue
        if name == "attention_mask":  # a mask may be bool or float, and additive
            fields[name] = real_tokens(value)
        elif _is_integer(value):
            fields[name] = value
    return fields


def _is_integer(x: torch.Tensor) -> bool:
    return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def looks_like_logits(output: Any, batch: Any = None,
                      vocab_size: int | None = None) -> torch.Tensor | None:
    """The logits in a model's ``output``, or ``None`` when it does not hold logits.

    Pass the raw output (not its first element: a Hugging Face output with a loss lists
    ``loss`` first).

    * An object or dict with a tensor ``logits`` (``CausalLMOutputWithPast``) gives it.
    * A tensor (or the first element of a tuple/list, after a leading scalar loss) with
      ``vocab_size`` given (pass
      ``model.config.vocab_size`` when the model has a config): it is logits when its last
      dim equals ``vocab_size``.
    * Otherwise, a heuristic: a floating tensor ``(batch, seq, V)`` with ``V >= 1000``, whose
      ``(batch, seq)`` equal the batch's ``input_ids`` shape (see :func:`token_fields`) and
      every input id ``< V`` (ids index the vocabulary). Hidden states of a 1024-wide encoder
      fail the last test as soon as an id reaches 1024; without ``input_ids`` the answer is
      ``None``.

    Logits whose last dim is 1 (a regressor's ``.logits``, a single-logit binary classifier's)
    are not logits here (:func:`single_logit`): a softmax over one class is 1 whatever the
    value, so their KL read 0 and their top-1 agreement 1 with an output 60 dB off.
    """
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor) and logits.is_floating_point():
        return None if single_logit(logits) else logits
    output = after_loss(output)  # (loss, logits, ...): labels with return_dict=False
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.dim() < 2:
        return None
    if vocab_size is not None:
        return output if output.shape[-1] == vocab_size else None
    ids = token_fields(batch).get("input_ids") if batch is not None else None
    if (ids is None or output.dim() != 3 or output.shape[-1] < _MIN_GUESSED_VOCAB
            or tuple(ids.shape) != tuple(output.shape[:2])):
        return None
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= output.shape[-1]):
        return None
    return output


def single_logit(logits: torch.Tensor) -> bool:
    """Whether ``logits`` hold one value per position (last dim 1), which is no distribution:
    a regressor's ``.logits`` (``num_labels=1``) or a binary classifier's single score. The
    LLM metrics read a softmax over the last dim, which is 1 there whatever the value.

    >>> single_logit(torch.zeros(4, 1)), single_logit(torch.zeros(4, 5))
    (True, False)
    """
    return logits.dim() >= 1 and logits.shape[-1] == 1
