"""What `pretrain generate` and `pretrain fill-mask` do: load a run, frame prompts as the model was trained,
decode (`pretrain/decoding.py`), show the result.

Prompt framing comes from the objective itself, never from its name: each objective's `framing(vocab)` says
which special tokens surround the encoder input (`[CLS] ... [SEP]`, `<s> ... </s>`, `... </s>`) and which
token starts the decoder (T5 `<pad>`, BART `</s>`). By default (`Objective.framing`) decoder-only prompts
start with `</s>`, the document separator of the causal-LM stream, so the prompt reads as the start of a
document.

Markers. The tokenizer's specials are control pieces that text never produces, so `encode_with_specials` splits
the prompt on the literal markers `[MASK]` and `<extra_id_N>` and inserts their ids. Spaces right before a
marker are dropped: in training the hidden piece carried its own word-boundary mark ("▁sat"), so "The cat
[MASK] on" is read as "The cat" [MASK] " on", as the model saw it. A span-corruption output
`<extra_id_0> span <extra_id_1> span ...` is put back into the prompt (`fill_spans`); a denoising output is
the whole reconstructed text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from objectives.base import Framing
from pretrain.decoding import CachedStepper, MinLength, Sampler, beam_search, generate
from pretrain.errors import UserError

MARKER = re.compile(r"\[MASK\]|<extra_id_(\d+)>")


@dataclass
class Run:
    """A trained run, ready to decode: its config, model (eval mode, on `device`), tokenizer and framing."""

    path: Path
    cfg: Any
    model: Any
    tokenizer: Any
    framing: Framing
    device: torch.device

    @property
    def kind(self) -> str:
        """decoder, encoder or encoder-decoder."""
        return self.model.arch.kind


def load_run(run_dir: Path, device: str | None = None, mode: str | None = None) -> Run:
    """Load a run folder's config, tokenizer and newest checkpoint (`pretrain.run.load`); UserError when any
    is missing. `mode`: one of the objective's mode tokens (UL2's `[S2S]`), put first as in training."""
    from pretrain.run import load

    cfg, tokenizer, model, _ = load(run_dir, device)
    return Run(Path(run_dir), cfg, model, tokenizer, framing_for(cfg.objective, tokenizer.vocab, mode, run_dir),
               next(model.parameters()).device)


def framing_for(objective: Any, vocab: Any, mode: str | None, where: Any = "the run") -> Framing:
    """The objective's framing, or in `mode` its mode's (the mode token first); UserError for a mode the run's
    objective does not have."""
    if mode is None:
        return objective.framing(vocab)
    if mode not in objective.modes:
        have = f"its modes are {', '.join(objective.modes)}" if objective.modes else "it has none"
        raise UserError(f"{where} was trained without the mode token {mode!r} ({have}); give one of its modes or "
                        "leave --mode out")
    return objective.mode_framing(vocab, mode)


def mode_note(run: Run, mode: str | None) -> str | None:
    """A note for a run trained with mode tokens when none was given (its prompts then start with none)."""
    modes = run.cfg.objective.modes
    if mode is None and modes:
        return (f"{run.path} was trained with the mode tokens {', '.join(modes)}; --mode MODE puts one first, as "
                "in training")
    return None


# ------------------------------------------------------------------------------------------------ prompts
def encode_with_specials(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text in which the literal markers `[MASK]` and `<extra_id_N>` become their special ids;
    spaces right before a marker are dropped (module docstring)."""
    from pretrain.tokenizer import MASK, N_SENTINELS, SENTINEL0

    ids, pos = [], 0
    for m in MARKER.finditer(text):
        ids += tokenizer.encode(text[pos:m.start()].rstrip(" "))
        if m[1] is None:
            ids.append(MASK)
        elif int(m[1]) < N_SENTINELS:
            ids.append(SENTINEL0 + int(m[1]))
        else:
            raise UserError(f"{m[0]} is not a sentinel: the tokenizer has <extra_id_0> .. <extra_id_{N_SENTINELS - 1}>")
        pos = m.end()
    return ids + tokenizer.encode(text[pos:])


