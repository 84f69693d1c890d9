"""The config tree, recipe loading and `--set` overrides.

Precedence is fixed: defaults < recipe (recipes/NAME.toml) < `--objective` and named flags < `--set a.b=v`.
Every field has a default and a one-line meaning. An unknown key, a wrong type or an out-of-range value
is a `UserError` naming the key and the valid choices (values are typed from the annotations by
pretrain/typed.py). Derived values are computed, never written back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from models.config import ModelConfig
from pretrain.budget import parse_duration
from pretrain.errors import UserError
from pretrain.recipes import read_recipe, suggest
from pretrain.tokenizer import MIN_VOCAB_SIZE
from pretrain.typed import build, build_objective, objective_class, to_table

__all__ = ["Config", "DataConfig", "TrainConfig", "SECTIONS", "config_from_dict", "objective_class", "override",
           "resolve"]

if TYPE_CHECKING:
    from objectives.base import Objective



@dataclass(frozen=True)
class DataConfig:
    """Where text comes from, how it is tokenized and cached, and the window length."""

    source: str = ""  # .txt/.jsonl/.json/.parquet files, folder or glob, or a datasets name; "" = built-in corpus
    dataset_config: str = ""  # datasets configuration name (with a datasets name)
    dataset_split: str = "train"  # datasets split to read (with a datasets name)
    text_field: str = "text"  # field holding the text in .jsonl/.json/.parquet/datasets rows
    doc_per: Literal["block", "line"] = "block"  # .txt: a document per blank-line-separated block, or per line
    valid_fraction: float = 0.02  # fraction of documents held out for validation (whole documents)
    split_seed: int = 1234  # seed of the train/validation document split
    seq_len: int = 128  # tokens per sequence (the encoder input length for span corruption)
    tokenizer: str = ""  # an existing sentencepiece .model to use; "" = train one on the corpus
    tokenizer_type: Literal["unigram", "bpe"] = "unigram"  # sentencepiece model type when training one
    vocab_size: int = 8000  # vocabulary size when training a tokenizer (specials and bytes included)
    vocab_limit: Literal["hard", "soft"] = "hard"  # soft: a corpus too small for vocab_size gets the most it allows
    cache_dir: str = "data/cache"  # where tokenizers and token caches are kept, keyed by their inputs
    workers: int = 0  # processes that split sentences and tokenize (0 = all cores); the cache never depends on it
    shard_tokens: int = 1 << 25  # most tokens per cache shard (33.5M; a longer document gets a shard of its own)
    tokenizer_sample: int = 200_000  # sentences sampled uniformly from the stream to train a tokenizer on
    max_docs: int = 0  # use only the first N documents of the stream (0 = all)
    max_tokens: int = 0  # use only the longest prefix of the stream with at most N tokens (0 = all)

    def __post_init__(self) -> None:
        for key in ("workers", "max_docs", "max_tokens"):
            _check(getattr(self, key) >= 0, f"data.{key}", "must be >= 0", getattr(self, key))
        _check(self.shard_tokens >= 1, "data.shard_tokens", "must be >= 1", self.shard_tokens)
        _check(self.tokenizer_sample >= 1, "data.tokenizer_sample", "must be >= 1", self.tokenizer_sample)
        _check(
            0.0 < self.valid_fraction < 0.5, "data.valid_fraction", "must be in (0, 0.5)", self.valid_fraction
        )
        _check(self.seq_len >= 8, "data.seq_len", "must be >= 8", self.seq_len)
        _check(
            self.vocab_size >= MIN_VOCAB_SIZE,
            "data.vocab_size",
            f"must be >= {MIN_VOCAB_SIZE} (the special pieces, 256 bytes and learned pieces)",
            self.vocab_size,
        )


@dataclass(frozen=True)
class TrainConfig:
    """The optimization loop: optimizer, schedule, precision, budgets, evaluation and checkpoints."""

    batch_size: int = 32  # sequences per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # stop after this many optimizer steps
    max_tokens: int = 0  # stop once this many input tokens were seen (0 = no token budget)
    max_time: str = ""  # wall-clock budget of the training loop, e.g. "4m", "90s", "1h30m" ("" = none)
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
    global_batch: int = 0  # sequences per optimizer step over all ranks (0 = batch_size x grad_accum x ranks)
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"  # under torchrun: DDP, or FSDP2 sharding (auto = ddp)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    batch_warmup_tokens: int = 0  # ramp the global batch up linearly over this many tokens (GPT-3; 0 = off)
    batch_warmup_start: int = 32  # sequences per step at the start of the batch ramp
    report_to: tuple[Literal["tensorboard", "wandb"], ...] = ("tensorboard",)  # also log there ("" = only jsonl)

    def __post_init__(self) -> None:
        for key in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_batches", "keep_last"):
            _check(getattr(self, key) >= 1, f"train.{key}", "must be >= 1", getattr(self, key))
        for key in (
            "max_tokens",
            "warmup_steps",
            "eval_every",
            "patience",
            "ckpt_every",
            "num_workers",
            "global_batch",
            "batch_warmup_tokens",
            "weight_decay",
            "clip",
            "label_smoothing",
            "momentum",
        ):
            _check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0", getattr(self, key))
        _check(math.isfinite(self.lr) and self.lr > 0, "train.lr", "must be a finite number > 0", self.lr)
        _check(0 <= self.seed < 2**63, "train.seed", "must be in [0, 2**63)", self.seed)
        _check(self.batch_warmup_start >= 1, "train.batch_warmup_start", "must be >= 1", self.batch_warmup_start)
        _check(self.global_batch == 0 or self.grad_accum == 1, "train.grad_accum",
               "must stay 1 when train.global_batch is set (the global batch decides the accumulation)",
               self.grad_accum)
        for key in ("eps", "weight_decay", "clip", "momentum", "min_lr_ratio", "label_smoothing"):
            _check(math.isfinite(getattr(self, key)), f"train.{key}", "must be finite", getattr(self, key))
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _check(
            all(0.0 <= b < 1.0 for b in self.betas),
            "train.betas",
            "must be two numbers in [0, 1)",
            self.betas,
        )
        _check(self.label_smoothing < 1.0, "train.label_smoothing", "must be < 1", self.label_smoothing)
        _check(len(set(self.report_to)) == len(self.report_to), "train.report_to", "repeats a name", self.report_to)
        parse_duration(self.max_time, "train.max_time (--max-time)")  # one line when it does not parse


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise UserError(f"{key} {rule}, got {value!r}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a run. `objective` is an objective instance (a frozen dataclass
    from `objectives.OBJECTIVES`), so its hyper-parameters were validated when it was built."""

    objective: Objective  # the objective instance; its fields are the [objective] section
    model: ModelConfig = field(default_factory=ModelConfig)  # backbone sizes and switches
    data: DataConfig = field(default_factory=DataConfig)  # text, tokenizer, cache, sequence length
    train: TrainConfig = field(default_factory=TrainConfig)  # optimization loop
    recipe: str = ""  # the recipe this config started from ("" = none)

    def to_dict(self) -> dict:
        """A JSON-able dict that `config_from_dict` turns back into an equal Config."""
        out: dict[str, Any] = {"recipe": self.recipe, "objective": to_table(self.objective)}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return json.loads(json.dumps(out))  # tuples -> lists, as in JSON/TOML


