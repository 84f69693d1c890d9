"""The pieces of one Transformer layer, in the order the papers introduce them: norms, position
encodings, multi-head attention, the position-wise feed-forward network, and the block that joins them
with residual connections. `models/transformer.py` stacks blocks into the encoder / decoder and adds
embeddings, heads and the KV cache; its docstring lists the papers and our deliberate deviations.

- Multi-head scaled dot-product attention, position-wise FFN, residuals, sinusoidal positions:
  Vaswani et al. 2017, "Attention Is All You Need" (§3.2, §3.3, §3.5).
- Pre-LN placement: Radford et al. 2019 (GPT-2), Xiong et al. 2020; post-LN: Vaswani et al., Devlin et
  al. 2019 (BERT), Lewis et al. 2019 (BART).
- RMSNorm and the bucketed relative position bias: Raffel et al. 2020 (T5); Zhang & Sennrich 2019.
- Rotary position embedding (RoPE): Su et al. 2021, "RoFormer".
- GEGLU / SwiGLU feed-forward: Shazeer 2020, "GLU Variants Improve Transformer".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig

EXPLICIT_KEYS = 512  # CPU attention under bf16 over at most this many keys runs `explicit_attention`
KV = tuple[Tensor, Tensor]
"""Keys and values of one attention layer, each (B, nh, L, hs)."""


# ----------------------------------------------------------------------------------------------- norms
def make_norm(cfg: ModelConfig) -> nn.Module:
    """LayerNorm (centre and scale, optional bias) or RMSNorm (T5: scale only, no mean, no bias)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (Zhang & Sennrich 2019; T5's norm), what
    `nn.RMSNorm` computes, with the same `weight`. On CPU it runs `_RMSNormFn`: torch's CPU RMSNorm is composite
    (pow, mean, rsqrt and two products forward, about ten passes backward): 1.5 ms forward + backward on
    16 x 128 x 256 here against 1.0 for ours, and a tiny T5 runs 22 of them a step. Elsewhere it is `F.rms_norm`."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu":
            return _RMSNormFn.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward, in x's dtype with autocast off (as `nn.RMSNorm` runs under it):
    r = (mean(x^2) + eps)^-1/2, y = x r w; dx = r (g w) - x r^3 mean(g w x), dw = sum over rows of g x r."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # noqa: D102 (autograd's own signature)
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(x.dtype)
            acc = torch.promote_types(x.dtype, torch.float32)  # the statistics in fp32 at least
            r = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)  # (..., 1)
            r = r.square_().div_(x.size(-1)).add_(eps).rsqrt_()
            y = x * r.to(x.dtype)
            y *= w
        ctx.save_for_backward(x, r, w)
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        x, r, w = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            d = x.size(-1)
            gw_x = g * w  # (..., d) the gradient w.r.t. x r
            coef = torch.linalg.vecdot(gw_x, x, dim=-1).unsqueeze(-1).to(r.dtype).mul_(r.pow(3)).div_(-d)  # (..., 1)
            dx = gw_x.mul_(r.to(x.dtype)).addcmul_(x, coef.to(x.dtype))
            dw = torch.mv((g * x).reshape(-1, d).t().to(r.dtype), r.reshape(-1)) if ctx.needs_input_grad[1] else None
        return dx, dw.to(ctx.weight_dtype) if dw is not None else None, None


# ------------------------------------------------------------------------------------------ activations
GATED = ("geglu", "swiglu")
"""Activations of the gated FFN (Shazeer 2020): act(x W) * (x V), two input projections."""


def gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). In bf16 on CPU it is evaluated by the erf
    GELU kernel: torch's CPU tanh-GELU runs 5.5x slower than its erf one there (forward 1.8 against 0.33 ms on
    16 x 128 x 1024 here, backward 1.9 against 0.7), 10% of a tiny GPT-2 step, while the two functions differ by
    at most 4.7e-4 (at x = 2.7, where bf16's spacing is 0.016): over every bf16 input in [-12, 12] the output is
    within that gap plus one bf16 rounding of the exact tanh form, its gradient within 1.5e-3 plus one
    (tests/test_transformer.py). fp32, fp16 and accelerators keep the tanh form."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return F.gelu(x)
    return F.gelu(x, approximate="tanh")


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise non-linearity; a gated variant returns the function applied to its gate."""
    return {
        "gelu": F.gelu,  # erf form (BERT)
        "gelu_tanh": gelu_tanh,  # GPT-2's approximation
        "relu": F.relu,  # Vaswani et al., T5 v1.0
        "geglu": F.gelu,
        "swiglu": F.silu,
    }[name]


# ------------------------------------------------------------------------------------ position encodings
def sinusoid_table(n: int, d: int) -> Tensor:
    """Vaswani et al. §3.5: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same). Returns (n, d)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]  # (n, 1)
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))  # (ceil(d/2),)
    angle = pos * freq  # (n, ceil(d/2))
    pe = torch.zeros(n, d)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d // 2])
    return pe


