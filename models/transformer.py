"""One Transformer backbone arranged as a decoder, an encoder or an encoder-decoder.

Papers: Vaswani et al. 2017 ("Attention Is All You Need": attention, FFN, residuals, sinusoidal positions,
encoder-decoder); Radford et al. 2019 (GPT-2: pre-LN, final norm, GELU-tanh, tied embeddings, residual
init scaled by 1/sqrt(2 x layers)); Devlin et al. 2019 (BERT: post-LN, embedding LayerNorm, segment
embeddings, MLM transform head with output bias, tanh pooler + classifier); Raffel et al. 2020 (T5:
RMSNorm, no biases, bucketed relative position bias shared by a stack, d_model**-0.5 before a tied
output); Lewis et al. 2019 (BART: post-LN encoder-decoder with embedding LayerNorm); Su et al. 2021
(RoFormer: rotary position embedding); Shazeer 2020 (GLU variants: GEGLU, SwiGLU).
The layer pieces are in `models/layers.py`; this file stacks them and adds embeddings, heads and the cache.

Forward contract (training): `model(input_ids, attention_mask=None, token_type_ids=None,
decoder_input_ids=None, decoder_attention_mask=None, output_mask=None) -> ModelOutput(logits, cls_logits)`.
Masks are (B, T) with 1 = real token. The model computes no loss.

Incremental decoding, with a `KVCache` (`models/cache.py`):

    memory = model.encode(input_ids, attention_mask)              # encoder-decoder only; (B, S, C), once
    cache = KVCache()
    logits = model.decode(prompt, memory=memory, memory_mask=attention_mask, cache=cache,
                          attention_mask=prompt_mask)               # (B, T, V); fills the cache
    logits = model.decode(next_ids[:, None], cache=cache)          # (B, 1, V); each step adds 1 token
    cache.reorder(beam_index)                                       # beam search: pick batch rows

- The cache keeps every decoder layer's self-attention keys/values (growing by the new tokens each call)
  and the cross-attention keys/values, computed from `memory` on the first call only (later calls need
  neither `memory` nor `memory_mask`). Decoder-only models call `decode` without memory.
- New tokens continue at the cache length, so every position kind (learned, sinusoidal, relative bias,
  RoPE) gives the same logits as a full recomputation (tested to 1e-5).
- Padding: `attention_mask` (B, T_new) marks the new tokens (None = all real); the cache remembers it, so
  padded positions stay hidden from every later step. A token's absolute position (learned, sinusoidal,
  RoPE) is the number of real tokens before it in its own sequence, so left-padded prompts get the same
  positions as unpadded ones; the relative bias uses the distance in the padded layout, which is the
  same as long as each sequence's real tokens are contiguous (left or right padding, never holes).
  Batched left-padded prompts therefore decode exactly as one prompt at a time.
- Right-padded decoder inputs in training need no `decoder_attention_mask`: under the causal mask a real
  token never sees a later pad, so leaving it out keeps SDPA's causal fast path.

Deliberate deviations (each small; say so if a recipe needs the original):
- SDPA's 1/sqrt(head size) scaling is kept with the relative bias (T5 folds it into its init), and every
  arrangement uses the GPT-2 init (normal(0, init_std), residual outputs / sqrt(2 x all layers)).
- The embedding norm follows `cfg.norm` (LayerNorm for BERT/BART, which is what they use).
- Sinusoidal positions scale the token embeddings by sqrt(d_model), as Vaswani et al. §3.4 do, so the
  fixed unit-amplitude table does not drown embeddings initialised at std 0.02.
- `max_len` is enforced for every position kind, not just the tables: it is the trained context.
- BART's learned-position offset of 2 and its frozen final_logits_bias are left out.
- GPT-2's tanh GELU is evaluated as the erf GELU in bf16 on CPU: they differ by under 4.7e-4 (`gelu_tanh`).
- A query with no real key (a fully padded row) attends uniformly to all keys instead of producing NaN;
  its output is garbage but finite and never read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models import cache as kv
from models.cache import KVCache  # also imported from here: models.transformer.KVCache
from models.config import Arch, ModelConfig
from models.layers import Block, Context, RelativeBias, activation_fn, make_norm, rope_angles, sinusoid_table

Projection = Callable[[Tensor, Tensor, "Tensor | None"], Any]
"""project(hidden (..., C), weight (V, C), bias (V,) or None): what replaces the output projection."""


class ModelOutput(NamedTuple):
    """What the model returns: vocabulary logits and, with a classifier head, class logits."""

    logits: Tensor  # (B, T, V), or (N, V) for the positions selected by output_mask
    cls_logits: Tensor | None  # (B, arch.classifier) or None


# --------------------------------------------------------------------------------------------- stack
class Stack(nn.Module):
    """An encoder or a decoder: position encoding, embedding norm, N blocks, final norm (pre-LN only;
    in post-LN the last block already ends with a norm)."""

    def __init__(self, cfg: ModelConfig, n_layers: int, causal: bool, cross: bool):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        self.pos_embed = nn.Embedding(cfg.max_len, cfg.d_model) if cfg.positions == "learned" else None
        if cfg.positions == "sinusoidal":  # fixed, so not saved with the weights
            self.register_buffer("sinusoid", sinusoid_table(cfg.max_len, cfg.d_model), persistent=False)
        self.rel_bias = RelativeBias(cfg, bidirectional=not causal) if cfg.positions == "relative" else None
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cross) for _ in range(n_layers))
        self.final_norm = make_norm(cfg) if cfg.norm_placement == "pre" else None
        self.checkpointing = False  # activation checkpointing of every block (Transformer.set_activation_checkpointing)

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        key_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x (B, T, C) token embeddings of the new tokens; pos (B|1, T) their absolute positions;
        key_mask (B, L) bool over cached + new tokens; memory (B, S, C) and memory_mask (B, 1, 1, S) for
        cross-attention. Returns hidden states (B, T, C); appends keys/values to `cache`."""
        cfg, T = self.cfg, x.size(1)
        past = cache.length if cache is not None else 0
        if self.pos_embed is not None:
            x = x + self.pos_embed(pos)  # (B|1, T, C) broadcast over the batch
        elif cfg.positions == "sinusoidal":
            x = x + self.sinusoid[pos]
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        bias = None
        if self.rel_bias is not None:  # computed once, shared by every layer (T5)
            k_pos = torch.arange(past + T, device=x.device)
            bias = self.rel_bias(k_pos[past:], k_pos)  # (1, nh, T, L)
        mask, is_causal = kv.self_attention_mask(self.causal, T, past, key_mask, bias, x.device)
        rope = rope_angles(pos, cfg.d_model // cfg.n_heads, cfg.rope_theta) if cfg.positions == "rope" else None
        ctx = Context(mask, is_causal, rope, memory, memory_mask)
        for i, block in enumerate(self.blocks):
            if cache is None and self.checkpointing and torch.is_grad_enabled():
                x, _, _ = checkpoint(block, x, ctx, use_reentrant=False)  # recomputed in backward, dropout too
            elif cache is None:
                x, _, _ = block(x, ctx)
            else:
                x, cache.self_kv[i], cross_kv = block(x, ctx, cache.self_kv.get(i), cache.cross_kv.get(i))
                if cross_kv is not None:
                    cache.cross_kv[i] = cross_kv
        return self.final_norm(x) if self.final_norm is not None else x


# --------------------------------------------------------------------------------------------- heads
class LMHead(nn.Module):
    """Vocabulary logits: the tied embedding matrix (or an untied projection); with `arch.lm_transform`,
    BERT's dense + activation + norm before it and an output bias."""

    def __init__(self, cfg: ModelConfig, arch: Arch, vocab_size: int):
        super().__init__()
        d = cfg.d_model
        self.dense = nn.Linear(d, d, bias=cfg.bias) if arch.lm_transform else None
        self.act = activation_fn(cfg.activation)  # gated names give their gate's function (GELU / SiLU)
        self.norm = make_norm(cfg) if arch.lm_transform else None
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if arch.lm_transform else None
        self.proj = None if cfg.tie_embeddings else nn.Linear(d, vocab_size, bias=False)
        # T5 v1.0 rescales before its tied projection because its embeddings start at std 1.
        self.scale = d**-0.5 if cfg.tie_embeddings and cfg.tied_output_scale else 1.0

    def forward(self, h: Tensor, embed_weight: Tensor, project: Projection | None = None) -> Any:
        """h (..., C) -> logits (..., V); embed_weight (V, C) is the input embedding matrix. With `project`, the
        final projection is project(h, weight, bias) instead (a fused projection + loss, say: the (N, V)
        logits need never exist), and its result is returned."""
        if self.dense is not None:
            h = self.norm(self.act(self.dense(h)))
        if self.scale != 1.0:
            h = h * self.scale
        weight = embed_weight if self.proj is None else self.proj.weight
        return F.linear(h, weight, self.bias) if project is None else project(h, weight, self.bias)


class Pooler(nn.Module):
    """BERT's sentence head: tanh(dense(h at position 0)), dropout, then a linear classifier."""

    def __init__(self, cfg: ModelConfig, n_classes: int):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, n_classes)

    def forward(self, h: Tensor, first: Tensor | None = None) -> Tensor:
        """h (B, T, C) -> class logits (B, n_classes) of each row's first token, or (B, E, n_classes) of the
        tokens at positions first (B, E) (the first token of each packed example)."""
        x = h[:, 0] if first is None else h.gather(1, first[..., None].expand(-1, -1, h.size(-1)))
        return self.classifier(self.drop(torch.tanh(self.dense(x))))


