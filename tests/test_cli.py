"""End-to-end CLI: run, resume, eval, listings, and the one-line errors with exit code 2."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import TINY, sets, write_corpus
from typer.testing import CliRunner

from pretrain.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small English-like corpus: 120 documents of several sentences."""
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(d)
    return d


def run(args, cache):
    res = runner.invoke(app, [*args, *sets(f"data.cache_dir={cache}")] if args[0] in ("run", "prepare") and
                        "--resume" not in args else args)
    return res


def test_help_does_not_import_torch():
    heavy = "('torch', 'datasets', 'sentencepiece', 'transformers', 'matplotlib')"
    code = f"import sys, pretrain.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("run", "eval", "prepare", "tokenizer", "objectives", "recipes", "bench", "generate", "fill-mask",
                "probe", "compare"):
        assert cmd in res.output


def test_listings():
    res = runner.invoke(app, ["objectives"], terminal_width=200)
    assert res.exit_code == 0
    for text in ("clm", "mlm", "span", "prefix", "denoise", "mask_prob = 0.15", "noise_density = 0.15",
                 "mask_ratio = 0.3", "encoder-decoder"):
        assert text in res.output, text
    res = runner.invoke(app, ["recipes"])
    assert res.exit_code == 0 and "gpt2-tiny" in res.output and "GPT-2 small" in res.output


def test_run_resume_is_bit_exact_and_eval_writes_json(corpus, tmp_path):
    cache = tmp_path / "cache"
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["run", "--objective", "clm", "--data", str(corpus / "docs.txt"), "--max-steps", "12",
            *sets(*TINY, "train.ckpt_every=6", "train.keep_last=5", "train.eval_every=6", "model.dropout=0.1")]
    res = run([*args, "--out", str(full)], cache)
    assert res.exit_code == 0, res.output
    assert (full / "config.json").is_file() and (full / "tokenizer.model").is_file()
    assert [p.name for p in sorted((full / "checkpoints").iterdir())] == ["step_0000006", "step_0000012"]
    # simulate an interruption after step 6: keep only what existed then, and resume
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_0000012")
    lines = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= 6
                                                and not (json.loads(ln)["step"] == 6 and "split" in ln)))
    res = runner.invoke(app, ["run", "--resume", str(part)])
    assert res.exit_code == 0, res.output

    def losses(p):
        return [(r["step"], r["lm_loss"]) for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())
                if "split" not in r]

    assert losses(full) == losses(part) and len(losses(full)) == 6
    a = (full / "checkpoints" / "step_0000012" / "model.safetensors").read_bytes()
    b = (part / "checkpoints" / "step_0000012" / "model.safetensors").read_bytes()
    assert a == b
    res = runner.invoke(app, ["eval", str(full), "--batches", "3"])
    assert res.exit_code == 0, res.output
    ev = json.loads((full / "eval.json").read_text())
    for key in ("loss", "bits_per_byte", "tokens", "lm_loss", "lm_acc", "perplexity"):
        assert key in ev
    assert 0 < ev["bits_per_byte"] < 20


@pytest.mark.parametrize("objective, switch", [("denoise", "pack"), ("mlm", "pack"), ("prefix", "pack"),
                                               ("clm", "doc_attention")])
