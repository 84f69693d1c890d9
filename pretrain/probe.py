"""`pretrain probe RUN_DIR`: how useful a run's model is downstream, measured the same way for every objective.

A labeled task (pretrain/probe_data.py: the built-in `stdlib-packages`, or a user's file) is split by group, and
the run's model is fine-tuned with a small classification head (a linear layer on a pooled hidden state) for a
fixed small budget, two ways, over `probe.seeds` seeds:
- linear probe: the model frozen, its pooled features computed once, standardized on the training examples,
  and a logistic regression trained on them (`probe.linear_steps` steps of AdamW on mini-batches of 64);
- full fine-tuning: every weight and the head trained (`probe.steps` steps of `probe.batch_size` examples,
  AdamW at `probe.lr` for the model and `probe.head_lr` for the new head, with a 10% linear warmup and a linear
  decay), in the run's precision. The head reads the pooled state standardized by the starting model's training
  features, as the linear probe does (the statistics are fixed, the body learns under them): a briefly
  pretrained model's pooled states are nearly the same vector for every text (per-feature spread about 4% of
  its scale for a `t5-tiny` at 1M tokens), and an unscaled head then barely moves in a short budget and ends
  on one class.
Each is scored on the test examples by accuracy and macro-F1 (the mean F1 over the test's classes) beside the
majority-class baseline (always the most frequent training class), with the mean and the standard deviation
over the seeds. The same architecture at random initialisation (`train.seed`, never trained) is probed too, as
the control: what the probe gets from the architecture and the task alone. The seeds change the head's
initialisation and the order of the batches; the data and its split are the same for every run and seed.

Every arrangement reads the text as its objective framed it in training (`Objective.framing`, or
`mode_framing` for a mode token, `probe.mode`; "auto" is the run's first mode token, if any): an encoder is
pooled at its first token ([CLS] or <s>) or by the mean over the real tokens, a decoder at its last real token
(the only one that has seen the whole text) or by the mean, an encoder-decoder by the mean of its encoder
states (or its first token); `probe.pooling = "auto"` picks first, last and mean respectively. Texts longer than
`probe.max_len` tokens (framing included) are cut at the end. Figures go to RUN/probe-TASK.json, which
`pretrain report` shows.
"""

from __future__ import annotations

import copy
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.errors import UserError
from pretrain.probe_data import TASKS, Examples, read_labeled, split, stdlib_packages

if TYPE_CHECKING:
    from pretrain.run import Loaded


