"""The name maps between our backbone's weights and Hugging Face `transformers` checkpoints: one function per
family, every tensor named, the transposes and rescalings written out. The same map runs both ways (`to_hf`
for `pretrain export`, `from_hf` for `pretrain run --init-from`), so a round trip is exact.

Modelled on litgpt `litgpt/scripts/convert_lit_checkpoint.py` (one small function per family, an explicit
name map) and nanoGPT `model.py` `GPT.from_pretrained` (the list of Conv1D weights to transpose); the HF names
are those of transformers `models/{gpt2,llama,bert,roberta,t5,bart,mbart}/modeling_*.py`. What each family
must get right:

- GPT-2 (`GPT2LMHeadModel`): `Conv1D` stores weights (in, out), the transpose of `nn.Linear`; `c_attn` is
  q, k, v fused in that order, like our `qkv`.
- Llama (`LlamaForCausalLM`): separate q/k/v/o and gate/up/down; our RoPE already pairs dimensions
  (i, i + hs/2) as HF's `rotate_half` does, so no permutation of q/k rows.
- BERT (`BertForPreTraining`, `BertForMaskedLM`) and RoBERTa (`RobertaForMaskedLM`): separate q/k/v; the MLM
  transform, its bias and the NSP pooler. RoBERTa numbers positions from padding_idx + 1, so its table has
  padding_idx + 1 leading rows we lack (zeros), and a token-type table of one row (zeros: we have none).
- T5 (`T5ForConditionalGeneration`): no 1/sqrt(head size) in its attention, so we fold ours into q (self- and
  cross-attention); the relative bias lives in block 0 of each stack; FFN at `layer.1` (encoder) / `layer.2`
  (decoder, after `EncDecAttention`).
- BART / mBART (`BartForConditionalGeneration`, `MBartForConditionalGeneration`): learned positions with an
  offset of 2 (two leading rows, never read), `final_logits_bias` zeros; mBART adds a final norm per stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.config import Arch, ModelConfig
from models.layers import GATED


@dataclass(frozen=True)
class Map:
    """One of our tensors and the HF tensor(s) holding it."""

    ours: str
    hf: tuple[str, ...]  # several when ours is fused (q|k|v, k|v, gate|up): its rows split evenly, in order
    transpose: bool = False  # HF Conv1D stores (in, out)
    scale: float = 1.0  # multiplies the first HF part (T5's q carries our 1/sqrt(head size))
    offset: int = 0  # leading rows of an HF position table that we lack (zeros; never read)


@dataclass(frozen=True)
class Layout:
    """A family's complete name map: `maps`, plus the HF tensors we lack that must be zeros."""

    maps: list[Map]
    zeros: dict[str, tuple[int, ...]]  # HF name -> shape


def _linear(ours: str, hf: str | tuple[str, ...], bias: bool, **kw) -> list[Map]:
    """weight (and bias) of one of our linears; `hf` names the HF module(s) without `.weight`."""
    hf = (hf,) if isinstance(hf, str) else hf
    out = [Map(f"{ours}.weight", tuple(f"{h}.weight" for h in hf), **kw)]
    if bias:
        out.append(Map(f"{ours}.bias", tuple(f"{h}.bias" for h in hf), scale=kw.get("scale", 1.0)))
    return out


def _norm(ours: str, hf: str, cfg: ModelConfig) -> list[Map]:
    """A LayerNorm (weight, bias when the config has biases) or an RMSNorm (weight only)."""
    out = [Map(f"{ours}.weight", (f"{hf}.weight",))]
    if cfg.norm == "layernorm" and cfg.bias:
        out.append(Map(f"{ours}.bias", (f"{hf}.bias",)))
    return out


def _head(cfg: ModelConfig, hf: str) -> list[Map]:
    """An untied output projection (a tied one is the embedding matrix, already mapped)."""
    return [] if cfg.tie_embeddings else [Map("lm_head.proj.weight", (f"{hf}.weight",))]


