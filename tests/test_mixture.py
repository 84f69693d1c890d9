"""Tests of objectives/mixture.py (UL2's mixture of denoisers and any mixture of one arrangement) and of its config
tables: the component draw against the weights, each component's rows against that objective alone on the same
generator stream, a mixture of one component against the objective, the two weightings' losses, the recipes
against the paper's denoisers, resume through the CLI, learning on every component, and the one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import TINY, sets, torchrun, write_corpus
from typer.testing import CliRunner

from models.config import ModelConfig
from objectives.base import IGNORE_INDEX, make_generator
from objectives.clm import CausalLM
from objectives.mixture import Component, Mixture, ul2_denoisers
from objectives.mlm import MaskedLM
from objectives.span import PrefixLM, SpanCorruption
from pretrain.cli import app
from pretrain.config import Config, DataConfig, TrainConfig, config_from_dict, resolve
from pretrain.data import TokenSplit
from pretrain.errors import UserError
from pretrain.metrics import Meter
from pretrain.optim import build_optimizer
from pretrain.run import build_model
from pretrain.runtime import Engine, Runtime
from pretrain.tokenizer import Vocab
from pretrain.trainer import target_counts, train_step

runner = CliRunner()
SEQ, V = 32, 400
MODEL = ModelConfig(n_layers=1, n_heads=2, d_model=32, d_ff=64, max_len=64, rel_buckets=8, rel_max_distance=16)


@pytest.fixture(scope="module")
def split() -> TokenSplit:
    rng = np.random.default_rng(1)
    docs = [[list(150 + rng.integers(0, 200, size=int(rng.integers(4, 25)))) for _ in range(int(rng.integers(2, 8)))]
            for _ in range(80)]
    return TokenSplit.from_documents(docs, n_bytes=30_000)


def vocab_for(obj) -> Vocab:
    return Vocab.synthetic(V, word_start_every=2, extra=obj.special_pieces)


def test_ul2_recipes_hold_the_papers_denoisers_and_rates():
    """R: mean span 3 and 8 at 15% ([NLU]); X: 3 and 8 at 50%, 64 at 15% and 50% ([NLG]); S: the prefix LM ([S2S]) at
    20% of the rows, the six span denoisers 13.3% each; both recipes are the default mixture."""
    m = Mixture()
    spans = [(c.objective.noise_density, c.objective.mean_span, c.mode) for c in m.components[:6]]
    assert spans == [(0.15, 3.0, "[NLU]"), (0.15, 8.0, "[NLU]"), (0.5, 3.0, "[NLG]"), (0.5, 8.0, "[NLG]"),
                     (0.15, 64.0, "[NLG]"), (0.5, 64.0, "[NLG]")]
    assert all(isinstance(c.objective, SpanCorruption) for c in m.components[:6])
    assert isinstance(m.components[6].objective, PrefixLM) and m.components[6].mode == "[S2S]"
    total = sum(c.weight for c in m.components)
    assert m.components[6].weight / total == pytest.approx(0.2)
    assert all(c.weight / total == pytest.approx(0.8 / 6) for c in m.components[:6])
    assert m.special_pieces == m.modes == ("[NLU]", "[NLG]", "[S2S]")
    for recipe in ("ul2", "ul2-tiny"):
        cfg, _ = resolve(recipe=recipe)
        assert cfg.objective == m and cfg.objective.positions_needed(cfg.data.seq_len) <= cfg.model.max_len


def test_component_frequencies_match_the_weights_within_5_sigma():
    m = Mixture()
    w = np.array([c.weight for c in m.components])
    p = w / w.sum()
    n = 0
    counts = np.zeros(len(p))
    for step in range(20):
        which = m.draw_components(make_generator(3, "train", step, 0, 0), 2000)
        counts += np.bincount(which.numpy(), minlength=len(p))
        n += 2000
    sigma = np.sqrt(n * p * (1 - p))
    assert (np.abs(counts - n * p) < 5 * sigma).all(), (counts, n * p)
    zero = Mixture((Component(SpanCorruption()), Component(PrefixLM(), 0.0)))
    assert not zero.draw_components(make_generator(0), 5000).bool().any()  # weight 0: never drawn


@pytest.mark.parametrize("step", range(4))
def test_each_components_rows_are_that_objective_on_the_same_generator_stream(split, step):
    """Replaying the draw: the component choice, then each present component's own batch in order from the same
    generator; the mixture's rows of component i (its mode token first, at its own widths) equal it exactly, and
    the padding around them is <pad> / IGNORE_INDEX / mask 0."""
    m = Mixture()
    vocab = vocab_for(m)
    batch = m.batch(split, vocab, make_generator(5, "train", step, 0, 0), 24, SEQ)
    gen = make_generator(5, "train", step, 0, 0)
    which = m.draw_components(gen, 24)
    assert torch.equal(which, batch["mixture_component"])
    seen = 0
    for i, c in enumerate(m.components):
        n = int((which == i).sum())
        if not n:
            assert m.component_rows(batch, i) is None
            continue
        seen += 1
        alone = c.objective.batch(split, vocab, gen, n, SEQ - 1)
        got = m.component_rows(batch, i)
        assert set(got) == set(alone), c.label
        assert (got["input_ids"][:, 0] == vocab.special_id(c.mode)).all()
        assert torch.equal(got["input_ids"][:, 1:], alone["input_ids"]), c.label
        for k in alone:
            if k != "input_ids":
                want = alone[k]
                if k == "attention_mask":
                    want = torch.cat([torch.ones(n, 1, dtype=torch.long), want], 1)
                assert torch.equal(got[k], want), (c.label, k)
        rows = which == i
        w = got["labels"].size(1)
        assert (batch["labels"][rows, w:] == IGNORE_INDEX).all() and (batch["decoder_input_ids"][rows, w:] == 0).all()
        real = batch["attention_mask"][rows].sum(1)
        assert torch.equal(real, (got["input_ids"] != vocab.pad).sum(1))
    assert seen >= 3


def _engine(obj, seed: int = 0):
    cfg = Config(objective=obj, model=MODEL, data=DataConfig(seq_len=SEQ),
                 train=TrainConfig(lr=3e-3, warmup_steps=0, seed=seed))
    model = build_model(cfg, V)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return cfg, Engine(Runtime(torch.device("cpu"), None), model, model, opt, scaler)


@pytest.mark.parametrize("obj", [SpanCorruption(0.5, 8.0), PrefixLM(), CausalLM(), MaskedLM()])
def test_a_mixture_of_one_component_is_that_objective(split, obj):
    """The same batches (plus the mixture's bookkeeping fields), the same terms, the same training steps bit for
    bit."""
    mix = Mixture((Component(obj),))
    vocab = vocab_for(mix)
    cfg_a, eng_a = _engine(obj)
    cfg_b, eng_b = _engine(mix)
    for step in range(3):
        a = obj.batch(split, vocab, make_generator(1, "train", step, 0, 0), 8, SEQ)
        b = mix.batch(split, vocab, make_generator(1, "train", step, 0, 0), 8, SEQ)
        assert all(torch.equal(a[k], b[k]) for k in a) and set(b) - set(a) <= {k for k in b if k.startswith("mixture_")}
        ga, _ = train_step(obj, eng_a, [a], cfg_a.train, Meter())
        gb, _ = train_step(mix, eng_b, [b], cfg_b.train, Meter())
        assert float(ga) == float(gb)
    for pa, pb in zip(eng_a.model.parameters(), eng_b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    main = next(iter(obj.loss_terms))
    with torch.no_grad():
        ta, tb = obj.loss(eng_a.model, a), mix.loss(eng_b.model, b)
    assert float(ta[main][0]) == float(tb["mixture_loss"][0]) and float(ta[main][1]) == float(tb["mixture_loss"][1])


def test_weightings_divide_as_documented(split):
    """tokens: one term, the sum of every component's summed loss over all their targets; components: each
    component's mean, summed. Both counted by the trainer from the batch as the loss counts them."""
    comps = (Component(SpanCorruption(0.15, 3.0), 1.0, "[R]", "r"),
             Component(SpanCorruption(0.5, 8.0), 1.0, "[X]", "x"), Component(PrefixLM(), 2.0, "[S]", "s"))
    tok, per = Mixture(comps), Mixture(comps, weighting="components")
    assert tok.loss_terms == {"mixture_loss": "labels"}
    assert per.loss_terms == {"r_span_loss": "mixture_r_labels", "x_span_loss": "mixture_x_labels",
                              "s_prefix_loss": "mixture_s_labels"}
    vocab = vocab_for(tok)
    b = tok.batch(split, vocab, make_generator(2, "train", 0, 0, 0), 16, SEQ)
    b2 = per.batch(split, vocab, make_generator(2, "train", 0, 0, 0), 16, SEQ)
    assert torch.equal(b["labels"], b2["labels"])
    _, eng = _engine(tok)
    with torch.no_grad():
        t_tok, t_per = tok.loss(eng.model, b), per.loss(eng.model, b2)
    parts = [t_per[k] for k in per.loss_terms]
    assert float(t_tok["mixture_loss"][0]) == pytest.approx(float(sum(s for s, _ in parts)), rel=1e-6)
    assert float(t_tok["mixture_loss"][1]) == sum(float(n) for _, n in parts)
    rt = Runtime(torch.device("cpu"), None)
    for obj, batch, terms in ((tok, b, t_tok), (per, b2, t_per)):
        counts, _ = target_counts(obj, [batch], rt)
        for t in obj.loss_terms:
            assert float(counts[t]) == float(terms[t][1]) > 0
    for label in ("r", "x", "s"):  # every component's own figures are reported under its label, in both
        assert any(k.startswith(f"{label}_") and k.endswith("_acc") for k in t_tok)


def test_config_round_trips_and_names_bad_components():
    cfg = Config(objective=Mixture())
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    raw = {"objective": {"name": "mixture", "components": [{"name": "span", "weight": 1, "mean_span": 8}]}}
    assert config_from_dict(raw).objective.components[0].objective == SpanCorruption(mean_span=8.0)
    bad = [
        ([{"name": "span", "weight": -1}], "weight"),
        ([{"name": "span", "weight": 0}, {"name": "prefix", "weight": 0}], "weight 0"),
        ([{"name": "span"}, {"name": "clm"}], "one arrangement"),
        ([{"name": "mlm", "pack": True}, {"name": "mlm", "label": "b"}], "leave pack off"),
        ([{"name": "denoise", "pack": True, "mode": "[S2S]"}], "mode token"),
        ([{"name": "spam"}], "unknown objective 'spam'"),
        ([{"name": "span", "mean_spam": 3}], "components[0].mean_spam"),
        ([{"weight": 1}], "names no objective"),
        ([{"name": "mixture"}], "cannot be a mixture"),
        ([{"name": "span", "label": "a"}, {"name": "prefix", "label": "a"}], "labels repeat"),
        ([{"name": "span", "mode": "[A B]"}], "special piece"),
        ([{"name": "mlm"}, {"name": "mlm", "nsp": False}], "segment embeddings"),
        ([], "empty"),
    ]
    for comps, words in bad:
        with pytest.raises(UserError, match=words.replace("[", r"\[")):
            config_from_dict({"objective": {"name": "mixture", "components": comps}})
    with pytest.raises(UserError, match="recipe file"):
        resolve(objective="mixture", sets=["objective.components=span,prefix"])
    packed = config_from_dict({"objective": {"name": "mixture", "components": [
        {"name": "mlm", "pack": True}, {"name": "mlm", "label": "b", "pack": True, "mask_prob": 0.3}]}})
    assert packed.objective.packs_examples and all(c.objective.packs_examples
                                                             for c in packed.objective.components)


# ---------------------------------------------------------------------------------------------- through the CLI
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("mixcorpus"), n_docs=160)


