"""Helpers the end-to-end CLI tests share: a tiny model config, --set expansion and a small corpus."""

from __future__ import annotations

import random
from pathlib import Path

TINY = ["model.n_layers=2", "model.n_heads=2", "model.d_model=32", "model.d_ff=64", "model.max_len=32",
        "data.seq_len=32", "data.vocab_size=420", "train.batch_size=8", "train.warmup_steps=5",
        "train.eval_batches=2", "train.log_every=2", "train.num_workers=0"]


def sets(*items: str) -> list[str]:
    """--set KEY=VALUE for each item."""
    return [a for item in items for a in ("--set", item)]


def write_corpus(folder: Path, n_docs: int = 120, seed: int = 0) -> Path:
    """A small English-like corpus: n_docs documents of several sentences, in folder/docs.txt."""
    rng = random.Random(seed)
    words = ("the model reads text and learns to predict the next word from the words before it while the "
             "optimizer lowers the loss step by step until the validation curve stops falling").split()
    docs = []
    for _ in range(n_docs):
        sents = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."
                 for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(sents))
    path = Path(folder) / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def torchrun(args: list[str], nproc: int = 2, script: Path | None = None, timeout: int = 300):
    """`torchrun --nproc_per_node nproc -m pretrain.cli ARGS` (or `script ARGS`) on gloo, one thread per rank;
    returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    exe = str(Path(sys.executable).parent / "torchrun")
    target = [str(script)] if script else ["-m", "pretrain.cli"]
    return subprocess.run([exe, "--nproc_per_node", str(nproc), *target, *args], capture_output=True, text=True,
                          cwd=root, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
