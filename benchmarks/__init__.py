"""Benchmarks, each beside the peer it is compared to, measured in one run (`pretrain bench`): batch
construction against per-example reference implementations (`batches.py`, `peers.py`), KV-cached generation
against recomputing every step (`generation.py`), and streaming prepare on generated corpora of several sizes
(`prepare.py`). Nothing in `pretrain/`, `objectives/` or `models/` imports this package."""
