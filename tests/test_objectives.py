"""The objective contract, checked for every registered objective (a new one inherits all of it by being
registered) and for the toy objective of the README's "Adding an objective", taken from the README itself:
purity, shapes and dtypes, targets, the trainer's counts, positions, framing through `generate`, learning.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from models.config import Arch, ModelConfig
from objectives import OBJECTIVES
from objectives.base import IGNORE_INDEX, Objective, make_generator
from objectives.clm import CausalLM
from objectives.mixture import Component
from objectives.mlm import MaskedLM
from objectives.span import PrefixLM, SpanCorruption
from pretrain.config import Config, DataConfig, TrainConfig, objective_class
from pretrain.data import TokenSplit
from pretrain.metrics import Meter
from pretrain.optim import build_optimizer
from pretrain.recipes import list_recipes
from pretrain.run import build_model
from pretrain.runtime import Engine, Runtime
from pretrain.tokenizer import N_SPECIAL, Tokenizer, Vocab, check_extra_pieces, train_tokenizer
from pretrain.trainer import target_counts, train_step


# ---------------------------------------------------------------------------------------- the toy objective
def readme_objective() -> type[Objective]:
    """The example objective of the README's "Adding an objective", run exactly as a reader would paste it."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## Adding an objective"):]
    start = section.index("```python\n") + len("```python\n")
    module = sys.modules.setdefault("readme_example", types.ModuleType("readme_example"))  # a file of its own
    exec(compile(section[start:section.index("```", start)], "README.md", "exec", dont_inherit=True), module.__dict__)
    return module.ReverseWindow


ReverseWindow = readme_objective()

CASES = [(name, {}) for name in OBJECTIVES] + [
    ("clm", {"doc_attention": True}),
    ("mlm", {"pack": True}),
    ("mlm", {"nsp": False}),
    ("mlm", {"whole_word": True, "selection": "bernoulli"}),
    ("denoise", {"delete_ratio": 0.1, "token_mask_ratio": 0.1, "insert_ratio": 0.1, "rotate_ratio": 0.5}),
    ("denoise", {"pack": True, "insert_ratio": 0.1, "rotate_ratio": 0.5}),
    ("prefix", {"pack": True}),
    ("reverse", {}),
    # mixtures beside the default (UL2's): each component a loss term of its own; a decoder-only one whose mode
    # token shifts the causal window; BERT pairs, whose NSP terms stay the components' own
    ("mixture", {"weighting": "components", "components": (
        Component(SpanCorruption(0.5, 3.0), 1.0, "[NLG]", "x"), Component(PrefixLM(), 1.0, "[S2S]", "s"))}),
    ("mixture", {"components": (Component(CausalLM()), Component(CausalLM(), 0.5, "[LM]"))}),
    ("mixture", {"components": (Component(MaskedLM()), Component(MaskedLM(mask_prob=0.3), 1.0, "[M30]", "m30"))}),
]
IDS = [name + "".join(f"-{k}" for k in kw) + (f"-{i}" if name == "mixture" else "") for i, (name, kw) in
       enumerate(CASES)]
V, SEQ, B = 400, 32, 8
TINY = ModelConfig(n_layers=2, n_heads=2, d_model=32, d_ff=64, max_len=64, rel_buckets=8, rel_max_distance=16)


@pytest.fixture
def registered(monkeypatch):
    """The registry with the toy objective added, as a user's one line in objectives/__init__.py would."""
    monkeypatch.setitem(OBJECTIVES, "reverse", ReverseWindow)
    return OBJECTIVES


@pytest.fixture(params=CASES, ids=IDS)
def obj(request, registered) -> Objective:
    name, kwargs = request.param
    return objective_class(name)(**kwargs)


@pytest.fixture(scope="module")
def split() -> TokenSplit:
    """40 documents of 2-6 sentences of 4-20 ordinary tokens from a skewed 50-id distribution (learnable in a
    few steps); ids start well above the specials so objectives with extra pieces fit too."""
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, 51)
    docs = [[list(150 + rng.choice(50, size=int(rng.integers(4, 21)), p=p / p.sum()))
             for _ in range(int(rng.integers(2, 7)))] for _ in range(40)]
    return TokenSplit.from_documents(docs, n_bytes=10_000)


