"""Decoding: the KV cache matches full recomputation, the search algorithms agree where they must, beam search
beats greedy where it should, batching with padding changes nothing, prompt framing and markers, and the
`generate` / `fill-mask` commands on real tiny runs (with their one-line errors)."""

import math
import random
import shutil

import pytest
import torch
from typer.testing import CliRunner

from models.config import Arch, ModelConfig
from models.transformer import Transformer
from pretrain.cli import app
from pretrain.decoding import (
    CachedStepper,
    PrefixStepper,
    Sampler,
    beam_search,
    generate,
    recompute_stepper,
)
from pretrain.generate import (
    Framing,
    TextStream,
    encode_with_specials,
    fill_spans,
    left_pad,
    right_pad,
)
from pretrain.tokenizer import MASK, N_SPECIAL, SENTINEL0, Tokenizer, Vocab

V = 200


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def tiny(kind: str, positions: str = "learned", seed: int = 0) -> Transformer:
    """A random 2-layer model; untied, so greedy decoding does not just repeat the last token."""
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layers=2, n_heads=2, d_model=32, d_ff=64, max_len=64, positions=positions,
                      tie_embeddings=False)
    return Transformer(cfg, Arch(kind=kind), V).eval()


def steppers(model, kind: str, rows: list[list[int]]):
    """A cached and a recomputing stepper over the same padded prompts (decoder-only) or sources."""
    if kind == "decoder":
        ids, mask = left_pad(rows, 0, torch.device("cpu"))
        return CachedStepper(model, ids, mask), recompute_stepper(model, ids, mask)
    src, mask = right_pad(rows, 0, torch.device("cpu"))
    memory = model.encode(src, mask)
    start = torch.zeros(len(rows), 1, dtype=torch.long)
    return CachedStepper(model, start, None, memory, mask), recompute_stepper(model, start, None, memory, mask)


PROMPTS = [[110, 150, 120], [130, 111, 112, 113, 114, 115, 199], [140]]


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "relative", "rope"])
@pytest.mark.parametrize("kind", ["decoder", "encoder-decoder"])
def test_cached_logits_equal_full_recomputation(kind, positions):
    model = tiny(kind, positions)
    cached, full = steppers(model, kind, PROMPTS)
    with torch.no_grad():
        a, b = cached.first(), full.first()
        assert (a - b).abs().max() < 1e-5
        for t in range(12):
            if t == 5:  # beam-style reordering: repeat and permute rows
                index = torch.tensor([2, 0, 0, 1])
                cached.reorder(index)
                full.reorder(index)
            if t == 9:  # a finished row dropped
                index = torch.tensor([0, 1, 3])
                cached.reorder(index)
                full.reorder(index)
            ids = torch.randint(N_SPECIAL, V, (len(index) if t >= 5 else a.size(0),))  # any continuation, not greedy
            a, b = cached.next(ids), full.next(ids)
            assert (a - b).abs().max() < 1e-5, (t, (a - b).abs().max())


def test_beam_width_one_and_top_k_one_equal_greedy():
    model = tiny("decoder", "rope")
    with torch.no_grad():
        free = generate(CachedStepper(model, *left_pad(PROMPTS, 0, torch.device("cpu"))), 3, 15, eos=-1)
        row = free.tokens[0]
        j = next(j for j in range(1, 15) if row[j] not in row[:j])
        eos = row[j]  # an id greedy decoding really emits (not at once), so the eos paths are exercised
        greedy = generate(CachedStepper(model, *left_pad(PROMPTS, 0, torch.device("cpu"))), 3, 15, eos=eos)
        assert greedy.finished[0] and len(greedy.tokens[0]) == j
        for alpha in (0.0, 0.6, -0.5):
            beam = beam_search(CachedStepper(model, *left_pad(PROMPTS, 0, torch.device("cpu"))), 3, 1, 15, eos, alpha)
            if alpha == 0.0:  # with a length penalty, width 1 may keep going past an eos (it could score better)
                assert beam == greedy
            assert beam_search(CachedStepper(model, *left_pad(PROMPTS, 0, torch.device("cpu"))), 3, 1, 15, -1,
                               alpha) == free
        for sampler in (Sampler(sample=True, top_k=1), Sampler(sample=True, top_p=1e-6)):
            out = generate(CachedStepper(model, *left_pad(PROMPTS, 0, torch.device("cpu"))), 3, 15, eos, sampler,
                           torch.Generator().manual_seed(1))
            assert out == greedy, sampler