MIX = ["model.n_layers=1", "model.n_dec_layers=1", "model.positions=relative", "model.rel_buckets=8",
       "model.rel_max_distance=16", "train.precision=fp32"]


def _run(corpus: Path, out: Path, cache: Path, *args: str, extra: tuple[str, ...] = ()):
    return runner.invoke(app, ["run", "--recipe", "ul2-tiny", "--data", str(corpus), "--out", str(out), *args,
                               *sets(*TINY, *MIX, f"data.cache_dir={cache}", *extra)])


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ul2_tiny_resumes_bit_exactly(corpus, tmp_path):
    cache = tmp_path / "cache"
    extra = ("train.ckpt_every=4", "train.keep_last=5", "train.eval_every=4", "train.log_every=1")
    res = _run(corpus, tmp_path / "full", cache, "--max-steps", "8", extra=extra)
    assert res.exit_code == 0, res.output
    res = _run(corpus, tmp_path / "part", cache, "--max-steps", "4", extra=extra)
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["run", "--resume", str(tmp_path / "part"), "--max-steps", "8"])
    assert res.exit_code == 0, res.output
    strip = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "elapsed")} for r in _records(
        tmp_path / "full")]
    again = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "elapsed")} for r in _records(
        tmp_path / "part")]
    assert strip == again
    assert {"r3_span_loss", "x64_50_span_acc", "s_prefix_loss", "mixture_loss"} <= {k for r in strip for k in r}
    assert {"r3_span_loss", "s_prefix_acc", "baseline_s_unigram_target_loss"} <= set(
        json.loads((tmp_path / "part" / "summary.json").read_text())) | {k for r in strip if "split" in r for k in r}
    cfg = json.loads((tmp_path / "part" / "config.json").read_text())
    assert [c["label"] for c in cfg["objective"]["components"]] == ["r3", "r8", "x3", "x8", "x64_15", "x64_50", "s"]
    _generate_in_each_mode(tmp_path / "part")


