"""Tests of the Transformer backbone and its KV cache. Tiny fp32 models in eval mode."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from models.config import Arch, ModelConfig
from models.transformer import KVCache, Transformer

V = 61
POSITIONS = ["learned", "sinusoidal", "relative", "rope"]
KINDS = ["decoder", "encoder", "encoder-decoder"]
TINY = ModelConfig(n_layers=2, n_heads=4, d_model=32, d_ff=64, max_len=40, rel_buckets=8, rel_max_distance=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def make(kind: str = "decoder", seed: int = 0, arch: Arch | None = None, **overrides) -> Transformer:
    """A tiny fp32 model in eval mode; arch defaults to the bare arrangement `kind`."""
    torch.manual_seed(seed)
    return Transformer(dataclasses.replace(TINY, **overrides), arch or Arch(kind), V).eval()


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(7, V, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model: Transformer, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kw).logits


# ------------------------------------------------------------------------------------- what attends to what
@pytest.mark.parametrize("positions", POSITIONS)
def test_decoder_is_causal(positions):
    model, x = make(positions=positions), ids(2, 12)
    y = x.clone()
    t = 5
    y[:, t:] = ids(2, 12 - t, seed=2)  # change tokens t+1..T (1-based)
    a, b = logits(model, x), logits(model, y)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-3)


@pytest.mark.parametrize("positions", POSITIONS)
def test_encoder_sees_the_future(positions):
    model, x = make("encoder", positions=positions), ids(2, 12)
    y = x.clone()
    y[:, -1] = (x[:, -1] + 1 - 7) % (V - 7) + 7
    assert not torch.allclose(logits(model, x)[:, 0], logits(model, y)[:, 0], atol=1e-4)


def test_cross_attention_depends_on_encoder_input():
    model, dec = make("encoder-decoder"), ids(2, 6, seed=3)
    x = ids(2, 10)
    y = x.clone()
    y[:, 4] = (x[:, 4] + 1 - 7) % (V - 7) + 7
    a = logits(model, x, decoder_input_ids=dec)
    b = logits(model, y, decoder_input_ids=dec)
    assert not torch.allclose(a, b, atol=1e-4)  # every decoder position moved
    assert (a - b).abs().amax(-1).min() > 1e-5


# ------------------------------------------------------------------------------------------------ padding
def pad(x: torch.Tensor, n: int, left: bool = False, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (1, T) padded with n tokens on one side; returns ids (1, T+n) and mask (1, T+n)."""
    p = torch.full((1, n), fill, dtype=x.dtype)
    m1, m0 = torch.ones_like(x), torch.zeros_like(p)
    return (torch.cat((p, x), 1), torch.cat((m0, m1), 1)) if left else (torch.cat((x, p), 1), torch.cat((m1, m0), 1))


@pytest.mark.parametrize("positions", POSITIONS)
def test_padding_changes_no_real_position(positions):
    x = ids(1, 7)
    enc = make("encoder", positions=positions)
    xp, m = pad(x, 4, fill=9)
    assert torch.allclose(logits(enc, xp, attention_mask=m)[:, :7], logits(enc, x), atol=1e-5)

    dec = make("decoder", positions=positions)
    for left in (False, True):  # a left-padded prompt keeps its positions (the count of real tokens before)
        xp, m = pad(x, 4, left=left, fill=9)
        real = logits(dec, xp, attention_mask=m)[m.bool()]
        assert torch.allclose(real, logits(dec, x)[0], atol=1e-5)

    ed, d = make("encoder-decoder", positions=positions), ids(1, 5, seed=4)
    xp, m = pad(x, 4, fill=9)
    padded = logits(ed, xp, attention_mask=m, decoder_input_ids=d)
    assert torch.allclose(padded, logits(ed, x, decoder_input_ids=d), atol=1e-5)
    dp, dm = pad(d, 3, fill=9)
    padded = logits(ed, xp, attention_mask=m, decoder_input_ids=dp, decoder_attention_mask=dm)[:, :5]
    assert torch.allclose(padded, logits(ed, x, decoder_input_ids=d), atol=1e-5)