def test_same_seed_same_sample_and_another_seed_another():
    model = tiny("decoder")  # init_std 0.02: a nearly flat next-token distribution

    def sample(seed):
        with torch.no_grad():
            stepper = CachedStepper(model, *left_pad(PROMPTS, 0, torch.device("cpu")))
            return generate(stepper, 3, 20, -1, Sampler(sample=True, top_p=0.9), torch.Generator().manual_seed(seed))

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b and a.tokens != c.tokens


def test_top_k_top_p_and_temperature_cut_the_distribution():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).repeat(4000, 1)  # (N, 4)
    g = torch.Generator().manual_seed(0)
    nucleus = Sampler(sample=True, top_p=0.7)(logits, g)  # 0.5 + 0.3 >= 0.7: tokens 1 and 3
    assert set(nucleus.tolist()) == {1, 3}
    assert abs((nucleus == 1).float().mean().item() - 0.5 / 0.8) < 0.03
    top2 = Sampler(sample=True, top_k=2)(logits, g)
    assert set(top2.tolist()) == {1, 3}
    full = Sampler(sample=True)(logits, g)
    assert abs((full == 0).float().mean().item() - 0.05) < 0.015
    hot = Sampler(sample=True, temperature=100.0)(logits, g)  # nearly uniform
    assert abs((hot == 0).float().mean().item() - 0.25) < 0.03


def scorer(ids: torch.Tensor, mask, **_) -> torch.Tensor:
    """A hand-written model over 5 ids (eos = 1) where greedy's first choice (2, p 0.5) leads only to
    flat continuations, while 3 (p 0.4) is followed by eos with p 0.9."""
    out = []
    for row in ids.tolist():
        gen = row[1:]  # after the one-token prompt
        if not gen:
            p = [0.0, 0.02, 0.5, 0.4, 0.08]
        elif gen[0] == 3:
            p = [0.0, 0.9, 0.04, 0.03, 0.03]
        else:
            p = [0.0, 0.25, 0.25, 0.25, 0.25]
        out.append(p)
    return torch.tensor(out).clamp_min(1e-9).log()


def logprob(tokens: list[int], eos: int = 1) -> float:
    ids = [0]
    total = 0.0
    for t in [*tokens, eos]:
        total += scorer(torch.tensor([ids]), None)[0, t].item()
        ids.append(t)
    return total


def test_beam_search_finds_the_sequence_greedy_misses():
    prompt = torch.zeros(2, 1, dtype=torch.long)
    greedy = generate(PrefixStepper(scorer, prompt), 2, 6, eos=1)
    assert greedy.tokens[0][0] == 2
    beam = beam_search(PrefixStepper(scorer, prompt), 2, 2, 6, eos=1, alpha=0.6)
    assert beam.tokens == [[3], [3]] and beam.finished == [True, True]
    assert logprob(beam.tokens[0]) > logprob(greedy.tokens[0]) + 1.0
    # the search keeps a finished hypothesis while it explores: the answer does not depend on the width
    assert beam_search(PrefixStepper(scorer, prompt), 2, 4, 6, eos=1, alpha=0.6).tokens == [[3], [3]]


def test_min_new_tokens_forbids_an_early_end():
    """The scorer's best beam ends after one token; with --min-new-tokens 3 no hypothesis ends before 3."""
    from pretrain.decoding import MinLength

    prompt = torch.zeros(2, 1, dtype=torch.long)
    free = beam_search(PrefixStepper(scorer, prompt), 2, 2, 6, eos=1, alpha=0.6)
    held = beam_search(MinLength(PrefixStepper(scorer, prompt), 1, 3), 2, 2, 6, eos=1, alpha=0.6)
    assert [len(t) for t in free.tokens] == [1, 1]
    assert all(len(t) >= 3 and 1 not in t for t in held.tokens)
    greedy = generate(MinLength(PrefixStepper(scorer, prompt), 1, 3), 2, 6, eos=1)
    assert all(1 not in t[:3] for t in greedy.tokens)