# --------------------------------------------------------------------------------------- transformer
class Transformer(nn.Module):
    """The backbone in the arrangement `arch` asks for, with token embeddings shared by the encoder,
    the decoder and the output projection."""

    def __init__(self, cfg: ModelConfig, arch: Arch, vocab_size: int):
        super().__init__()
        self.cfg, self.arch, self.vocab_size, self.max_len = cfg, arch, vocab_size, cfg.max_len
        d = cfg.d_model
        self.embed = nn.Embedding(vocab_size, d)
        self.embed_scale = math.sqrt(d) if cfg.positions == "sinusoidal" else 1.0  # Vaswani et al. §3.4
        self.segment = nn.Embedding(2, d) if arch.segments else None
        has_enc, has_dec = arch.kind != "decoder", arch.kind != "encoder"
        self.encoder = Stack(cfg, cfg.n_layers, causal=False, cross=False) if has_enc else None
        n_dec = cfg.dec_layers if has_enc else cfg.n_layers
        self.decoder = Stack(cfg, n_dec, causal=True, cross=has_enc) if has_dec else None
        self.lm_head = LMHead(cfg, arch, vocab_size)
        self.pooler = Pooler(cfg, arch.classifier) if arch.classifier > 0 else None
        self.init_weights()

    def stacks(self) -> list[Stack]:
        """The encoder and/or decoder."""
        return [s for s in (self.encoder, self.decoder) if s is not None]

    def set_activation_checkpointing(self, on: bool) -> None:
        """Keep only each block's input for backward and recompute the rest there (Chen et al. 2016,
        "Training Deep Nets with Sublinear Memory Cost"; `torch.utils.checkpoint`, non-reentrant, with the RNG
        state replayed so dropout masks repeat): the same gradients for about a third more compute."""
        for s in self.stacks():
            s.checkpointing = on

    def init_weights(self) -> None:
        """normal(0, init_std) for linears and embeddings, zero biases, norms at 1; the projections that
        write into the residual stream get init_std / sqrt(2 x layers), layers of both stacks counted
        (GPT-2)."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        n_layers = sum(len(s.blocks) for s in self.stacks())
        for s in self.stacks():
            for block in s.blocks:
                for lin in block.residual_outputs():
                    nn.init.normal_(lin.weight, 0.0, std / math.sqrt(2 * n_layers))

    # ------------------------------------------------------------------------------------ pieces
    def check_length(self, n: int) -> None:
        """Refuse a sequence longer than the position table / trained context."""
        if n > self.max_len:
            raise ValueError(
                f"sequence of {n} tokens is longer than model.max_len = {self.max_len}; "
                "raise model.max_len or lower data.seq_len"
            )

    def embed_tokens(self, ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """ids (B, T) -> token (+ segment) embeddings (B, T, C); positions are added by the stack."""
        x = self.embed(ids) * self.embed_scale if self.embed_scale != 1.0 else self.embed(ids)
        if self.segment is not None:  # BERT adds the type-0 embedding when no types are given
            x = x + (self.segment(token_type_ids) if token_type_ids is not None else self.segment.weight[0])
        return x

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
               example_ids: Tensor | None = None):
        """Run the encoder: input_ids (B, S), attention_mask (B, S) 1 = real -> hidden states (B, S, C).
        example_ids (B, S): several examples packed in a row (`packed_masks`)."""
        if self.encoder is None:
            raise ValueError("encode() needs an encoder; this is a decoder-only model")
        B, S = input_ids.shape
        self.check_length(S)
        key_mask = attention_mask.bool() if attention_mask is not None else None
        x = self.embed_tokens(input_ids, token_type_ids)
        if example_ids is not None:
            pos, key_mask = kv.packed_masks(example_ids, key_mask)
            return self.encoder(x, pos, key_mask)
        return self.encoder(x, kv.position_ids(S, 0, key_mask, x.device), key_mask)

    def decode_hidden(
        self,
        ids: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        example_ids: Tensor | None = None,
        memory_example_ids: Tensor | None = None,
    ) -> Tensor:
        """Decoder hidden states (B, T, C) of the new tokens ids (B, T); see `decode`. example_ids (B, T): several
        examples packed in a row, trained without a cache (`packed_masks`); an encoder-decoder's also number the
        packed encoder rows (memory_example_ids (B, S)), each decoder token seeing its own example's only."""
        if self.decoder is None:
            raise ValueError("decode() needs a decoder; this is an encoder-only model")
        B, T = ids.shape
        past = cache.length if cache is not None else 0
        self.check_length(past + T)
        new_mask = attention_mask.bool() if attention_mask is not None else None
        if example_ids is not None or memory_example_ids is not None:
            if cache is not None or example_ids is None or (self.encoder is None) != (memory_example_ids is None):
                raise ValueError("packed rows train without a cache, numbering an encoder-decoder's both stacks")
            pos, key_mask = kv.packed_masks(example_ids, new_mask)
            cross = kv.packed_cross_mask(example_ids, memory_example_ids) if self.encoder is not None else None
            return self.decoder(self.embed_tokens(ids, token_type_ids), pos, key_mask, memory, cross)
        key_mask = cache.grow_mask(new_mask, B, T) if cache is not None else new_mask  # (B, L) or None
        cross_mask = None
        if self.encoder is not None:
            if cache is not None and cache.cross_kv:  # cross keys/values and their mask were kept
                cross_mask = cache.memory_mask
            elif memory is None:
                raise ValueError("an encoder-decoder's first decode() needs the encoder output `memory`")
            else:
                cross_mask = kv.padding_mask(memory_mask) if memory_mask is not None else None
                if cache is not None:
                    cache.memory_mask = cross_mask
        x = self.embed_tokens(ids, token_type_ids)
        h = self.decoder(x, kv.position_ids(T, past, key_mask, x.device), key_mask, memory, cross_mask, cache)
        if cache is not None:
            cache.length += T
        return h

    def decode(
        self,
        decoder_input_ids: Tensor,
        *,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V) of T new decoder tokens (B, T) after those in `cache` (if any).

        memory (B, S, C) / memory_mask (B, S): the encoder output and its padding (encoder-decoder; with a
        cache only on the first call). attention_mask (B, T): 1 = real new token (None = all real).
        """
        h = self.decode_hidden(decoder_input_ids, memory, memory_mask, cache, attention_mask)
        return self.lm_head(h, self.embed.weight)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        output_mask: Tensor | None = None,
        project: Projection | None = None,
        example_ids: Tensor | None = None,
        decoder_example_ids: Tensor | None = None,
    ) -> ModelOutput:
        """Training forward pass (module docstring): logits for every decoder position (decoder-only and
        encoder-decoder) or every input position (encoder); with output_mask (B, T) bool only for the
        selected positions, (N, V) in row-major order. With `project` the logits field holds what
        project(hidden (N|B, T, C), output weight (V, C), bias (V,) | None) returns instead: the caller's own
        projection runs inside the forward pass (where a sharded model's weights are gathered), and the model
        still computes no loss of its own. example_ids (B, T) pack several examples in a row: attention stays
        within each, positions restart at each (`packed_masks`); an encoder-decoder takes them for its encoder
        rows and decoder_example_ids (B, T_dec) for its decoder rows, the same examples in the same order."""
        if self.arch.kind == "encoder":
            h = self.encode(input_ids, attention_mask, token_type_ids, example_ids)
        elif self.arch.kind == "decoder":
            h = self.decode_hidden(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                   example_ids=example_ids)
        else:
            if decoder_input_ids is None:
                raise ValueError("an encoder-decoder needs decoder_input_ids")
            memory = self.encode(input_ids, attention_mask, token_type_ids, example_ids)
            h = self.decode_hidden(decoder_input_ids, memory, attention_mask, attention_mask=decoder_attention_mask,
                                   example_ids=decoder_example_ids, memory_example_ids=example_ids)
        if self.pooler is None:
            cls_logits = None
        else:
            cls_logits = self.pooler(h, kv.first_tokens(example_ids) if example_ids is not None else None)
        if output_mask is not None:
            h = h[output_mask]  # (N, C)
        return ModelOutput(self.lm_head(h, self.embed.weight, project), cls_logits)

    # ------------------------------------------------------------------------------ accounting
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters (a tied matrix once). non_embedding: without the token, segment and position
        tables, the relative bias and an untied output matrix (Kaplan et al. 2020's N)."""
        return self._count(self, non_embedding)

    def _count(self, module: nn.Module, non_embedding: bool) -> int:
        n = sum(p.numel() for p in module.parameters())
        if non_embedding:
            tables = [m.weight for m in module.modules() if isinstance(m, nn.Embedding)]
            if module is self and self.lm_head.proj is not None:
                tables.append(self.lm_head.proj.weight)
            n -= sum(w.numel() for w in tables)
        return n

    def flops_per_token(self, seq_len: int, dec_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per input token, for sequences of seq_len input tokens.

        6 x (non-embedding params + the d x V output matmul) per token, plus 12 x layers x d x context
        for the attention scores and weighted sum (PaLM, Chowdhery et al. 2022, appendix B; the causal
        half is not discounted). An encoder-decoder also runs its decoder on dec_len tokens (default
        seq_len) per sequence with cross-attention over seq_len; that work is spread over the seq_len
        input tokens. The output head is counted on every position (an MLM head on 15% runs less).
        """
        d, V = self.cfg.d_model, self.vocab_size
        if self.arch.kind != "encoder-decoder":
            L = self.cfg.n_layers
            return 6.0 * (self.num_params(non_embedding=True) + d * V) + 12.0 * L * d * seq_len
        S, T = seq_len, dec_len or seq_len
        n_enc, n_dec = self._count(self.encoder, True), self._count(self.decoder, True)
        n_cross_kv = sum(b.cross_attn.kv.weight.numel() for b in self.decoder.blocks)  # runs on memory
        n_rest = self.num_params(non_embedding=True) - n_enc - n_dec  # heads
        L_e, L_d = len(self.encoder.blocks), len(self.decoder.blocks)
        total = (
            6.0 * S * (n_enc + n_cross_kv)
            + 6.0 * T * (n_dec - n_cross_kv + n_rest + d * V)
            + 12.0 * d * (L_e * S * S + L_d * T * T + L_d * T * S)
        )
        return total / S