def test_a_packed_run_resumes_bit_exact(corpus, tmp_path, objective, switch):
    """Packed rows (several examples a row) resume as exactly as one example a row."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["run", "--objective", objective, "--data", str(corpus / "docs.txt"), "--max-steps", "4",
            *sets(*TINY, f"objective.{switch}=true", "train.ckpt_every=2", "train.keep_last=5", "train.eval_every=0")]
    res = run([*args, "--out", str(full)], tmp_path / "cache")
    assert res.exit_code == 0, res.output
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_0000004")
    lines = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= 2))
    res = runner.invoke(app, ["run", "--resume", str(part)])
    assert res.exit_code == 0, res.output
    a, b = ((p / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes() for p in (full, part))
    assert a == b


def test_tiny_run_lowers_the_loss(corpus, tmp_path):
    res = run(["run", "--objective", "clm", "--data", str(corpus / "docs.txt"), "--max-steps", "50", "--out",
               str(tmp_path / "r"), *sets(*TINY, "train.lr=3e-3", "train.eval_every=0")], tmp_path / "cache")
    assert res.exit_code == 0, res.output
    recs = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train = [r["lm_loss"] for r in recs if "split" not in r]
    assert train[-1] < train[0] - 1.0, train
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 50 and summary["val_loss"] < 5.0


def test_token_budget_stops_the_run(corpus, tmp_path):
    res = run(["run", "--objective", "clm", "--data", str(corpus / "docs.txt"), "--max-tokens", "1000", "--out",
               str(tmp_path / "r"), *sets(*TINY, "train.eval_every=0")], tmp_path / "cache")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["tokens"] >= 1000 and summary["steps"] == 4  # 8 x 32 = 256 tokens a step


def expect_error(res, *words):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    for w in words:
        assert w in res.output, (w, res.output)


def test_bad_resume_and_checkpoints(corpus, tmp_path):
    cache = tmp_path / "cache"
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(runner.invoke(app, ["run", "--resume", str(empty)]), "not a run folder")
    r = tmp_path / "r"
    res = run(["run", "--objective", "clm", "--data", str(corpus / "docs.txt"), "--max-steps", "2", "--out", str(r),
               *sets(*TINY)], cache)
    assert res.exit_code == 0, res.output
    # the same --out again: refused, nothing overwritten
    before = (r / "config.json").read_text()
    res = run(["run", "--objective", "clm", "--data", str(corpus / "docs.txt"), "--out", str(r), *sets(*TINY)], cache)
    expect_error(res, "already holds a run", "--resume")
    assert (r / "config.json").read_text() == before
    # no checkpoint
    nock = tmp_path / "nock"
    shutil.copytree(r, nock)
    shutil.rmtree(nock / "checkpoints")
    expect_error(runner.invoke(app, ["run", "--resume", str(nock)]), "no checkpoint")
    expect_error(runner.invoke(app, ["eval", str(nock)]), "no checkpoint")
    # a checkpoint of another architecture
    other = tmp_path / "other"
    res = run(["run", "--objective", "clm", "--data", str(corpus / "docs.txt"), "--max-steps", "2", "--out",
               str(other), *sets(*TINY, "model.d_model=48", "model.d_ff=96")], cache)
    assert res.exit_code == 0, res.output
    mixed = tmp_path / "mixed"
    shutil.copytree(r, mixed)
    shutil.rmtree(mixed / "checkpoints")
    shutil.copytree(other / "checkpoints", mixed / "checkpoints")
    expect_error(runner.invoke(app, ["run", "--resume", str(mixed), "--max-steps", "4"]), "another architecture")
    expect_error(runner.invoke(app, ["eval", str(mixed)]), "another architecture")
    # a corrupted weights file
    bad = tmp_path / "bad"
    shutil.copytree(r, bad)
    w = next((bad / "checkpoints").iterdir()) / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    expect_error(runner.invoke(app, ["run", "--resume", str(bad), "--max-steps", "4"]), "corrupted")
    expect_error(runner.invoke(app, ["eval", str(bad)]), "corrupted")


def test_bad_config_errors(corpus, tmp_path):
    cache = tmp_path / "cache"
    base = ["run", "--objective", "clm", "--data", str(corpus / "docs.txt"), "--out", str(tmp_path / "x")]
    expect_error(run([*base, *sets(*TINY, "data.seq_len=64")], cache), "model.max_len", "data.seq_len")
    expect_error(run([*base, *sets(*TINY, "train.optimizer=lion")], cache), "train.optimizer", "adamw")
    expect_error(run([*base, *sets(*TINY, "train.schedule=step")], cache), "train.schedule", "cosine")
    expect_error(run([*base, *sets(*TINY, "train.nope=1")], cache), "unknown key 'train.nope'")
    expect_error(run(["run", "--recipe", "nope"], cache), "unknown recipe")
    expect_error(run(["run", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "y")], cache),
                 "missing.txt")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_non_finite_loss_stops_with_the_step(corpus, tmp_path, monkeypatch):
    """A loss that turns NaN at the 3rd step stops the run, names the step and writes no checkpoint after it."""
    import torch

    from objectives.clm import CausalLM

    calls = {"n": 0}
    original = CausalLM.loss

    def nan_loss(self, model, batch, label_smoothing=0.0):
        calls["n"] += 1
        terms = original(self, model, batch, label_smoothing)
        if calls["n"] >= 3 and model.training:
            s, n = terms["lm_loss"]
            terms["lm_loss"] = (s * torch.tensor(float("nan")), n)
        return terms

    monkeypatch.setattr(CausalLM, "loss", nan_loss)
    r = tmp_path / "nan"
    res = run(["run", "--objective", "clm", "--data", str(corpus / "docs.txt"), "--max-steps", "10", "--out", str(r),
               *sets(*TINY, "train.ckpt_every=2", "train.eval_every=0")], tmp_path / "cache")
    expect_error(res, "non-finite", "step 3", "step_0000002")
    assert [p.name for p in (r / "checkpoints").iterdir()] == ["step_0000002"]


def test_interval_speed_leaves_out_evaluation_and_checkpoints(corpus, tmp_path, monkeypatch):
    """A logged interval's tokens/s (and MFU) count training time only: evaluations that take 0.6 s each inside
    intervals of two ~5 ms steps, and checkpoints, leave its figures near the other intervals'."""
    import time

    import pretrain.trainer as trainer

    real = trainer.evaluate

    def slow(*args, **kwargs):
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", slow)
    r = tmp_path / "p"
    res = run(["run", "--objective", "clm", "--data", str(corpus / "docs.txt"), "--max-steps", "12", "--out", str(r),
               *sets(*TINY, "train.eval_every=4", "train.ckpt_every=4")], tmp_path / "cache")
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]
    speeds = [rec["tokens_per_s"] for rec in recs if "split" not in rec][1:]  # the first holds the warm-up step
    assert sum("split" in rec for rec in recs) == 3 and len(speeds) == 5
    assert min(speeds) > max(speeds) / 10, speeds  # an evaluation counted in would make its interval ~50x slower


