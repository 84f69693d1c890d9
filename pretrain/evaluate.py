"""Evaluation on fixed-seed batches: the mean of every term the objective reports, plus loss, perplexity and
bits per byte, identical in every run so that runs (and objectives) compare on the same draws."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from objectives.base import IGNORE_INDEX, make_generator
from pretrain.metrics import Meter
from pretrain.parallel import all_keys

if TYPE_CHECKING:
    from pretrain.config import Config
    from pretrain.data import TokenSplit
    from pretrain.runtime import Runtime
    from pretrain.tokenizer import Vocab

EVAL_SEED = 20240101  # fixed: every run evaluates on the same validation batches, whatever its train seed


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: Config, split: TokenSplit, vocab: Vocab, rt: Runtime,
             n_batches: int) -> dict[str, float]:
    """Mean of every reported term over `n_batches` fixed-seed batches of `split` (shared out over the ranks,
    rounded up to a whole number per rank), plus
    loss (the main loss term), perplexity, bits per byte (total nats of the main loss term / (ln 2 x UTF-8
    bytes of its targets)), and the tokens and bytes evaluated."""
    obj = cfg.objective
    main_term, main_field = next(iter(obj.loss_terms.items()))
    was_training = model.training
    model.eval()
    meter, n_bytes = Meter(), 0
    for i in range(-(-n_batches // rt.world)):  # batch g = i x world + rank: the same draws on any number of ranks
        g = make_generator(EVAL_SEED, "eval", i * rt.world + rt.rank, 0)
        b = obj.batch(split, vocab, g, cfg.train.batch_size, cfg.data.seq_len)
        labels = b[main_field]
        n_bytes += int(vocab.piece_bytes_t[labels[labels != IGNORE_INDEX]].sum())
        b = {k: v.to(rt.device, non_blocking=True) for k, v in b.items()}
        with rt.autocast():
            meter.add(obj.loss(model, b))
    model.train(was_training)
    keys = all_keys(list(meter.sums), rt)  # the same names on every rank, even where a term was not reported
    sums = torch.tensor([meter.sums.get(k, 0.0) for k in keys] + [meter.counts.get(k, 0.0) for k in keys] + [n_bytes],
                        dtype=torch.float64, device=rt.device)
    if rt.world > 1:
        dist.all_reduce(sums)
    s, c, n_bytes = sums[: len(keys)].tolist(), sums[len(keys): 2 * len(keys)].tolist(), sums[-1].item()
    out = {k: s[i] / max(c[i], 1) for i, k in enumerate(keys)}
    main = keys.index(main_term)
    out["loss"] = out[main_term]
    out["perplexity"] = math.exp(min(out["loss"], 50.0))
    out["bits_per_byte"] = s[main] / (math.log(2) * n_bytes) if n_bytes else float("nan")
    out["tokens"] = int(c[main])
    out["bytes"] = int(n_bytes)
    return out