def fill_spans(tokenizer: Any, prompt_ids: list[int], output_ids: list[int]) -> str:
    """Put a span-corruption output `<extra_id_0> a <extra_id_1> b ...` back into the prompt's sentinels;
    a sentinel the output does not fill stays as its marker."""
    from pretrain.tokenizer import N_SENTINELS, SENTINEL0

    spans: dict[int, list[int]] = {}
    current = None
    for i in output_ids:
        if SENTINEL0 <= i < SENTINEL0 + N_SENTINELS:
            current = spans.setdefault(i, [])
        elif current is not None:
            current.append(i)
    filled: list[int] = []
    for i in prompt_ids:
        filled += spans[i] if i in spans else [i]
    return tokenizer.decode(filled, keep_special=True)


def has_sentinel(ids: list[int]) -> bool:
    """Whether ids hold a span-corruption sentinel."""
    from pretrain.tokenizer import N_SENTINELS, SENTINEL0

    return any(SENTINEL0 <= i < SENTINEL0 + N_SENTINELS for i in ids)


def left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) ids left-padded to the longest row and the (B, T) mask, 1 = real (None when nothing is padded)."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, (mask if not bool(mask.all()) else None)


def require_decoder(run: Run) -> None:
    """UserError unless the run's model has a decoder (it can generate text)."""
    if run.kind == "encoder":
        raise UserError(f"{run.path} is an encoder-only ({run.cfg.objective.name}) run, which cannot generate text; "
                        "use `pretrain fill-mask` for it")


# ------------------------------------------------------------------------------------------------ decoding
@dataclass(frozen=True)
class DecodeOptions:
    """How `generate_batch` decodes (the `pretrain generate` flags)."""

    max_new_tokens: int | None = None  # None: 100 for decoder-only, input length + 50 for encoder-decoders
    beam: int = 1  # beam width; 1 = no beam search
    length_penalty: float = 0.6  # GNMT's alpha in ((5 + len) / 6)^alpha
    sample: bool = False  # ancestral sampling (implied by temperature / top_k / top_p)
    temperature: float | None = None  # sampling temperature (default 1)
    top_k: int | None = None  # sample among the k most likely tokens
    top_p: float | None = None  # sample from the smallest set with probability >= p (nucleus)
    seed: int | None = None  # sampling seed (None: a fresh one, reported)
    min_new_tokens: int = 0  # `</s>` is not allowed before this many new tokens
    batch_size: int = 16  # prompts decoded together (`pretrain generate --prompts FILE`)

    def __post_init__(self) -> None:
        if self.beam < 1:
            raise UserError(f"--beam must be >= 1, got {self.beam}")
        if self.beam > 1 and self.sampling:
            raise UserError("--beam cannot be combined with --sample / --temperature / --top-k / --top-p; pick one")
        if self.temperature is not None and self.temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.min_new_tokens < 0:
            raise UserError(f"--min-new-tokens must be >= 0, got {self.min_new_tokens}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")

    @property
    def sampling(self) -> bool:
        """Sampling was asked for, explicitly or by a sampling parameter."""
        return self.sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p))

    def sampler(self) -> Sampler:
        return Sampler(self.sampling, self.temperature or 1.0, self.top_k or 0, self.top_p or 1.0)


@dataclass
class Generation:
    """One prompt's result: the encoded input, the generated ids and what to show."""

    prompt: str
    input_ids: list[int]  # the prompt's ids, without framing
    output_ids: list[int]  # generated ids, without the start token and `</s>`
    finished: bool  # ended with `</s>` (else at the length or context limit)
    text: str  # the continuation (decoder-only) or the decoder's output text
    filled: str | None = None  # the prompt with its sentinels filled in (span-corruption outputs)


