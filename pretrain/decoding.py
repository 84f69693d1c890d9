"""Decoding algorithms: greedy, ancestral sampling (temperature, top-k, nucleus) and beam search.

- Ancestral sampling with temperature; top-k (Fan et al. 2018, "Hierarchical Neural Story Generation");
  nucleus / top-p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration").
- Beam search with GNMT's length penalty lp(n) = ((5 + n) / 6)^alpha, hypotheses ranked by
  log p(y) / lp(|y|) (Wu et al. 2016, "Google's Neural Machine Translation System", §7; alpha = 0.6 as in
  Vaswani et al. 2017, §6.1).

The algorithms know nothing about models: they drive a `Stepper`, which returns the next-token logits of
every row and can drop or repeat rows (`reorder`). `CachedStepper` runs a Transformer with its KV cache
(only the new token is computed each step; an encoder-decoder's encoder output and cross-attention keys and
values are computed once); `PrefixStepper` calls any function `logits = f(prefix)` on the whole prefix each
step, which is both the no-cache reference (full recomputation) and the way to test the search with a
hand-written scorer. `benchmarks/generation.py` times the two on the tiny recipe's model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor


class Stepper(Protocol):
    """What the decoding loops drive: next-token logits of B rows, and row selection."""

    def first(self) -> Tensor:
        """Logits (B, V) of the first new token after the prompt."""
        ...

    def next(self, ids: Tensor) -> Tensor:
        """Append ids (B,) to each row; return the logits (B, V) of the token after them."""
        ...

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (B',) in that order (drop finished rows, expand or pick beams)."""
        ...


class MinLength:
    """Wrap a stepper so `eos` cannot be chosen for the first `n` new tokens: beam search on a weakly trained
    model otherwise prefers ending at once (an empty output) to any length-normalised continuation."""

    def __init__(self, inner: Stepper, eos: int, n: int) -> None:
        self.inner, self.eos, self.n, self.made = inner, eos, n, 0

    def _block(self, logits: Tensor) -> Tensor:
        if self.made < self.n:
            logits = logits.clone()
            logits[:, self.eos] = float("-inf")
        self.made += 1
        return logits

    def first(self) -> Tensor:
        return self._block(self.inner.first())

    def next(self, ids: Tensor) -> Tensor:
        return self._block(self.inner.next(ids))

    def reorder(self, index: Tensor) -> None:
        self.inner.reorder(index)


class CachedStepper:
    """A Transformer decoder with a KV cache: the prompt is run once, then one token per step.

    Decoder-only: `prompt` (B, T) left-padded with `prompt_mask` (B, T) 1 = real token, so every row's last
    position is real. Encoder-decoder: `prompt` is the decoder start token (B, 1) and `memory` (B, S, C) /
    `memory_mask` (B, S) the encoder output, used on the first call only (the cache keeps the cross k/v).
    """

    def __init__(self, model, prompt: Tensor, prompt_mask: Tensor | None = None, memory: Tensor | None = None,
                 memory_mask: Tensor | None = None):
        from models.transformer import KVCache

        self.model, self.prompt, self.prompt_mask = model, prompt, prompt_mask
        self.memory, self.memory_mask = memory, memory_mask
        self.cache = KVCache()

    def first(self) -> Tensor:
        logits = self.model.decode(self.prompt, memory=self.memory, memory_mask=self.memory_mask, cache=self.cache,
                                   attention_mask=self.prompt_mask)  # (B, T, V)
        self.memory = self.memory_mask = None  # kept as cross-attention k/v in the cache
        return logits[:, -1]

    def next(self, ids: Tensor) -> Tensor:
        return self.model.decode(ids[:, None], cache=self.cache)[:, -1]  # (B, 1, V) -> (B, V)

    def reorder(self, index: Tensor) -> None:
        self.cache.reorder(index)