def test_fully_padded_rows_stay_finite():
    x = ids(2, 6)
    m = torch.ones_like(x)
    m[1] = 0  # an all-padding sequence
    for kind in KINDS:
        model = make(kind, positions="relative")
        out = model(x, attention_mask=m, decoder_input_ids=x, decoder_attention_mask=m).logits
        out.sum().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("positions", POSITIONS)
def test_positions_matter_and_relative_kinds_depend_only_on_distance(positions):
    model, x = make("encoder", positions=positions), ids(2, 10)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(logits(model, x)[:, perm], logits(model, x[:, perm]), atol=1e-4)
    with torch.no_grad():  # shift every absolute position by 7: only RoPE and the relative bias ignore it
        h = model.embed_tokens(x)
        pos = torch.arange(10)[None]
        same = torch.allclose(model.encoder(h, pos), model.encoder(h, pos + 7), atol=1e-5)
    assert same == (positions in ("rope", "relative"))


def test_relative_buckets_match_t5():
    from models.layers import relative_bucket

    rel = torch.tensor([0, -1, 1, -7, -8, -100, -1000, 5])  # key position - query position
    assert relative_bucket(rel, True, 32, 128).tolist() == [0, 1, 17, 7, 8, 15, 15, 21]
    rel = torch.tensor([0, -1, -15, -16, -20, -200, 5])
    assert relative_bucket(rel, False, 32, 128).tolist() == [0, 1, 15, 16, 17, 31, 0]