def test_beam_length_penalty_prefers_longer_outputs():
    """[3] ends with p .25 after 2 tokens, [2, 2, 2, 2] with p .45 after 5: the length penalty alpha decides."""
    def fn(ids, mask, **_):
        out = []
        for row in ids.tolist():
            gen = row[1:]
            if not gen:
                p = [0.0, 0.05, 0.45, 0.5, 0.0]
            elif gen == [3]:
                p = [0.0, 0.5, 0.5, 0.0, 0.0]
            elif len(gen) < 4:
                p = [0.0, 0.0, 1.0, 0.0, 0.0]  # 2 2 2 ... certain until length 4
            else:
                p = [0.0, 1.0, 0.0, 0.0, 0.0]
            out.append(p)
        return torch.tensor(out).clamp_min(1e-12).log()

    prompt = torch.zeros(1, 1, dtype=torch.long)
    # log p: [3] = log .25 = -1.39 (2 tokens with eos); [2,2,2,2] = log .45 = -0.80 (5 tokens): longer wins at 0
    assert beam_search(PrefixStepper(fn, prompt), 1, 3, 8, 1, alpha=0.0).tokens == [[2, 2, 2, 2]]
    assert beam_search(PrefixStepper(fn, prompt), 1, 3, 8, 1, alpha=2.0).tokens == [[2, 2, 2, 2]]
    # a strongly negative alpha punishes length
    assert beam_search(PrefixStepper(fn, prompt), 1, 3, 8, 1, alpha=-3.0).tokens == [[3]]
    # a limit of 3 new tokens: the unfinished [2, 2, 2] competes as it stands (log .45 / lp(3))
    out = beam_search(PrefixStepper(fn, prompt), 1, 3, 3, 1, alpha=0.0)
    assert out.tokens == [[2, 2, 2]] and out.finished == [False]


@pytest.mark.parametrize("kind", ["decoder", "encoder-decoder"])
def test_batched_generation_with_padding_equals_one_prompt_at_a_time(kind):
    model = tiny(kind, "relative" if kind == "encoder-decoder" else "learned", seed=3)
    with torch.no_grad():
        row = generate(steppers(model, kind, PROMPTS[1:2])[0], 1, 12, eos=-1).tokens[0]
        j = next(j for j in range(1, 12) if row[j] not in row[:j])
        eos = row[j]  # one row ends early, so the batch shrinks while the others go on
        limits = [12, 10, 7]
        for search in ("greedy", "beam"):
            def run(rows, lim, search=search):
                s = steppers(model, kind, rows)[0]
                if search == "greedy":
                    return generate(s, len(rows), lim, eos)
                return beam_search(s, len(rows), 3, lim, eos, 0.6)

            batched = run(PROMPTS, limits)
            single = [run([p], [n]) for p, n in zip(PROMPTS, limits, strict=True)]
            assert batched.tokens == [s.tokens[0] for s in single], search
            assert batched.finished == [s.finished[0] for s in single], search
            if search == "greedy":
                assert batched.finished[1] and len(batched.tokens[1]) == j
            assert all(len(t) <= n for t, n in zip(batched.tokens, limits, strict=True))


def test_framing_is_read_from_each_objective():
    from objectives import OBJECTIVES

    v = Vocab.synthetic(400)
    assert OBJECTIVES["clm"]().framing(v) == Framing(prefix=(v.eos,))
    assert OBJECTIVES["mlm"](nsp=True).framing(v) == Framing((v.cls,), (v.sep,))  # [CLS] text [SEP]
    assert OBJECTIVES["mlm"](nsp=False).framing(v) == Framing((v.bos,), (v.eos,))  # <s> text </s>
    assert OBJECTIVES["span"]().framing(v) == Framing((), (v.eos,), v.pad)  # T5: text </s>, decoder <pad>
    assert OBJECTIVES["prefix"]().framing(v) == Framing((), (v.eos,), v.pad)
    assert OBJECTIVES["denoise"]().framing(v) == Framing((v.bos,), (v.eos,), v.eos)  # BART: decoder </s>


