"""A mixture of objectives: UL2's mixture of denoisers (Tay et al. 2022, "UL2: Unifying Language Learning
Paradigms", arXiv 2205.05131), or any registered objectives that share one model arrangement.

Components. Each is an objective with its own hyper-parameters, a weight (its relative rate), an optional mode
token prepended to the input (UL2's "mode switching": `[NLU]` for the R-denoisers, `[NLG]` for the X-denoisers,
`[S2S]` for the S-denoiser; the tokenizer makes each an extra special piece) and a label that prefixes its
metrics. The default mixture (`ul2_denoisers`) is UL2's seven denoisers, written as its appendix's seqio
`ul2_objective` builds them: R = span corruption (T5's `span_corruption` pieces: `random_spans_helper`,
`random_spans_noise_mask`, one sentinel per span) at mean span 3 and 8 with 15% noise; X = mean span 3 and 8 at
50%, and mean span 64 at 15% and 50%; S = T5's `prefix_lm` (a uniform split point, objectives/span.py
`PrefixLM`). The rates: the S-denoiser takes 20% of the rows and the six span denoisers share the rest equally
(13.3% each), the mixing the paper's ablations settle on for S (about 20%) with the other denoisers uniform, as
seqio's `sample_from_datasets` does without rates.

Batches. Row r's component is drawn from the step's generator (an i.i.d. choice with probability weight / total:
one uniform per row, inverse CDF); then each present component, in order, draws its rows from the same generator
with its own `batch` (at seq_len - 1 when it has a mode token, which then takes the first input position), so a
component's rows are exactly what that objective alone draws from the generator at that point, batches stay pure
and resume stays exact. A mixture of one component draws no assignment: its batches are that objective's.
Components' batches differ in width (span corruption's targets depend on its density and mean span; the prefix
LM pads), so every field is right-padded to the batch's longest (`<pad>` for ids, 0 for masks, IGNORE_INDEX for
targets) with an `attention_mask` over the real inputs; `mixture_component` (B,) says which component a row
belongs to and `mixture_widths` (B, K) each of its fields' own width (0: the component has no such field), so
`loss` gives every component its rows exactly as its own `batch` made them (`component_rows`). seqio instead
mixes whole examples from one stream per denoiser; here a micro-batch holds several denoisers, which keeps one
generator per micro-batch (pretrain/batches.py).

Loss. Each present component's own `loss` runs on its rows (one forward pass per component: each objective
calls the model as it needs, and no row is padded to another component's length); its terms are reported under
its label (`r3_span_loss`, `s_prefix_acc`, ...). `weighting` decides what the trainer divides:
- "tokens" (default, as UL2's T5X training, whose loss sums every target token of its mixed batches): one main
  term `mixture_loss` over every row's targets, divided by their global count, so a component weighs by its
  share of the target tokens; the components' other terms (BERT's NSP) stay terms of their own.
- "components": every term of every component is a loss term of its own, with its own target field
  (`mixture_{label}_{field}`, IGNORE_INDEX on the other components' rows), divided by that component's count:
  the update is the sum of the components' mean losses, each weighing 1 whatever its rate (the rate then sets
  how much data and compute estimate it).
Either way the trainer's one division per term is unchanged, and a component absent from a micro-batch adds a
zero sum. Every component must keep its main targets in the same field for "tokens" (all built-in ones do).
Under torchrun, DDP trains a mixture as one process does (its gradients are reduced once per step, whatever
the passes); FSDP gathers the sharded weights at every forward pass, and ranks whose micro-batches hold other
components make other passes, so a mixture of several components refuses train.parallel = "fsdp"
(`one_pass`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from models.config import Arch
from objectives.base import IGNORE_INDEX, Batch, Framing, Objective, Terms
from objectives.span import PrefixLM, SpanCorruption
from pretrain.errors import UserError
from pretrain.tokenizer import check_extra_pieces

if TYPE_CHECKING:
    from pretrain.data import TokenSplit
    from pretrain.tokenizer import Vocab

LABEL = re.compile(r"[a-z][a-z0-9_]*")
OWN = "mixture_"  # the prefix of the fields the mixture adds to a batch


@dataclass(frozen=True, repr=False)
class Component:
    """One objective of a mixture: its rate, its mode token and the prefix of its metrics."""

    objective: Objective  # the objective with its hyper-parameters (a recipe writes them flat, beside name)
    weight: float = 1.0  # relative rate of the rows drawn from it (divided by the mixture's total)
    mode: str = ""  # a mode token prepended to every input, e.g. UL2's [NLU] ("" = none); a special piece
    label: str = ""  # the prefix of its metrics, e.g. r3 -> r3_span_loss ("" = the objective's name, numbered)

    def __post_init__(self) -> None:
        if not isinstance(self.objective, Objective):
            raise UserError(f"a mixture component needs an objective, got {self.objective!r}")
        if isinstance(self.weight, bool) or not (math.isfinite(self.weight) and self.weight >= 0):
            raise UserError(f"the weight of mixture component {self.label or self.objective.name} must be a finite "
                            f"number >= 0, got {self.weight!r}; give each component a relative rate such as 1 or 0.2")
        if self.mode:
            check_extra_pieces((self.mode,))
        if self.label and not LABEL.fullmatch(self.label):
            raise UserError(f"mixture component label {self.label!r} must be lower-case letters, digits and _, "
                            "starting with a letter (it prefixes metric names), e.g. r3")

    def __repr__(self) -> str:
        o = self.objective
        params = ", ".join(f"{f.name}={getattr(o, f.name)!r}" for f in fields(o))
        mode = f" {self.mode}" if self.mode else ""
        return f"{self.label or o.name}: {o.name}({params}) x{self.weight:g}{mode}"


def ul2_denoisers() -> tuple[Component, ...]:
    """UL2's seven denoisers with its mode tokens and rates (module docstring): weights 2 for each span denoiser
    and 3 for the S-denoiser, i.e. 13.3% each and 20%."""
    r, x, s = "[NLU]", "[NLG]", "[S2S]"
    return (Component(SpanCorruption(0.15, 3.0), 2.0, r, "r3"), Component(SpanCorruption(0.15, 8.0), 2.0, r, "r8"),
            Component(SpanCorruption(0.5, 3.0), 2.0, x, "x3"), Component(SpanCorruption(0.5, 8.0), 2.0, x, "x8"),
            Component(SpanCorruption(0.15, 64.0), 2.0, x, "x64_15"),
            Component(SpanCorruption(0.5, 64.0), 2.0, x, "x64_50"), Component(PrefixLM(), 3.0, s, "s"))


def _arch_text(a: Arch) -> str:
    """'encoder with segment embeddings and a 2-way classifier', for the error that names two arrangements."""
    extras = [text for text, on in (("segment embeddings", a.segments), ("an MLM head", a.lm_transform),
                                    (f"a {a.classifier}-way classifier", a.classifier)) if on]
    return a.kind + (f" with {' and '.join(extras)}" if extras else "")


def _common(seqs: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The longest common prefix of the tuples."""
    out = []
    for items in zip(*seqs, strict=False):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return tuple(out)


