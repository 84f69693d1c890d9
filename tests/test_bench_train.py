"""The training benchmark compares like with like: the transformers model it times computes our model's logits
(same config, same weights), on our objective's batches; and the fused output projection + cross-entropy equals
the plain one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import benchmarks.train as bt
import objectives.base as base
from objectives.base import IGNORE_INDEX, ce_terms, lm_terms

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("whole", [True, False])
def test_fused_projection_and_cross_entropy_equal_the_plain_ones(monkeypatch, smoothing, bias, dtype, whole):
    monkeypatch.setattr(base, "LOGITS_PER_CHUNK", 1000)  # many chunks, the last one partial
    if not whole:  # a bf16 logit gradient too big to keep whole: W's gradient accumulates chunk by chunk
        monkeypatch.setattr(base, "WHOLE_LOGIT_GRAD_BYTES", 0)
    g = torch.Generator().manual_seed(0)
    N, C, V = 300, 32, 97
    h0, w0 = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 0.2
    b0 = torch.randn(V, generator=g) * 0.1 if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[::7] = IGNORE_INDEX
    out = []
    for fused in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if bias else None
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            terms = lm_terms(y, "lm", smoothing)(h, w, b) if fused else ce_terms(F.linear(h, w, b), y, "lm", smoothing)
        (terms["lm_loss"][0] * 0.37).backward()
        out.append((terms, h.grad, w.grad, b.grad if bias else None))
    (a, ha, wa, ba), (f, hf, wf, bf) = out
    tol = 1e-5 if dtype is None else 2e-2
    assert set(a) == set(f) and a["lm_loss"][1] == f["lm_loss"][1] == (y != IGNORE_INDEX).sum()
    for k in a:
        assert abs(float(a[k][0]) - float(f[k][0])) <= tol * max(1.0, abs(float(a[k][0]))), k
    for x, z in ((ha, hf), (wa, wf), (ba, bf)):
        if x is not None:
            assert (x - z).abs().max() <= tol * max(1e-3, float(x.abs().max())) + 1e-7
    assert float(hf[::7].abs().max()) == 0  # an ignored row gets no gradient


def test_the_benchmark_times_the_same_model_on_the_same_batches(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    monkeypatch.setitem(bt.SIZES, "tiny", {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "vocab": 600,
                                           "batch": 4, "seq": 32})
    for family in ("gpt2", "t5"):
        row = bt.bench_family(family, "tiny", "fp32", 2, str(tmp_path / "cache"))
        assert row["same_model_max_abs_diff"] < 1e-4  # transformers computes our logits: a fair comparison
        assert row["ours_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0 and 0 < row["ours_real_share"] <= 1
        assert row["ratio"] > 0 and 0 < row["mfu"] < 1


def test_fused_bf16_loss_survives_a_label_far_below_the_top():
    """A label ~200 nats below the top logit has probability 0 even in bf16: its loss is still the right finite
    number (recomputed in fp32), not inf."""
    h = torch.zeros(3, 4)
    h[:, 0] = 1.0
    w = torch.zeros(5, 4)
    w[0, 0], w[1, 0] = 200.0, -1.0  # class 0 leads by 200 nats; class 1 is 201 below it
    y = torch.tensor([1, 0, IGNORE_INDEX])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = lm_terms(y, "lm")(h, w, None)
    want = ce_terms(F.linear(h, w), y, "lm")
    assert torch.isfinite(terms["lm_loss"][0])
    assert abs(float(terms["lm_loss"][0]) - float(want["lm_loss"][0])) < 1.0  # 201 nats, bf16-rounded logits
    assert float(terms["lm_acc"][0]) == 1.0  # the second row's label is the top one
