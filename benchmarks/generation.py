"""Generation speed with the KV cache beside full recomputation every step (the peer a user would otherwise
write: call the model on the whole prefix for each new token), on the tiny recipe's model, in one run."""

from __future__ import annotations

import time
from typing import Any

import torch

from pretrain.decoding import CachedStepper, generate, recompute_stepper

TARGET = 5.0  # cached / recomputed speed-up at 256 new tokens that we hold ourselves to


def bench_generation(new_tokens: int = 256, prompt_len: int = 16, batch_size: int = 1, device: str | None = None,
                     threads: int = 1) -> dict:
    """Greedy generation speed with the KV cache and with full recomputation each step, on the tiny recipe's
    model (recipes/gpt2-tiny.toml sizes: 4 layers, d 256, 4 heads, vocab 8000) with a context long enough
    for the prompt and new_tokens, randomly initialised; `</s>` never stops it. On the CPU it runs on
    `threads` threads (1 by default: one-token steps are too small to split, and on a shared machine
    extra threads mostly wait for each other). Returns tokens/s of each path, the speed-up and whether both
    paths produced the same tokens."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    before = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    try:
        return _bench(new_tokens, prompt_len, batch_size, dev)
    finally:
        torch.set_num_threads(before)


def _bench(new_tokens: int, prompt_len: int, batch_size: int, dev: torch.device) -> dict:
    from models.config import Arch, ModelConfig
    from models.transformer import Transformer

    cfg = ModelConfig(n_layers=4, n_heads=4, d_model=256, d_ff=1024, activation="gelu_tanh",
                      max_len=max(512, prompt_len + new_tokens))
    torch.manual_seed(0)
    V = 8000
    model = Transformer(cfg, Arch(kind="decoder"), V).to(dev).eval()
    prompt = torch.randint(V // 2, V, (batch_size, prompt_len), device=dev)  # ordinary ids of any tokenizer
    res: dict[str, Any] = {"device": str(dev), "new_tokens": new_tokens, "prompt_len": prompt_len,
                           "batch_size": batch_size}
    outs = {}
    for name, make in (("cached", CachedStepper), ("recompute", recompute_stepper)):
        with torch.inference_mode():
            generate(make(model, prompt[:, :4]), batch_size, 4, eos=-1)  # warm-up
            _sync(dev)
            t0 = time.perf_counter()
            outs[name] = generate(make(model, prompt), batch_size, new_tokens, eos=-1)
            _sync(dev)
        res[f"{name}_s"] = time.perf_counter() - t0
        res[f"{name}_tokens_per_s"] = batch_size * new_tokens / res[f"{name}_s"]
    res["speedup"] = res["cached_tokens_per_s"] / res["recompute_tokens_per_s"]
    res["same_tokens"] = outs["cached"].tokens == outs["recompute"].tokens
    return res


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def print_generation(r: dict, console: Any) -> None:
    """The table `pretrain bench` prints for a `bench_generation` result."""
    from pretrain.metrics import table

    cpu = ", 1 thread" if r["device"] == "cpu" else ""
    console.print(table(
        f"generation, {r['new_tokens']} new tokens after {r['prompt_len']}, batch {r['batch_size']}, gpt2-tiny "
        f"sizes, {r['device']}{cpu}; same tokens: {r['same_tokens']}",
        [("KV cache", f"{r['cached_tokens_per_s']:.1f}", f"{r['cached_s']:.2f}", f"{r['speedup']:.1f}x",
          f">= {TARGET:g}x", "yes" if r["speedup"] >= TARGET else "NO"),
         ("recompute (peer)", f"{r['recompute_tokens_per_s']:.1f}", f"{r['recompute_s']:.2f}", "1.0x", "", "")],
        ("path", "tokens/s", "seconds", "speed-up", "target", "meets")))