GOLDEN = Path(__file__).parent / "golden" / "clm_tiny_curve.json"


def test_golden_loss_curve(corpus, tmp_path):
    """A refactor keeps the tiny run's loss curve. Regenerate deliberately with
    PRETRAIN_RECORD_GOLDEN=1 when a change is meant to alter training (and say why in the commit)."""
    import os

    r = tmp_path / "g"
    res = run(["run", "--objective", "clm", "--data", str(corpus / "docs.txt"), "--max-steps", "8", "--out", str(r),
               *sets(*TINY, "train.eval_every=0", "model.dropout=0.1")], tmp_path / "cache")
    assert res.exit_code == 0, res.output
    curve = [[rec["step"], rec["lm_loss"]] for rec in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())
             if "split" not in rec]
    if os.environ.get("PRETRAIN_RECORD_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(curve, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert [s for s, _ in curve] == [s for s, _ in golden]
    for (step, got), (_, want) in zip(curve, golden, strict=True):
        assert abs(got - want) < 1e-4, (step, got, want)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_learn(corpus, tmp_path, precision):
    """bf16 autocast and fp16 autocast with a GradScaler both train (the named flag reaches the config)."""
    r = tmp_path / precision
    res = run(["run", "--objective", "clm", "--data", str(corpus / "docs.txt"), "--max-steps", "20", "--out", str(r),
               "--precision", precision, *sets(*TINY, "train.lr=3e-3", "train.eval_every=0")], tmp_path / "cache")
    assert res.exit_code == 0, res.output
    assert json.loads((r / "config.json").read_text())["train"]["precision"] == precision
    losses = [rec["lm_loss"] for rec in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())
              if "split" not in rec]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.5, losses


def test_interrupt_checkpoints_finished_steps_and_resume_is_exact(corpus, tmp_path, monkeypatch):
    """Ctrl-C in the middle of step 5 saves steps 1-4 (with the RNG of step 5's start); resuming then gives the
    uninterrupted run's losses and weights bit for bit, dropout included."""
    from objectives.clm import CausalLM

    cache = tmp_path / "cache"
    args = ["run", "--objective", "clm", "--data", str(corpus / "docs.txt"), "--max-steps", "8",
            *sets(*TINY, "train.grad_accum=2", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=100",
                  "model.dropout=0.1")]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run([*args, "--out", str(full)], cache).exit_code == 0
    calls = {"n": 0}
    original = CausalLM.loss

    def interrupted(self, model, batch, label_smoothing=0.0):
        calls["n"] += 1
        if calls["n"] == 10:  # step 5, second micro-batch
            raise KeyboardInterrupt
        return original(self, model, batch, label_smoothing)

    monkeypatch.setattr(CausalLM, "loss", interrupted)
    res = run([*args, "--out", str(cut)], cache)
    assert res.exit_code == 130 and f"step_0000004; continue with --resume {cut}" in res.output.replace("\n", "")
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step_0000004"]
    monkeypatch.setattr(CausalLM, "loss", original)
    assert runner.invoke(app, ["run", "--resume", str(cut)]).exit_code == 0

    def losses(p):
        return [(r["step"], r["lm_loss"]) for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())
                if "split" not in r]

    assert losses(full) == losses(cut) and len(losses(full)) == 8
    name = "checkpoints/step_0000008/model.safetensors"
    assert (full / name).read_bytes() == (cut / name).read_bytes()


def test_torchrun_two_processes(corpus, tmp_path):
    """Two CPU processes under torchrun (gloo): DDP trains, rank 0 alone writes the run folder and prints."""
    r = tmp_path / "ddp"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "pretrain.cli",
           "run",
           "--objective", "clm", "--data", str(corpus / "docs.txt"), "--max-steps", "4", "--out", str(r),
           *sets(*TINY, f"data.cache_dir={tmp_path / 'cache'}", "train.eval_every=2", "train.ckpt_every=2")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("run summary") == 1
    recs = [json.loads(ln) for ln in (r / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if "split" not in x] == [2, 4]  # one writer
    assert [p.name for p in sorted((r / "checkpoints").iterdir())] == ["step_0000002", "step_0000004"]
    summary = json.loads((r / "summary.json").read_text())
    assert summary["tokens"] == 2 * 4 * 8 * 32  # both ranks' tokens are counted
