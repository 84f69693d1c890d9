"""Which Hugging Face class computes what a (ModelConfig, Arch) computes, and the HF config both ways.

The family follows from the switches alone, never from the objective: a decoder with learned positions is
GPT-2 and one with RoPE is Llama; an encoder with segments is BERT and one without is RoBERTa; an
encoder-decoder with the relative bias is T5, with learned positions BART (post-LN) or mBART (pre-LN). A
switch that the family's HF class cannot represent (pre-LN BERT, sinusoidal positions, a GPT-2 without
biases) is a one-line UserError naming the switch and the nearest exportable value, so export never writes a
folder that loads but computes something else. Field names follow transformers
`models/{gpt2,llama,bert,roberta,t5,bart,mbart}/configuration_*.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import Arch, ModelConfig
from models.layers import GATED
from pretrain.errors import UserError

# our activation -> the transformers ACT2FN name that computes exactly it (erf GELU, tanh GELU, ReLU)
ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "geglu": "gelu", "swiglu": "silu"}
ACT_BACK = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
            "gelu_python_tanh": "gelu_tanh", "relu": "relu"}
GATED_BACK = {"gelu": "geglu", "gelu_python": "geglu", "silu": "swiglu", "swish": "swiglu"}


@dataclass(frozen=True)
class Family:
    """An HF model class and the AutoModel class that loads it."""

    name: str  # gpt2, llama, bert, roberta, t5, bart, mbart (the key of pretrain.hf_map's functions)
    hf_class: str  # e.g. "GPT2LMHeadModel"
    auto_class: str  # e.g. "AutoModelForCausalLM"


FAMILIES = {
    "gpt2": Family("gpt2", "GPT2LMHeadModel", "AutoModelForCausalLM"),
    "llama": Family("llama", "LlamaForCausalLM", "AutoModelForCausalLM"),
    "bert": Family("bert", "BertForPreTraining", "AutoModelForPreTraining"),
    "bert-mlm": Family("bert", "BertForMaskedLM", "AutoModelForMaskedLM"),
    "roberta": Family("roberta", "RobertaForMaskedLM", "AutoModelForMaskedLM"),
    "t5": Family("t5", "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    "bart": Family("bart", "BartForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    "mbart": Family("bart", "MBartForConditionalGeneration", "AutoModelForSeq2SeqLM"),
}
HF_CLASSES = {f.hf_class: key for key, f in FAMILIES.items()}


def _need(cfg: ModelConfig, cls: str, **want) -> None:
    """UserError naming the first model switch that differs from what `cls` can represent."""
    for key, value in want.items():
        allowed = value if isinstance(value, tuple) else (value,)
        if getattr(cfg, key) not in allowed:
            others = f" (or {', '.join(map(repr, allowed[1:]))})" if len(allowed) > 1 else ""
            raise UserError(f"model.{key} = {getattr(cfg, key)!r} cannot be exported: {cls} needs {key} = "
                            f"{allowed[0]!r}{others}; train with --set model.{key}={allowed[0]} to export, or keep "
                            "using the run in pretrain")


PLAIN = ("gelu", "gelu_tanh", "relu")  # non-gated activations


def family(cfg: ModelConfig, arch: Arch) -> Family:
    """The HF family that computes exactly what (cfg, arch) computes; UserError naming the switch otherwise."""
    if arch.kind == "decoder":
        if cfg.positions == "rope":
            _need(cfg, "LlamaForCausalLM", norm="rmsnorm", norm_placement="pre", activation=GATED, embed_norm=False,
                  tied_output_scale=False)
            return FAMILIES["llama"]
        _need(cfg, "GPT2LMHeadModel (or LlamaForCausalLM with positions 'rope')", positions="learned")
        _need(cfg, "GPT2LMHeadModel", norm="layernorm", norm_placement="pre", bias=True, activation=PLAIN,
              embed_norm=False, tied_output_scale=False)
        return FAMILIES["gpt2"]
    if arch.kind == "encoder":
        name = "BertForPreTraining" if arch.segments else "RobertaForMaskedLM"
        _need(cfg, name, positions="learned", norm="layernorm", norm_placement="post", bias=True, embed_norm=True,
              activation=PLAIN if arch.segments else "gelu", tied_output_scale=False)
        if not arch.lm_transform or arch.classifier not in ((0, 2) if arch.segments else (0,)):
            raise UserError(f"an encoder with heads {arch} has no Hugging Face class; export supports BERT's MLM head "
                            "with or without NSP (segments) and RoBERTa's (no segments)")
        return FAMILIES["bert" if arch.classifier else "bert-mlm"] if arch.segments else FAMILIES["roberta"]
    if cfg.positions == "relative":
        _need(cfg, "T5ForConditionalGeneration", norm="rmsnorm", norm_placement="pre", bias=False, embed_norm=False,
              tie_embeddings=True)
        return FAMILIES["t5"]
    _need(cfg, "BartForConditionalGeneration (or T5ForConditionalGeneration with positions 'relative')",
          positions="learned")
    _need(cfg, "BartForConditionalGeneration", norm="layernorm", bias=True, embed_norm=True, activation=PLAIN,
          tied_output_scale=False, norm_eps=1e-5)  # BART's LayerNorms keep torch's default eps
    return FAMILIES["bart" if cfg.norm_placement == "post" else "mbart"]


# ------------------------------------------------------------------------------------------------ export
def hf_config(fam: Family, cfg: ModelConfig, vocab_size: int, ids: dict[str, int]) -> dict:
    """The HF config fields of `fam` for our config; `ids`: pad, bos, eos, decoder_start token ids."""
    d, act, tok = cfg.d_model, ACT[cfg.activation], {k: v for k, v in ids.items() if k != "decoder_start_token_id"}
    common = {"vocab_size": vocab_size, "tie_word_embeddings": cfg.tie_embeddings, **tok}
    if fam.name == "gpt2":
        return {**common, "n_embd": d, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
                "n_positions": cfg.max_len, "activation_function": act, "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                "initializer_range": cfg.init_std}
    if fam.name == "llama":
        return {**common, "hidden_size": d, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": cfg.n_heads, "intermediate_size": cfg.d_ff, "hidden_act": act,
                "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.bias,
                "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout, "initializer_range": cfg.init_std,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    if fam.name in ("bert", "roberta"):
        roberta = fam.name == "roberta"
        return {**common, "hidden_size": d, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                "intermediate_size": cfg.d_ff, "hidden_act": act, "layer_norm_eps": cfg.norm_eps,
                "max_position_embeddings": cfg.max_len + (ids["pad_token_id"] + 1 if roberta else 0),
                "type_vocab_size": 1 if roberta else 2, "hidden_dropout_prob": cfg.dropout,
                "attention_probs_dropout_prob": cfg.dropout, "initializer_range": cfg.init_std,
                "position_embedding_type": "absolute"}
    if fam.name == "t5":
        ffn = (f"gated-{'gelu_python' if cfg.activation == 'geglu' else act}" if cfg.activation in GATED else act)
        return {**common, "d_model": d, "d_kv": d // cfg.n_heads, "d_ff": cfg.d_ff, "num_layers": cfg.n_layers,
                "num_decoder_layers": cfg.dec_layers, "num_heads": cfg.n_heads, "feed_forward_proj": ffn,
                "relative_attention_num_buckets": cfg.rel_buckets, "layer_norm_epsilon": cfg.norm_eps,
                "relative_attention_max_distance": cfg.rel_max_distance, "dropout_rate": cfg.dropout,
                "n_positions": cfg.max_len, "decoder_start_token_id": ids["decoder_start_token_id"],
                # transformers' T5 always ties; tie_word_embeddings false means "no d_model**-0.5 rescale"
                "tie_word_embeddings": cfg.tied_output_scale}
    return {**common, "d_model": d, "encoder_layers": cfg.n_layers, "decoder_layers": cfg.dec_layers,
            "encoder_attention_heads": cfg.n_heads, "decoder_attention_heads": cfg.n_heads,
            "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff, "activation_function": act,
            "max_position_embeddings": cfg.max_len, "dropout": cfg.dropout, "attention_dropout": cfg.dropout,
            "activation_dropout": 0.0, "init_std": cfg.init_std, "scale_embedding": False,
            "decoder_start_token_id": ids["decoder_start_token_id"], "forced_eos_token_id": None}


# ------------------------------------------------------------------------------------------------ import
def model_fields(fam: Family, c) -> dict:
    """Our ModelConfig fields read from the HF config object `c` of family `fam` (the inverse of `hf_config`);
    UserError when `c` uses a feature our backbone lacks."""
    def refuse(what: str) -> UserError:
        return UserError(f"the {fam.hf_class} checkpoint uses {what}, which the pretrain backbone does not have; "
                         "give a checkpoint without it")

    if fam.name == "gpt2":
        if c.scale_attn_by_inverse_layer_idx or c.reorder_and_upcast_attn or not c.scale_attn_weights:
            raise refuse("a non-standard attention scaling")
        return dict(n_layers=c.n_layer, n_heads=c.n_head, d_model=c.n_embd, d_ff=c.n_inner or 4 * c.n_embd,
                    max_len=c.n_positions, norm="layernorm", norm_placement="pre", norm_eps=c.layer_norm_epsilon,
                    positions="learned", activation=_act(c.activation_function, refuse), bias=True,
                    embed_norm=False, tie_embeddings=c.tie_word_embeddings, tied_output_scale=False)
    if fam.name == "llama":
        rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": c.rope_theta}
        if c.num_key_value_heads != c.num_attention_heads or rope.get("rope_type", "default") != "default":
            raise refuse("grouped-query attention or scaled RoPE")
        if c.attention_bias != c.mlp_bias or c.head_dim * c.num_attention_heads != c.hidden_size:
            raise refuse("biases in only some projections or a head size other than hidden_size / heads")
        return dict(n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads, d_model=c.hidden_size,
                    d_ff=c.intermediate_size, max_len=c.max_position_embeddings, norm="rmsnorm", norm_placement="pre",
                    norm_eps=c.rms_norm_eps, positions="rope", rope_theta=float(rope["rope_theta"]),
                    activation=_gated(c.hidden_act, refuse), bias=c.attention_bias, embed_norm=False,
                    tie_embeddings=c.tie_word_embeddings, tied_output_scale=False)
    if fam.name in ("bert", "roberta"):
        if c.position_embedding_type != "absolute":
            raise refuse(f"position_embedding_type {c.position_embedding_type!r}")
        shift = c.pad_token_id + 1 if fam.name == "roberta" else 0
        return dict(n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads, d_model=c.hidden_size,
                    d_ff=c.intermediate_size, max_len=c.max_position_embeddings - shift, norm="layernorm",
                    norm_placement="post", norm_eps=c.layer_norm_eps, positions="learned",
                    activation=_act(c.hidden_act, refuse), bias=True, embed_norm=True,
                    tie_embeddings=c.tie_word_embeddings, tied_output_scale=False)
    if fam.name == "t5":
        act = GATED_BACK.get(c.dense_act_fn) if c.is_gated_act else ACT_BACK.get(c.dense_act_fn)
        if act is None:
            raise refuse(f"the activation {c.feed_forward_proj!r}")
        return dict(n_layers=c.num_layers, n_dec_layers=c.num_decoder_layers, n_heads=c.num_heads, d_model=c.d_model,
                    d_ff=c.d_ff, max_len=getattr(c, "n_positions", 512), norm="rmsnorm", norm_placement="pre",
                    norm_eps=c.layer_norm_epsilon, positions="relative", rel_buckets=c.relative_attention_num_buckets,
                    rel_max_distance=c.relative_attention_max_distance, activation=act, bias=False, embed_norm=False,
                    tie_embeddings=True, tied_output_scale=bool(c.scale_decoder_outputs))
    if (c.scale_embedding or c.encoder_attention_heads != c.decoder_attention_heads
            or c.encoder_ffn_dim != c.decoder_ffn_dim):
        raise refuse("scaled embeddings or encoder and decoder of different widths")
    return dict(n_layers=c.encoder_layers, n_dec_layers=c.decoder_layers, n_heads=c.encoder_attention_heads,
                d_model=c.d_model, d_ff=c.encoder_ffn_dim, max_len=c.max_position_embeddings, norm="layernorm",
                norm_placement="post" if fam.hf_class.startswith("Bart") else "pre", norm_eps=1e-5,
                positions="learned", activation=_act(c.activation_function, refuse), bias=True, embed_norm=True,
                tie_embeddings=c.tie_word_embeddings, tied_output_scale=False)


def _act(name: str, refuse) -> str:
    if name not in ACT_BACK:
        raise refuse(f"the activation {name!r}")
    return ACT_BACK[name]


def _gated(name: str, refuse) -> str:
    if name not in GATED_BACK:
        raise refuse(f"the gated activation {name!r}")
    return GATED_BACK[name]


def arch_of(fam_key: str) -> Arch:
    """The arrangement an HF class holds (what the objective's `arch` must equal for `--init-from`)."""
    return {"gpt2": Arch("decoder"), "llama": Arch("decoder"), "t5": Arch("encoder-decoder"),
            "bart": Arch("encoder-decoder"), "mbart": Arch("encoder-decoder"),
            "bert": Arch("encoder", segments=True, lm_transform=True, classifier=2),
            "bert-mlm": Arch("encoder", segments=True, lm_transform=True),
            "roberta": Arch("encoder", lm_transform=True)}[fam_key]
