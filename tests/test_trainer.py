"""The trainer's pieces: loss averaging under accumulation, schedules, optimizer groups, the loop's guards."""

import math

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from objectives.base import IGNORE_INDEX, make_generator
from objectives.clm import CausalLM
from pretrain.config import Config, DataConfig, TrainConfig
from pretrain.data import TokenSplit
from pretrain.metrics import Meter
from pretrain.optim import build_optimizer, lr_factor
from pretrain.run import build_model
from pretrain.runtime import Engine, Runtime
from pretrain.tokenizer import Vocab
from pretrain.trainer import train_step

V = 300


def tiny_cfg(**train) -> Config:
    model = ModelConfig(n_layers=2, n_heads=2, d_model=32, d_ff=64, max_len=32)
    return Config(objective=CausalLM(), model=model, data=DataConfig(seq_len=16), train=TrainConfig(**train))


def uneven_batches(n=8, T=16, seed=0):
    """n CLM rows whose labels have very different numbers of ignored positions, so a mean of
    per-micro-batch means differs from the global token mean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(110, V, (n, T + 1), generator=g)
    labels = x[:, 1:].clone()
    for i in range(n):
        labels[i, : (i * 2) % T] = IGNORE_INDEX
    return {"input_ids": x[:, :-1].contiguous(), "labels": labels}


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_accumulation_1x8_equals_4x2(clip):
    """SGD with lr 1 and no momentum makes the update equal to the accumulated gradient itself (AdamW's first
    step is lr * sign(g), which would turn float rounding on near-zero gradients into lr-sized noise)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(optimizer="sgd", lr=1.0, momentum=0.0, clip=clip, weight_decay=0.0)
    full = uneven_batches()
    params = []
    for micro in ([full], [{k: v[i: i + 2] for k, v in full.items()} for i in range(0, 8, 2)]):
        model = build_model(cfg, V)
        opt = build_optimizer(model, cfg.train, torch.device("cpu"))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        engine = Engine(Runtime(torch.device("cpu"), None), model, model, opt, scaler)
        train_step(cfg.objective, engine, micro, cfg.train, Meter())
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (params[0] - params[1]).abs().max().item() < 1e-6