def _generate_in_each_mode(run: Path):
    """`generate --mode M` frames the prompt with M first, as the component with that mode was trained; no mode
    gives a note; a mode the run lacks is a one-line error."""
    from pretrain.generate import encode_prompts, framed, load_run

    for mode in ("[NLU]", "[NLG]", "[S2S]"):
        r = load_run(run, mode=mode)
        ids = framed(r, encode_prompts(r, ["the model reads"])[0])
        assert ids[0] == r.tokenizer.vocab.special_id(mode) and ids[-1] == r.tokenizer.vocab.eos
        res = runner.invoke(app, ["generate", str(run), "--prompt", "the model reads", "--mode", mode,
                                  "--max-new-tokens", "3"])
        assert res.exit_code == 0 and "input: the model reads" in res.output, res.output
    res = runner.invoke(app, ["generate", str(run), "--prompt", "the model", "--max-new-tokens", "2"])
    assert res.exit_code == 0 and "--mode" in res.output
    res = runner.invoke(app, ["generate", str(run), "--prompt", "the model", "--mode", "[XYZ]"])
    assert res.exit_code == 2 and "[NLU], [NLG], [S2S]" in res.output and len(res.output.strip().splitlines()) == 1


def test_ul2_tiny_learns_on_every_component(corpus, tmp_path):
    """The recipe's mixture on a shrunk model: every denoiser's training loss falls from the first logged
    interval to the last (the default-size run's figures are in the README)."""
    res = _run(corpus, tmp_path / "run", tmp_path / "cache", "--max-steps", "60",
               extra=("train.batch_size=32", "train.log_every=15", "train.eval_every=0", "train.lr=3e-3",
                      "train.warmup_steps=5"))
    assert res.exit_code == 0, res.output
    recs = [r for r in _records(tmp_path / "run") if "split" not in r]
    labels = [c.label for c in ul2_denoisers()]
    for label in labels:
        key = next(k for k in recs[0] if k.startswith(f"{label}_") and k.endswith("_loss"))
        assert recs[-1][key] < recs[0][key] - 0.3, (key, recs[0][key], recs[-1][key])
    assert recs[-1]["mixture_loss"] < recs[0]["mixture_loss"]
    assert math.isfinite(json.loads((tmp_path / "run" / "summary.json").read_text())["val_loss"])


