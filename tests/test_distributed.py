"""Scaling out on torch.distributed, on the CPU with 2 gloo processes: DDP and FSDP2 equal one process on the
same global batch, FSDP checkpoints (every rank its shard) resume bit for bit and load in one process, a rank
killed mid-checkpoint leaves the previous checkpoint trusted; activation checkpointing and the batch ramp."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_runs import TINY, sets, torchrun
from typer.testing import CliRunner

from pretrain.batches import BatchPlan
from pretrain.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def args(corpus: Path, cache: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["run", "--objective", "clm", "--data", str(corpus), "--max-steps", str(steps), "--out", str(out),
            *sets(*TINY, f"data.cache_dir={cache}", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=2",
                  "train.keep_last=10"), *extra]


def records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "split" not in r]


def shards(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    """Every rank's shard file of a checkpoint: file -> tensor name -> this rank's slice."""
    from safetensors.torch import load_file

    folder = run / "checkpoints" / f"step_{step:07d}" / "shards"
    return {p.name: load_file(p) for p in sorted(folder.iterdir())}


def same_shards(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k])
                                                                           for k in a[f]) for f in a)


def test_ddp_and_fsdp_equal_one_process_on_the_same_global_batch(corpus, cache, tmp_path):
    """train.global_batch = 16 in micro-batches of 8: one process accumulates 2, each of 2 ranks takes 1; the
    loss trajectories agree within 1e-5 (fp32, 10 steps) and so do the token counts."""
    batch = sets("train.global_batch=16", "train.precision=fp32")
    one = tmp_path / "one"
    res = runner.invoke(app, args(corpus, cache, one, 10, *batch))
    assert res.exit_code == 0, res.output
    for mode in ("ddp", "fsdp"):
        out = tmp_path / mode
        p = torchrun(args(corpus, cache, out, 10, *batch, *sets(f"train.parallel={mode}")))
        assert p.returncode == 0, p.stderr[-3000:]
        a, b = records(one), records(out)
        assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
        assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
        assert max(abs(x["lm_loss"] - y["lm_loss"]) for x, y in zip(a, b, strict=True)) < 1e-5, mode


def test_fsdp_checkpoints_resume_bit_exact_and_load_in_one_process(corpus, cache, tmp_path):
    fsdp = sets("train.parallel=fsdp", "train.global_batch=16", "model.dropout=0.1", "train.precision=fp32")
    full = tmp_path / "full"
    p = torchrun(args(corpus, cache, full, 6, *fsdp))
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(q.name for q in (full / "checkpoints").iterdir()) == ["step_0000002", "step_0000004",
                                                                        "step_0000006"]
    assert len(shards(full, 6)) == 2  # one file of shards per rank
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_0000006")
    p = torchrun(["run", "--resume", str(part)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert [(r["step"], r["lm_loss"]) for r in records(part)] == [(r["step"], r["lm_loss"]) for r in records(full)]
    assert same_shards(shards(part, 6), shards(full, 6))  # every rank's shard, bit for bit
    summary = json.loads((full / "summary.json").read_text())
    res = runner.invoke(app, ["eval", str(full), "--batches", "2"])  # one process reads the 2 ranks' shards
    assert res.exit_code == 0, res.output
    assert abs(json.loads((full / "eval.json").read_text())["loss"] - summary["val_loss"]) < 1e-5


KILL_RANK_1 = """
import os, signal, sys
from torch.distributed.checkpoint import HuggingFaceStorageWriter
real = HuggingFaceStorageWriter.write_data
def write_data(self, plan, planner):
    if os.environ["RANK"] == "1" and "step_0000004" in str(self.path):
        os.kill(os.getpid(), signal.SIGKILL)  # rank 1 dies in the middle of checkpoint 4
    return real(self, plan, planner)