def rope_angles(pos: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles pos * theta^(-2i/hs) (Su et al.), each (B|1, 1, T, hs/2);
    pos (B|1, T) holds each token's absolute position."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angle = pos[:, None, :, None].float() * inv_freq  # (B|1, 1, T, hs/2)
    return angle.cos(), angle.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+hs/2}) of x (B, nh, T, hs) by the angles (the GPT-NeoX / LLaMA pairing of
    dimensions; the paper pairs neighbours, an equivalent permutation of the head dimensions)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, nh, T, hs)


def relative_bucket(rel: Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each relative position rel = key position - query position.

    Half the buckets (a quarter with direction) hold exact small distances, the rest grow
    logarithmically up to max_distance, beyond which distances share the last bucket. Bidirectional
    (encoder): keys after the query use the upper half. Causal (decoder): future keys are masked anyway,
    so they fall into bucket 0 with the key itself.
    """
    n = -rel  # > 0: the key is in the past
    bucket = torch.zeros_like(n)
    if bidirectional:
        n_buckets //= 2
        bucket = (n < 0).long() * n_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    exact = n_buckets // 2
    log_ratio = torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (n_buckets - exact)).long()).clamp(max=n_buckets - 1)
    return bucket + torch.where(n < exact, n, large)


class RelativeBias(nn.Module):
    """T5's relative position bias: one learned scalar per (bucket, head), added to the attention logits.

    As in T5 it lives once per stack (T5 keeps it in the first layer) and is shared by all its layers.
    """

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.n_buckets, self.max_distance = cfg.rel_buckets, cfg.rel_max_distance
        self.table = nn.Embedding(cfg.rel_buckets, cfg.n_heads)

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """q_pos (Tq,), k_pos (Tk,) positions -> additive bias (1, nh, Tq, Tk)."""
        rel = k_pos[None, :] - q_pos[:, None]  # (Tq, Tk)
        bucket = relative_bucket(rel, self.bidirectional, self.n_buckets, self.max_distance)
        return self.table(bucket).permute(2, 0, 1).unsqueeze(0)  # (Tq, Tk, nh) -> (1, nh, Tq, Tk)


# -------------------------------------------------------------------------------------------- attention
@dataclass
class Context:
    """What every layer of a stack shares in one forward pass; the stack builds it once."""

    mask: Tensor | None  # self-attention mask, broadcastable to (B, nh, T, L): bool (True = may see) or additive
    is_causal: bool  # SDPA's causal fast path (decoder, no padding, no bias, no cache)
    rope: tuple[Tensor, Tensor] | None  # (cos, sin) for the new tokens, (B|1, 1, T, hs/2) each
    memory: Tensor | None = None  # (B, S, C) encoder output (cross-attention)
    memory_mask: Tensor | None = None  # (B, 1, 1, S) bool, True = real encoder token


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
                       dropout_p: float) -> Tensor:
    """softmax(q k^T / sqrt(hs) + mask) v, what `F.scaled_dot_product_attention` computes, written out in q's
    dtype: the mask is added in place to the scores, and the softmax (fp32 inside, as torch's CPU kernel does for
    bf16) writes bf16 probabilities, as Hugging Face's eager attention under autocast holds them. q (B, nh, T, hs),
    k and v (B, nh, L, hs), mask as in `Context`. On CPU under bf16, fwd + bwd of one layer's attention takes
    3.0 ms at 16 x 4 heads x 128 keys against SDPA's 10.9 ms, 9.2 against 16.4 at 8 x 8 x 256, 14.9 against 22.8
    at 4 x 8 x 512, and loses at 1024 keys (60.8 against 39.3); it holds the (B, nh, T, L) scores, so it is kept
    to EXPLICIT_KEYS."""
    T, L = q.size(-2), k.size(-2)
    scores = torch.matmul(q * q.size(-1) ** -0.5, k.transpose(-1, -2))  # (B, nh, T, L)
    if is_causal:
        scores.add_(torch.full((T, L), float("-inf"), dtype=scores.dtype, device=q.device).triu(L - T + 1))
    elif mask is not None and mask.dtype == torch.bool:
        scores.add_(torch.zeros(mask.shape, dtype=scores.dtype, device=q.device).masked_fill_(~mask, float("-inf")))
    elif mask is not None:
        scores.add_(mask)  # additive (the relative position bias, -inf where a key is hidden)
    p = torch.softmax(scores, -1)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, v)


class Attention(nn.Module):
    """Multi-head attention (Vaswani et al. §3.2.2) through `F.scaled_dot_product_attention`, or
    `explicit_attention` where that is faster (CPU, bf16, short keys).

    Self-attention projects q, k, v from x with one fused matmul; cross-attention projects q from x and
    k, v from the encoder output.
    """

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.cross, self.dropout = cfg.n_heads, cross, cfg.dropout
        if cross:
            self.q = nn.Linear(d, d, bias=cfg.bias)
            self.kv = nn.Linear(d, 2 * d, bias=cfg.bias)
        else:
            self.qkv = nn.Linear(d, 3 * d, bias=cfg.bias)
        self.out = nn.Linear(d, d, bias=cfg.bias)  # residual output projection (scaled init)

    def split_heads(self, x: Tensor, n: int) -> list[Tensor]:
        """(B, T, n*C) -> n tensors (B, nh, T, hs)."""
        B, T, _ = x.shape
        x = x.view(B, T, n, self.n_heads, -1)  # (B, T, n, nh, hs)
        return list(x.permute(2, 0, 3, 1, 4).unbind(0))  # n x (B, nh, T, hs)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        memory: Tensor | None = None,
        cached: KV | None = None,
    ) -> tuple[Tensor, KV]:
        """x (B, T, C) -> (B, T, C), and the keys/values attended to (for the cache).

        `cached`: keys/values kept from earlier steps. Self-attention appends the new tokens' k, v to
        them; cross-attention reuses them as they are (the encoder output does not change), else
        projects `memory` (B, S, C).
        """
        B, T, C = x.shape
        if self.cross:
            (q,) = self.split_heads(self.q(x), 1)  # (B, nh, T, hs)
            k, v = cached if cached is not None else self.split_heads(self.kv(memory), 2)  # (B, nh, S, hs)
        else:
            q, k, v = self.split_heads(self.qkv(x), 3)  # (B, nh, T, hs) each
            if rope is not None:  # rotate the new tokens' queries and keys by their own positions
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cached is not None:
                k, v = torch.cat((cached[0], k), dim=2), torch.cat((cached[1], v), dim=2)  # (B, nh, L, hs)
        drop = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.size(2) <= EXPLICIT_KEYS:
            y = explicit_attention(q, k, v, mask, is_causal, drop)  # (B, nh, T, hs)
        else:
            if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
                mask = mask.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=drop)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out(y), (k, v)


# ------------------------------------------------------------------------------------------ feed-forward
class MLP(nn.Module):
    """Position-wise feed-forward network (Vaswani et al. §3.3): act(x W1) W2; gated variants (Shazeer
    2020) use (act(x W) * x V) W2, with W and V fused into one matmul of width 2 * d_ff."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.activation in GATED
        self.act = activation_fn(cfg.activation)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff * (2 if self.gated else 1), bias=cfg.bias)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)  # residual output projection (scaled init)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        h = self.fc(x)  # (B, T, d_ff) or (B, T, 2 * d_ff)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)  # (B, T, d_ff) each
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.out(h)


