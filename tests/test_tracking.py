"""The TensorBoard event files every run writes (read back with tensorboard's EventAccumulator), a resumed run's
purge, the one-line note when the package is missing, and W&B offline when it is installed."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from tiny_runs import runner, train, write_corpus

from pretrain.cli import app
from pretrain.tracking import AXES


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar in the event files of `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def expected(recs: list[dict], axis: str, suffix: str = "") -> dict[str, list[tuple[int, float]]]:
    """What the event files should hold: every number of every record, against its step or its tokens."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in recs:
        split = r.get("split", "train")
        for k, v in r.items():
            if k not in AXES and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(f"{split}{suffix}/{k}", []).append((r[axis], float(v)))
    return out


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        for (_, a), (_, b) in zip(got[tag], points, strict=True):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-12), tag  # float32 in the event file


def test_every_scalar_at_every_step_against_steps_and_tokens(corpus, tmp_path):
    r = tmp_path / "r"
    res = train("clm", corpus, r, tmp_path / "cache", "--max-steps", "6", extra=("train.eval_every=3",))
    assert res.exit_code == 0, res.output
    recs = records(r)
    assert {"lm_loss", "lm_acc", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(recs[0])
    assert [x["step"] for x in recs if "split" in x] == [3, 6]  # every 3 steps; the last one after the loop
    assert_same(events(r / "tensorboard" / "steps"), expected(recs, "step"))
    assert_same(events(r / "tensorboard" / "tokens"), expected(recs, "tokens", "_by_tokens"))
    valid = [x for x in recs if "split" in x]
    assert valid[0]["tokens"] == 3 * 8 * 32 and valid[0]["eval_tokens"] == 2 * 8 * 32  # trained vs evaluated


def test_resume_purges_what_the_interrupted_session_logged_past_its_checkpoint(corpus, tmp_path):
    """Steps 5-6 were logged, the checkpoint is at 4: the resumed session logs 5-6 again and TensorBoard keeps
    one point per step, the resumed session's."""
    r = tmp_path / "r"
    res = train("clm", corpus, r, tmp_path / "cache", "--max-steps", "6",
                extra=("train.eval_every=0", "train.log_every=1", "train.ckpt_every=4", "train.keep_last=5"))
    assert res.exit_code == 0, res.output
    shutil.rmtree(r / "checkpoints" / "step_0000006")
    res = runner.invoke(app, ["run", "--resume", str(r), "--max-steps", "7"])
    assert res.exit_code == 0, res.output
    got = events(r / "tensorboard" / "steps")
    assert [s for s, _ in got["train/lm_loss"]] == [1, 2, 3, 4, 5, 6, 7]
    last = {x["step"]: x for x in records(r) if "split" not in x}  # the resumed session's records come last
    assert [v for _, v in got["train/lm_loss"]][4:] == pytest.approx([last[s]["lm_loss"] for s in (5, 6, 7)])
    assert [s for s, _ in events(r / "tensorboard" / "tokens")["train_by_tokens/lm_loss"]] == [
        256 * s for s in range(1, 8)]


def test_without_tensorboard_one_line_says_how_to_install_and_the_run_goes_on(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    r = tmp_path / "r"
    res = train("clm", corpus, r, tmp_path / "cache", "--max-steps", "2")
    assert res.exit_code == 0, res.output
    notes = [ln for ln in res.output.splitlines() if "pip install tensorboard" in ln]
    assert len(notes) == 1 and "goes on" in notes[0], res.output
    assert (r / "summary.json").is_file() and not (r / "tensorboard").exists()


def test_report_to_none_writes_no_event_files(corpus, tmp_path):
    r = tmp_path / "r"
    res = train("clm", corpus, r, tmp_path / "cache", "--max-steps", "2", extra=("train.report_to=",))
    assert res.exit_code == 0, res.output
    assert json.loads((r / "config.json").read_text())["train"]["report_to"] == []
    assert not (r / "tensorboard").exists()
    res = train("clm", corpus, tmp_path / "x", tmp_path / "cache", extra=("train.report_to=tensorbord",))
    assert res.exit_code == 2 and "'tensorboard', 'wandb'" in res.output


def test_wandb_offline_when_installed(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    r = tmp_path / "r"
    res = train("clm", corpus, r, tmp_path / "cache", "--max-steps", "2",
                extra=("train.report_to=tensorboard,wandb",))
    assert res.exit_code == 0, res.output
    assert list((r / "wandb").glob("offline-run-*")), list((r / "wandb").iterdir())