def _qkv(prefix: str) -> tuple[str, str, str]:
    return tuple(f"{prefix}{x}" for x in ("q_proj", "k_proj", "v_proj"))


# ------------------------------------------------------------------------------------------------ decoders
def gpt2(cfg: ModelConfig, arch: Arch) -> Layout:
    """GPT2LMHeadModel: every projection a transposed Conv1D, biases everywhere, learned positions, ln_f."""
    m = [Map("embed.weight", ("transformer.wte.weight",)), Map("decoder.pos_embed.weight", ("transformer.wpe.weight",))]
    for i in range(cfg.n_layers):
        o, h = f"decoder.blocks.{i}", f"transformer.h.{i}"
        m += _norm(f"{o}.attn_norm", f"{h}.ln_1", cfg)
        m += [Map(f"{o}.attn.qkv.weight", (f"{h}.attn.c_attn.weight",), transpose=True),
              Map(f"{o}.attn.qkv.bias", (f"{h}.attn.c_attn.bias",)),
              Map(f"{o}.attn.out.weight", (f"{h}.attn.c_proj.weight",), transpose=True),
              Map(f"{o}.attn.out.bias", (f"{h}.attn.c_proj.bias",))]
        m += _norm(f"{o}.mlp_norm", f"{h}.ln_2", cfg)
        m += [Map(f"{o}.mlp.fc.weight", (f"{h}.mlp.c_fc.weight",), transpose=True),
              Map(f"{o}.mlp.fc.bias", (f"{h}.mlp.c_fc.bias",)),
              Map(f"{o}.mlp.out.weight", (f"{h}.mlp.c_proj.weight",), transpose=True),
              Map(f"{o}.mlp.out.bias", (f"{h}.mlp.c_proj.bias",))]
    m += _norm("decoder.final_norm", "transformer.ln_f", cfg) + _head(cfg, "lm_head")
    return Layout(m, {})