HuggingFaceStorageWriter.write_data = write_data
from pretrain.cli import main
sys.argv = ["pretrain", *sys.argv[1:]]
main()
"""


def test_a_rank_killed_during_a_checkpoint_write_leaves_the_previous_one_trusted(corpus, cache, tmp_path):
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    out = tmp_path / "killed"
    p = torchrun(args(corpus, cache, out, 6, *sets("train.parallel=fsdp", "train.global_batch=16")), script=script)
    assert p.returncode != 0
    trusted = [q.name for q in (out / "checkpoints").iterdir() if (q / "state.json").is_file()]
    assert trusted == ["step_0000002"]
    p = torchrun(["run", "--resume", str(out)])  # from step 2; the half-written folder is cleared away
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(q.name for q in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004",
                                                                       "step_0000006"]


def test_bad_layouts_are_one_line_errors(corpus, cache, tmp_path):
    res = runner.invoke(app, args(corpus, cache, tmp_path / "a", 2, *sets("train.parallel=fsdp")))
    assert res.exit_code == 2 and "torchrun" in res.output and "Traceback" not in res.output, res.output
    p = torchrun(args(corpus, cache, tmp_path / "b", 2, *sets("train.global_batch=12")))
    errors = [ln for ln in p.stdout.splitlines() + p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode != 0 and len(errors) == 1 and "train.global_batch 12" in errors[0], p.stderr[-2000:]
    ddp = tmp_path / "ddp"
    p = torchrun(args(corpus, cache, ddp, 2))  # its global batch is 2 ranks x 8: it cannot move to 1 rank
    assert p.returncode == 0, p.stderr[-3000:]
    res = runner.invoke(app, ["run", "--resume", str(ddp), "--max-steps", "4"])
    assert res.exit_code == 2 and "written by 2 rank(s)" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------------------------- activation checkpointing
def test_activation_checkpointing_same_gradients_less_saved_memory():
    from models.config import Arch, ModelConfig
    from models.transformer import Transformer

    cfg = ModelConfig(n_layers=4, n_heads=2, d_model=64, d_ff=256, max_len=64, dropout=0.1)
    ids = torch.randint(200, 400, (4, 64), generator=torch.Generator().manual_seed(0))
    out = []
    for on in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg, Arch(kind="encoder-decoder"), 400)
        model.set_activation_checkpointing(on)
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(1)  # the same dropout masks, replayed in the recomputation
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, decoder_input_ids=ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in model.parameters()], sum(saved)))
    (l0, g0, m0), (l1, g1, m1) = out
    assert abs(l0 - l1) < 1e-6 and max((a - b).abs().max().item() for a, b in zip(g0, g1, strict=True)) < 1e-6
    assert m1 < 0.6 * m0, (m0, m1)  # only each block's input is kept for backward


def test_activation_checkpointing_run_has_the_same_losses(corpus, cache, tmp_path):
    runs = []
    for on in ("false", "true"):
        out = tmp_path / on
        res = runner.invoke(app, args(corpus, cache, out, 5, *sets(f"train.activation_checkpointing={on}",
                                                                   "model.dropout=0.1")))
        assert res.exit_code == 0, res.output
        runs.append([r["lm_loss"] for r in records(out)])
    assert max(abs(a - b) for a, b in zip(*runs, strict=True)) < 1e-6


# ------------------------------------------------------------------------------------------- the batch ramp
def test_the_batch_plan_follows_the_ramp_exactly():
    """GPT-3's ramp: sequences(s) = start + (full - start) x min(1, tokens before s / ramp tokens), rounded up to
    whole rounds of one micro-batch per rank."""
    rows, world, full, T, start, ramp = 4, 2, 8, 16, 6, 3000
    plan = BatchPlan(rows, world, full, T, start, ramp)
    tokens, s = 0, 0
    while True:
        seqs = start + (full * rows - start) * min(1.0, tokens / ramp)
        want = min(full, -(-int(-(-seqs // 1)) // (rows * world)) * world) if seqs % 1 == 0 else None
        want = min(full, max(1, -(-seqs // (rows * world))) * world) if want is None else want
        assert plan.micro(s) == want and plan.micro(s) % world == 0, s
        assert plan.tokens_before(s) == tokens and plan.local(s) == plan.micro(s) // world
        if want == full:
            break
        tokens += want * rows * T
        s += 1
    assert s > 3 and plan.micro(s + 100) == full  # a real ramp, then the full batch
    k = 0
    for step in range(s + 3):
        for j in range(plan.local(step)):
            assert plan.step_of(k) == (step, j)
            k += 1
    for budget in (1, 500, tokens, tokens + 1, 10 * tokens):
        n = plan.steps_for_tokens(budget)
        assert plan.tokens_before(n) >= budget and (n == 0 or plan.tokens_before(n - 1) < budget)


def test_a_ramped_run_counts_its_tokens_and_resumes_mid_ramp_bit_exact(corpus, cache, tmp_path):
    ramp = sets("train.batch_warmup_tokens=4096", "train.batch_warmup_start=8", "train.global_batch=32",
                "train.batch_size=4", "model.dropout=0.1")
    full = tmp_path / "full"
    assert runner.invoke(app, args(corpus, cache, full, 8, *ramp)).exit_code == 0
    recs = records(full)
    plan = BatchPlan(4, 1, 8, 32, 8, 4096)
    assert [r["tokens"] for r in recs] == [plan.tokens_before(s + 1) for s in range(8)]  # clm: every token counts
    assert plan.micro(0) < plan.micro(3) < plan.micro(7) == 8  # it ramps, then runs at the full batch
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for name in ("step_0000004", "step_0000006", "step_0000008"):  # back to the middle of the ramp
        shutil.rmtree(part / "checkpoints" / name)
    assert runner.invoke(app, ["run", "--resume", str(part)]).exit_code == 0
    assert [(r["step"], r["lm_loss"]) for r in records(part)] == [(r["step"], r["lm_loss"]) for r in recs]
    name = "checkpoints/step_0000008/model.safetensors"
    assert (part / name).read_bytes() == (full / name).read_bytes()