@dataclass(frozen=True)
class Mixture(Objective):
    """A weighted mixture of objectives of one arrangement, each row from one component (UL2's mixture of
    denoisers by default); every component's loss and metrics are reported under its label."""

    components: tuple[Component, ...] = field(default_factory=ul2_denoisers)  # [[objective.components]] tables
    weighting: Literal["tokens", "components"] = "tokens"  # tokens: one loss over every target; components: each alone

    name: ClassVar[str] = "mixture"
    default_recipe: ClassVar[str] = "ul2-tiny"

    def __post_init__(self) -> None:
        comps = self.components
        if not comps:
            raise UserError("objective.components is empty; give one [[objective.components]] table per objective")
        if self.weighting not in ("tokens", "components"):
            raise UserError(f"objective.weighting must be 'tokens' or 'components', got {self.weighting!r}")
        for c in comps:
            if isinstance(c.objective, Mixture):
                raise UserError("a mixture component cannot be a mixture; list its components in the outer one")
        if not sum(c.weight for c in comps) > 0:
            raise UserError("every mixture component has weight 0; give at least one a positive weight")
        for c, label in zip(comps, self.labels, strict=True):
            if c.objective.arch != comps[0].objective.arch:
                raise UserError(
                    f"mixture components need one arrangement, but {self.labels[0]} ({comps[0].objective.name}) is "
                    f"{_arch_text(comps[0].objective.arch)} and {label} ({c.objective.name}) is "
                    f"{_arch_text(c.objective.arch)}; mix objectives of one arrangement")
        packed = [label for c, label in zip(comps, self.labels, strict=True) if c.objective.packs_examples]
        moded = [label for c, label in zip(comps, self.labels, strict=True) if c.objective.packs_examples and c.mode]
        if moded:
            raise UserError(f"mixture components {', '.join(moded)} pack several examples into a row and have a mode "
                            "token, which would go first in the row, before only its first example; drop the mode "
                            "or leave pack off")
        if packed and len(packed) < len(comps):
            raise UserError(f"mixture components {', '.join(packed)} pack several examples into a row and the others "
                            "do not, so their per-example fields differ in shape; pack all of them or leave pack off")
        if len(set(self.labels)) != len(comps):
            raise UserError(f"mixture component labels repeat ({', '.join(self.labels)}); give each a label of its own")
        mains = {next(iter(c.objective.loss_terms.values())) for c in comps}
        if self.weighting == "tokens" and len(mains) > 1:
            raise UserError(f"the components keep their main targets in different fields ({', '.join(sorted(mains))})"
                            ", which weighting 'tokens' pools; use objective.weighting = 'components'")

    # ------------------------------------------------------------------------------------------- the contract
    @cached_property
    def labels(self) -> tuple[str, ...]:
        """Each component's metric prefix: its label, else its objective's name (numbered 1, 2, ... when the
        name repeats)."""
        names = [c.objective.name for c in self.components]
        return tuple(c.label or (n if names.count(n) == 1 else f"{n}{names[:i + 1].count(n)}")
                     for i, (c, n) in enumerate(zip(self.components, names, strict=True)))

    @property
    def arch(self) -> Arch:
        """The components' one arrangement."""
        return self.components[0].objective.arch

    @property
    def loss_terms(self) -> dict[str, str]:
        """tokens: mixture_loss over the common main target field, then the components' other terms; components:
        every term of every component, each over its own field (module docstring)."""
        out = {"mixture_loss": next(iter(self.components[0].objective.loss_terms.values()))}
        if self.weighting == "components":
            out = {}
        for c, label in zip(self.components, self.labels, strict=True):
            items = list(c.objective.loss_terms.items())
            for term, fld in items[1:] if self.weighting == "tokens" else items:
                out[f"{label}_{term}"] = f"{OWN}{label}_{fld}"
        return out

    @property
    def packs_examples(self) -> bool:
        """Its components all pack or none do (__post_init__); it packs when they do."""
        return self.components[0].objective.packs_examples

    @property
    def one_pass(self) -> bool:
        """One forward pass per micro-batch only for a mixture of one component (module docstring)."""
        return len(self.components) == 1

    @property
    def modes(self) -> tuple[str, ...]:
        """The components' mode tokens, each once, in order."""
        return tuple(dict.fromkeys(c.mode for c in self.components if c.mode))

    @property
    def special_pieces(self) -> tuple[str, ...]:
        """The mode tokens, then the components' own special pieces."""
        return tuple(dict.fromkeys([*self.modes, *(p for c in self.components for p in c.objective.special_pieces)]))

    def positions_needed(self, seq_len: int) -> int:
        """The longest sequence of any component, drawn at seq_len - 1 when a mode token goes first. The mode token
        lengthens the input side only: of an encoder-decoder, the encoder, which reads the component's
        positions_needed when that exceeds its decoder length (BART's insertions), else at most its seq_len."""
        need = seq_len
        for c in self.components:
            n, m = seq_len - bool(c.mode), bool(c.mode)
            pos = c.objective.positions_needed(n)
            if self.arch.kind == "encoder-decoder":
                dec = c.objective.decoder_length(n)
                need = max(need, dec, (pos if pos > dec else min(pos, n)) + m)
            else:
                need = max(need, pos + m)
        return need

    def decoder_length(self, seq_len: int) -> int:
        """An encoder-decoder's longest target among the components (an upper bound, as for BART's blocks)."""
        if self.arch.kind != "encoder-decoder":
            return seq_len
        return max(c.objective.decoder_length(seq_len - bool(c.mode)) for c in self.components)

    def framing(self, vocab: Vocab) -> Framing:
        """What every component's rows share: the common start (a mode token only when all have the same) and
        end of their framings; the first component's decoder start. `mode_framing` gives one mode's."""
        fs = [self._framed(c, vocab) for c in self.components]
        suffix = _common([f.suffix[::-1] for f in fs])[::-1]
        return Framing(_common([f.prefix for f in fs]), suffix, fs[0].decoder_start)

    def mode_framing(self, vocab: Vocab, mode: str) -> Framing:
        """The framing of the first component with mode token `mode`: the mode token, then its own framing."""
        for c in self.components:
            if c.mode == mode:
                return self._framed(c, vocab)
        raise UserError(f"this mixture has no mode {mode!r}; its modes are {', '.join(self.modes) or 'none'}")

    def special_targets(self, vocab: Vocab) -> frozenset[int]:
        """Every component's special targets (mode tokens never are)."""
        return frozenset().union(*(c.objective.special_targets(vocab) for c in self.components))

    def baseline(self, split: TokenSplit, vocab: Vocab, seq_len: int = 128) -> dict[str, float]:
        """Each component's reference figure under its label."""
        return {f"{label}_{k}": v for c, label in zip(self.components, self.labels, strict=True)
                for k, v in c.objective.baseline(split, vocab, seq_len - bool(c.mode)).items()}

    def _framed(self, c: Component, vocab: Vocab) -> Framing:
        f = c.objective.framing(vocab)
        return Framing((vocab.special_id(c.mode), *f.prefix), f.suffix, f.decoder_start) if c.mode else f

    # ------------------------------------------------------------------------------------------- batches
    def draw_components(self, gen: torch.Generator, batch_size: int) -> torch.Tensor:
        """(B,) int64 component of each row: probability weight / total, one uniform per row (inverse CDF); a
        mixture of one component draws nothing."""
        if len(self.components) == 1:
            return torch.zeros(batch_size, dtype=torch.long)
        w = torch.tensor([c.weight for c in self.components], dtype=torch.float64)
        cdf = (w / w.sum()).cumsum(0)
        u = torch.rand(batch_size, generator=gen, dtype=torch.float64)
        return torch.searchsorted(cdf, u, right=True).clamp(max=len(w) - 1)

    def component_batch(self, i: int, split: TokenSplit, vocab: Vocab, gen: torch.Generator, rows: int,
                        seq_len: int) -> Batch:
        """Component i's own batch of `rows` rows from `gen`, its mode token (if any) in the first input position
        (the objective draws at seq_len - 1 then): input ids get the mode id, masks 1, targets IGNORE_INDEX."""
        c = self.components[i]
        b = c.objective.batch(split, vocab, gen, rows, seq_len - bool(c.mode))
        assert not any(k.startswith(OWN) for k in b), f"{c.objective.name} uses a field named {OWN}..."
        if not c.mode:
            return b
        targets = set(c.objective.loss_terms.values())
        for k, t in b.items():
            if t.dim() == 2 and self._input_side(k):
                v = vocab.special_id(c.mode) if k == "input_ids" else IGNORE_INDEX if k in targets else \
                    int(k == "attention_mask")
                b[k] = torch.cat([t.new_full((rows, 1), v), t], dim=1)
        return b

    def _input_side(self, key: str) -> bool:
        """Whether a batch field is aligned with input_ids (the encoder's, or a decoder-only model's, positions)."""
        return self.arch.kind != "encoder-decoder" or not (key == "labels" or key.startswith("decoder_"))

    def batch(self, split: TokenSplit, vocab: Vocab, gen: torch.Generator, batch_size: int, seq_len: int) -> Batch:
        """Each row's component from `gen`, then each present component's rows from `gen`, merged (module
        docstring)."""
        which = self.draw_components(gen, batch_size)
        parts = []
        for i in range(len(self.components)):
            rows = (which == i).nonzero()[:, 0]
            if len(rows):
                parts.append((rows, self.component_batch(i, split, vocab, gen, len(rows), seq_len)))
        out = _merge(parts, batch_size, vocab, {f for c in self.components for f in c.objective.loss_terms.values()})
        out[f"{OWN}component"] = which
        for i, label in enumerate(self.labels):
            for fld in set(self.components[i].objective.loss_terms.values()):
                if f"{OWN}{label}_{fld}" in self.loss_terms.values():
                    t = out.get(fld, torch.full((batch_size,), IGNORE_INDEX))
                    out[f"{OWN}{label}_{fld}"] = t.masked_fill((which != i).view(-1, *[1] * (t.dim() - 1)),
                                                              IGNORE_INDEX)
        return out

    def component_rows(self, batch: Batch, i: int) -> Batch | None:
        """Component i's rows of a merged batch, every field at the component's own width (None when the batch
        holds none of its rows): what its `batch` returned, mode token included."""
        rows = (batch[f"{OWN}component"] == i).nonzero()[:, 0]
        if not len(rows):
            return None
        names = sorted(k for k in batch if not k.startswith(OWN))
        widths = batch[f"{OWN}widths"][rows[0]].tolist()
        return {k: batch[k][rows, :w] if batch[k].dim() == 2 else batch[k][rows]
                for k, w in zip(names, widths, strict=True) if w}

    # ------------------------------------------------------------------------------------------- loss
    def loss(self, model: torch.nn.Module, batch: Batch, label_smoothing: float = 0.0) -> Terms:
        """Each present component's own loss on its rows, under its label; then the pooled main term (tokens
        weighting) and a zero sum for every loss term without rows here."""
        terms: Terms = {}
        mains = []
        for i, (c, label) in enumerate(zip(self.components, self.labels, strict=True)):
            sub = self.component_rows(batch, i)
            if sub is None:
                continue
            terms |= {f"{label}_{k}": v for k, v in c.objective.loss(model, sub, label_smoothing).items()}
            mains.append(f"{label}_{next(iter(c.objective.loss_terms))}")
        if self.weighting == "tokens":
            for suffix in ("loss", "acc", "nll"):  # the main term's sum and count, its accuracy and plain NLL
                keys = [k for m in mains if (k := m if suffix == "loss" else m.removesuffix("loss") + suffix) in terms]
                if keys:
                    terms[f"mixture_{suffix}"] = (sum(terms[k][0] for k in keys), sum(terms[k][1] for k in keys))
        zero = batch[f"{OWN}component"].new_zeros(()).float()
        for t in self.loss_terms:
            terms.setdefault(t, (zero, zero))
        return terms