def generate_batch(run: Run, prompts: list[str], opts: DecodeOptions, gen: torch.Generator | None = None,
                   on_token=None, notes: list[str] | None = None) -> list[Generation]:
    """Decode a batch of prompts with the run's model (KV cache on); notes collects context-limit messages."""
    tok, model, f = run.tokenizer, run.model, run.framing
    seq2seq, limit = run.kind == "encoder-decoder", model.max_len
    encoded = encode_prompts(run, prompts)
    rows = [framed(run, e) for e in encoded]
    with torch.inference_mode():
        if seq2seq:
            enc_ids, enc_mask = right_pad(rows, tok.vocab.pad, run.device)
            memory = model.encode(enc_ids, enc_mask)  # (B, S, C): once
            start = torch.full((len(rows), 1), f.decoder_start, dtype=torch.long, device=run.device)
            stepper = CachedStepper(model, start, None, memory, enc_mask)
            want = [opts.max_new_tokens or len(r) + 50 for r in rows]
            room = limit - 1  # the start token takes a decoder position
        else:
            ids, mask = left_pad(rows, tok.vocab.pad, run.device)
            stepper = CachedStepper(model, ids, mask)
            want = [opts.max_new_tokens or 100] * len(rows)
            room = limit - ids.size(1)  # the cache counts the left padding too
        n_new = [min(w, room) for w in want]
        if opts.min_new_tokens:
            stepper = MinLength(stepper, tok.vocab.eos, opts.min_new_tokens)
        if opts.beam > 1:
            out = beam_search(stepper, len(rows), opts.beam, n_new, tok.vocab.eos, opts.length_penalty)
        else:
            out = generate(stepper, len(rows), n_new, tok.vocab.eos, opts.sampler(), gen, on_token)
    cut = [not fin and n < w for n, w, fin in zip(n_new, want, out.finished, strict=True)]
    if any(cut) and notes is not None:
        notes.append(f"{sum(cut)} output(s) stopped at the model's context limit ({limit} tokens) before </s>")
    return [_show(run, p, e, o, fin) for p, e, o, fin in zip(prompts, encoded, out.tokens, out.finished, strict=True)]


def framed(run: Run, ids: list[int]) -> list[int]:
    """A prompt's ids with the objective's framing around them: prefix + ids + suffix."""
    return [*run.framing.prefix, *ids, *run.framing.suffix]


def encode_prompts(run: Run, prompts: list[str]) -> list[list[int]]:
    """The prompts' ids without framing (markers become special ids for encoder-decoders); UserError when the
    run cannot generate or a framed prompt is longer than the model's context."""
    require_decoder(run)
    tok, limit = run.tokenizer, run.model.max_len
    encoded = [encode_with_specials(tok, p) if run.kind == "encoder-decoder" else tok.encode(p) for p in prompts]
    longest = max(len(framed(run, e)) for e in encoded)
    if longest > limit:
        raise UserError(f"a prompt is {longest} tokens long (framing included) but the model's context is {limit} "
                        "tokens; shorten the prompt")
    return encoded


