"""`pretrain run --init-from DIR`: start a run (new optimizer, step 0) from the weights of a Hugging Face
folder of one of the exportable families, for continued pretraining.

The model config comes from the folder (`pretrain.hf_config.model_fields`), the tokenizer from its
sentencepiece `tokenizer.model` (which `pretrain export` writes; it must hold our special pieces at their
ids), and the weights through the same name map as export, inverted (`pretrain.hf_map.from_hf`), so export ->
--init-from -> export gives the same tensors byte for byte. A recipe's or --set's model key that disagrees
with the folder is an error naming the key. A hub name goes to `from_pretrained` unchanged, so users with a
hub get it for free. Weights are read from safetensors only: a pickle checkpoint (`pytorch_model.bin`) is
refused, never unpickled.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.errors import UserError

if TYPE_CHECKING:
    import torch

    from pretrain.config import Config
    from pretrain.hf_config import Family

PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def _family(source: str) -> tuple[str, Family, object]:
    """The family's key and the family and HF config of `source`; UserError when it is no HF model of ours or
    holds only pickles."""
    from pretrain.export import require_transformers
    from pretrain.hf_config import FAMILIES, HF_CLASSES

    transformers = require_transformers()
    path = Path(source)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"--init-from {source} is not a Hugging Face model folder (no config.json); give a folder "
                            "written by `pretrain export` or by transformers' save_pretrained")
        if not any(path.glob("*.safetensors")):
            pickles = [p for p in PICKLES if (path / p).exists()]
            what = f"only {pickles[0]}, a pickle file, which pretrain never unpickles" if pickles else "no weights"
            raise UserError(f"--init-from {source} holds {what}; save the model as safetensors "
                            "(model.save_pretrained(DIR, safe_serialization=True)) and give that folder")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"--init-from {source} is not a Hugging Face model ({str(e).splitlines()[0]})") from None
    names = [a for a in (config.architectures or []) if a in HF_CLASSES]
    if not names:
        raise UserError(f"--init-from {source} holds {config.architectures or config.model_type}, not one of the "
                        f"families pretrain trains: {', '.join(HF_CLASSES)}")
    return HF_CLASSES[names[0]], FAMILIES[HF_CLASSES[names[0]]], config


def _tokenizer(source: str) -> str:
    """The path of the folder's sentencepiece model (for a hub name, downloaded to the HF cache)."""
    from transformers.utils import cached_file

    path = cached_file(source, "tokenizer.model", _raise_exceptions_for_missing_entries=False)
    if path is None:
        raise UserError(f"--init-from {source} has no tokenizer.model (a sentencepiece model with pretrain's special "
                        "pieces); export the model with `pretrain export` so the folder carries it")
    return path


def init_config(source: str, cfg: Config, sources: list, explicit: bool) -> tuple[Config, list]:
    """`cfg` with the model config and tokenizer of the HF model `source`; UserError when its family is not the
    arrangement the objective needs, or a model key set by the recipe (when given explicitly with --recipe),
    a flag or --set disagrees with the folder. Returns the new config and sources."""
    from pretrain.hf_config import arch_of, model_fields
    from pretrain.tokenizer import Tokenizer

    key, fam, hf = _family(source)
    arch, want = arch_of(key), cfg.objective.arch
    if arch != want:
        raise UserError(f"--init-from {source} holds a {fam.hf_class} ({arch.kind}, segments={arch.segments}, "
                        f"classifier={arch.classifier}) but objective {cfg.objective.name} needs {want.kind}, segments="
                        f"{want.segments}, classifier={want.classifier}; give a model of that family")
    fields = model_fields(fam, hf)
    said = {k[len("model."):]: src for k, _, src in sources if k.startswith("model.") and (explicit or src != "recipe")}
    for k, value in fields.items():
        if k in said and getattr(cfg.model, k) != value:
            raise UserError(f"model.{k} = {getattr(cfg.model, k)!r} ({said[k]}) but --init-from {source} holds "
                            f"{value!r}; drop model.{k} (the model config comes from the folder)")
    tok_path = _tokenizer(source)
    tok = Tokenizer.load(tok_path, cfg.objective.special_pieces)
    if tok.size != hf.vocab_size:
        raise UserError(f"--init-from {source}: its tokenizer.model has {tok.size} pieces but the model "
                        f"{hf.vocab_size}; give a folder written by `pretrain export`")
    model = dataclasses.replace(cfg.model, **fields)
    new = dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, tokenizer=tok_path))
    added = [(f"model.{k}", v, "--init-from") for k, v in fields.items() if k not in said]
    return new, [*sources, *added, ("data.tokenizer", tok_path, "--init-from"), ("init_from", source, "--init-from")]


def hf_state(source: str, fam: Family) -> dict[str, torch.Tensor]:
    """The HF model's state dict (fp32) read through transformers from safetensors only."""
    import torch

    from pretrain.export import require_transformers

    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()
    model = getattr(transformers, fam.auto_class).from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    return model.state_dict()


def load_into(model: torch.nn.Module, source: str, cfg: Config) -> None:
    """Copy the weights of the HF model `source` into our freshly built `model` (config from `init_config`)."""
    import torch

    from pretrain import hf_map
    from pretrain.export import layout

    _, fam, _ = _family(source)
    vocab_size = model.embed.weight.size(0)
    lay = layout(fam, cfg, vocab_size)
    sd = hf_state(source, fam)
    for name in lay.zeros:  # tensors we lack: RoBERTa's one token type (a constant, folded into every position)
        if name.endswith("token_type_embeddings.weight"):
            pos = next(mp.hf[0] for mp in lay.maps if mp.ours == "encoder.pos_embed.weight")
            sd[pos] = sd[pos] + sd[name][0]
        elif bool(sd[name].any()):
            raise UserError(f"--init-from {source}: {name} is not zero, which the pretrain backbone cannot hold")
    ours = hf_map.from_hf(lay, sd)
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