def config_from_dict(raw: dict, recipe: str = "") -> Config:
    """Build a Config from a nested dict (a recipe, a saved config.json, or overrides merged into them)."""
    raw = dict(raw)
    raw.pop("description", None)
    recipe = raw.pop("recipe", recipe) or recipe
    allowed = ["objective", *SECTIONS]
    for key in raw:
        if key not in allowed:
            raise UserError(
                f"unknown section '{key}'{suggest(key, allowed)}; valid sections: {', '.join(allowed)}"
            )
        if not isinstance(raw[key], dict):
            raise UserError(f"'{key}' must be a table of keys (e.g. [{key}] in TOML), got {raw[key]!r}")
    objective = build_objective(raw.get("objective", {}))
    sections = {s: build(cls, raw.get(s, {}), s) for s, cls in SECTIONS.items()}
    return Config(objective=objective, recipe=recipe, **sections)


# ---------------------------------------------------------------------------------------------- resolution


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise UserError(
            f"override '{key}' must look like section.key (e.g. train.lr), sections: objective, "
            f"{', '.join(SECTIONS)}"
        )
    raw.setdefault(parts[0], {})
    if not isinstance(raw[parts[0]], dict):
        raise UserError(f"'{parts[0]}' is not a section")
    raw[parts[0]][parts[1]] = value


def resolve(
    *,
    recipe: str | None = None,
    objective: str | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> tuple[Config, list[tuple[str, Any, str]]]:
    """Resolve defaults < recipe < `--objective` and named flags < `--set` into a Config.

    `flags` maps dotted keys to values of named CLI flags (None = not given). Without a recipe the
    objective's `default_recipe` (a CPU-sized one) is used. Returns the Config and the list of
    (key, value, source) for every value that is not a default, to print and save with the run.
    """
    sources: dict[str, str] = {}
    raw: dict[str, Any] = {}
    if recipe is None:
        from objectives import DEFAULT_OBJECTIVE

        recipe = objective_class(objective or DEFAULT_OBJECTIVE).default_recipe
    if recipe:
        raw = read_recipe(recipe)
        raw.pop("description", None)
        for sec, vals in raw.items():
            for k in vals if isinstance(vals, dict) else ():
                sources[f"{sec}.{k}"] = "recipe"
    if objective is not None:
        objective_class(objective)
        old = raw.get("objective", {}).get("name")
        if old != objective:  # the recipe's objective hyper-parameters belong to another objective
            raw["objective"] = {"name": objective}
            sources = {k: v for k, v in sources.items() if not k.startswith("objective.")}
        sources["objective.name"] = "--objective"
    for key, value in (flags or {}).items():
        if value is not None:
            _set_dotted(raw, key, value)
            sources[key] = "flag"
    for item in sets:
        key, value = split_set(item)
        _set_dotted(raw, key, value)  # text: pretrain/typed.py types it from the field's annotation
        sources[key] = "--set"
    cfg = config_from_dict(raw, recipe=recipe or "")
    flat = _flatten(cfg.to_dict())
    report = [(k, flat.get(k), src) for k, src in sources.items()]
    return cfg, report


def split_set(item: str) -> tuple[str, str]:
    """'section.key=value' -> ('section.key', 'value')."""
    if "=" not in item:
        raise UserError(f"--set '{item}' must look like section.key=value (e.g. --set train.lr=3e-4)")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def override(cfg: Config, sets: list[str], sections: tuple[str, ...] = ("data", "train")) -> Config:
    """A run's `cfg` with `--set section.key=value` overrides applied in order, typed as in `resolve`; only keys of
    `sections` may change (the run's model and objective are fixed)."""
    raw = cfg.to_dict()
    for key, value in map(split_set, sets):
        if key.split(".")[0] not in sections:
            raise UserError(f"--set {key}: only {', '.join(s + '.*' for s in sections)} keys can change here "
                            "(the model and objective are the run's own)")
        _set_dotted(raw, key, value)
    return config_from_dict(raw, recipe=cfg.recipe)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