class PrefixStepper:
    """Calls `fn(ids, mask, **rows) -> logits (B, V)` on the whole prefix at every step (no cache).

    ids (B, T) is the prompt followed by the tokens chosen so far, mask (B, T) its padding (or None), and
    `rows` any per-row tensors fn needs (e.g. the encoder output); all are reordered with the rows.
    """

    def __init__(self, fn: Callable[..., Tensor], ids: Tensor, mask: Tensor | None = None, **rows: Tensor | None):
        self.fn, self.ids, self.mask = fn, ids, mask
        self.rows = {k: v for k, v in rows.items() if v is not None}

    def first(self) -> Tensor:
        return self.fn(self.ids, self.mask, **self.rows)

    def next(self, ids: Tensor) -> Tensor:
        self.ids = torch.cat((self.ids, ids[:, None]), dim=1)  # (B, T + 1)
        if self.mask is not None:
            self.mask = torch.cat((self.mask, self.mask.new_ones(len(ids), 1)), dim=1)
        return self.fn(self.ids, self.mask, **self.rows)

    def reorder(self, index: Tensor) -> None:
        self.ids = self.ids.index_select(0, index)
        self.mask = self.mask.index_select(0, index) if self.mask is not None else None
        self.rows = {k: v.index_select(0, index) for k, v in self.rows.items()}


def recompute_stepper(model, prompt: Tensor, prompt_mask: Tensor | None = None, memory: Tensor | None = None,
                      memory_mask: Tensor | None = None) -> PrefixStepper:
    """The no-cache reference: the same arguments as `CachedStepper`, recomputing the whole prefix each step."""

    def fn(ids: Tensor, mask: Tensor | None, memory: Tensor | None = None, memory_mask: Tensor | None = None):
        return model.decode(ids, memory=memory, memory_mask=memory_mask, attention_mask=mask)[:, -1]

    return PrefixStepper(fn, prompt, prompt_mask, memory=memory, memory_mask=memory_mask)


# --------------------------------------------------------------------------------------------- choosing
@dataclass(frozen=True)
class Sampler:
    """How the next token is chosen from logits: argmax (greedy), or a draw from the temperature-scaled
    distribution cut to the top_k most likely tokens (0 = all) and to the smallest set whose probability
    reaches top_p (1 = all). Draws use a CPU generator, so a seed gives the same sample on every device."""

    sample: bool = False  # False = greedy
    temperature: float = 1.0  # logits are divided by it; < 1 sharpens, > 1 flattens
    top_k: int = 0  # keep the k most likely tokens (0 = no cut)
    top_p: float = 1.0  # keep the smallest set of most likely tokens with probability >= top_p

    def __call__(self, logits: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """logits (B, V) -> chosen ids (B,) int64 on the logits' device."""
        if not self.sample:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if 0 < self.top_k < logits.size(-1):
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
            p = sorted_logits.softmax(-1)
            before = p.cumsum(-1) - p  # probability of the more likely tokens
            drop = before >= self.top_p  # the most likely token always stays (before = 0)
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1).cpu()
        return torch.multinomial(probs, 1, generator=gen).squeeze(1).to(logits.device)


class Output(NamedTuple):
    """Generated ids per row (without `</s>`) and whether the row ended with `</s>` (else at the length limit)."""

    tokens: list[list[int]]
    finished: list[bool]


def generate(stepper: Stepper, batch_size: int, max_new: int | list[int], eos: int, choose: Sampler | None = None,
             gen: torch.Generator | None = None, on_token: Callable[[Tensor], None] | None = None) -> Output:
    """Greedy or sampled decoding of up to max_new tokens per row (one limit, or one per row), stopping each
    row at `eos`.

    Rows that end are dropped from the stepper, so the batch shrinks as rows end. `on_token` receives the
    ids (B,) chosen at each step while every row is alive (streaming a single prompt).
    """
    choose = choose or Sampler()
    limits = max_new if isinstance(max_new, list) else [max_new] * batch_size
    tokens: list[list[int]] = [[] for _ in range(batch_size)]
    finished = [False] * batch_size
    active = [row for row in range(batch_size) if limits[row] > 0]  # original row of each stepper row
    logits = stepper.first() if active else None  # (B, V)
    if active and len(active) < batch_size:
        index = torch.tensor(active, dtype=torch.long, device=logits.device)
        stepper.reorder(index)
        logits = logits[index]
    while active:
        ids = choose(logits, gen)  # (B',)
        if on_token is not None and len(active) == batch_size:
            on_token(ids)
        keep = []
        for j, (row, i) in enumerate(zip(active, ids.tolist(), strict=True)):
            if i == eos:
                finished[row] = True
                continue
            tokens[row].append(i)
            if len(tokens[row]) < limits[row]:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):  # drop the rows that ended
            index = torch.tensor(keep, dtype=torch.long, device=ids.device)
            stepper.reorder(index)
            active, ids = [active[j] for j in keep], ids[index]
        logits = stepper.next(ids)
    return Output(tokens, finished)


