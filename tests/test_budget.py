"""The wall-clock budget (`--max-time`, train.max_time): durations, the horizon estimated from the measured step time
and frozen, the stop at the budget, the schedule's floor at the end, an exact resume, and `make run`'s budget."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from tiny_runs import TINY, expect_error, runner, sets, train

from pretrain.budget import TIMING_SKIP, TIMING_STEPS, Horizon, parse_duration
from pretrain.checkpoint import TrainState
from pretrain.cli import app
from pretrain.config import TrainConfig
from pretrain.errors import UserError
from pretrain.runlist import read_records

ROOT = Path(__file__).resolve().parent.parent


def test_durations():
    assert [parse_duration(t) for t in ("4m", "90s", "1h30m", "2.5h", "240", "1m30", " 4 m ", "", "0")] == [
        240, 90, 5400, 9000, 240, 90, 240, 0, 0]
    for bad in ("4 minutes", "-1m", "m", "4m4h", "1.5.2s", "soon"):
        with pytest.raises(UserError, match="not a duration"):
            parse_duration(bad)
    with pytest.raises(UserError, match="train.max_time"):
        TrainConfig(max_time="4 mins")


def test_horizon_is_planned_once_from_the_timed_steps():
    tc = TrainConfig(max_time="10s", max_steps=1000, eval_every=0)
    state = TrainState()
    plan = Horizon(tc, 1000, state, lambda v, op: v)
    assert plan.steps == 1000 and plan.source == "max_steps"
    frozen, elapsed = [], []
    for step in range(1, 30):
        dt = 1.1 if step <= TIMING_SKIP else 0.1  # a slow start-up, then steady steps
        state.step, state.elapsed = step, sum(elapsed[-1:]) + dt
        elapsed.append(state.elapsed)
        frozen.append(plan.observe(state, dt))
    at = TIMING_SKIP + TIMING_STEPS
    assert frozen.index(True) == at - 1 and frozen.count(True) == 1
    assert plan.step_seconds == pytest.approx(0.1)  # the start-up steps are not timed
    elapsed = elapsed[at - 1]
    assert at < state.horizon <= at + (10 - elapsed) / 0.1  # within the budget, most of it
    assert state.horizon > at + 0.8 * (10 - elapsed) / 0.1
    assert plan.steps == state.horizon and plan.source == "timing" and state.horizon_budget == 10
    # evaluations take their share of the budget, so the horizon comes sooner
    evals = Horizon(TrainConfig(max_time="10s", eval_every=10, eval_batches=20), 1000, TrainState(), lambda v, op: v)
    assert evals.plan(at, elapsed, 0.1) < plan.plan(at, elapsed, 0.1)


def test_a_resume_keeps_the_frozen_horizon_unless_the_budget_changed():
    def state():
        return TrainState(step=100, horizon=300, horizon_budget=240.0)

    kept = state()
    assert Horizon(TrainConfig(max_time="4m"), 1000, kept, lambda v, op: v).steps == 300
    assert Horizon(TrainConfig(max_time="4m"), 250, kept, lambda v, op: v).steps == 250  # a smaller step budget wins
    for other in ("5m", ""):
        replanned = state()
        assert Horizon(TrainConfig(max_time=other), 1000, replanned, lambda v, op: v).steps == 1000
        assert replanned.horizon == 0


def test_budgets_spent():
    plan = Horizon(TrainConfig(max_time="1m", max_tokens=500), 1000, TrainState(), lambda v, op: v)
    assert plan.exhausted(TrainState(tokens=499, elapsed=59.9)) is None
    assert plan.exhausted(TrainState(tokens=500)) == "max_tokens"
    assert plan.exhausted(TrainState(elapsed=60.0)) == "max_time"


class Clock:
    """A clock that moves only when a training step runs: every step takes exactly `step` seconds, so what the
    planner measures is what the run then spends."""

    def __init__(self, step: float) -> None:
        self.t, self.step = 1000.0, step

    def perf_counter(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    import pretrain.trainer as trainer

    c = Clock(1 / 16)  # exact in binary: elapsed times add up without rounding
    original = trainer.train_step

    def timed_step(*args, **kwargs):
        out = original(*args, **kwargs)
        c.t += c.step
        return out

    monkeypatch.setattr(trainer, "train_step", timed_step)
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=c.perf_counter))
    return c


BUDGET = ("--max-time", "2s", "--max-steps", "100000")  # 32 steps of 1/16 s
STEADY = ("train.log_every=1", "train.eval_every=0", "train.lr=1e-3", "train.min_lr_ratio=0.1")


def test_time_budget_stops_within_a_step_and_the_schedule_ends_at_its_floor(corpus, tmp_path, clock):
    r = tmp_path / "r"
    res = train("clm", corpus, r, tmp_path / "cache", *BUDGET, extra=STEADY)
    assert res.exit_code == 0, res.output
    summary = json.loads((r / "summary.json").read_text())
    recs = [x for x in read_records(r / "metrics.jsonl") if "split" not in x]
    assert summary["stopped_by"] == "max_time" and summary["horizon_from"] == "timing"
    assert recs[-2]["elapsed"] < 2.0 <= recs[-1]["elapsed"]  # the step that crossed the budget was the last
    assert summary["steps"] == recs[-1]["step"] == 32
    horizon = summary["horizon"]
    assert 0.8 * 32 < horizon < 32
    lrs = {x["step"]: x["lr"] for x in recs}  # record N: the lr of its step, optimizer step N-1
    assert all(lrs[s] == pytest.approx(1e-4) for s in range(horizon + 1, 33))  # the floor, from the horizon on
    assert all(lrs[s] > lrs[s + 1] > 1e-4 for s in range(6, horizon))  # decaying towards it until then
    note = json.loads((r / "config.json").read_text())["notes"]["horizon"]
    assert note["steps"] == horizon and note["from"] == "timing" and "measured" in note["note"]
    state = json.loads((r / "checkpoints" / "step_0000032" / "state.json").read_text())
    assert state["horizon"] == horizon and state["horizon_budget"] == 2.0


def test_time_budget_run_resumes_exactly(corpus, tmp_path, clock):
    """Interrupted at step 16 (after the horizon froze), resumed: the same losses and weights as the run that went
    through, because the horizon comes back from the checkpoint instead of a new timing."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = (*STEADY, "train.ckpt_every=16", "train.keep_last=5", "model.dropout=0.1")
    assert train("clm", corpus, full, tmp_path / "cache", *BUDGET, extra=extra).exit_code == 0
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_0000032")
    clock.t = 5000.0  # another session, another clock reading: only the elapsed time saved matters
    res = runner.invoke(app, ["run", "--resume", str(cut)])
    assert res.exit_code == 0, res.output

    def losses(run):
        return [(x["step"], x["lm_loss"], x["lr"]) for x in read_records(run / "metrics.jsonl") if "split" not in x]

    assert losses(full) == losses(cut) and len(losses(full)) == 32
    name = "checkpoints/step_0000032/model.safetensors"
    assert (full / name).read_bytes() == (cut / name).read_bytes()


