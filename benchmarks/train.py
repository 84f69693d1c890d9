"""`pretrain bench train`: our training step beside the `transformers` model of the same config, in one process.

For each family (GPT-2 / clm, BERT / mlm with NSP, T5 / span corruption, BART / denoising) the recipe's switches
with the benchmark's sizes build our backbone and, through the export's mapping (pretrain/hf_config.py,
pretrain/hf_map.py), the Hugging Face model of exactly that config with the same weights. Both train on the
same batches of the built-in corpus (the objective's own batches; HF gets the fields its forward takes and
computes its own loss, as a user's loop on it would), with the same optimizer (`pretrain.optim`), the same
precision (bf16 autocast, or fp32) and the same threads, alternating step by step so that a change of machine
load falls on both; the figures are medians over the steps (ratios: of per-pair ratios).

Where the objective can pack examples into rows (mlm's and denoise's `pack`, switched on here: `PACKED`), ours
trains the packed batches and HF the unpacked ones it can compute (its models cannot keep attention within
packed examples). Per step it reports tokens/s of each side counting every position of the batch (padding
included) and counting only real input tokens (the attention mask's ones), both ratios, the real share of the
positions each side computes (`objectives.base.computed_positions`: an encoder-decoder's decoder counts too),
and MFU of ours against the bf16 / fp32 matmul peak measured in the same run (`pretrain.metrics.measure_peak_flops`).

The process keeps freed memory mapped, as the trainer does (`pretrain.runtime.keep_freed_memory`); the
transformers side shares that setting, so the ratio is like for like. A user's own loop on transformers runs
without it, and slower: about 9,100 instead of 11,600 tokens/s for GPT-2 tiny in bf16 on our 2-core machine.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from objectives.base import computed_positions, input_tokens, make_generator

FAMILIES = {"gpt2": "gpt2-tiny", "bert": "bert-tiny", "t5": "t5-tiny", "bart": "bart-tiny"}  # recipe of switches
PACKED = {  # ours packs where the objective can (transformers gets the same examples unpacked)
    "bert": ["objective.pack=true"],
    "bart": ["objective.pack=true"],
}
SIZES = {  # model sizes and batch shapes the benchmark is stated at
    "tiny": {"d_model": 256, "n_layers": 4, "n_heads": 4, "d_ff": 1024, "vocab": 8000, "batch": 16, "seq": 128},
    "small": {"d_model": 512, "n_layers": 6, "n_heads": 8, "d_ff": 2048, "vocab": 16000, "batch": 8, "seq": 256},
}
TARGETS = {"bf16": 1.5, "fp32": 1.2}  # ours / HF tokens/s we hold ourselves to


def family_config(family: str, size: str, precision: str, cache_dir: str):
    """The Config of a benchmarked family: its tiny recipe's switches (objective included) at `size`."""
    from pretrain.config import resolve

    s = SIZES[size]
    sets = [f"model.d_model={s['d_model']}", f"model.n_layers={s['n_layers']}", "model.n_dec_layers=0",
            f"model.n_heads={s['n_heads']}", f"model.d_ff={s['d_ff']}", f"model.max_len={s['seq']}",
            f"data.seq_len={s['seq']}", f"data.vocab_size={s['vocab']}", "data.vocab_limit=soft",
            f"train.batch_size={s['batch']}", f"train.precision={precision}", "model.dropout=0.0",
            f"data.cache_dir={cache_dir}", *PACKED.get(family, [])]
    cfg, _ = resolve(recipe=FAMILIES[family], sets=sets)
    return cfg


def build_pair(cfg, vocab) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our model and the transformers model of the same config and the same weights (fp32, train mode)."""
    from pretrain.export import layout, require_transformers, token_ids
    from pretrain.hf_config import family, hf_config
    from pretrain.hf_map import to_hf
    from pretrain.run import build_model

    transformers = require_transformers()
    ours = build_model(cfg, vocab.size).train()
    fam = family(cfg.model, cfg.objective.arch)
    hf_cfg = getattr(transformers, fam.hf_class).config_class(
        **hf_config(fam, cfg.model, vocab.size, token_ids(cfg, vocab)))
    hf_cfg._attn_implementation = "sdpa"
    hf = getattr(transformers, fam.hf_class)(hf_cfg)
    hf.load_state_dict(to_hf(layout(fam, cfg, vocab.size), ours.state_dict()), strict=False)
    return ours, hf.train()


def hf_inputs(batch: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The fields a transformers model of this arrangement takes, with labels as it expects them: a causal LM
    shifts them itself (labels = input_ids), a seq2seq model builds its decoder inputs from them."""
    if kind == "decoder":
        return {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}
    keep = ("input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label")
    return {k: v for k, v in batch.items() if k in keep}