# ------------------------------------------------------------------------------------------ beam search
def length_penalty(n: int, alpha: float) -> float:
    """GNMT's lp(n) = ((5 + n) / 6)^alpha for a hypothesis of n tokens."""
    return ((5 + n) / 6) ** alpha


def beam_search(stepper: Stepper, batch_size: int, beam: int, max_new: int | list[int], eos: int,
                alpha: float = 0.6) -> Output:
    """The hypothesis of highest log p(y) / lp(|y|) found by a beam of width `beam`, per row; at most max_new
    tokens (one limit, or one per row).

    Each step keeps the `beam` best continuations that do not end the sequence; a candidate ending in `eos`
    among the `beam` best becomes a finished hypothesis (|y| counts the `eos`). A row stops when no live beam
    can still beat its best finished hypothesis: live scores only fall, so the bound is score / lp(limit)
    for alpha > 0 and score / lp(next length) otherwise. Beams still alive at the row's limit are scored as
    they stand. Width 1 with alpha = 0 is greedy decoding.
    """
    B, K = batch_size, beam
    limits = max_new if isinstance(max_new, list) else [max_new] * B
    best: list[tuple[float, list[int], bool]] = [(-math.inf, [], False)] * B  # (normalized score, ids, finished)
    done = [n <= 0 for n in limits]
    if all(done):
        return Output([[] for _ in range(B)], [False] * B)
    logits = stepper.first()  # (B, V): one beam per row at first
    device, V = logits.device, logits.size(-1)
    scores = torch.zeros(B, 1, device=device)  # (B, k) log-probabilities of the live beams
    hist = torch.zeros(B, 0, dtype=torch.long, device=device)  # (B * k, t) their tokens
    for t in range(max(limits)):
        k = scores.size(1)
        logp = logits.float().log_softmax(-1).view(B, k, V) + scores[:, :, None]  # (B, k, V)
        n_cand = min(2 * K, k * V)  # 2K: at most K of them end in eos (one per beam), so K always go on
        top, flat = logp.view(B, k * V).topk(n_cand, dim=-1)  # (B, n_cand)
        src, tok = flat // V, flat % V  # source beam and token
        is_eos = tok == eos
        lp_done = length_penalty(t + 1, alpha)
        for b, j in (is_eos[:, :K]).nonzero().tolist():  # eos among the K best candidates: finished
            s = top[b, j].item() / lp_done
            if not done[b] and s > best[b][0]:
                best[b] = (s, hist[b * k + src[b, j]].tolist(), True)
        # The K best candidates not ending in eos live on.
        go_on = ~is_eos & (torch.cumsum(~is_eos, dim=1) <= K)  # (B, n_cand), K True per row
        sel = go_on.nonzero()[:, 1].view(B, K)
        scores, src, tok = top.gather(1, sel), src.gather(1, sel), tok.gather(1, sel)  # (B, K)
        index = (torch.arange(B, device=device)[:, None] * k + src).view(-1)  # (B * K,) rows of the last step
        hist = torch.cat((hist.index_select(0, index), tok.view(-1, 1)), dim=1)  # (B * K, t + 1)
        top_live = scores.max(dim=1).values.tolist()
        final = (scores / length_penalty(t + 1, alpha)).tolist()  # the live beams as they stand
        for b in range(B):
            if done[b]:
                continue
            if t + 1 >= limits[b]:  # at the limit: the live beams compete as they stand
                j = max(range(K), key=lambda j: final[b][j])
                if final[b][j] > best[b][0]:
                    best[b] = (final[b][j], hist[b * K + j].tolist(), False)
                done[b] = True
            elif best[b][2]:
                bound = top_live[b] / length_penalty(limits[b] if alpha > 0 else t + 2, alpha)
                done[b] = best[b][0] >= bound
        if all(done):
            break
        stepper.reorder(index)
        logits = stepper.next(tok.view(-1))
    return Output([ids for _, ids, _ in best], [f for _, _, f in best])
