"""The objective contract (`Objective`), the Batch type, IGNORE_INDEX and the loss helpers every objective
shares.

An objective is a frozen dataclass that subclasses `Objective`; its fields are its hyper-parameters and
constructing it validates them (raise `pretrain.errors.UserError` from `__post_init__`). It says which model
arrangement it needs (`arch`), draws a corrupted batch from the token cache (`batch`, a pure function of the
generator it is given, vectorized over the whole batch), and turns a batch into per-term *sums* of losses
(`loss`). Every other member has a default here, so the smallest objective writes five things: `name`,
`arch`, `loss_terms`, `batch` and `loss` (see objectives/clm.py).

Loss averaging happens in exactly one place, the trainer: it counts each loss term's targets from the
batch field named in `loss_terms` (entries != IGNORE_INDEX), sums the counts over all micro-batches and
ranks, and divides. So 1x8 and 4x2 gradient accumulation give the same update (Hugging Face's per-micro-batch
mean is the bug this avoids).
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from models.config import Arch
from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.data import TokenSplit
    from pretrain.tokenizer import Vocab

IGNORE_INDEX = -100
"""Label value that marks a position without a target (the value PyTorch's cross_entropy and HF use)."""

Batch = dict[str, torch.Tensor]
"""A batch: HF names. `input_ids`, `attention_mask` (1 = real token), `token_type_ids`, `labels` (token
targets), `decoder_input_ids`, `decoder_attention_mask`, `next_sentence_label`. Every tensor is int64 and on
the CPU when the objective returns it; the trainer moves it to the device."""

Terms = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""What `Objective.loss` returns: metric name -> (sum, count), both 0-dim tensors. The mean is sum/count.
Loss terms (the keys of `loss_terms`) carry gradients in the sum; every other entry (accuracies, ...) is
detached and reported only."""


@dataclass(frozen=True)
class Framing:
    """How the objective frames text for its model, so `pretrain generate`/`fill-mask` feed prompts the way
    training did: encoder (or decoder-only) input = prefix + text + suffix; an encoder-decoder's decoder
    starts with `decoder_start`."""

    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    decoder_start: int | None = None


class Objective(abc.ABC):
    """The whole contract of an objective. Subclass it with a frozen dataclass and register the class in
    `objectives.OBJECTIVES`; `tests/test_objectives.py` then checks the contract for it.

    Required: the class attributes `name`, `arch`, `loss_terms` and the methods `batch` and `loss`. The
    rest are optional, with the defaults written here.
    """

    name: ClassVar[str]
    """The registry key, e.g. "clm"."""
    arch: ClassVar[Arch]
    """The model arrangement (decoder / encoder / encoder-decoder, segments, heads); may be a property when
    it depends on the hyper-parameters (BERT's NSP head)."""
    loss_terms: ClassVar[dict[str, str]]
    """Loss term name -> batch field whose non-IGNORE_INDEX entries are its targets. The first is the main
    term (what `loss`, perplexity and bits per byte report). May be a property, like `arch`."""
    default_recipe: ClassVar[str | None] = None
    """The CPU-sized recipe `pretrain run --objective NAME` starts from; None: the dataclass defaults."""
    special_pieces: ClassVar[tuple[str, ...]] = ()
    """Special pieces of this objective's own (UL2's mode tokens, say): the tokenizer appends them after the
    fixed ones; look their ids up with `vocab.special_id(piece)`. May be a property (a mixture's modes)."""
    modes: ClassVar[tuple[str, ...]] = ()
    """Mode tokens a prompt may start with (UL2's `[NLU]`, `[NLG]`, `[S2S]`), each one of `special_pieces`:
    `pretrain generate --mode` and the probe's `probe.mode` pick one (`mode_framing`). May be a property."""
    one_pass: ClassVar[bool] = True
    """True when `loss` runs the model once per batch. A mixture runs it once per component present, a number that
    differs between ranks; train.parallel = "fsdp", which gathers the sharded weights at every pass, refuses it.
    May be a property."""
    packs_examples: ClassVar[bool] = False
    """True when a row holds several examples, so a per-example field is (B, E) rather than (B,) (BERT's packed
    NSP pairs). A mixture merges its components' rows field by field and needs them to agree. May be a property."""
    scores_whole_text: ClassVar[bool] = False
    """True when the main loss term predicts every token of the text, in order (a causal LM): its bits per byte
    is then the text's compression rate, comparable with any such run whatever its tokenizer, and `pretrain
    compare` sets it beside the others; otherwise it is per byte of the hidden targets only."""

    @abc.abstractmethod
    def batch(self, split: TokenSplit, vocab: Vocab, gen: torch.Generator, batch_size: int, seq_len: int) -> Batch:
        """Draw and corrupt one batch of `batch_size` rows from `split`. Pure given `gen` (same generator
        state, same batch); vectorized tensor code, never a Python loop over tokens."""

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch, label_smoothing: float = 0.0) -> Terms:
        """Run the model as this objective needs; return (sum, count) per term (losses in nats). The count
        of each loss term must equal the targets the trainer counts in its `loss_terms` field."""

    def positions_needed(self, seq_len: int) -> int:
        """The longest sequence (encoder or decoder side) the model sees for `data.seq_len` = seq_len, so the
        trainer can check it against `model.max_len` before training starts. Default: seq_len."""
        return seq_len

    def decoder_length(self, seq_len: int) -> int:
        """Decoder positions per row of an encoder-decoder batch (what the training FLOPs count for the
        decoder side). Default: seq_len; objectives with shorter targets (T5's 114 for 512) say so."""
        return seq_len

    def raw_window(self, seq_len: int) -> int | None:
        """The fixed length of raw text window one row corrupts when it differs from seq_len (T5 reads 568
        tokens for 512 inputs), for the benchmark's raw-token figure; None (default) when there is none."""
        return None

    def framing(self, vocab: Vocab) -> Framing:
        """The special tokens around a prompt, as in this objective's training batches. Default, from the
        arrangement: a decoder's prompt follows `</s>` (the start of a document of the causal stream), an
        encoder's is bare text, an encoder-decoder's decoder starts with `<pad>` (T5's convention)."""
        if self.arch.kind == "decoder":
            return Framing(prefix=(vocab.eos,))
        return Framing(decoder_start=vocab.pad if self.arch.kind == "encoder-decoder" else None)

    def mode_framing(self, vocab: Vocab, mode: str) -> Framing:
        """The framing of a prompt in mode `mode`, one of `modes` (the callers check): the mode token first, as in
        training. Default: the objective has no modes, so asking for one is a UserError."""
        raise UserError(f"the {self.name} objective has no mode tokens, so there is no mode {mode!r}; leave --mode out")

    def special_targets(self, vocab: Vocab) -> frozenset[int]:
        """Special ids that may be targets in `labels` (T5's sentinels and `</s>`, BART's `<s>`/`</s>`); any
        other special id, `<pad>` above all, must never be one. Default: none."""
        return frozenset()

    def baseline(self, split: TokenSplit, vocab: Vocab, seq_len: int) -> dict[str, float]:
        """A reference figure the run summary prints beside ours (e.g. a unigram model's loss), fit on the
        training split; {} (default) for none."""
        return {}


def input_tokens(batch: Batch) -> int:
    """Real (non-pad) input tokens of a batch: the attention mask's sum, or every input_ids entry without one.
    What token budgets, tokens/s and the benchmark count."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def computed_positions(batch: Batch) -> tuple[int, int]:
    """(real tokens, positions) the model computes for a batch: its input's (`input_tokens` of input_ids.numel()),
    plus, for an encoder-decoder, its decoder's (the targets that are not IGNORE_INDEX, of labels.numel()). Their
    ratio is the batch's real-token density, which padding lowers and packing raises."""
    real, positions = input_tokens(batch), batch["input_ids"].numel()
    if "decoder_input_ids" in batch:
        real += int((batch["labels"] != IGNORE_INDEX).sum())
        positions += batch["labels"].numel()
    return real, positions


def make_generator(seed: int, *stream: int | str) -> torch.Generator:
    """A torch.Generator seeded from (seed, *stream), e.g. (seed, "train", step, micro_step, rank).

    Every batch is a pure function of these numbers, so the data loader keeps no hidden state, resume is
    exact and evaluation uses the same batches in every run.
    """
    key = ":".join(str(s) for s in (seed, *stream)).encode()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1))
    return g