def test_per_micro_batch_mean_would_differ():
    """The same batches averaged per micro-batch (HF's bug) give a different loss: the test above can fail."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg, V)
    full = uneven_batches()
    micro = [{k: v[i: i + 2] for k, v in full.items()} for i in range(0, 8, 2)]
    terms = [cfg.objective.loss(model, m) for m in micro]
    global_mean = sum(t["lm_loss"][0] for t in terms) / sum(t["lm_loss"][1] for t in terms)
    mean_of_means = sum(t["lm_loss"][0] / t["lm_loss"][1] for t in terms) / len(terms)
    assert abs(global_mean.item() - mean_of_means.item()) > 1e-4


def test_schedules():
    tc = TrainConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, tc, 110) == pytest.approx(0.1)
    assert lr_factor(9, tc, 110) == pytest.approx(1.0)
    assert lr_factor(10, tc, 110) == pytest.approx(1.0)
    assert lr_factor(60, tc, 110) == pytest.approx(0.55)
    assert lr_factor(110, tc, 110) == pytest.approx(0.1)
    lin = TrainConfig(warmup_steps=10, schedule="linear", min_lr_ratio=0.0)
    assert lr_factor(60, lin, 110) == pytest.approx(0.5)
    assert lr_factor(110, lin, 110) == pytest.approx(0.0)
    inv = TrainConfig(warmup_steps=16, schedule="inverse_sqrt")
    assert lr_factor(15, inv, 1000) == pytest.approx(1.0)
    assert lr_factor(63, inv, 1000) == pytest.approx(0.5)
    const = TrainConfig(warmup_steps=0, schedule="constant")
    assert lr_factor(500, const, 10) == 1.0


def test_no_weight_decay_on_biases_norms_embeddings():
    cfg = tiny_cfg()
    model = build_model(cfg, V)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == cfg.train.weight_decay and opt.param_groups[1]["weight_decay"] == 0
    for name, p in model.named_parameters():
        is_matrix = p.dim() >= 2 and "emb" not in name and "norm" not in name and "ln" not in name
        assert (id(p) in decayed) == is_matrix, name
    for kind in ("adafactor", "sgd"):
        build_optimizer(model, TrainConfig(optimizer=kind), torch.device("cpu")).step()


def test_batches_are_pure_functions_of_seed_step_micro_rank():
    docs = [[list(range(110 + d, 120 + d))] * 3 for d in range(20)]
    split = TokenSplit.from_documents(docs)
    vocab = Vocab.synthetic(V)
    obj = CausalLM()

    def draw(*key):
        return obj.batch(split, vocab, make_generator(*key), 4, 8)["input_ids"]

    assert torch.equal(draw(1, "train", 5, 0, 0), draw(1, "train", 5, 0, 0))
    others = [draw(2, "train", 5, 0, 0), draw(1, "train", 6, 0, 0), draw(1, "train", 5, 1, 0),
              draw(1, "train", 5, 0, 1)]
    assert all(not torch.equal(draw(1, "train", 5, 0, 0), o) for o in others)


def test_clm_windows_join_documents_with_eos_and_shift_by_one():
    docs = [[[110, 111], [112]], [[120, 121, 122]], [[130]]]
    split = TokenSplit.from_documents(docs)
    stream = np.array([110, 111, 112, 3, 120, 121, 122, 3, 130, 3])
    b = CausalLM().batch(split, Vocab.synthetic(V), make_generator(0), 64, 4)
    for x, y in zip(b["input_ids"].numpy(), b["labels"].numpy(), strict=True):
        starts = [s for s in range(len(stream) - 4) if (stream[s: s + 4] == x).all()]
        assert starts, x
        assert (stream[starts[0] + 1: starts[0] + 5] == y).all()
    assert math.isclose(len({tuple(r) for r in b["input_ids"].tolist()}), 6)  # every start position occurs


def test_stream_windows_are_the_joined_stream_at_every_start_and_length():
    """Windows that start or end on a separator, hold several whole documents or one-token ones, reach the last
    document's separator, or span the whole stream: each is the explicit stream's slice."""
    from objectives.clm import stream_windows

    docs = [[[110]], [[111, 112]], [[113]], [[114, 115, 116, 117]], [[118]], [[119]], [[120, 121]]]
    split = TokenSplit.from_documents(docs)
    stream = np.concatenate([np.append(np.concatenate(d), 3) for d in docs])
    for length in range(1, len(stream) + 1):
        starts = torch.arange(len(stream) - length + 1)
        got = stream_windows(split, starts, length, 3).numpy()
        want = np.stack([stream[s:s + length] for s in starts.tolist()])
        assert (got == want).all(), length
    past = stream_windows(split, torch.tensor([len(stream) - 3]), 8, 3)  # runs past the end: its start still reads
    assert past[0, :3].tolist() == stream[-3:].tolist()


def test_clm_doc_attention_opens_an_example_at_each_eos():
    docs = [[list(range(110 + d, 113 + d))] for d in range(30)]  # 3-token documents
    split = TokenSplit.from_documents(docs)
    vocab = Vocab.synthetic(V)
    b = CausalLM(doc_attention=True).batch(split, vocab, make_generator(0), 8, 12)
    x, ex = b["input_ids"], b["example_ids"]
    assert ex.shape == x.shape and (ex[:, 0] == 1 + (x[:, 0] == vocab.eos)).all()
    step = ex.diff(dim=1)
    assert torch.equal(step, (x[:, 1:] == vocab.eos).long())  # +1 exactly where a </s> starts the next document
    assert "example_ids" not in CausalLM().batch(split, vocab, make_generator(0), 8, 12)  # off by default, as GPT-2
