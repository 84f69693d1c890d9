"""Tiny runs for the end-to-end tests: a small English-like corpus, a model that trains a step in milliseconds,
the CLI runner, one-line error checks and torchrun."""

import random
from pathlib import Path

from typer.testing import CliRunner

from pretrain.cli import app

runner = CliRunner()

TINY = ["model.n_layers=2", "model.n_heads=2", "model.d_model=32", "model.d_ff=64", "model.max_len=32",
        "data.seq_len=32", "data.vocab_size=420", "train.batch_size=8", "train.warmup_steps=5",
        "train.eval_batches=2", "train.log_every=2", "train.num_workers=0"]


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def write_corpus(folder: Path, name: str = "docs.txt", seed: int = 0, n_docs: int = 120) -> Path:
    """`n_docs` documents of several sentences drawn from a small vocabulary; returns the file."""
    rng = random.Random(seed)
    words = ("the model reads text and learns to predict the next word from the words before it while the "
             "optimizer lowers the loss step by step until the validation curve stops falling").split()
    docs = []
    for _ in range(n_docs):
        sents = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."
                 for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(sents))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n\n".join(docs) + "\n")
    return path


def train(objective: str, data: Path, out: Path, cache: Path, *args: str, extra: tuple[str, ...] = ()):
    """`pretrain run --objective OBJECTIVE` of the tiny model on `data` into `out`; `extra`: more --set items."""
    return runner.invoke(app, ["run", "--objective", objective, "--data", str(data), "--out", str(out), *args,
                               *sets(*TINY, f"data.cache_dir={cache}", *extra)])


def expect_error(res, *words: str) -> None:
    """A user error: exit code 2, one line naming the problem, no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    for w in words:
        assert w in res.output, (w, res.output)


def torchrun(args: list[str], nproc: int = 2, script: Path | None = None, timeout: int = 300):
    """`torchrun --nproc_per_node nproc -m pretrain.cli ARGS` (or `script ARGS`) on gloo, one thread per rank;
    returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    exe = str(Path(sys.executable).parent / "torchrun")
    target = [str(script)] if script else ["-m", "pretrain.cli"]
    return subprocess.run([exe, "--standalone", "--nproc_per_node", str(nproc), *target, *args], capture_output=True,
                          text=True,
                          cwd=root, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