def test_time_budget_on_the_real_clock(corpus, tmp_path):
    r = tmp_path / "r"
    res = train("clm", corpus, r, tmp_path / "cache", "--max-time", "4s", "--max-steps", "100000", extra=STEADY)
    assert res.exit_code == 0, res.output
    recs = [x for x in read_records(r / "metrics.jsonl") if "split" not in x]
    assert json.loads((r / "summary.json").read_text())["stopped_by"] == "max_time"
    assert recs[-2]["elapsed"] < 4.0 <= recs[-1]["elapsed"]
    assert json.loads((r / "config.json").read_text())["notes"]["horizon"]["from"] == "timing"


def test_bad_max_time(corpus, tmp_path):
    expect_error(train("clm", corpus, tmp_path / "x", tmp_path / "cache", "--max-time", "4minutes"),
                 "--max-time", "not a duration", "4m")
    expect_error(train("clm", corpus, tmp_path / "x", tmp_path / "cache", extra=("train.max_time=soon",)),
                 "train.max_time", "not a duration")
    assert not (tmp_path / "x").exists()


def make_run_command() -> list[str]:
    """The command `make run` runs, read from the Makefile."""
    text = (ROOT / "Makefile").read_text()
    line = re.search(r"^run:.*\n\t\$\(BIN\)/(pretrain .*)$", text, re.M)
    assert line, "the Makefile's run target"
    return line[1].split()


def test_make_run_is_held_by_a_time_budget():
    cmd = make_run_command()
    assert "--max-time" in cmd
    assert parse_duration(cmd[cmd.index("--max-time") + 1]) <= 240  # 4 minutes leave a minute for the rest


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PRETRAIN_SLOW"), reason="trains for 4 minutes: set PRETRAIN_SLOW=1")
def test_make_run_finishes_within_5_minutes(tmp_path):
    """The README's promise, measured: `make run`'s command from a fresh cache (tokenizer and cache included)."""
    cmd = make_run_command()
    t0 = time.perf_counter()
    out = subprocess.run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:], "--out", str(tmp_path / "run"),
                          *sets(f"data.cache_dir={tmp_path / 'cache'}")], capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    print(f"make run: {wall:.0f} s wall, {summary['steps']} steps, {summary['tokens_per_s']:.0f} tokens/s, "
          f"valid bits/byte {summary['val_bits_per_byte']:.3f}, stopped by {summary['stopped_by']}")
    assert wall < 300, wall


def test_time_budget_under_torchrun(corpus, tmp_path):
    """Two gloo processes agree on the horizon and on the step the budget ends at (a rank stopping alone would
    leave the other waiting in its next all-reduce)."""
    r = tmp_path / "ddp"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "pretrain.cli",
           "run",
           "--objective", "clm", "--data", str(corpus), "--max-time", "3s", "--max-steps", "100000", "--out", str(r),
           *sets(*TINY, f"data.cache_dir={tmp_path / 'cache'}", *STEADY)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((r / "summary.json").read_text())
    assert summary["stopped_by"] == "max_time" and summary["tokens"] == 2 * summary["steps"] * 8 * 32
    recs = [x for x in read_records(r / "metrics.jsonl") if "split" not in x]
    assert [x["step"] for x in recs] == list(range(1, summary["steps"] + 1))  # one writer, every step once
    assert json.loads((r / "config.json").read_text())["notes"]["horizon"]["from"] == "timing"