# ------------------------------------------------------------------------------------------------ switches
SWITCHES = [
    {},
    {"norm": "rmsnorm"},
    {"norm_placement": "post"},
    *[{"positions": p} for p in POSITIONS[1:]],
    *[{"activation": a} for a in ("gelu_tanh", "relu", "geglu", "swiglu")],
    {"bias": False},
    {"embed_norm": True},
    {"tie_embeddings": False},
    {"tied_output_scale": True, "norm": "rmsnorm", "positions": "relative", "bias": False},
    {"dropout": 0.1, "n_dec_layers": 1},
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_each_switch_builds_and_trains(kind, switch):
    arch = Arch(kind, segments=kind != "decoder", lm_transform=kind == "encoder", classifier=2 * (kind == "encoder"))
    model = make(kind, arch=arch, **switch).train()
    x, m = ids(3, 9), torch.ones(3, 9, dtype=torch.long)
    m[0, 6:] = 0
    out = model(x, attention_mask=m, token_type_ids=(torch.arange(9) >= 4).long().expand(3, 9), decoder_input_ids=x)
    assert out.logits.shape == (3, 9, V)
    loss = out.logits.logsumexp(-1).mean() + (out.cls_logits.sum() if out.cls_logits is not None else 0)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name
    names = dict(model.named_parameters())
    assert ("lm_head.proj.weight" in names) == (not model.cfg.tie_embeddings)
    assert all("final_norm" not in n for n in names) == (model.cfg.norm_placement == "post")
    assert not any("sinusoid" in k for k in model.state_dict())  # the fixed table is not a weight


def test_tied_output_scale_is_t5s_d_model_rescale():
    plain = make(norm="rmsnorm", positions="relative", bias=False)
    scaled = make(norm="rmsnorm", positions="relative", bias=False, tied_output_scale=True)
    scaled.load_state_dict(plain.state_dict())
    x = ids(2, 8)
    assert torch.allclose(logits(scaled, x), logits(plain, x) * 32**-0.5, atol=1e-6)


def test_gpt2_small_has_124m_parameters():
    from pretrain.config import resolve

    cfg = resolve(recipe="gpt2")[0].model  # the recipe's model, with GPT-2's 50257-token vocabulary
    with torch.device("meta"):
        model = Transformer(cfg, Arch("decoder"), 50257)
    assert abs(model.num_params() - 124_439_808) <= 0.005 * 124_439_808
    assert model.num_params() == 124_439_808  # exactly Hugging Face's GPT-2 count
    n = 124_439_808 - 50257 * 768 - 1024 * 768
    assert model.num_params(non_embedding=True) == n
    assert model.flops_per_token(1024) == 6 * (n + 768 * 50257) + 12 * 12 * 768 * 1024


def test_init_scales_residual_projections():
    model = make(n_layers=3, d_model=256, d_ff=256, n_heads=4)
    std = lambda w: w.std().item()  # noqa: E731
    assert std(model.embed.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.decoder.blocks[0].attn.qkv.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.decoder.blocks[2].mlp.out.weight) == pytest.approx(0.02 / math.sqrt(6), rel=0.05)
    assert model.decoder.blocks[0].attn.out.bias.abs().max() == 0


# --------------------------------------------------------------------------------------------------- heads
def test_output_mask_selects_rows_of_the_full_logits():
    model = make("encoder", arch=Arch("encoder", segments=True, lm_transform=True, classifier=2))
    x = ids(3, 10)
    sel = torch.rand(3, 10, generator=torch.Generator().manual_seed(0)) < 0.3
    with torch.no_grad():
        full, part = model(x), model(x, output_mask=sel)
    assert part.logits.shape == (int(sel.sum()), V)
    assert torch.allclose(part.logits, full.logits[sel], atol=1e-6)
    assert torch.equal(part.cls_logits, full.cls_logits)


def test_segment_embeddings_change_the_output_and_cls_shape():
    model = make("encoder", arch=Arch("encoder", segments=True, classifier=2))
    x = ids(4, 10)
    tt = (torch.arange(10) >= 5).long().expand(4, 10)
    with torch.no_grad():
        a, b = model(x), model(x, token_type_ids=tt)
    assert not torch.allclose(a.logits, b.logits, atol=1e-4)
    assert a.cls_logits.shape == (4, 2)
    assert make("encoder").forward(x).cls_logits is None


# ----------------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("kind", ["decoder", "encoder-decoder"])
def test_cached_decoding_equals_full_recomputation(kind, positions):
    model = make(kind, positions=positions)
    src, src_mask = ids(2, 9, seed=5), torch.ones(2, 9, dtype=torch.long)
    src_mask[1, 6:] = 0
    seq = ids(2, 14, seed=6)
    cache = KVCache()
    with torch.no_grad():
        memory = model.encode(src, src_mask) if kind == "encoder-decoder" else None
        full = model.decode(seq, memory=memory, memory_mask=src_mask)  # (B, T, V) without a cache
        steps = [(0, 4), (4, 6), *((t, t + 1) for t in range(6, 14))]  # prefill, a 2-token chunk, then 1 by 1
        for i, (a, b) in enumerate(steps):
            kw = {"memory": memory, "memory_mask": src_mask} if i == 0 else {}  # cross k/v kept after step 0
            out = model.decode(seq[:, a:b], cache=cache, **kw)
            assert torch.allclose(out, full[:, a:b], atol=1e-5, rtol=0), (a, b)
    assert cache.length == 14 and cache.self_kv[0][0].shape == (2, 4, 14, 8)


@pytest.mark.parametrize("positions", POSITIONS)
def test_left_padded_batch_decodes_like_single_prompts(positions):
    model = make(positions=positions)
    p0, p1 = ids(1, 6, seed=7), ids(1, 3, seed=8)
    p1_padded, m1 = pad(p1, 3, left=True)
    prompts, mask = torch.cat((p0, p1_padded)), torch.cat((torch.ones_like(p0), m1))
    nxt = ids(2, 4, seed=9)
    with torch.no_grad():
        cache = KVCache()
        batched = [model.decode(prompts, cache=cache, attention_mask=mask)[:, -1]]
        batched += [model.decode(nxt[:, t : t + 1], cache=cache)[:, 0] for t in range(4)]
        for row, p in enumerate((p0, p1)):
            single = model.decode(torch.cat((p, nxt[row : row + 1]), 1))[0, p.size(1) - 1 :]  # (5, V)
            assert torch.allclose(torch.stack([b[row] for b in batched]), single, atol=1e-5)


def test_cache_reorder_follows_beams():
    model = make(positions="rope")
    x, nxt = ids(3, 5), ids(3, 1, seed=2)
    order = torch.tensor([2, 2, 0])
    with torch.no_grad():
        cache = KVCache()
        model.decode(x, cache=cache)
        cache.reorder(order)
        out = model.decode(nxt, cache=cache)
        full = model.decode(torch.cat((x[order], nxt), 1))[:, -1:]
    assert torch.allclose(out, full, atol=1e-5)


# ------------------------------------------------------------------------------------------------ errors
def test_too_long_is_an_error_naming_the_keys():
    """models/ raises ValueError (it imports nothing from pretrain/); callers check lengths up front and the
    config layer turns model errors into the user's one-line error."""
    model = make(max_len=16)
    with pytest.raises(ValueError, match=r"17 tokens .* model.max_len = 16.*data.seq_len"):
        model(ids(1, 17))
    cache = KVCache()
    with torch.no_grad():
        model.decode(ids(1, 16), cache=cache)
        with pytest.raises(ValueError, match="max_len"):
            model.decode(ids(1, 1), cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        make("encoder-decoder", max_len=16, positions="relative")(ids(1, 20), decoder_input_ids=ids(1, 4))


# ------------------------------------------------------------------------------------------------ packed rows
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_packed_examples_compute_what_each_computes_alone(kind, positions):
    """Three examples packed in a row (then padding) give exactly the logits each gives in a row of its own:
    attention stays within an example and its positions restart."""
    model = make(kind, positions=positions)
    lengths = [9, 13, 6]
    parts = [ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    pad = torch.zeros(1, 4, dtype=torch.long)
    row = torch.cat([*parts, pad], dim=1)  # (1, 32)
    example = torch.cat([torch.full((1, n), i + 1) for i, n in enumerate(lengths)] + [pad], dim=1)
    packed = logits(model, row, example_ids=example)
    start = 0
    for part, n in zip(parts, lengths, strict=True):
        alone = logits(model, part)
        assert (packed[:, start:start + n] - alone).abs().max() < 1e-5, (kind, positions, start)
        start += n


@pytest.mark.parametrize("positions", POSITIONS)
def test_packed_encoder_decoder_rows_compute_each_example_alone(positions):
    """Three (source, target) examples packed in an encoder row and a decoder row, each then padded: every decoder
    position gives the logits it gives with its example alone, so cross-attention stays within the example too."""
    model = make("encoder-decoder", positions=positions)
    src_len, dec_len = [9, 13, 6], [5, 11, 8]
    srcs = [ids(1, n, seed=10 + i) for i, n in enumerate(src_len)]
    decs = [ids(1, n, seed=20 + i) for i, n in enumerate(dec_len)]

    def packed_row(parts, pad):
        row = torch.cat([*parts, torch.zeros(1, pad, dtype=torch.long)], 1)
        number = torch.cat([torch.full((1, p.size(1)), i + 1) for i, p in enumerate(parts)]
                           + [torch.zeros(1, pad, dtype=torch.long)], 1)
        return row, number

    (src, src_ex), (dec, dec_ex) = packed_row(srcs, 4), packed_row(decs, 3)
    out = logits(model, src, attention_mask=(src_ex > 0).long(), decoder_input_ids=dec, example_ids=src_ex,
                 decoder_example_ids=dec_ex)
    start = 0
    for s, d in zip(srcs, decs, strict=True):
        alone = logits(model, s, decoder_input_ids=d)
        assert (out[:, start:start + d.size(1)] - alone).abs().max() < 1e-5, (positions, start)
        start += d.size(1)
    with pytest.raises(ValueError, match="packed rows"):  # one stack numbered, not the other
        model(src, decoder_input_ids=dec, example_ids=src_ex)


# ------------------------------------------------------------------------------------ explicit attention (CPU)
def test_explicit_attention_is_sdpa_written_out():
    """The CPU bf16 path computes what SDPA computes, for every mask the stacks build: causal, bool (padding,
    packed), additive (relative bias), and fewer queries than keys (a cache)."""
    import torch.nn.functional as F

    from models.layers import explicit_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    bool_mask = torch.rand(2, 1, 7, 7, generator=g) > 0.3
    bool_mask[..., 0] = True  # every query sees a key
    bias = torch.randn(1, 3, 7, 7, generator=g)
    for mask, causal in ((None, True), (None, False), (bool_mask, False), (bias, False)):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        assert (explicit_attention(q, k, v, mask, causal, 0.0) - want).abs().max() < 1e-5
    tail = q[:, :, -2:]  # two new queries over seven cached keys, causal: they see all keys up to their own
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, -2:]
    assert (explicit_attention(tail, k, v, None, True, 0.0) - want).abs().max() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_cpu_attention_follows_the_fp32_model(kind, monkeypatch):
    """Under bf16 autocast on CPU the model takes explicit_attention (short keys), and its logits
    follow the fp32 model's within bf16 rounding; past EXPLICIT_KEYS it takes SDPA and agrees as well."""
    import models.layers as layers

    calls = []
    real = layers.explicit_attention
    monkeypatch.setattr(layers, "explicit_attention", lambda *a: calls.append(1) or real(*a))
    x = ids(2, 12)
    m = torch.ones_like(x)
    m[1, 9:] = 0
    kw = {"attention_mask": m} | ({"decoder_input_ids": x} if kind == "encoder-decoder" else {})
    model = make(kind, positions="relative" if kind != "decoder" else "learned")
    ref = logits(model, x, **kw)
    for limit, used in ((256, True), (4, False)):
        monkeypatch.setattr(layers, "EXPLICIT_KEYS", limit)
        calls.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, **kw).logits.float()
        assert bool(calls) == used
        assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_gelu_tanh_in_bf16_is_gpt2s_formula_to_bf16_rounding():
    """bf16 on CPU evaluates GPT-2's tanh GELU with the erf kernel (models/layers.py `gelu_tanh`): over every bf16
    input in [-12, 12] the output is within the functions' 4.7e-4 gap plus one bf16 step of the exact tanh form,
    and so is its gradient (within 1.5e-3 plus a step); fp32 keeps the tanh form itself."""
    from models.layers import gelu_tanh

    x = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = x[torch.isfinite(x) & (x.abs() <= 12)].clone().requires_grad_()
    exact = x.detach().double().requires_grad_()
    want = torch.nn.functional.gelu(exact, approximate="tanh")
    want.sum().backward()
    y = gelu_tanh(x)
    y.float().sum().backward()

    def step(ref: torch.Tensor) -> torch.Tensor:  # bf16's spacing at ref (8 significant bits)
        return 2.0 ** (torch.frexp(ref.float()).exponent.double() - 8)

    want = want.detach()
    assert y.dtype == torch.bfloat16 and ((y.detach().double() - want).abs() <= 4.8e-4 + step(want)).all()
    assert ((x.grad.double() - exact.grad).abs() <= 1.5e-3 + step(exact.grad)).all()
    assert (y.detach().double() != want.to(torch.bfloat16).double()).sum() > 100  # the erf kernel, not the tanh one
    xf = torch.linspace(-6, 6, 1001)
    assert torch.equal(gelu_tanh(xf), torch.nn.functional.gelu(xf, approximate="tanh"))


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's own, on bf16 input
def test_rmsnorm_is_torchs_with_an_exact_gradient():
    """models/layers.py RMSNorm: its hand-written backward passes gradcheck in float64, and forward, input and
    weight gradients match `nn.RMSNorm` in fp32, under bf16 autocast (fp32 out, as torch's) and on bf16 input."""
    from models.layers import RMSNorm, _RMSNormFn

    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(7, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFn.apply(x, w, 1e-6), (x, w))
    ours, ref = RMSNorm(64, eps=1e-6), torch.nn.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(1 + 0.3 * torch.randn(64))
        ref.weight.copy_(ours.weight)
    cases = ((torch.float32, False, 1e-5), (torch.float32, True, 1e-5), (torch.bfloat16, False, 3e-2))
    for dtype, autocast, tol in cases:
        x = torch.randn(4, 9, 64).mul_(3).to(dtype).requires_grad_()
        g = torch.randn(4, 9, 64)
        outs = []
        for m in (ours, ref):
            x.grad, m.weight.grad = None, None
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                y = m(x)
            y.backward(g.to(y.dtype))
            outs.append((y.detach(), x.grad.float(), m.weight.grad.clone()))
        (y1, dx1, dw1), (y2, dx2, dw2) = outs
        assert y1.dtype == y2.dtype
        y1, y2 = y1.float(), y2.float()
        scale = max(1.0, float(dw2.abs().max()))
        assert (y1 - y2).abs().max() < tol and (dx1 - dx2).abs().max() < tol and (dw1 - dw2).abs().max() < tol * scale