def test_bad_mixtures_are_one_line_errors(corpus, tmp_path):
    base = (Path(__file__).resolve().parent.parent / "recipes" / "ul2-tiny.toml").read_text()
    cases = {
        "negative": (base.replace("weight = 3.0", "weight = -3.0"), "finite number >= 0"),
        "zero": (base.replace("weight = 2.0", "weight = 0.0").replace("weight = 3.0", "weight = 0"), "weight 0"),
        "arrangement": (base.replace('name = "prefix"', 'name = "clm"'), "one arrangement"),
        "unknown": (base.replace('name = "prefix"', 'name = "prefixx"'), "unknown objective 'prefixx'"),
    }
    for name, (text, words) in cases.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        res = runner.invoke(app, ["run", "--recipe", str(path), "--data", str(corpus), "--max-steps", "1",
                                  "--out", str(tmp_path / name)])
        assert res.exit_code == 2, (name, res.output)
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output, res.output
        assert words in res.output, (name, res.output)
        assert not (tmp_path / name).exists()
    res = runner.invoke(app, ["run", "--objective", "mixture", "--set", "objective.components=span", "--max-steps",
                              "1"])
    assert res.exit_code == 2 and "recipe file" in res.output and len(res.output.strip().splitlines()) == 1


def test_mode_framing_of_a_run_without_modes_is_an_error():
    from pretrain.generate import framing_for

    vocab = Vocab.synthetic(V)
    assert framing_for(CausalLM(), vocab, None) == CausalLM().framing(vocab)
    with pytest.raises(UserError, match="it has none"):
        framing_for(CausalLM(), vocab, "[S2S]")
    m = Mixture()
    f = framing_for(m, vocab_for(m), "[S2S]")
    assert f.prefix == (vocab_for(m).special_id("[S2S]"),) and f.suffix == (vocab.eos,) and f.decoder_start == 0


