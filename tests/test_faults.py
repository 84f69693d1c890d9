"""Faults a hostile user or a hostile machine brings: every one is a single line on stderr with exit 2 (no
traceback), nothing trusted is lost or overwritten, and a resume after Ctrl-C or kill -9 is bit-exact."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_runs import TINY, sets, write_corpus
from typer.testing import CliRunner

from pretrain.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*args: str):
    return runner.invoke(app, list(args))


def train(corpus: Path, cache: Path, out: Path, *extra: str, steps: int = 4):
    return cli("run", "--objective", "clm", "--data", str(corpus), "--max-steps", str(steps), "--out", str(out),
               *sets(*TINY, f"data.cache_dir={cache}", "train.ckpt_every=2", "train.eval_every=0"), *extra)


def one_line(res, *words: str, code: int = 2) -> None:
    """The run failed with exactly one line on stderr (error: ...) holding every word, and no traceback."""
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.output
    for w in words:
        assert w in errors[0], (w, errors[0])


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["lm_loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "split" not in r]


def weights(run: Path, step: int) -> bytes:
    return (run / "checkpoints" / f"step_{step:07d}" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def finished(corpus, cache, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4, never to be modified (tests copy it)."""
    out = tmp_path_factory.mktemp("runs") / "done"
    res = train(corpus, cache, out)
    assert res.exit_code == 0, res.output
    return out


