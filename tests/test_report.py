"""`pretrain report` (PNG plots, Markdown and HTML tables across runs), `pretrain runs` (the listing and its states)
and the run folder's records as the report reads them."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import expect_error, runner, train, write_corpus

from pretrain.cli import app
from pretrain.metrics import fmt
from pretrain.plots import DPI, FIG_SIZE
from pretrain.report import PLOTS
from pretrain.runlist import merge_sessions, read_run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A finished clm run and a finished mlm run, a few steps each, on one corpus and cache."""
    root = tmp_path_factory.mktemp("runs")
    data, cache = write_corpus(root / "corpus"), root / "cache"
    for obj, steps in (("clm", "8"), ("mlm", "6")):
        res = train(obj, data, root / "runs" / f"{obj}-tiny", cache, "--max-steps", steps,
                    extra=("train.eval_every=4",))
        assert res.exit_code == 0, res.output
    return root / "runs" / "clm-tiny", root / "runs" / "mlm-tiny"


def test_report_draws_both_runs_and_tabulates_their_summaries(two_runs, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "rep"
    res = runner.invoke(app, ["report", *map(str, two_runs), "--out", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "report.html" in res.output
    for name in PLOTS:
        img = imread(out / name)  # (H, W, RGBA) floats in [0, 1]
        assert img.shape[:2] == (round(FIG_SIZE[1] * DPI), round(FIG_SIZE[0] * DPI)), (name, img.shape)
        assert img[..., :3].std() > 0.01, name  # curves, axes and text, not a blank canvas
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for name in PLOTS:
        assert f"<img src='{name}'" in page and f"]({name})" in md
    for run in two_runs:
        summary = json.loads((run / "summary.json").read_text())
        baselines = {k: v for k, v in summary.items() if k.startswith("baseline_")}
        assert baselines, summary  # both objectives have a reference figure
        for doc in (page, md):
            assert run.name in doc
            assert summary["run_dir"] and fmt(summary["val_loss"]) in doc
            assert fmt(summary["val_bits_per_byte"]) in doc and fmt(summary["tokens_per_s"]) in doc
            for value in baselines.values():
                assert fmt(value) in doc
    assert "nsp acc" in page and "lm acc" in page  # each objective's own metrics


def test_report_of_a_run_still_training(two_runs, tmp_path):
    """A run without summary.json (still training, or crashed) is reported as far as its records go."""
    live = tmp_path / "clm-live"
    shutil.copytree(two_runs[0], live)
    (live / "summary.json").unlink()
    lines = (live / "metrics.jsonl").read_text().splitlines()
    (live / "metrics.jsonl").write_text("\n".join(lines[:3]) + '\n{"step": 6, "tok')  # a half-written last line
    (live / "checkpoints" / "step_0000008").rename(live / "checkpoints" / "step_0000002")
    info = read_run(live)
    last = json.loads(lines[2])
    assert info.state == "crashed" and info.steps == max(last["step"], 2) and info.tokens == last["tokens"]
    res = runner.invoke(app, ["report", str(live), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "crashed" in (tmp_path / "rep" / "report.md").read_text()


def test_resumed_sessions_are_merged():
    recs = [{"step": 2}, {"step": 4}, {"step": 4, "split": "valid"}, {"step": 6}, {"step": 8},
            {"step": 6, "again": True}, {"step": 8, "again": True}, {"step": 8, "split": "valid"}]
    merged = merge_sessions(recs)
    assert [(r["step"], r.get("split", "train")) for r in merged] == [
        (2, "train"), (4, "train"), (4, "valid"), (6, "train"), (8, "train"), (8, "valid")]
    assert all(r.get("again") for r in merged if r["step"] in (6, 8) and "split" not in r)


@pytest.fixture
def wide(monkeypatch):
    """A console wide enough for every column (the test runner's is 80 characters)."""
    from rich.console import Console

    from pretrain import cli_runs

    monkeypatch.setattr(cli_runs, "console", Console(width=250))


def test_runs_lists_states(two_runs, tmp_path, wide):
    root = tmp_path / "runs"
    root.mkdir()
    finished = root / "a-finished"
    shutil.copytree(two_runs[0], finished)
    stopped = root / "b-stopped"  # interrupted: no summary, every logged step checkpointed
    shutil.copytree(two_runs[1], stopped)
    (stopped / "summary.json").unlink()
    crashed = root / "c-crashed"  # its process died: a .running naming a process that is gone
    shutil.copytree(two_runs[0], crashed)
    (crashed / "summary.json").unlink()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    import socket

    (crashed / ".running").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    live = root / "d-running"
    shutil.copytree(crashed, live)
    (live / ".running").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    (root / "not-a-run").mkdir()
    assert [read_run(p).state for p in (finished, stopped, crashed, live)] == ["finished", "stopped", "crashed",
                                                                              "running"]
    res = runner.invoke(app, ["runs", str(root)])
    assert res.exit_code == 0, res.output
    rows = {ln.split()[0]: ln for ln in res.output.splitlines() if ln.strip() and ln.split()[0][:2] in
            ("a-", "b-", "c-", "d-", "no")}
    assert set(rows) == {"a-finished", "b-stopped", "c-crashed", "d-running"}  # not-a-run is no run
    for name, row in rows.items():
        assert row.split()[2] == name.split("-")[1]
    assert "mlm" in rows["b-stopped"] and "clm" in rows["a-finished"]
    last_valid = [json.loads(ln) for ln in (finished / "metrics.jsonl").read_text().splitlines()][-1]
    assert fmt(last_valid["loss"]) in rows["a-finished"]


def test_report_bad_input(two_runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(runner.invoke(app, ["report", str(empty)]), "not a run folder")
    expect_error(runner.invoke(app, ["report", str(two_runs[0].parent)]), "holds runs", "/*")
    expect_error(runner.invoke(app, ["report"]), "give one or more run folders")
    expect_error(runner.invoke(app, ["report", str(tmp_path / "nothing" / "*")]), "no folder matches")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    expect_error(runner.invoke(app, ["report", str(two_runs[0]), "--out", str(afile)]), "is a file")
    assert afile.read_text() == "keep me"
    expect_error(runner.invoke(app, ["runs", str(tmp_path / "missing")]), "is not a folder")


def test_help_imports_no_plotting_or_tracking_package():
    heavy = "('torch', 'matplotlib', 'tensorboard', 'wandb')"
    code = f"import sys, pretrain.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "report" in res.output and "runs" in res.output
