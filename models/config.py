"""ModelConfig (the sizes and the few structural switches of the one Transformer backbone) and Arch (its
arrangement).

The arrangement (decoder / encoder / encoder-decoder, segment embeddings, heads) is not a recipe setting:
each objective supplies its `Arch`, so a recipe cannot pair an objective with the wrong arrangement. The
vocabulary size comes from the tokenizer and is passed to the model, never written back.

`models/` is a leaf: it imports nothing from the rest of the project. A bad value raises `ValueError` with a
message naming the `model.` key; the config layer turns it into the user's one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Norm = Literal["layernorm", "rmsnorm"]
Placement = Literal["pre", "post"]
Positions = Literal["learned", "sinusoidal", "relative", "rope"]
Activation = Literal["gelu", "gelu_tanh", "relu", "geglu", "swiglu"]


@dataclass(frozen=True)
class Arch:
    """The model arrangement an objective needs; the recipe only chooses sizes."""

    kind: Literal["decoder", "encoder", "encoder-decoder"]
    segments: bool = False  # token type (segment) embeddings with 2 types, as BERT
    lm_transform: bool = False  # BERT's MLM head: dense + activation + LayerNorm before the tied output, plus bias
    classifier: int = 0  # > 0: a pooler (dense + tanh on the first token) and a classifier with this many classes

    def __post_init__(self) -> None:
        if self.kind not in ("decoder", "encoder", "encoder-decoder"):
            raise ValueError(f"arch kind must be decoder, encoder or encoder-decoder, got {self.kind!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and switches of the backbone. Every field has a default and a one-line meaning."""

    n_layers: int = 4  # layers of a decoder-only or encoder-only model; encoder layers of an encoder-decoder
    n_dec_layers: int = 0  # decoder layers of an encoder-decoder (0 = same as n_layers)
    n_heads: int = 4  # attention heads; d_model must divide by it
    d_model: int = 256  # hidden size
    d_ff: int = 1024  # feed-forward inner size (per branch for gated activations)
    max_len: int = 512  # size of the position table (learned/sinusoidal); longest sequence the model accepts
    dropout: float = 0.0  # dropout on embeddings, attention probabilities, residual branches
    norm: Norm = "layernorm"  # layernorm (mean and variance) or rmsnorm (T5: scale only)
    norm_placement: Placement = "pre"  # pre-LN (GPT-2, T5) or post-LN (original Transformer, BERT, BART)
    norm_eps: float = 1e-5  # epsilon inside the norms
    positions: Positions = "learned"  # learned absolute, sinusoidal, T5 relative bias, or rotary (RoPE)
    rel_buckets: int = 32  # relative position buckets (positions = "relative")
    rel_max_distance: int = 128  # distance beyond which relative positions share the last bucket
    rope_theta: float = 10000.0  # RoPE base (positions = "rope")
    activation: Activation = "gelu"  # FFN activation: gelu (erf), gelu_tanh (GPT-2), relu, geglu, swiglu
    bias: bool = True  # biases in linear layers and norms (T5 has none)
    embed_norm: bool = False  # LayerNorm on the embeddings (BERT, BART)
    tie_embeddings: bool = True  # output projection shares the input embedding matrix
    tied_output_scale: bool = False  # T5 v1.0: hidden state x d_model**-0.5 before the tied output projection
    init_std: float = 0.02  # std of the normal init; residual output projections get init_std/sqrt(2*layers)

    def __post_init__(self) -> None:
        for key in ("n_layers", "n_heads", "d_model", "d_ff", "max_len", "rel_buckets", "rel_max_distance"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.n_dec_layers < 0:
            raise ValueError(f"model.n_dec_layers must be >= 0 (0 = same as n_layers), got {self.n_dec_layers}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}); "
                "change one of them"
            )
        if self.positions == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError("model.positions = 'rope' needs an even head size (d_model / n_heads)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.init_std <= 0 or self.norm_eps <= 0:
            raise ValueError("model.init_std and model.norm_eps must be > 0")
        if self.positions == "relative" and not self.rel_max_distance > self.rel_buckets // 2 >= 2:
            raise ValueError(
                f"model.rel_buckets ({self.rel_buckets}) must be >= 4 and model.rel_max_distance "
                f"({self.rel_max_distance}) above rel_buckets / 2; T5 uses 32 and 128"
            )

    @property
    def dec_layers(self) -> int:
        """Decoder layers of an encoder-decoder (derived, never written back)."""
        return self.n_dec_layers or self.n_layers