def _merge(parts: list[tuple[torch.Tensor, Batch]], B: int, vocab: Vocab, targets: set[str]) -> Batch:
    """The components' batches as one: every field right-padded to its longest (ids with <pad>, targets with
    IGNORE_INDEX, the rest with 0), an attention_mask over the real inputs when rows differ in input width or any
    component has one (rows of a component without one get 1 on its inputs, and still width 0: it never sees
    it), and `mixture_widths` (B, K): each row's width of each field, in sorted field order."""
    names = {k for _, b in parts for k in b}
    in_w = torch.zeros(B, dtype=torch.long)
    for rows, b in parts:
        in_w[rows] = b["input_ids"].size(1)
    if int(in_w.min()) < int(in_w.max()):
        names.add("attention_mask")
    names = sorted(names)
    widths = torch.zeros(B, len(names), dtype=torch.long)
    out: Batch = {}
    for j, k in enumerate(names):
        have = [(rows, b[k]) for rows, b in parts if k in b]
        two_d = k == "attention_mask" or have[0][1].dim() == 2
        W = int(in_w.max()) if k == "attention_mask" else max(t.size(1) for _, t in have) if two_d else 0
        fill = IGNORE_INDEX if k in targets else vocab.pad if k.endswith("input_ids") else 0
        t_out = torch.full((B, W) if two_d else (B,), fill, dtype=torch.long)
        if k == "attention_mask":  # rows without a mask of their own: every input is real
            t_out = (torch.arange(W) < in_w[:, None]).long()
        for rows, t in have:
            if two_d:
                t_out[rows, : t.size(1)] = t
                if k == "attention_mask":
                    t_out[rows, t.size(1):] = 0
            else:
                t_out[rows] = t
            widths[rows, j] = t.size(1) if two_d else 1
        out[k] = t_out
    out[f"{OWN}widths"] = widths
    return out
