"""`pretrain export RUN --out DIR`: a run's model as a Hugging Face `transformers` folder that
`AutoModelFor*.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load offline.

    DIR/config.json              the HF config of the family that computes what ours computes (pretrain.hf_config)
    DIR/model.safetensors        the weights under HF names (pretrain.hf_map), fp32
    DIR/tokenizer.json ...       our sentencepiece tokenizer as a fast tokenizer (pretrain.hf_tokenizer)
    DIR/tokenizer.model          the sentencepiece model itself (what `pretrain run --init-from DIR` trains with)
    DIR/generation_config.json   models that generate: </s> ends, <pad> pads, the objective's decoder start
    DIR/README.md                a model card: objective, recipe, sizes, steps and tokens, data, eval, parity

The folder is written next to DIR under a temporary name, loaded back with transformers and checked against
our model on a padded probe batch (logits, NSP logits, encoder states: max abs difference <= 1e-4 in fp32),
and only then renamed into place: export never leaves a folder that loads but computes something else. The
proof on real batches of every recipe is `tests/test_export.py`. transformers is the optional extra
`pretrain[hf]`; this module imports it only inside functions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.errors import UserError

if TYPE_CHECKING:
    import torch

    from pretrain.config import Config

TOLERANCE = 1e-4  # max abs difference of fp32 logits between ours and the exported model
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "decoder_input_ids", "decoder_attention_mask")


def require_transformers() -> Any:
    """The transformers module; a one-line UserError saying what to install when it is absent."""
    try:
        import transformers
    except ImportError:
        raise UserError("this needs Hugging Face transformers, which is not installed; pip install 'pretrain[hf]' "
                        "(or pip install transformers)") from None
    return transformers


def layout(fam, cfg: Config, vocab_size: int):
    """The name map (`pretrain.hf_map.Layout`) of family `fam` for the run config `cfg`."""
    from pretrain import hf_map
    from pretrain.tokenizer import PAD

    m, arch = cfg.model, cfg.objective.arch
    if fam.name == "roberta":
        return hf_map.roberta(m, arch, PAD)
    if fam.name == "bart":
        return hf_map.bart(m, arch, vocab_size)
    return getattr(hf_map, fam.name)(m, arch)


def token_ids(cfg: Config, vocab) -> dict[str, int]:
    """The special ids an HF config carries; the decoder start is the objective's (T5 <pad>, BART </s>)."""
    start = cfg.objective.framing(vocab).decoder_start
    return {"pad_token_id": vocab.pad, "bos_token_id": vocab.bos, "eos_token_id": vocab.eos,
            "decoder_start_token_id": vocab.pad if start is None else start}


def export(run_dir: Path, out: Path, step: int | None = None, force: bool = False) -> dict:
    """Write the HF folder of the run's newest checkpoint (or of `step`) to `out`; returns what the model card
    reports. UserError (nothing written) for a run without a checkpoint, an `out` that exists and is not empty
    (unless `force`), or a switch no HF class represents."""
    from pretrain import run as runs
    from pretrain.hf_config import family

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"--out {out} exists and is not empty; choose another folder or pass --force to replace it")
    cfg = runs.load_config(run_dir)
    fam = family(cfg.model, cfg.objective.arch)  # refuse a non-exportable switch before loading anything
    transformers = require_transformers()
    loaded = runs.load(run_dir, "cpu", step)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        card = _write(transformers, fam, loaded, Path(run_dir), tmp)
        card["max_abs_diff"] = verify(loaded.model, tmp, fam, cfg, loaded.tokenizer.vocab)
        card["out"] = str(out)
        _model_card(tmp, card)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
    return card


def _write(transformers, fam, loaded, run_dir: Path, tmp: Path) -> dict:
    """config.json, model.safetensors, the tokenizer files and generation_config.json into `tmp`."""
    from safetensors.torch import save_file

    from pretrain import hf_map, hf_tokenizer
    from pretrain.hf_config import hf_config

    cfg, tok, model = loaded.cfg, loaded.tokenizer, loaded.model
    ids = token_ids(cfg, tok.vocab)
    config_cls = getattr(transformers, fam.hf_class).config_class
    config = config_cls(**hf_config(fam, cfg.model, tok.size, ids), architectures=[fam.hf_class])
    config.save_pretrained(str(tmp))
    weights = hf_map.to_hf(layout(fam, cfg, tok.size), model.state_dict())
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    framing = cfg.objective.framing(tok.vocab)
    hf_tokenizer.save(tok, framing, cfg.objective.arch.segments, cfg.model.max_len, tmp)
    shutil.copyfile(tok.path, tmp / "tokenizer.model")
    if cfg.objective.arch.kind != "encoder":
        start = {"decoder_start_token_id": ids["decoder_start_token_id"]} if config.is_encoder_decoder else {}
        transformers.GenerationConfig(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                                      pad_token_id=ids["pad_token_id"],
                                      **start).save_pretrained(str(tmp))
    state = json.loads((loaded.checkpoint / "state.json").read_text())
    return {"family": fam.hf_class, "auto_class": fam.auto_class, "objective": cfg.objective,
            "recipe": cfg.recipe or "-", "model": cfg.model, "vocab_size": tok.size,
            "parameters": sum(p.numel() for p in model.parameters()), "step": state["step"],
            "tokens": state["tokens"], "checkpoint": loaded.checkpoint.name, "run": run_dir,
            "data": _read_json(run_dir / "data.json"), "eval": _eval_figures(run_dir)}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _eval_figures(run_dir: Path) -> dict:
    """`pretrain eval`'s figures (eval.json), else the validation figures of the run's last evaluation."""
    ev = _read_json(run_dir / "eval.json")
    if ev:
        return ev
    summary = _read_json(run_dir / "summary.json")
    return {"split": "valid, end of training", **{k[4:]: v for k, v in summary.items() if k.startswith("val_")}}


