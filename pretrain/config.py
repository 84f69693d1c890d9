"""The config tree, recipe loading and `--set` overrides.

Precedence is fixed: defaults < recipe (recipes/NAME.toml) < `--objective` and named flags < `--set a.b=v`.
Every field has a default and a one-line meaning. An unknown key, a wrong type or an out-of-range value
is a `UserError` naming the key and the valid choices. Derived values are computed, never written back.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from models.config import ModelConfig
from pretrain.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class DataConfig:
    """Where text comes from, how it is tokenized and cached, and the window length."""

    source: str = ""  # text files / folder / glob (.txt .jsonl .json .parquet) or a datasets name; "" = built-in corpus
    dataset_config: str = ""  # datasets configuration name (with a datasets name)
    dataset_split: str = "train"  # datasets split to read (with a datasets name)
    text_field: str = "text"  # field holding the text in .jsonl/.json/.parquet/datasets rows
    doc_per: Literal["block", "line"] = "block"  # .txt: one document per blank-line-separated block, or per line
    valid_fraction: float = 0.02  # fraction of documents held out for validation (whole documents)
    split_seed: int = 1234  # seed of the train/validation document split
    seq_len: int = 128  # tokens per sequence (the encoder input length for span corruption)
    tokenizer: str = ""  # an existing sentencepiece .model to use; "" = train one on the corpus
    tokenizer_type: Literal["unigram", "bpe"] = "unigram"  # sentencepiece model type when training one
    vocab_size: int = 8000  # vocabulary size when training a tokenizer (specials and bytes included)
    cache_dir: str = "data/cache"  # where tokenizers and token caches are kept, keyed by their inputs

    def __post_init__(self) -> None:
        _check(0.0 < self.valid_fraction < 0.5, "data.valid_fraction", "must be in (0, 0.5)", self.valid_fraction)
        _check(self.seq_len >= 8, "data.seq_len", "must be >= 8", self.seq_len)
        _check(self.vocab_size >= 400, "data.vocab_size", "must be >= 400 (107 specials + 256 bytes + pieces)",
               self.vocab_size)


@dataclass(frozen=True)
class TrainConfig:
    """The optimization loop: optimizer, schedule, precision, budgets, evaluation and checkpoints."""

    batch_size: int = 32  # sequences per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # stop after this many optimizer steps
    max_tokens: int = 0  # stop once this many input tokens were seen (0 = no token budget)
    optimizer: Literal["adamw", "adafactor", "sgd"] = "adamw"  # the optimizer
    lr: float = 1e-3  # peak learning rate
    schedule: Literal["cosine", "linear", "inverse_sqrt", "constant"] = "cosine"  # decay after warmup
    warmup_steps: int = 100  # linear warmup from 0 to lr over this many steps
    min_lr_ratio: float = 0.1  # cosine/linear decay floor as a fraction of lr (GPT-3: 0.1)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay (never on biases, norms, embeddings)
    momentum: float = 0.9  # SGD momentum
    clip: float = 1.0  # global gradient-norm clipping (0 = off)
    label_smoothing: float = 0.0  # label smoothing of the cross-entropy loss terms
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 uses a GradScaler; bf16 autocast needs none
    compile: bool = False  # torch.compile the model
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto = CUDA if present, else MPS, else CPU
    seed: int = 1234  # seeds the weights, dropout and every batch
    log_every: int = 10  # steps between metric lines
    eval_every: int = 200  # steps between evaluations (0 = only at the end)
    eval_batches: int = 20  # validation batches per evaluation (fixed seed)
    patience: int = 0  # stop after this many evaluations without improvement (0 = never)
    ckpt_every: int = 500  # steps between checkpoints (a final one is always written)
    keep_last: int = 2  # checkpoints kept in the run folder
    num_workers: int = 1  # DataLoader worker processes building batches (one thread each)

    def __post_init__(self) -> None:
        for key in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_batches", "keep_last"):
            _check(getattr(self, key) >= 1, f"train.{key}", "must be >= 1", getattr(self, key))
        for key in ("max_tokens", "warmup_steps", "eval_every", "patience", "ckpt_every", "num_workers",
                    "weight_decay", "clip", "label_smoothing", "momentum"):
            _check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0", getattr(self, key))
        _check(self.lr > 0, "train.lr", "must be > 0", self.lr)
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _check(all(0.0 <= b < 1.0 for b in self.betas), "train.betas", "must be two numbers in [0, 1)", self.betas)
        _check(self.label_smoothing < 1.0, "train.label_smoothing", "must be < 1", self.label_smoothing)


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise UserError(f"{key} {rule}, got {value!r}")