def llama(cfg: ModelConfig, arch: Arch) -> Layout:
    """LlamaForCausalLM: RMSNorm before each sub-layer, RoPE (no table), gate/up/down FFN, final norm."""
    m = [Map("embed.weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.n_layers):
        o, h = f"decoder.blocks.{i}", f"model.layers.{i}"
        m += _norm(f"{o}.attn_norm", f"{h}.input_layernorm", cfg)
        m += _linear(f"{o}.attn.qkv", _qkv(f"{h}.self_attn."), cfg.bias)
        m += _linear(f"{o}.attn.out", f"{h}.self_attn.o_proj", cfg.bias)
        m += _norm(f"{o}.mlp_norm", f"{h}.post_attention_layernorm", cfg)
        m += _linear(f"{o}.mlp.fc", (f"{h}.mlp.gate_proj", f"{h}.mlp.up_proj"), cfg.bias)
        m += _linear(f"{o}.mlp.out", f"{h}.mlp.down_proj", cfg.bias)
    m += _norm("decoder.final_norm", "model.norm", cfg) + _head(cfg, "lm_head")
    return Layout(m, {})


# ------------------------------------------------------------------------------------------------ encoders
def _bert_encoder(cfg: ModelConfig, root: str) -> list[Map]:
    """The embeddings and layers BERT and RoBERTa share (post-LN: attn_norm follows attention)."""
    e = f"{root}.embeddings"
    m = [Map("embed.weight", (f"{e}.word_embeddings.weight",))]
    m += _norm("encoder.embed_norm", f"{e}.LayerNorm", cfg)
    for i in range(cfg.n_layers):
        o, h = f"encoder.blocks.{i}", f"{root}.encoder.layer.{i}"
        s = f"{h}.attention.self"
        m += _linear(f"{o}.attn.qkv", (f"{s}.query", f"{s}.key", f"{s}.value"), cfg.bias)
        m += _linear(f"{o}.attn.out", f"{h}.attention.output.dense", cfg.bias)
        m += _norm(f"{o}.attn_norm", f"{h}.attention.output.LayerNorm", cfg)
        m += _linear(f"{o}.mlp.fc", f"{h}.intermediate.dense", cfg.bias)
        m += _linear(f"{o}.mlp.out", f"{h}.output.dense", cfg.bias)
        m += _norm(f"{o}.mlp_norm", f"{h}.output.LayerNorm", cfg)
    return m


def _mlm_head(cfg: ModelConfig, dense: str, norm: str, bias: str, decoder: str) -> list[Map]:
    return [*_linear("lm_head.dense", dense, cfg.bias), *_norm("lm_head.norm", norm, cfg),
            Map("lm_head.bias", (bias,)), *_head(cfg, decoder)]


def bert(cfg: ModelConfig, arch: Arch) -> Layout:
    """BertForPreTraining (with the NSP pooler and classifier) or BertForMaskedLM (without)."""
    m = [Map("encoder.pos_embed.weight", ("bert.embeddings.position_embeddings.weight",)),
         Map("segment.weight", ("bert.embeddings.token_type_embeddings.weight",)), *_bert_encoder(cfg, "bert")]
    p = "cls.predictions"
    m += _mlm_head(cfg, f"{p}.transform.dense", f"{p}.transform.LayerNorm", f"{p}.bias", f"{p}.decoder")
    if arch.classifier:
        m += [*_linear("pooler.dense", "bert.pooler.dense", cfg.bias),
              *_linear("pooler.classifier", "cls.seq_relationship", True)]
    return Layout(m, {})


def roberta(cfg: ModelConfig, arch: Arch, pad_id: int) -> Layout:
    """RobertaForMaskedLM: positions from padding_idx + 1, a one-row token-type table of zeros."""
    m = [Map("encoder.pos_embed.weight", ("roberta.embeddings.position_embeddings.weight",), offset=pad_id + 1),
         *_bert_encoder(cfg, "roberta")]
    m += _mlm_head(cfg, "lm_head.dense", "lm_head.layer_norm", "lm_head.bias", "lm_head.decoder")
    return Layout(m, {"roberta.embeddings.token_type_embeddings.weight": (1, cfg.d_model)})


# --------------------------------------------------------------------------------------- encoder-decoders
def t5(cfg: ModelConfig, arch: Arch) -> Layout:
    """T5ForConditionalGeneration: `shared`, relative bias in block 0 of each stack, q rescaled, no biases."""
    q = (cfg.d_model // cfg.n_heads) ** -0.5  # our SDPA scaling, folded into T5's unscaled q
    m = [Map("embed.weight", ("shared.weight",))]
    for side, n, ffn in (("encoder", cfg.n_layers, 1), ("decoder", cfg.dec_layers, 2)):
        m.append(Map(f"{side}.rel_bias.table.weight",
                     (f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)))
        for i in range(n):
            o, h = f"{side}.blocks.{i}", f"{side}.block.{i}.layer"
            a = f"{h}.0.SelfAttention"
            m += [Map(f"{o}.attn.qkv.weight", (f"{a}.q.weight", f"{a}.k.weight", f"{a}.v.weight"), scale=q),
                  Map(f"{o}.attn.out.weight", (f"{a}.o.weight",)), *_norm(f"{o}.attn_norm", f"{h}.0.layer_norm", cfg)]
            if side == "decoder":
                c = f"{h}.1.EncDecAttention"
                m += [Map(f"{o}.cross_attn.q.weight", (f"{c}.q.weight",), scale=q),
                      Map(f"{o}.cross_attn.kv.weight", (f"{c}.k.weight", f"{c}.v.weight")),
                      Map(f"{o}.cross_attn.out.weight", (f"{c}.o.weight",)),
                      *_norm(f"{o}.cross_norm", f"{h}.1.layer_norm", cfg)]
            d = f"{h}.{ffn}.DenseReluDense"
            wi = (f"{d}.wi_0.weight", f"{d}.wi_1.weight") if cfg.activation in GATED else (f"{d}.wi.weight",)
            m += [Map(f"{o}.mlp.fc.weight", wi), Map(f"{o}.mlp.out.weight", (f"{d}.wo.weight",)),
                  *_norm(f"{o}.mlp_norm", f"{h}.{ffn}.layer_norm", cfg)]
        m += _norm(f"{side}.final_norm", f"{side}.final_layer_norm", cfg)
    return Layout(m, {})


def bart(cfg: ModelConfig, arch: Arch, vocab_size: int) -> Layout:
    """BartForConditionalGeneration (post-LN) or MBartForConditionalGeneration (pre-LN, a final norm per stack):
    positions offset by 2, `final_logits_bias` zeros."""
    m = [Map("embed.weight", ("model.shared.weight",))]
    for side, n in (("encoder", cfg.n_layers), ("decoder", cfg.dec_layers)):
        s = f"model.{side}"
        m += [Map(f"{side}.pos_embed.weight", (f"{s}.embed_positions.weight",), offset=2),
              *_norm(f"{side}.embed_norm", f"{s}.layernorm_embedding", cfg)]
        for i in range(n):
            o, h = f"{side}.blocks.{i}", f"{s}.layers.{i}"
            m += _linear(f"{o}.attn.qkv", _qkv(f"{h}.self_attn."), cfg.bias)
            m += _linear(f"{o}.attn.out", f"{h}.self_attn.out_proj", cfg.bias)
            m += _norm(f"{o}.attn_norm", f"{h}.self_attn_layer_norm", cfg)
            if side == "decoder":
                m += _linear(f"{o}.cross_attn.q", f"{h}.encoder_attn.q_proj", cfg.bias)
                m += _linear(f"{o}.cross_attn.kv", (f"{h}.encoder_attn.k_proj", f"{h}.encoder_attn.v_proj"), cfg.bias)
                m += _linear(f"{o}.cross_attn.out", f"{h}.encoder_attn.out_proj", cfg.bias)
                m += _norm(f"{o}.cross_norm", f"{h}.encoder_attn_layer_norm", cfg)
            m += _linear(f"{o}.mlp.fc", f"{h}.fc1", cfg.bias) + _linear(f"{o}.mlp.out", f"{h}.fc2", cfg.bias)
            m += _norm(f"{o}.mlp_norm", f"{h}.final_layer_norm", cfg)
        if cfg.norm_placement == "pre":
            m += _norm(f"{side}.final_norm", f"{s}.layer_norm", cfg)
    m += _head(cfg, "lm_head")
    return Layout(m, {"final_logits_bias": (1, vocab_size)})


# ------------------------------------------------------------------------------------------------ the maps
def to_hf(layout: Layout, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the HF state dict (fp32, contiguous); every tensor of ours must be mapped."""
    out: dict[str, torch.Tensor] = {}
    for mp in layout.maps:
        t = ours[mp.ours].detach().float()
        parts = list(t.chunk(len(mp.hf))) if len(mp.hf) > 1 else [t]
        if mp.scale != 1.0:
            parts[0] = parts[0] * mp.scale
        if mp.offset:
            parts = [torch.cat([t.new_zeros(mp.offset, *t.shape[1:]), p]) for p in parts]
        for name, p in zip(mp.hf, parts, strict=True):
            out[name] = (p.t() if mp.transpose else p).contiguous()
    out.update({name: torch.zeros(shape) for name, shape in layout.zeros.items()})
    mapped = {mp.ours for mp in layout.maps}
    assert mapped == set(ours), f"unmapped {sorted(set(ours) - mapped)[:3]}, absent {sorted(mapped - set(ours))[:3]}"
    return out


def from_hf(layout: Layout, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF state dict -> ours: the inverse of `to_hf` (HF tensors we do not map, tied copies, are ignored)."""
    out = {}
    for mp in layout.maps:
        parts = [hf[name].detach().float() for name in mp.hf]
        parts = [p.t() if mp.transpose else p for p in parts]
        parts = [p[mp.offset:] for p in parts]
        if mp.scale != 1.0:
            parts[0] = parts[0] / mp.scale
        out[mp.ours] = torch.cat(parts).contiguous() if len(parts) > 1 else parts[0].contiguous()
    return out
