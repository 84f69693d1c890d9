"""Tests of `pretrain compare` (pretrain/compare.py): one tokenizer and one cache for every run, the token and FLOPs
budgets, the table with every entry's eval and probe figures, the progress, continuing a comparison, the recipes
form the NSP replication uses, and the one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tiny_runs import sets, write_corpus
from typer.testing import CliRunner

from pretrain.cli import app

runner = CliRunner()
SMALL = ["model.n_layers=1", "model.n_dec_layers=1", "model.n_heads=2", "model.d_model=32", "model.d_ff=64",
         "model.max_len=32", "data.seq_len=32", "data.vocab_size=420", "train.batch_size=8", "train.eval_batches=2",
         "train.log_every=2", "train.num_workers=0", "train.precision=fp32", "train.eval_every=0",
         "probe.classes=3", "probe.max_per_class=12", "probe.steps=2", "probe.linear_steps=5", "probe.seeds=1",
         "probe.max_len=24"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("cmpcorpus"), n_docs=150)


def compare(corpus: Path, out: Path, *args: str, extra: tuple[str, ...] = ()):
    return runner.invoke(app, ["compare", "--data", str(corpus), "--out", str(out), "--eval-batches", "2", *args,
                               *sets(*SMALL, f"data.cache_dir={out.parent / 'cache'}", *extra)])


def test_objectives_share_a_tokenizer_and_a_cache_at_equal_tokens(corpus, tmp_path):
    out = tmp_path / "cmp"
    res = compare(corpus, out, "--objectives", "clm,span,denoise", "--tokens", "6000")
    assert res.exit_code == 0, res.output
    for i, name in enumerate(("clm", "span", "denoise"), 1):
        assert f"run {i}/3: {name}" in res.output
    info = json.loads((out / "compare.json").read_text())
    runs = {r["entry"]: r for r in info["runs"]}
    tokenizers, caches = set(), set()
    for entry, r in runs.items():
        run = Path(r["run_dir"])
        cfg = json.loads((run / "config.json").read_text())
        tokenizers.add(cfg["data"]["tokenizer"])
        caches.add(json.loads((run / "data.json").read_text())["cache_key"])
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == r["steps"] == cfg["train"]["max_steps"]
        # the run's own batches counted: the budget is reached within its last step
        assert 6000 <= summary["tokens"] < 6000 + 2 * r["tokens_per_step"], entry
        assert (run / "eval.json").is_file() and (run / "probe-stdlib-packages.json").is_file()
    assert len(tokenizers) == 1 and len(caches) == 1
    rows = {r["entry"]: r for r in info["rows"]}
    assert set(rows) == {"clm", "span", "denoise"}
    for r in rows.values():
        assert r["valid loss"] != "-" and "%" in r["probe linear"] and "%" in r["probe fine-tuned"]
        assert "%" in r["random init fine-tuned"] and "%" in r["majority"]
    assert rows["clm"]["bits/byte"] != "-" and rows["span"]["bits/byte"] == "-"  # bits per byte only where it compares
    md = (out / "report" / "report.md").read_text()
    assert md.index("## Comparison") < md.index("## Runs") and "| span |" in md
    again = compare(corpus, out, "--objectives", "clm,span,denoise", "--tokens", "6000")  # continues: nothing to do
    assert again.exit_code == 0 and again.output.count("(done)") == 3 and "probing" not in again.output, again.output


def test_a_flops_budget_and_the_replication_recipes_over_seeds(corpus, tmp_path):
    out = tmp_path / "nsp"
    res = compare(corpus, out, "--recipes", "bert-tiny,roberta-tiny", "--flops", "2e9", "--seeds", "2",
                  extra=("probe.random_init=false",))
    assert res.exit_code == 0, res.output
    info = json.loads((out / "compare.json").read_text())
    assert [(r["entry"], r["seed"]) for r in info["runs"]] == [("bert-tiny", 1234), ("bert-tiny", 1235),
                                                               ("roberta-tiny", 1234), ("roberta-tiny", 1235)]
    for r in info["runs"]:
        assert r["steps"] == math.ceil(2e9 / r["flops_per_step"])
    rows = {r["entry"]: r for r in info["rows"]}
    assert rows["bert-tiny"]["runs"] == "2" and "±" in rows["bert-tiny"]["probe fine-tuned"]
    assert rows["bert-tiny"]["objective"] == rows["roberta-tiny"]["objective"] == "mlm"
    assert rows["bert-tiny"]["random init fine-tuned"] == "-"


def test_bad_compare_input_is_one_line(corpus, tmp_path):
    cases = [(["--objectives", "clm", "--tokens", "5", "--flops", "1e9"], "not both"),
             (["--objectives", "clm", "--recipes", "gpt2-tiny"], "one of them"),
             ([], "--objectives"),
             (["--objectives", "clm,spam"], "unknown objective 'spam'"),
             (["--objectives", "clm,clm"], "repeat"),
             (["--objectives", "clm", "--set", "train.max_steps=3"], "--tokens N or --flops F"),
             (["--objectives", "clm", "--set", "objective.nsp=false"], "--recipes"),
             (["--objectives", "clm", "--set", "probe.stepz=1"], "unknown key 'probe.stepz'"),
             (["--objectives", "clm", "--tokens", "0"], "positive")]
    for args, words in cases:
        res = runner.invoke(app, ["compare", "--data", str(corpus), "--out", str(tmp_path / "x"), *args])
        assert res.exit_code == 2, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output, res.output
        assert words in res.output, (words, res.output)
    assert not (tmp_path / "x").exists()