def right_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, S) encoder ids right-padded to the longest row and the mask (None when nothing is padded)."""
    S = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (S - len(r)) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (S - len(r)) for r in rows], dtype=torch.long, device=device)
    return ids, (mask if not bool(mask.all()) else None)


def shown(tokenizer: Any, ids: list[int]) -> str:
    """Text of an encoder-decoder's output: sentinels and [MASK] shown as markers, framing tokens (<s>, </s>,
    <pad>, [CLS], [SEP]) left out."""
    v = tokenizer.vocab
    hide = {v.pad, v.bos, v.eos, v.cls, v.sep}
    return tokenizer.decode([i for i in ids if i not in hide], keep_special=True)


def _show(run: Run, prompt: str, encoded: list[int], out: list[int], finished: bool) -> Generation:
    tok = run.tokenizer
    if run.kind == "decoder":
        return Generation(prompt, encoded, out, finished, tok.decode(out))
    filled = fill_spans(tok, encoded, out) if has_sentinel(encoded) else None
    return Generation(prompt, encoded, out, finished, shown(tok, out), filled)


class TextStream:
    """Writes a single prompt's tokens as they come, decoding the whole output each time so a word made
    of several pieces (or a character of several byte pieces) prints right; holds back an unfinished
    UTF-8 character (decoded as U+FFFD). markers: show sentinels and [MASK] as `shown` does."""

    def __init__(self, tokenizer: Any, write, eos: int, markers: bool = False):
        self.tokenizer, self.write, self.eos, self.markers = tokenizer, write, eos, markers
        self.ids: list[int] = []
        self.done = 0  # characters written

    def __call__(self, ids: torch.Tensor) -> None:
        i = int(ids[0])
        if i == self.eos:
            return
        self.ids.append(i)
        text = shown(self.tokenizer, self.ids) if self.markers else self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd") and len(text) > self.done:
            self.write(text[self.done:])
            self.done = len(text)


# ------------------------------------------------------------------------------------------------ fill-mask
def fill_mask(run: Run, text: str, top_k: int = 5) -> list[list[tuple[int, float]]]:
    """The top_k (id, probability) candidates of each [MASK] in text, in order; special pieces are never
    candidates (they are never MLM targets)."""
    from pretrain.tokenizer import MASK

    if run.kind != "encoder":
        raise UserError(f"{run.path} is a {run.kind} ({run.cfg.objective.name}) run; fill-mask needs a masked-LM "
                        "(encoder) run: use `pretrain generate` for this one")
    if "[MASK]" not in text:
        raise UserError("the text has no [MASK]; write [MASK] where a token should be predicted")
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    ids = framed(run, encode_with_specials(run.tokenizer, text))
    if len(ids) > run.model.max_len:
        raise UserError(f"the text is {len(ids)} tokens long (framing included) but the model's context is "
                        f"{run.model.max_len} tokens; shorten it")
    x = torch.tensor([ids], device=run.device)  # (1, T)
    types = torch.zeros_like(x) if run.model.arch.segments else None  # one segment: type 0 throughout
    with torch.inference_mode():
        logits = run.model(x, token_type_ids=types, output_mask=x == MASK).logits.float()  # (N, V)
    special = run.tokenizer.vocab.special_t.to(run.device)
    probs = logits.masked_fill(special, float("-inf")).softmax(-1)
    p, i = probs.topk(min(top_k, int((~special).sum())), dim=-1)  # (N, k)
    return [list(zip(r_i, r_p, strict=True)) for r_i, r_p in zip(i.tolist(), p.tolist(), strict=True)]


def top1_text(run: Run, text: str, candidates: list[list[tuple[int, float]]]) -> str:
    """text with each [MASK] replaced by its most likely candidate."""
    from pretrain.tokenizer import MASK

    best = iter(row[0][0] for row in candidates)
    ids = [next(best) if i == MASK else i for i in encode_with_specials(run.tokenizer, text)]
    return run.tokenizer.decode(ids, keep_special=True)


# ------------------------------------------------------------------------------------------------ showing
def show_stream(console: Any, run: Run, text: str, opts: DecodeOptions, gen: torch.Generator | None,
                notes: list[str]) -> None:
    """Decode one prompt, printing its tokens on `console` as they come (`pretrain generate --prompt`)."""
    seq2seq = run.kind == "encoder-decoder"

    def write(s: str) -> None:
        console.print(s, end="", markup=False, highlight=False, soft_wrap=True)

    if seq2seq:
        _labelled(console, "input", text)
        console.print("[bold]output:[/] ", end="")
    else:
        console.print(text, end="", style="bold", markup=False, highlight=False, soft_wrap=True)
    stream = TextStream(run.tokenizer, write, run.tokenizer.vocab.eos, markers=seq2seq)
    results = generate_batch(run, [text], opts, gen, stream, notes)
    console.print()
    if results[0].filled is not None:
        _labelled(console, "filled", results[0].filled)


def show_batched(console: Any, run: Run, texts: list[str], opts: DecodeOptions, gen: torch.Generator | None,
                 notes: list[str]) -> None:
    """Decode prompts in batches of similar length, then print each result in the prompts' order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
    results: list[Generation] = [None] * len(texts)  # type: ignore[list-item]
    for k in range(0, len(order), opts.batch_size):
        chunk = order[k:k + opts.batch_size]
        for i, g in zip(chunk, generate_batch(run, [texts[i] for i in chunk], opts, gen, None, notes), strict=True):
            results[i] = g
    for i, g in enumerate(results):
        if len(texts) > 1:
            console.rule(f"prompt {i + 1}", style="dim")
        if run.kind == "encoder-decoder":
            _labelled(console, "input", g.prompt)
            _labelled(console, "output", g.text)
            if g.filled is not None:
                _labelled(console, "filled", g.filled)
        else:
            console.print(g.prompt, end="", style="bold", markup=False, highlight=False, soft_wrap=True)
            console.print(g.text, markup=False, highlight=False, soft_wrap=True)


def _labelled(console: Any, label: str, text: str) -> None:
    """Print `label: text` with the text verbatim (no markup, no wrapping inside the text)."""
    console.print(f"[bold]{label}:[/] ", end="")
    console.print(text, markup=False, highlight=False, soft_wrap=True)