def vocab_for(obj: Objective) -> Vocab:
    return Vocab.synthetic(V, word_start_every=2, extra=obj.special_pieces)


def draw(obj: Objective, split: TokenSplit, seed: int = 0, step: int = 0) -> dict:
    return obj.batch(split, vocab_for(obj), make_generator(seed, "train", step, 0, 0), B, SEQ)


def config(obj: Objective, **train) -> Config:
    return Config(objective=obj, model=TINY, data=DataConfig(seq_len=SEQ), train=TrainConfig(**train))


# ---------------------------------------------------------------------------------------------- the contract
def test_members_are_complete(obj):
    cls = type(obj)
    assert isinstance(obj, Objective) and dataclasses.is_dataclass(obj)
    assert OBJECTIVES[cls.name] is cls
    assert isinstance(obj.arch, Arch) and obj.loss_terms and all(isinstance(f, str) for f in obj.loss_terms.values())
    assert obj.default_recipe is None or obj.default_recipe in list_recipes()
    check_extra_pieces(obj.special_pieces)
    with pytest.raises(dataclasses.FrozenInstanceError):
        obj.some_field = 1  # hyper-parameters are frozen: a run cannot mutate its objective


def test_batch_is_pure_with_int64_fields_of_the_right_shapes(obj, split):
    a, b, other = draw(obj, split), draw(obj, split), draw(obj, split, seed=1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in a if a[k].shape == other[k].shape)
    for k, t in a.items():
        assert t.dtype == torch.int64 and t.device.type == "cpu" and t.size(0) == B, k
    assert set(obj.loss_terms.values()) <= a.keys()
    need = obj.positions_needed(SEQ)
    x = a["input_ids"]
    assert x.dim() == 2 and x.size(1) <= need and 0 <= int(x.min()) and int(x.max()) < V
    for k in ("attention_mask", "token_type_ids"):
        if k in a:
            assert a[k].shape == x.shape and set(a[k].unique().tolist()) <= {0, 1}, k
    if obj.arch.kind == "encoder-decoder":
        y = a["decoder_input_ids"]
        assert y.size(1) <= need and y.size(1) <= obj.decoder_length(SEQ) and a["labels"].shape == y.shape
    else:
        assert "decoder_input_ids" not in a and a["labels"].shape == x.shape


def test_targets_are_never_pad_or_an_unannounced_special(obj, split):
    vocab = vocab_for(obj)
    allowed = obj.special_targets(vocab)
    assert vocab.pad not in allowed
    for step in range(5):
        labels = draw(obj, split, step=step)["labels"]
        t = labels[labels != IGNORE_INDEX]
        assert t.numel() > 0 and int(t.min()) >= 0 and int(t.max()) < V
        specials = set(t[torch.from_numpy(vocab.special)[t]].tolist())
        assert specials <= allowed, (specials, allowed)


def test_the_trainers_target_count_is_the_losss_count(obj, split):
    batch = draw(obj, split)
    model = build_model(config(obj), V)
    terms = obj.loss(model, batch)
    counts, _ = target_counts(obj, [batch], Runtime(torch.device("cpu"), None))
    for term in obj.loss_terms:
        assert float(counts[term]) == float(terms[term][1]) > 0, term
        assert terms[term][0].requires_grad and torch.isfinite(terms[term][0]), term


def test_framing_matches_the_training_batches(obj, split):
    vocab = vocab_for(obj)
    f, batch = obj.framing(vocab), draw(obj, split)
    if obj.arch.kind == "decoder":
        assert f.decoder_start is None and not f.suffix
        return
    x = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(x))
    for row, m in zip(x.tolist(), mask.tolist(), strict=True):
        real = [t for t, keep in zip(row, m, strict=True) if keep]
        assert tuple(real[: len(f.prefix)]) == f.prefix and tuple(real[len(real) - len(f.suffix):]) == f.suffix
    if obj.arch.kind == "encoder-decoder":
        assert (batch["decoder_input_ids"][:, 0] == f.decoder_start).all()
    else:
        assert f.decoder_start is None


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """A real tokenizer holding every case's extra pieces (the toy's [REV], the mixtures' mode tokens)."""
    objs = [ReverseWindow(), *(OBJECTIVES[name](**kw) for name, kw in CASES if name in OBJECTIVES)]
    extra = tuple(dict.fromkeys(p for obj in objs for p in obj.special_pieces))
    rng = random.Random(0)
    words = "the model reads text and learns to write what comes next in a sentence".split()
    texts = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(300)]
    path = train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t", 420, extra_pieces=extra, soft_limit=True)
    return Tokenizer.load(path, extra)