def ce_terms(logits: torch.Tensor, labels: torch.Tensor, name: str, label_smoothing: float = 0.0) -> Terms:
    """Summed cross-entropy and accuracy over the labels that are not IGNORE_INDEX.

    logits (..., V) and labels (...) of matching leading shape. Returns {f"{name}_loss": (sum, n),
    f"{name}_acc": (correct, n)}. With label smoothing the loss term is the smoothed loss and
    f"{name}_nll" reports the plain negative log-likelihood (what perplexity and bits per byte use).
    """
    V = logits.size(-1)
    logits = logits.reshape(-1, V).float()
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    n = keep.sum()
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing)
    with torch.no_grad():
        correct = (top_hit(logits, labels.clamp(min=0)[:, None]) & keep).sum()
    out: Terms = {f"{name}_loss": (loss, n), f"{name}_acc": (correct, n)}
    if label_smoothing > 0:
        with torch.no_grad():
            nll = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        out[f"{name}_nll"] = (nll, n)
    return out


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: labels (B, T) shifted one step right behind `start_id`;
    IGNORE_INDEX entries become `pad_id`."""
    out = labels.new_full(labels.shape, pad_id)
    out[:, 0] = start_id
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == IGNORE_INDEX, pad_id)


LOGITS_PER_CHUNK = 1 << 22  # logits (rows x vocabulary) computed at once by `lm_terms`: 16 MB of fp32
WHOLE_LOGIT_GRAD_BYTES = 1 << 27  # a bf16/fp16 logit gradient up to this size is kept whole (128 MB)


def lm_terms(labels: torch.Tensor, name: str, label_smoothing: float = 0.0):
    """The output projection fused with `ce_terms`, to pass as `model(..., project=...)`: the same terms
    ({name}_loss, {name}_acc and, with label smoothing, {name}_nll) from hidden states, the output weight and
    bias, computed a chunk of rows at a time so that the (N, V) logits, their fp32 copy, the log-softmax and its
    gradient never exist whole. The gradient is computed in the forward pass, chunk by chunk, and scaled in the
    backward pass (the idea of Liger-Kernel's fused linear cross-entropy, linkedin/Liger-Kernel
    `src/liger_kernel/ops/fused_linear_cross_entropy.py`). labels (...) match the hidden states' leading shape."""

    def project(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Terms:
        flat = labels.reshape(-1)
        loss, nll, correct, n = _LinearCrossEntropy.apply(h.reshape(-1, h.size(-1)), weight, bias, flat,
                                                           label_smoothing)
        out: Terms = {f"{name}_loss": (loss, n), f"{name}_acc": (correct, n)}
        if label_smoothing > 0:
            out[f"{name}_nll"] = (nll, n)
        return out

    return project


def top_hit(z: torch.Tensor, yk: torch.Tensor) -> torch.Tensor:
    """(n,) whether each row's label logit (yk (n, 1)) is its top one, a tie counting as a hit: the accuracy test
    of `ce_terms` and of both fused chunk functions."""
    return z.gather(1, yk)[:, 0] >= z.amax(-1)


def _add_at_labels(g: torch.Tensor, yk: torch.Tensor, value: float) -> None:
    """g[i, yk[i]] += value for every row i, in place. An indexed put: torch's CPU scatter_add_ on bf16 copies
    the whole (n, V) tensor to fp32 and back (4 ms a chunk of 524 x 8000, 12% of a tiny GPT-2 step)."""
    rows = torch.arange(g.size(0), device=g.device)
    g.index_put_((rows, yk[:, 0]), torch.full((g.size(0),), value, dtype=g.dtype, device=g.device), accumulate=True)


def _chunk_fp32(z: torch.Tensor, yk: torch.Tensor, keep: torch.Tensor, smoothing: float,
                out: torch.Tensor | None = None):
    """One chunk's (smoothed) loss, NLL and hits per row, and the gradient w.r.t. its logits z (n, V), in fp32:
    one log_softmax pass (max-with-indices, exp, sum and divide apart cost twice as much on CPU). `out` is
    not used (the gradient is fp32 here; the caller converts it)."""
    z = z.float()
    hit = top_hit(z, yk)
    lp = torch.log_softmax(z, -1)
    del z
    nll = (-lp.gather(1, yk)[:, 0]).masked_fill_(~keep, 0)
    loss = nll * (1 - smoothing) - lp.mean(-1).masked_fill_(~keep, 0) * smoothing if smoothing else nll
    g = lp.exp_()  # the softmax, in place of the log-probabilities
    if smoothing:
        g -= smoothing / g.size(1)
    _add_at_labels(g, yk, smoothing - 1.0)
    return loss, nll, hit, g


def _chunk_bf16(z: torch.Tensor, yk: torch.Tensor, keep: torch.Tensor, smoothing: float,
                out: torch.Tensor | None = None):
    """`_chunk_fp32` for bf16 logits on CPU without an fp32 copy of them: the softmax (fp32 inside) writes bf16
    probabilities, which are the gradient's precision anyway (it enters the bf16 matmuls), and the NLL is
    -log p[label] in fp32 from them (within 0.004 nats of the fp32 figure; bf16 keeps fp32's exponent range, and
    a label probability that still underflows is recomputed in fp32). 6% of a tiny GPT-2 step here. The
    gradient is written into `out` when given (the caller's whole logit gradient: no copy of each chunk)."""
    g = torch.softmax(z, -1, out=out)  # (n, V) bf16
    hit, zy = top_hit(z, yk), z.gather(1, yk)[:, 0].float()
    logp = g.gather(1, yk)[:, 0].float().log()
    lost = torch.isinf(logp) & keep
    if bool(lost.any()):  # a label more than ~87 nats below the top: its probability is 0 in bf16 too
        logp[lost] = zy[lost] - torch.logsumexp(z[lost].float(), -1)
    nll = (-logp).masked_fill_(~keep, 0)
    loss = nll
    if smoothing:  # the smoothed term's mean log-probability: mean(z) - lse, lse = z[label] - log p[label]
        mean_lp = z.mean(-1, dtype=torch.float32) - (zy - logp)
        loss = nll * (1 - smoothing) - mean_lp.masked_fill_(~keep, 0) * smoothing
        g -= smoothing / g.size(1)
    _add_at_labels(g, yk, smoothing - 1.0)
    return loss, nll, hit, g


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed (label-smoothed) cross-entropy of softmax(h W^T + b) against labels, with accuracy and the plain
    NLL, chunk by chunk; the gradients w.r.t. h, W and b are accumulated in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, smoothing):  # noqa: D102 (autograd's own signature)
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        x_all, w = h.to(dtype), weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        N, V = x_all.size(0), w.size(0)
        grad_h = torch.empty_like(x_all)
        # Low precision: the logit gradient kept whole when it fits, so that W's gradient is one matmul and one
        # fp32 conversion instead of a conversion and an add per chunk; fp32 accumulates W's in place (addmm_).
        g_all = torch.empty(N, V, dtype=dtype, device=h.device) if (
            dtype != torch.float32 and N * V * x_all.element_size() <= WHOLE_LOGIT_GRAD_BYTES) else None
        grad_w = None if g_all is not None else torch.zeros(w.shape, dtype=torch.float32, device=h.device)
        grad_b = torch.zeros(V, dtype=torch.float32, device=h.device) if bias is not None else None
        sums = torch.zeros(3, dtype=torch.float64, device=h.device)  # loss, nll, correct
        rows = max(1, LOGITS_PER_CHUNK // V)
        chunk_terms = _chunk_bf16 if dtype == torch.bfloat16 and dev == "cpu" else _chunk_fp32
        for i in range(0, N, rows):
            x, y = x_all[i:i + rows], labels[i:i + rows]
            keep = y != IGNORE_INDEX
            yk = y.clamp(min=0)[:, None]
            into = g_all[i:i + rows] if g_all is not None else None
            loss, nll, hit, g = chunk_terms(F.linear(x, w, b), yk, keep, smoothing, into)  # logits (n, V) in dtype
            sums += torch.stack([loss.sum(), nll.sum(), (hit & keep).sum()]).double()
            if dev != "cpu":  # an ignored row has no gradient (no host sync on an accelerator)
                g.mul_(keep[:, None])
            elif not bool(keep.all()):
                g.index_fill_(0, (~keep).nonzero()[:, 0], 0.0)
            if grad_b is not None:
                grad_b += g.sum(0)
            g = g.to(dtype)
            if g_all is not None:
                if g is not into:  # the bf16 chunk wrote into it already
                    into.copy_(g)
                continue
            grad_h[i:i + rows] = g @ w
            if dtype == torch.float32:
                grad_w.addmm_(g.t(), x)
            else:
                grad_w += (g.t() @ x).float()
        if g_all is not None:
            torch.mm(g_all, w, out=grad_h)
            grad_w = (g_all.t() @ x_all).float()
            del g_all
        ctx.save_for_backward(grad_h, grad_w, grad_b if grad_b is not None else torch.empty(0))
        ctx.has_bias, ctx.dtypes = bias is not None, (h.dtype, weight.dtype)
        n = (labels != IGNORE_INDEX).sum()
        loss, nll, correct = sums.float().unbind()
        ctx.mark_non_differentiable(nll, correct, n)
        return loss, nll, correct, n

    @staticmethod
    def backward(ctx, g_loss, *_):  # noqa: D102
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return ((grad_h * g_loss).to(h_dtype), (grad_w * g_loss).to(w_dtype),
                (grad_b * g_loss).to(w_dtype) if ctx.has_bias else None, None, None)