@dataclass(frozen=True)
class ProbeConfig:
    """The probe's task, split, budget and pooling (`--set probe.KEY=VALUE`)."""

    task: str = "stdlib-packages"  # a built-in task (used when data is empty)
    data: str = ""  # a labeled .jsonl or .parquet file instead of a built-in task
    text_field: str = "text"  # field holding each example's text (with data)
    label_field: str = "label"  # field holding each example's label (with data)
    group_field: str = ""  # rows sharing this field's value stay on one side of the split ("" = the text)
    classes: int = 12  # built-in task: the largest packages kept as classes (10-20 is the task's range)
    test_fraction: float = 0.25  # share of each class's examples held out for test, by whole groups
    split_seed: int = 0  # seed of the split and of the per-class sample (the same for every run)
    max_per_class: int = 160  # training examples kept per class (a quarter as many for test)
    max_len: int = 64  # tokens of each text the model reads, framing included (cut at the end)
    pooling: Literal["auto", "first", "mean", "last"] = "auto"  # auto: first (encoder), last (decoder), mean (enc-dec)
    mode: str = "auto"  # a mode token of the run to frame the texts with; auto = its first, "" = none
    seeds: int = 3  # seeds of the head's initialisation and batch order
    steps: int = 300  # full fine-tuning: optimizer steps (about 3.5 passes over the built-in task's training set)
    batch_size: int = 16  # full fine-tuning: examples per step
    lr: float = 1e-4  # full fine-tuning: peak learning rate of the model's weights (10% warmup, linear decay)
    head_lr: float = 1e-3  # full fine-tuning: peak learning rate of the new head, which starts from nothing
    linear_steps: int = 300  # linear probe: steps of AdamW on the frozen features
    linear_lr: float = 1e-2  # linear probe: learning rate
    random_init: bool = True  # also probe the architecture at random initialisation (the control)

    def __post_init__(self) -> None:
        for key in ("classes", "seeds", "steps", "batch_size", "linear_steps", "max_per_class"):
            if getattr(self, key) < 1:
                raise UserError(f"probe.{key} must be >= 1, got {getattr(self, key)}")
        if self.classes < 2:
            raise UserError(f"probe.classes must be >= 2, got {self.classes}")
        if not 0 < self.test_fraction < 1:
            raise UserError(f"probe.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_len < 4:
            raise UserError(f"probe.max_len must be >= 4, got {self.max_len}")
        if not all(math.isfinite(v) and v > 0 for v in (self.lr, self.head_lr, self.linear_lr)):
            raise UserError("probe.lr, probe.head_lr and probe.linear_lr must be finite numbers > 0")
        if not self.data and self.task not in TASKS:
            raise UserError(f"unknown probe task {self.task!r}; the built-in tasks are {', '.join(TASKS)}, or give a "
                            "labeled file with --data FILE.jsonl")

    @property
    def name(self) -> str:
        """The task's name in file names and tables: the built-in task, or the data file's stem."""
        return Path(self.data).stem if self.data else self.task


def probe_config(sets: list[str], **named: Any) -> ProbeConfig:
    """ProbeConfig from `--set probe.KEY=VALUE` items and named flags (None = not given), typed from the fields."""
    from pretrain.config import split_set
    from pretrain.typed import build

    values = {k: v for k, v in named.items() if v is not None}
    for item in sets:
        key, value = split_set(item)
        section, _, name = key.partition(".")
        if section != "probe" or not name:
            raise UserError(f"--set {key}: the probe takes probe.KEY=VALUE settings (e.g. --set probe.steps=200)")
        values[name] = value
    return build(ProbeConfig, values, "probe")


def load_task(pc: ProbeConfig) -> tuple[Examples, Examples]:
    """The task's (train, test) examples."""
    ex = read_labeled(Path(pc.data), pc.text_field, pc.label_field, pc.group_field) if pc.data else \
        stdlib_packages(pc.classes)
    return split(ex, pc.test_fraction, pc.split_seed, pc.max_per_class)


# ---------------------------------------------------------------------------------------------- features
class Reader:
    """How a run's model reads texts for the probe: framing, pooling, and the batches of token ids."""

    def __init__(self, loaded: Loaded, pc: ProbeConfig):
        from pretrain.generate import framing_for

        obj, vocab = loaded.cfg.objective, loaded.tokenizer.vocab
        self.kind, self.segments = obj.arch.kind, obj.arch.segments
        self.mode = (obj.modes[0] if obj.modes else None) if pc.mode == "auto" else (pc.mode or None)
        self.framing = framing_for(obj, vocab, self.mode, loaded.checkpoint.parent.parent)
        auto = {"encoder": "first", "decoder": "last", "encoder-decoder": "mean"}[self.kind]
        self.pooling = auto if pc.pooling == "auto" else pc.pooling
        if self.kind == "decoder" and self.pooling == "first":
            raise UserError("probe.pooling = 'first' reads a decoder's first token, which has seen none of the "
                            "text; use last or mean")
        self.max_len = min(pc.max_len, loaded.model.max_len)
        self.tokenizer, self.pad = loaded.tokenizer, vocab.pad

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Framed ids of each text, the text cut so that the whole fits max_len."""
        f, room = self.framing, self.max_len - len(self.framing.prefix) - len(self.framing.suffix)
        if room < 1:
            raise UserError(f"probe.max_len {self.max_len} leaves no room for text inside the framing")
        return [[*f.prefix, *ids[:room], *f.suffix] for ids in self.tokenizer.encode_batch(texts)]

    def pooled(self, model: torch.nn.Module, rows: list[list[int]], device: torch.device) -> torch.Tensor:
        """(B, C) pooled hidden states of the framed rows (right-padded here)."""
        T = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.pad] * (T - len(r)) for r in rows], device=device)
        lens = torch.tensor([len(r) for r in rows], device=device)
        mask = (torch.arange(T, device=device) < lens[:, None]).long()  # (B, T)
        if self.kind == "decoder":
            h = model.decode_hidden(ids, attention_mask=mask)  # (B, T, C)
        else:
            types = torch.zeros_like(ids) if self.segments else None
            h = model.encode(ids, mask, types)  # (B, T, C)
        if self.pooling == "first":
            return h[:, 0]
        if self.pooling == "last":
            return h[torch.arange(len(rows), device=device), lens - 1]
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)


def _features(model, reader: Reader, rows: list[list[int]], rt) -> torch.Tensor:
    """(N, C) fp32 pooled features of every row, without gradients, 64 rows at a time."""
    model.eval()
    out = []
    with torch.no_grad(), rt.autocast():
        for i in range(0, len(rows), 64):
            out.append(reader.pooled(model, rows[i:i + 64], rt.device).float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- scores
def scores(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean F1 over the classes present in `gold`)."""
    f1 = []
    for c in np.unique(gold):
        tp = float(((pred == c) & (gold == c)).sum())
        p, r = tp / max(float((pred == c).sum()), 1.0), tp / float((gold == c).sum())
        f1.append(0.0 if tp == 0 else 2 * p * r / (p + r))
    return {"acc": float((pred == gold).mean()), "macro_f1": float(np.mean(f1))}


def linear_probe(feats: torch.Tensor, train_y: np.ndarray, n_train: int, pc: ProbeConfig, seed: int) -> np.ndarray:
    """Test predictions of a logistic regression on standardized frozen features (rows n_train: are test)."""
    g = torch.Generator().manual_seed(seed)
    x = feats - feats[:n_train].mean(0)
    x = x / x[:n_train].std(0).clamp_min(1e-6)
    y = torch.from_numpy(train_y)
    K = int(train_y.max()) + 1
    head = torch.nn.Linear(x.size(1), K)
    torch.nn.init.normal_(head.weight, 0.0, 0.01, generator=g)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=pc.linear_lr, weight_decay=1e-3)
    for _ in range(pc.linear_steps):
        idx = torch.randint(0, n_train, (min(64, n_train),), generator=g)
        loss = F.cross_entropy(head(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return head(x[n_train:]).argmax(-1).numpy()


def fine_tune(model, reader: Reader, data: tuple, pc: ProbeConfig, seed: int, rt) -> np.ndarray:
    """Test predictions after full fine-tuning of a copy of `model` with a fresh linear head. data = (train rows,
    train labels, test rows, (mean, std) of the starting model's training features, by which the head's input
    is standardized)."""
    train_rows, train_y, test_rows, (mu, sd) = data
    mu, sd = mu.to(rt.device), sd.to(rt.device)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout, if the model has any
    net = copy.deepcopy(model).to(rt.device).train()
    head = torch.nn.Linear(net.cfg.d_model, int(train_y.max()) + 1).to(rt.device)
    torch.nn.init.normal_(head.weight, 0.0, 0.02, generator=g)
    torch.nn.init.zeros_(head.bias)
    params = [*net.parameters(), *head.parameters()]
    opt = torch.optim.AdamW([{"params": list(net.parameters()), "peak": pc.lr},
                             {"params": list(head.parameters()), "peak": pc.head_lr}], weight_decay=0.01)
    warm = max(1, pc.steps // 10)
    y_all = torch.from_numpy(train_y)
    for step in range(pc.steps):
        for group in opt.param_groups:
            group["lr"] = group["peak"] * min((step + 1) / warm, max(0.0, (pc.steps - step) / (pc.steps - warm + 1)))
        idx = torch.randint(0, len(train_rows), (pc.batch_size,), generator=g).tolist()
        with rt.autocast():
            h = reader.pooled(net, [train_rows[i] for i in idx], rt.device).float()
        logits = head((h - mu) / sd)
        loss = F.cross_entropy(logits, y_all[idx].to(rt.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    net.eval()
    preds = []
    with torch.no_grad(), rt.autocast():
        for i in range(0, len(test_rows), 64):
            h = reader.pooled(net, test_rows[i:i + 64], rt.device).float()
            preds.append(head((h - mu) / sd).float().argmax(-1).cpu())
    return torch.cat(preds).numpy()


def _spread(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Per-seed figures and their mean and standard deviation."""
    out: dict[str, Any] = {"seeds": runs}
    for k in runs[0]:
        v = np.array([r[k] for r in runs])
        out[k], out[f"{k}_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return out


def _probe_model(model, reader: Reader, task: tuple, pc: ProbeConfig, rt) -> dict[str, Any]:
    """Linear probe and full fine-tuning of one model over the seeds."""
    train_rows, train_y, test_rows, test_y = task
    feats = _features(model, reader, train_rows + test_rows, rt)
    lin = [scores(linear_probe(feats, train_y, len(train_rows), pc, s), test_y) for s in range(pc.seeds)]
    stats = feats[:len(train_rows)].mean(0), feats[:len(train_rows)].std(0).clamp_min(1e-6)
    ft = [scores(fine_tune(model, reader, (train_rows, train_y, test_rows, stats), pc, s, rt), test_y)
          for s in range(pc.seeds)]
    return {"linear": _spread(lin), "finetune": _spread(ft)}


def probe_run(run_dir: Path, pc: ProbeConfig, console: Any = None) -> dict[str, Any]:
    """Probe the run's newest checkpoint (and the random-init control); write and return RUN/probe-TASK.json."""
    from pretrain.run import RunDir, build_model, load, write_json
    from pretrain.runtime import setup_runtime

    t0 = time.perf_counter()
    loaded = load(run_dir)
    rt = setup_runtime(loaded.cfg.train)
    reader = Reader(loaded, pc)
    train, test = load_task(pc)
    task = (reader.encode(train.texts), train.labels, reader.encode(test.texts), test.labels)
    say = console.print if console is not None else (lambda *a, **k: None)
    say(f"probe {pc.name}: {len(train.texts)} training and {len(test.texts)} test examples in "
        f"{len(train.classes)} classes; pooling {reader.pooling}, mode {reader.mode or 'none'}", markup=False)
    majority = int(np.bincount(train.labels).argmax())
    res: dict[str, Any] = {
        "task": pc.name, "classes": train.classes, "n_train": len(train.texts), "n_test": len(test.texts),
        "test_groups": len(set(test.groups)), "train_groups": len(set(train.groups)),
        "majority": scores(np.full(len(test.labels), majority), test.labels),
        "run": _probe_model(loaded.model, reader, task, pc, rt), "checkpoint": loaded.checkpoint.name,
        "pooling": reader.pooling, "mode": reader.mode, "settings": asdict(pc),
        "python_version": platform.python_version()}
    if pc.random_init:
        fresh = build_model(loaded.cfg, loaded.tokenizer.size).to(rt.device)
        res["random_init"] = _probe_model(fresh, reader, task, pc, rt)
    res["seconds"] = time.perf_counter() - t0
    write_json(RunDir(run_dir).probe_for(pc.name), res)
    return res