# ------------------------------------------------------------------------------------------------- block
class Block(nn.Module):
    """One layer: self-attention, cross-attention (decoder of an encoder-decoder), feed-forward; each
    sub-layer wrapped in a residual connection with its norm before (pre-LN) or after (post-LN)."""

    def __init__(self, cfg: ModelConfig, cross: bool):
        super().__init__()
        self.pre = cfg.norm_placement == "pre"
        self.attn_norm, self.attn = make_norm(cfg), Attention(cfg)
        self.cross_norm = make_norm(cfg) if cross else None
        self.cross_attn = Attention(cfg, cross=True) if cross else None
        self.mlp_norm, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def residual_outputs(self) -> list[nn.Linear]:
        """The projections that write into the residual stream (GPT-2 scales their init)."""
        outs = [self.attn.out, self.mlp.out]
        return outs + ([self.cross_attn.out] if self.cross_attn is not None else [])

    def add(self, x: Tensor, y: Tensor, norm: nn.Module) -> Tensor:
        """Residual connection: pre-LN x + y (y was computed from norm(x)); post-LN norm(x + y)."""
        return x + self.drop(y) if self.pre else norm(x + self.drop(y))

    def forward(self, x: Tensor, ctx: Context, cached_self: KV | None = None, cached_cross: KV | None = None):
        """x (B, T, C) -> (B, T, C), self-attention k/v (B, nh, L, hs), cross-attention k/v or None."""
        h = self.attn_norm(x) if self.pre else x
        y, self_kv = self.attn(h, ctx.mask, ctx.is_causal, ctx.rope, cached=cached_self)
        x = self.add(x, y, self.attn_norm)
        cross_kv = None
        if self.cross_attn is not None:
            h = self.cross_norm(x) if self.pre else x
            y, cross_kv = self.cross_attn(h, ctx.memory_mask, memory=ctx.memory, cached=cached_cross)
            x = self.add(x, y, self.cross_norm)
        h = self.mlp_norm(x) if self.pre else x
        x = self.add(x, self.mlp(h), self.mlp_norm)
        return x, self_kv, cross_kv