def timed_steps(cfg, ours, hf, batches: dict[str, list[dict]], rounds: int,
                compile_model: bool = False) -> dict[str, list[float]]:
    """Seconds of each side's training step on its own batches (`batches["ours"]`, `batches["hf"]`), alternating
    ours / HF for `rounds` rounds after one warm-up round (its seconds under "warmup"); `compile_model`:
    ours runs through `torch.compile`, as `train.compile` does."""
    from pretrain.metrics import Meter
    from pretrain.optim import build_optimizer
    from pretrain.runtime import AMP_DTYPES, Engine, Runtime
    from pretrain.trainer import train_step

    cpu = torch.device("cpu")
    rt = Runtime(cpu, AMP_DTYPES[cfg.train.precision])
    fwd = torch.compile(ours) if compile_model else ours
    engine = Engine(rt, ours, fwd, build_optimizer(ours, cfg.train, cpu), torch.amp.GradScaler("cpu", enabled=False))
    hf_opt = build_optimizer(hf, cfg.train, cpu)
    kind = cfg.objective.arch.kind

    def step_ours(b):
        train_step(cfg.objective, engine, [b], cfg.train, Meter())

    def step_hf(b):
        with rt.autocast():
            loss = hf(**hf_inputs(b, kind)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.train.clip)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    out: dict[str, list[float]] = {"ours": [], "hf": [], "warmup": []}
    for i in range(rounds + 1):
        order = (("ours", step_ours), ("hf", step_hf))
        for name, fn in order if i % 2 == 0 else order[::-1]:  # who goes first alternates too
            b = batches[name][i % len(batches[name])]
            t0 = time.perf_counter()
            fn(b)
            out[name if i else "warmup"].append(time.perf_counter() - t0)  # round 0 warms both up
    return out


def bench_family(family: str, size: str, precision: str, rounds: int, cache_dir: str,
                 compile_model: bool = False) -> dict[str, Any]:
    """One row of the benchmark: tokens/s of ours and HF, all positions and real tokens, ratio, MFU."""
    from pretrain.data import prepare
    from pretrain.export import max_abs_diff, probe
    from pretrain.metrics import measure_peak_flops

    cfg = family_config(family, size, precision, cache_dir)
    prepared = prepare(cfg.data, extra_pieces=cfg.objective.special_pieces, progress=False)
    vocab, split = prepared.tokenizer.vocab, prepared.cache.split("train")
    B, T = cfg.train.batch_size, cfg.data.seq_len
    batches = {side: [obj.batch(split, vocab, make_generator(0, "bench-train", i), B, T) for i in range(4)]
               for side, obj in (("ours", cfg.objective), ("hf", unpacked(cfg.objective)))}
    ours, hf = build_pair(cfg, vocab)
    same = max(max_abs_diff(ours.eval(), hf.eval(), probe(cfg, vocab)).values())  # fp32 logits before training
    ours.train(), hf.train()
    times = timed_steps(cfg, ours, hf, batches, rounds, compile_model)
    real = {side: statistics.mean(input_tokens(b) for b in bs) for side, bs in batches.items()}
    density = {side: [sum(x) for x in zip(*map(computed_positions, bs), strict=True)] for side, bs in batches.items()}
    nominal = B * T
    t_ours, t_hf = statistics.median(times["ours"]), statistics.median(times["hf"])
    ratio = statistics.median(h / o for o, h in zip(times["ours"], times["hf"], strict=True))
    peak = measure_peak_flops(torch.device("cpu"), torch.bfloat16 if precision == "bf16" else None)
    mfu = ours.flops_per_token(T, cfg.objective.decoder_length(T)) * nominal / t_ours / peak
    real_ratio = ratio * real["ours"] / real["hf"]
    return {"family": family, "objective": cfg.objective.name, "size": size, "precision": precision,
            "ours_tokens_per_s": nominal / t_ours, "hf_tokens_per_s": nominal / t_hf,
            "ours_real_tokens_per_s": real["ours"] / t_ours, "hf_real_tokens_per_s": real["hf"] / t_hf,
            "ours_real_share": density["ours"][0] / density["ours"][1],
            "hf_real_share": density["hf"][0] / density["hf"][1], "ratio": ratio,
            "real_ratio": real_ratio, "target": TARGETS[precision],
            "meets": min(ratio, real_ratio) >= TARGETS[precision], "mfu": mfu, "peak_flops": peak,
            "rounds": rounds, "same_model_max_abs_diff": same, "compiled": compile_model,
            "ours_first_step_s": times["warmup"][0]}  # round 0 runs ours first


def unpacked(objective):
    """The objective as a user of transformers would batch it: each example in a row of its own (transformers'
    models cannot keep attention within packed examples)."""
    import dataclasses

    from objectives.packing import SWITCHES

    off = {f.name: False for f in dataclasses.fields(objective) if f.name in SWITCHES}
    return dataclasses.replace(objective, **off)


def print_rows(rows: list[dict], console: Any) -> None:
    """The benchmark's table: tokens/s over all positions (real input tokens in brackets)."""
    from pretrain.metrics import table

    console.print(table(
        f"training step beside transformers, {torch.get_num_threads()} thread(s), medians of alternating steps; "
        "tokens/s (real tokens)",
        [(f"{r['family']} {r['size']} {r['precision']}{' compiled' if r['compiled'] else ''}",
          f"{r['ours_tokens_per_s']:,.0f} "
          f"({r['ours_real_tokens_per_s']:,.0f})", f"{r['hf_tokens_per_s']:,.0f} ({r['hf_real_tokens_per_s']:,.0f})",
          f"{r['ratio']:.2f}x ({r['real_ratio']:.2f}x)", f"{'yes' if r['meets'] else 'NO'} (>= {r['target']:g}x)",
          f"{r['ours_real_share']:.0%} / {r['hf_real_share']:.0%}", f"{r['mfu']:.1%}",
          f"{r['ours_first_step_s']:.1f}") for r in rows],
        ("family", "ours", "transformers", "ratio", "meets", "real ours/HF", "MFU", "ours 1st step s")))