def test_ddp_trains_a_mixture_as_one_process_and_fsdp_refuses_it(corpus, tmp_path):
    """train.global_batch = 16: one process accumulates two micro-batches, each of 2 ranks takes one, whose rows
    fall to other components (so other forward passes); the losses agree. FSDP, whose every pass is a collective,
    refuses a mixture of several components."""
    from pretrain.config import TrainConfig
    from pretrain.parallel import mode_for

    extra = ("train.global_batch=16", "train.log_every=1", "train.eval_every=0", "model.positions=sinusoidal")
    one, two = tmp_path / "one", tmp_path / "ddp"
    res = _run(corpus, one, tmp_path / "cache", "--max-steps", "3", extra=extra)
    assert res.exit_code == 0, res.output
    p = torchrun(["run", "--recipe", "ul2-tiny", "--data", str(corpus), "--out", str(two), "--max-steps", "3",
                  *sets(*TINY, *MIX, f"data.cache_dir={tmp_path / 'cache'}", *extra)])
    assert p.returncode == 0, p.stderr[-3000:]
    a = [r for r in _records(one) if "split" not in r]
    b = [r for r in _records(two) if "split" not in r]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert max(abs(x["mixture_loss"] - y["mixture_loss"]) for x, y in zip(a, b, strict=True)) < 1e-5
    with pytest.raises(UserError, match="train.parallel=ddp"):
        mode_for(TrainConfig(parallel="fsdp"), 2, Mixture().one_pass)
    assert mode_for(TrainConfig(parallel="fsdp"), 2, Mixture((Component(SpanCorruption()),)).one_pass) == "fsdp"