def test_framing_round_trips_through_generate(obj, tokenizer, tmp_path):
    from pretrain.generate import DecodeOptions, Run, encode_prompts, fill_mask, framed, generate_batch

    torch.manual_seed(0)
    model = build_model(config(obj), tokenizer.size).eval()
    run = Run(tmp_path, config(obj), model, tokenizer, obj.framing(tokenizer.vocab), torch.device("cpu"))
    assert run.framing == obj.framing(tokenizer.vocab)
    text = "The model reads text."
    if obj.arch.kind == "encoder":
        cands = fill_mask(run, "The model [MASK] text.", top_k=3)
        assert len(cands) == 1 and len(cands[0]) == 3
        assert all(not tokenizer.vocab.special[i] for i, _ in cands[0])
        return
    ids = encode_prompts(run, [text])[0]
    row = framed(run, ids)
    assert row == [*run.framing.prefix, *tokenizer.encode(text), *run.framing.suffix]
    assert tokenizer.decode(row) == text  # the framing is special pieces only: the prompt comes back intact
    out = generate_batch(run, [text], DecodeOptions(max_new_tokens=3, min_new_tokens=1))[0]
    assert out.input_ids == ids and 1 <= len(out.output_ids) <= 3


def test_five_steps_lower_the_loss(obj, split):
    cfg = config(obj, lr=1e-2, warmup_steps=0, weight_decay=0.0)
    vocab = vocab_for(obj)
    model = build_model(cfg, V)
    engine = Engine(Runtime(torch.device("cpu"), None), model, model,
                    build_optimizer(model, cfg.train, torch.device("cpu")), torch.amp.GradScaler("cpu", enabled=False))
    main = next(iter(obj.loss_terms))
    held_out = obj.batch(split, vocab, make_generator(99, "eval"), 32, SEQ)

    def loss() -> float:
        with torch.no_grad():
            s, n = obj.loss(model, held_out)[main]
        return float(s / n)

    before = loss()
    for step in range(5):
        train_step(obj, engine, [draw(obj, split, step=step)], cfg.train, Meter())
    assert loss() < before - 0.3, (before, loss())


# ---------------------------------------------------------------------------------------------- end to end
def test_a_new_objective_runs_through_the_cli(registered, tmp_path):
    """The toy objective, registered, is listed, trains, evaluates and generates through the CLI, its own
    special piece included."""
    from pretrain.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["objectives"], terminal_width=200)
    assert res.exit_code == 0 and "reverse" in res.output and "Toy" in res.output
    res = runner.invoke(app, ["run", "--help"], terminal_width=200)
    assert res.exit_code == 0 and "reverse" in res.output and "denoise" in res.output
    rng = random.Random(1)
    words = "a toy objective reverses every window of the text it reads".split()
    (tmp_path / "c.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(60)))
    tiny = ["model.n_layers=1", "model.n_heads=2", "model.d_model=32", "model.d_ff=64", "model.max_len=32",
            "model.positions=learned", "data.seq_len=16", "data.vocab_size=420", "data.vocab_limit=soft",
            "train.batch_size=4", "train.warmup_steps=1", "train.eval_batches=1", "train.log_every=1",
            "train.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}"]
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", "--objective", "reverse", "--data", str(tmp_path / "c.txt"), "--max-steps", "3",
                              "--out", str(out), *[a for s in tiny for a in ("--set", s)]])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "split" not in r] == [1, 2, 3] and "reverse_loss" in recs[0]
    assert Tokenizer.load(out / "tokenizer.model").specials[N_SPECIAL:] == ("[REV]",)
    assert runner.invoke(app, ["eval", str(out), "--batches", "1"]).exit_code == 0
    res = runner.invoke(app, ["generate", str(out), "--prompt", "a toy", "--max-new-tokens", "3"])
    assert res.exit_code == 0 and "input: a toy" in res.output, res.output