def test_options_pick_the_search():
    from pretrain.errors import UserError
    from pretrain.generate import DecodeOptions

    assert not DecodeOptions().sampling and not DecodeOptions(beam=4).sampling
    for kw in ({"sample": True}, {"top_k": 5}, {"top_p": 0.9}, {"temperature": 0.7}):
        assert DecodeOptions(**kw).sampling, kw
    assert DecodeOptions(top_k=5).sampler() == Sampler(sample=True, top_k=5)
    for kw in ({"beam": 0}, {"beam": 2, "top_k": 3}, {"top_p": 0.0}, {"temperature": 0.0}, {"max_new_tokens": 0}):
        with pytest.raises(UserError):
            DecodeOptions(**kw)


# ------------------------------------------------------------------------------------------------ real runs
TINY = ["model.n_layers=2", "model.n_heads=2", "model.d_model=32", "model.d_ff=64", "model.max_len=32",
        "data.seq_len=32", "data.vocab_size=420", "train.batch_size=4", "train.warmup_steps=1",
        "train.eval_every=0", "train.log_every=1", "train.num_workers=0"]
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny 3-step runs of clm, span, denoise and mlm on a small corpus (one shared tokenizer and cache)."""
    rng = random.Random(0)
    words = ("the model reads text and learns to predict the next word from the words before it while the "
             "optimizer lowers the loss step by step until the validation curve stops falling").split()
    docs = [" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(rng.randint(2, 6))) for _ in range(120)]
    d = tmp_path_factory.mktemp("gen")
    (d / "docs.txt").write_text("\n\n".join(docs) + "\n")
    out = {}
    for obj in ("clm", "span", "denoise", "mlm"):
        sets = [a for s in (*TINY, f"data.cache_dir={d / 'cache'}") for a in ("--set", s)]
        res = runner.invoke(app, ["run", "--objective", obj, "--data", str(d / "docs.txt"), "--max-steps", "3",
                                  "--out", str(d / obj), *sets])
        assert res.exit_code == 0, res.output
        out[obj] = d / obj
    return out


def one_line_error(res, *words):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    for w in words:
        assert w in res.output, (w, res.output)


def test_markers_become_specials_and_spans_fill_the_prompt(runs):
    tok = Tokenizer.load(runs["span"] / "tokenizer.model")
    ids = encode_with_specials(tok, "The model <extra_id_0> text [MASK] and <extra_id_1>.")
    assert ids.count(SENTINEL0) == ids.count(SENTINEL0 + 1) == ids.count(MASK) == 1
    assert tok.decode(ids, keep_special=True) == "The model<extra_id_0> text[MASK] and<extra_id_1>."
    out = [SENTINEL0, *tok.encode(" reads"), SENTINEL0 + 1, *tok.encode(" loss")]
    assert fill_spans(tok, ids, out) == "The model reads text[MASK] and loss."
    first_only = out[: 1 + len(tok.encode(" reads"))]  # <extra_id_1> never filled: its marker stays
    assert fill_spans(tok, ids, first_only) == "The model reads text[MASK] and<extra_id_1>."


def test_stream_prints_whole_characters(runs):
    tok = Tokenizer.load(runs["clm"] / "tokenizer.model")
    text = " the model reads é and 日本 text"  # é and 日本 are byte pieces in this tiny vocabulary
    ids = tok.encode(text)
    assert len(ids) > len(text.split())
    parts = []
    stream = TextStream(tok, parts.append, eos=3)
    for i in [*ids, 3]:
        stream(torch.tensor([i]))
    assert "".join(parts) == text and not any("\ufffd" in p for p in parts)


def test_generate_command_on_real_runs(runs, tmp_path):
    res = runner.invoke(app, ["generate", str(runs["clm"]), "--prompt", "The model reads", "--max-new-tokens", "5"])
    assert res.exit_code == 0, res.output
    streamed = res.output.splitlines()[0]
    assert streamed.startswith("The model reads") and len(streamed) > len("The model reads")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the loss\nThe model reads\n\nstep by step until\n")
    res = runner.invoke(app, ["generate", str(runs["clm"]), "--prompts", str(prompts), "--max-new-tokens", "5",
                              "--batch-size", "2"])
    assert res.exit_code == 0 and res.output.count("prompt ") == 3, res.output
    assert streamed in res.output.splitlines()  # batched (left-padded) output = the streamed single one
    args = ["generate", str(runs["clm"]), "--prompt", "the", "--max-new-tokens", "8", "--top-k", "50"]
    a, b = runner.invoke(app, [*args, "--seed", "4"]), runner.invoke(app, [*args, "--seed", "4"])
    assert a.exit_code == 0 and a.output == b.output and "--seed 4" in a.output
    res = runner.invoke(app, ["generate", str(runs["clm"]), "--prompt", "the model", "--beam", "3"])
    assert res.exit_code == 0 and "context limit (32 tokens)" in res.output, res.output
    res = runner.invoke(app, ["generate", str(runs["span"]), "--prompt", "The model <extra_id_0> text.",
                              "--max-new-tokens", "6"])
    assert res.exit_code == 0 and "input:" in res.output and "filled: The model" in res.output, res.output
    res = runner.invoke(app, ["generate", str(runs["denoise"]), "--prompts", str(prompts), "--beam", "2",
                              "--max-new-tokens", "6"])
    assert res.exit_code == 0 and res.output.count("output:") == 3 and "filled" not in res.output, res.output
    res = runner.invoke(app, ["generate", str(runs["denoise"]), "--prompt", "The model [MASK] text."])
    assert res.exit_code == 0 and "input: The model [MASK] text." in res.output, res.output


def test_fill_mask_prints_a_table(runs):
    res = runner.invoke(app, ["fill-mask", str(runs["mlm"]), "The model [MASK] text and [MASK].", "--top-k", "3"])
    assert res.exit_code == 0, res.output
    assert "probability" in res.output and "top-1: The model" in res.output
    probs = [float(x) for x in res.output.split() if x.startswith("0.")]
    assert len(probs) == 6 and all(0 < p <= 1 for p in probs)


def test_bad_inputs_give_one_line_and_exit_2(runs, tmp_path):
    nock = tmp_path / "nock"
    shutil.copytree(runs["clm"], nock)
    shutil.rmtree(nock / "checkpoints")
    one_line_error(runner.invoke(app, ["generate", str(nock), "--prompt", "hi"]), "no checkpoint")
    one_line_error(runner.invoke(app, ["generate", str(tmp_path), "--prompt", "hi"]), "not a run folder")
    one_line_error(runner.invoke(app, ["generate", str(runs["clm"]), "--prompt", "the loss " * 40]),
                   "context is 32 tokens")
    one_line_error(runner.invoke(app, ["generate", str(runs["span"]), "--prompt", "the loss " * 40]), "context")
    one_line_error(runner.invoke(app, ["generate", str(runs["mlm"]), "--prompt", "the"]), "fill-mask")
    one_line_error(runner.invoke(app, ["fill-mask", str(runs["clm"]), "the [MASK]"]), "masked-LM")
    one_line_error(runner.invoke(app, ["fill-mask", str(runs["mlm"]), "no mask here"]), "no [MASK]")
    one_line_error(runner.invoke(app, ["generate", str(runs["clm"]), "--prompt", "a", "--beam", "2", "--sample"]),
                   "--beam")
    one_line_error(runner.invoke(app, ["generate", str(runs["clm"])]), "--prompt")


def test_bench_generation_smoke():
    from benchmarks.generation import bench_generation

    res = bench_generation(new_tokens=6, prompt_len=4, device="cpu")
    assert res["same_tokens"] and res["cached_tokens_per_s"] > 0 and res["recompute_tokens_per_s"] > 0
    assert math.isfinite(res["speedup"])