def copy(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


# ------------------------------------------------------------------------------------------- hostile text
def test_markup_in_values_and_paths_prints_as_written(tmp_path, cache):
    one_line(cli("run", "--data", str(tmp_path / "[/x]no[bold]file.txt"), "--out", str(tmp_path / "o"),
                 *sets(f"data.cache_dir={cache}")), "[/x]no[bold]file.txt")
    one_line(cli("run", *sets("train.precision=[bold]x")), "'[bold]x'")
    recipe = tmp_path / "r.toml"
    recipe.write_text("model = 3\n")
    one_line(cli("run", "--recipe", str(recipe)), "[model]")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("args, words", [
    (["--seed", str(2**70)], ["train.seed", "2**63"]),
    (sets("train.lr=inf"), ["train.lr", "finite"]),
    (sets("train.lr=nan"), ["train.lr", "finite"]),
    (sets("train.clip=inf"), ["train.clip", "finite"]),
])
def test_numbers_are_checked_before_any_work(args, words, tmp_path):
    one_line(cli("run", "--out", str(tmp_path / "o"), *args), *words)
    assert not (tmp_path / "o").exists()


def test_eval_needs_a_batch(finished):
    one_line(cli("eval", str(finished), "--batches", "0"), "--batches")


# ------------------------------------------------------------------------------------------- the --out folder
def test_out_that_is_a_file_a_path_under_a_file_or_unwritable(corpus, cache, tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("mine")
    one_line(train(corpus, cache, f), "is a file")
    one_line(train(corpus, cache, f / "sub"), "is a file, not a folder")
    assert f.read_text() == "mine"
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    one_line(train(corpus, cache, tmp_path / "new"), "not writable")
    assert not (tmp_path / "new").exists()


def test_a_folder_that_is_no_run_is_never_overwritten(corpus, cache, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.json").write_text("my own data")
    one_line(train(corpus, cache, mine), "holds no run")
    assert (mine / "data.json").read_text() == "my own data" and len(list(mine.iterdir())) == 1


def test_a_run_without_checkpoint_restarts_and_advice_agrees(corpus, cache, finished, tmp_path):
    crashed = copy(finished, tmp_path)
    shutil.rmtree(crashed / "checkpoints")
    (crashed / "checkpoints").mkdir()
    res = cli("run", "--resume", str(crashed))
    one_line(res, "no checkpoint", f"pretrain run --out {crashed}")
    res = train(corpus, cache, crashed)  # what the advice says: it starts again from scratch
    assert res.exit_code == 0 and "starts again" in res.output, res.output
    assert losses(crashed) == losses(finished) and weights(crashed, 4) == weights(finished, 4)
    (crashed / "notes.txt").write_text("mine")
    shutil.rmtree(crashed / "checkpoints")
    one_line(train(corpus, cache, crashed), "notes.txt")  # a file no run wrote: refused
    assert (crashed / "notes.txt").read_text() == "mine"


def test_resume_of_a_finished_run_writes_nothing(finished, tmp_path):
    done = copy(finished, tmp_path)
    before = {p: p.read_bytes() for p in done.rglob("*") if p.is_file()}
    one_line(cli("run", "--resume", str(done)), "already finished", "--max-steps")
    assert {p: p.read_bytes() for p in done.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------------------------------- corrupt run folders
def test_corrupt_run_files_are_named(finished, tmp_path):
    bad = copy(finished, tmp_path, "json")
    (bad / "config.json").write_text("{not json")
    for cmd in (["run", "--resume", str(bad)], ["eval", str(bad)], ["generate", str(bad), "--prompt", "a"]):
        one_line(cli(*cmd), "config.json", "not valid JSON")
    (bad / "config.json").write_text("[1, 2]")
    one_line(cli("eval", str(bad)), "config.json", "list")
    for name, state in (("list", [1, 2]), ("step", {"step": "many", "tokens": 1, "best_val": 1.0, "bad_evals": 0,
                                                    "elapsed": 0.0})):
        bad = copy(finished, tmp_path, name)
        (bad / "checkpoints" / "step_0000004" / "state.json").write_text(json.dumps(state))
        one_line(cli("run", "--resume", str(bad), "--max-steps", "6"), "step_0000004", "state.json")
    bad = copy(finished, tmp_path, "rng")
    t = bad / "checkpoints" / "step_0000004" / "train.safetensors"
    save_file({k: v for k, v in load_file(t).items() if k != "rng.cpu"}, t)
    one_line(cli("run", "--resume", str(bad), "--max-steps", "6"), "step_0000004", "rng.cpu")


def test_a_stray_folder_in_checkpoints_is_ignored_with_a_warning(finished, tmp_path):
    run = copy(finished, tmp_path)
    shutil.copytree(run / "checkpoints" / "step_0000004", run / "checkpoints" / "step_best")
    res = cli("eval", str(run), "--batches", "1")
    assert res.exit_code == 0 and "step_best is not a checkpoint folder" in res.output, res.output
    assert json.loads((run / "eval.json").read_text())["checkpoint"] == "step_0000004"
    res = cli("generate", str(run), "--prompt", "the model", "--max-new-tokens", "2")
    assert res.exit_code == 0, res.output
    res = cli("run", "--resume", str(run), "--max-steps", "6")
    assert res.exit_code == 0 and (run / "checkpoints" / "step_0000006").is_dir(), res.output


def test_non_finite_weights_are_refused_on_load(finished, tmp_path):
    run = copy(finished, tmp_path)
    w = run / "checkpoints" / "step_0000004" / "model.safetensors"
    tensors = load_file(w)
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, w)
    for cmd in (["eval", str(run)], ["generate", str(run), "--prompt", "a"], ["run", "--resume", str(run),
                                                                              "--max-steps", "6"]):
        one_line(cli(*cmd), "non-finite weights", "step_0000004")


def test_no_checkpoint_with_non_finite_weights_is_ever_called_good(corpus, cache, tmp_path):
    out = tmp_path / "blowup"
    res = train(corpus, cache, out, *sets("train.lr=1e30", "train.warmup_steps=0", "train.ckpt_every=1",
                                          "train.clip=0"))
    one_line(res, "non-finite")
    for ckpt in (out / "checkpoints").glob("step_*"):  # whatever was saved holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values()), ckpt


# ------------------------------------------------------------------------------------------- full disk
def enospc(path="file"):
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_during_the_first_checkpoint(corpus, cache, tmp_path, monkeypatch):
    import pretrain.checkpoint as ckpt

    def full(model, filename, *a, **k):
        raise enospc(filename)

    monkeypatch.setattr(ckpt, "save_model", full)
    out = tmp_path / "full"
    one_line(train(corpus, cache, out), "step_0000002", "no space is left", "no checkpoint was saved before")
    assert not list((out / "checkpoints").iterdir())  # the partial checkpoint is gone


def test_disk_full_during_a_later_checkpoint_keeps_the_trusted_one(corpus, cache, finished, tmp_path, monkeypatch):
    import pretrain.checkpoint as ckpt

    calls, real = {"n": 0}, ckpt.save_file

    def full_on_second(tensors, filename, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise enospc(filename)
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", full_on_second)
    out = tmp_path / "later"
    one_line(train(corpus, cache, out), "step_0000004", "newest trusted checkpoint", "step_0000002")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    monkeypatch.setattr(ckpt, "save_file", real)
    assert cli("run", "--resume", str(out)).exit_code == 0
    assert losses(out) == losses(finished) and weights(out, 4) == weights(finished, 4)


def test_disk_full_while_appending_metrics(corpus, cache, tmp_path, monkeypatch):
    import builtins

    real = builtins.open

    def full_open(file, mode="r", *a, **k):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise enospc(file)
        return real(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", full_open)
    one_line(train(corpus, cache, tmp_path / "m"), "metrics.jsonl", "no space is left")


# ------------------------------------------------------------------------------------------- resume is exact
def test_sigint_between_the_optimizer_step_and_the_step_count(corpus, cache, tmp_path, monkeypatch):
    """A real SIGINT delivered right after the optimizer update of step 3 (inside the step) waits until the
    step is counted: the checkpoint holds step 3 with step 3's weights, and the resume is bit-exact."""
    real = torch.amp.GradScaler.update
    log1 = sets("train.log_every=1")
    reference = tmp_path / "reference"
    assert train(corpus, cache, reference, *log1).exit_code == 0
    for workers in (0, 1):
        for trial in range(3):
            calls = {"n": 0}

            def update(self, *a, calls=calls, **k):
                calls["n"] += 1
                real(self, *a, **k)
                if calls["n"] == 3:
                    os.kill(os.getpid(), signal.SIGINT)

            monkeypatch.setattr(torch.amp.GradScaler, "update", update)
            out = tmp_path / f"int-{workers}-{trial}"
            res = train(corpus, cache, out, *log1, *sets(f"train.num_workers={workers}"))
            assert res.exit_code == 130 and "step_0000003" in res.output, res.output
            monkeypatch.setattr(torch.amp.GradScaler, "update", real)
            assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
            assert cli("run", "--resume", str(out)).exit_code == 0
            assert losses(out) == losses(reference) and weights(out, 4) == weights(reference, 4), (workers, trial)


KILL_DURING_WRITE = """
import os, signal, sys
import pretrain.checkpoint as ckpt
real = ckpt.save_file
def killed(tensors, filename, *a, **k):
    if "step_{step:07d}" in str(filename):
        os.kill(os.getpid(), signal.SIGKILL)  # the weights are written, the rest of the checkpoint never is
    return real(tensors, filename, *a, **k)
ckpt.save_file = killed
from pretrain.cli import main
sys.argv = ["pretrain", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("workers", [0, 1])
def test_kill_9_during_a_checkpoint_write_then_resume_is_exact(corpus, cache, tmp_path, workers):
    """kill -9 in the middle of writing checkpoint 4 (3 trials, with 0 and 1 DataLoader workers): the run's
    newest trusted checkpoint stays step 2, the stale temporary folder is removed at the next start, and the
    resume repeats the uninterrupted run bit for bit, with no duplicate metric records."""
    args = ["run", "--objective", "clm", "--data", str(corpus), "--max-steps", "6",
            *sets(*TINY, f"data.cache_dir={cache}", "train.ckpt_every=2", "train.eval_every=0",
                  "train.log_every=1", f"train.num_workers={workers}", "model.dropout=0.1")]
    full = tmp_path / "full"
    assert cli(*args, "--out", str(full)).exit_code == 0
    for trial in range(3):
        out = tmp_path / f"killed-{trial}"
        code = KILL_DURING_WRITE.format(step=4)
        p = subprocess.run([sys.executable, "-c", code, *args, "--out", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
        names = sorted(q.name for q in (out / "checkpoints").iterdir())
        assert len(names) == 2 and names[0].startswith(".tmp-step_0000004") and names[1] == "step_0000002", names
        res = cli("run", "--resume", str(out))
        assert res.exit_code == 0, res.output
        assert sorted(q.name for q in (out / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
        assert losses(out) == losses(full) and len(losses(out)) == 6  # no step logged twice
        assert weights(out, 6) == weights(full, 6), trial


def test_resume_refuses_a_changed_corpus_unless_told(tmp_path, cache):
    corpus = write_corpus(tmp_path)
    out = tmp_path / "r"
    assert train(corpus, cache, out, steps=2).exit_code == 0
    corpus.write_text(corpus.read_text() + "\n\nA new document about something else entirely.\n")
    one_line(cli("run", "--resume", str(out), "--max-steps", "4"), "data", "changed", "--accept-data-change")
    res = cli("run", "--resume", str(out), "--max-steps", "4", "--accept-data-change")
    assert res.exit_code == 0 and "no longer an exact continuation" in " ".join(res.output.split()), res.output


def test_same_seed_same_bits_with_0_1_and_2_workers(corpus, cache, tmp_path):
    """Batches are pure functions of (seed, step, micro-step, rank), so who builds them cannot matter."""
    runs = []
    for workers in (0, 1, 2):
        out = tmp_path / f"w{workers}"
        res = train(corpus, cache, out, *sets(f"train.num_workers={workers}", "train.grad_accum=2",
                                               "model.dropout=0.1", "train.log_every=1"))
        assert res.exit_code == 0, res.output
        runs.append(out)
    assert losses(runs[0]) == losses(runs[1]) == losses(runs[2])
    assert weights(runs[0], 4) == weights(runs[1], 4) == weights(runs[2], 4)


def test_a_folder_of_no_text_files_and_tokenizer_advice_are_one_line(tmp_path, cache):
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"\x00\x01")
    res = cli("prepare", "--data", str(folder), *sets(f"data.cache_dir={cache}"))
    one_line(res, "holds no .txt", "give a folder of text files")
    assert res.output.strip().count("\n") == 0  # nothing printed before the error, no library notice
    corpus = write_corpus(tmp_path, n_docs=30)
    res = cli("tokenizer", "train", "--data", str(corpus), "--vocab-size", "100000", "--out", str(tmp_path / "t"))
    one_line(res, "--vocab-size")  # the advice names this command's own flag
    assert not list(tmp_path.glob("t.*"))