# ------------------------------------------------------------------------------------------------ parity
def probe(cfg: Config, vocab, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small batch in the model's arrangement with right padding on both sides: row 1 ends in pads."""
    import torch

    g = torch.Generator().manual_seed(seed)
    T = min(16, cfg.model.max_len)
    ordinary = vocab.ordinary_ids
    ids = ordinary[torch.randint(len(ordinary), (2, T), generator=g)]
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, T - T // 3:] = 0
    batch = {"input_ids": ids.masked_fill(mask == 0, vocab.pad), "attention_mask": mask}
    if cfg.objective.arch.segments:
        batch["token_type_ids"] = (torch.arange(T) >= T // 2).long().expand(2, T) * mask
    if cfg.objective.arch.kind == "encoder-decoder":
        batch["decoder_input_ids"] = batch["input_ids"].flip(0)
        batch["decoder_attention_mask"] = mask.flip(0)
    return batch


def outputs(model, hf, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Ours and HF's outputs on `batch` at real positions, by name: logits (decoder positions for an
    encoder-decoder), nsp_logits (BERT's classifier) and encoder (the encoder's last hidden states)."""
    import torch

    kind = model.arch.kind
    batch = {k: v for k, v in batch.items() if k in MODEL_INPUTS}  # targets (labels, ...) stay out
    with torch.no_grad():
        ours = model(**batch)
        theirs = hf(**batch, return_dict=True)
        rows = batch["decoder_attention_mask" if kind == "encoder-decoder" else "attention_mask"].bool()
        logits = theirs.logits if hasattr(theirs, "logits") else theirs.prediction_logits
        res = {"logits": (ours.logits[rows], logits[rows])}
        if ours.cls_logits is not None:
            res["nsp_logits"] = (ours.cls_logits, theirs.seq_relationship_logits)
        if kind == "encoder-decoder":
            mem = model.encode(batch["input_ids"], batch["attention_mask"])
            real = batch["attention_mask"].bool()
            res["encoder"] = (mem[real], theirs.encoder_last_hidden_state[real])
    return res


def max_abs_diff(model, hf, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs difference of each output of `outputs`."""
    return {k: float((a.float() - b.float()).abs().max()) for k, (a, b) in outputs(model, hf, batch).items()}


def load_hf(path: Path | str, auto_class: str):
    """An exported folder loaded by transformers (fp32, eval mode); UserError when keys are missing or extra."""
    import torch

    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar in the middle of our output
    hf, info = getattr(transformers, auto_class).from_pretrained(str(path), dtype=torch.float32,
                                                                 output_loading_info=True, use_safetensors=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise UserError(f"export bug: transformers loads {path} with {bad}; nothing was written, please report it")
    return hf.eval()


def verify(model, path: Path, fam, cfg: Config, vocab) -> dict[str, float]:
    """Load the written folder and compare it with `model` on `probe`; UserError (a bug) beyond TOLERANCE."""
    model = model.float().eval()
    diff = max_abs_diff(model, load_hf(path, fam.auto_class), probe(cfg, vocab))
    if max(diff.values()) > TOLERANCE:
        raise UserError(f"export bug: the {fam.hf_class} written differs from the run's model by {diff} (> "
                        f"{TOLERANCE}); nothing was written, please report it")
    return diff


# ------------------------------------------------------------------------------------------------ model card
def _model_card(path: Path, c: dict) -> None:
    """README.md: what the model is, how it was trained, how well it does, and the three lines to use it."""
    m, obj = c["model"], c["objective"]
    what = " ".join((type(obj).__doc__ or "").strip().split("\n\n")[0].split())
    ev = c["eval"]
    figures = ", ".join(f"{k} {v:.4g}" for k, v in ev.items() if isinstance(v, float)) or "none (run `pretrain eval`)"
    data = c["data"]
    src = data.get("source") or {}
    fingerprint = src.get("fingerprint") if isinstance(src, dict) else src
    layers = f"{m.n_layers} + {m.dec_layers}" if obj.arch.kind == "encoder-decoder" else str(m.n_layers)
    diff = ", ".join(f"{k} {v:.2e}" for k, v in c["max_abs_diff"].items())
    lines = [
        f"# {c['family']} trained with pretrain", "",
        f"- objective: `{obj.name}`: {what}",
        f"- recipe: `{c['recipe']}`; arrangement: {obj.arch.kind}",
        f"- size: {c['parameters']:,} parameters; {layers} layers x d_model {m.d_model}, {m.n_heads} heads, d_ff "
        f"{m.d_ff}, context {m.max_len}, vocabulary {c['vocab_size']}",
        f"- trained: {c['step']:,} steps, {c['tokens']:,} input tokens (checkpoint `{c['checkpoint']}`)",
        f"- data: {json.dumps(data.get('source', '-'), default=str)[:300]}; fingerprint `{fingerprint or '-'}`",
        f"- eval ({ev.get('split', '-')} split): {figures}",
        f"- parity: max abs difference to the pretrain model on a padded probe batch (fp32): {diff}", "",
        "## Use it", "", "```python",
        f"from transformers import {c['auto_class']}, AutoTokenizer",
        f"model = {c['auto_class']}.from_pretrained(\"{c['out']}\")",
        f"tokenizer = AutoTokenizer.from_pretrained(\"{c['out']}\")", "```", "",
        "The tokenizer is the run's sentencepiece model: `tokenizer(text)` frames text as training did, and "
        "special pieces are never read from text (a literal `[MASK]` stays text); use `tokenizer.mask_token_id`, "
        "or call it with `split_special_tokens=False`, to insert one.",
    ]
    (path / "README.md").write_text("\n".join(lines) + "\n")
