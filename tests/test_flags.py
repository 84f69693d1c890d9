"""One meaning per flag: `--out` of `prepare` (the cache folder) and `eval` (where its JSON goes, never over another
evaluation), `--set` on `eval`."""

import json
from pathlib import Path

import pytest
from tiny_runs import expect_error, runner, sets, train, write_corpus

from pretrain.cli import app


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny clm run on its corpus, and two other corpora."""
    root = tmp_path_factory.mktemp("flags")
    own = write_corpus(root / "own")
    others = [write_corpus(root / "a", "news.txt", seed=1), write_corpus(root / "b", "books.txt", seed=2)]
    res = train("clm", own, root / "run", root / "cache", "--max-steps", "4")
    assert res.exit_code == 0, res.output
    return root / "run", own, others, root / "cache"


def evaluate(run, *args):
    return runner.invoke(app, ["eval", str(run), "--batches", "2", *args])


def test_eval_on_two_other_corpora_leaves_three_files(trained):
    run, own, (news, books), _ = trained
    assert evaluate(run).exit_code == 0
    first = json.loads((run / "eval.json").read_text())
    for data in (news, books):
        res = evaluate(run, "--data", str(data))
        assert res.exit_code == 0, res.output
        assert f"eval-{data.stem}.json" in res.output.replace("\n", "")
    files = sorted(p.name for p in run.glob("eval*.json"))
    assert files == ["eval-books.json", "eval-news.json", "eval.json"]
    assert json.loads((run / "eval.json").read_text()) == first  # the run's own evaluation is kept
    assert first["data"] == str(own)
    results = {name: json.loads((run / name).read_text()) for name in files}
    assert results["eval-news.json"]["data"] == str(news) and results["eval-books.json"]["data"] == str(books)
    assert results["eval-news.json"]["loss"] != results["eval-books.json"]["loss"]  # different text, new numbers
    # the run's own data named explicitly is still the run's own data
    assert evaluate(run, "--data", str(own)).exit_code == 0
    assert sorted(p.name for p in run.glob("eval*.json")) == files


def test_eval_never_overwrites_another_evaluation(trained, tmp_path):
    run, _, (news, _), _ = trained
    same_name = write_corpus(tmp_path / "elsewhere", "news.txt", seed=3)  # another corpus with the same file name
    assert evaluate(run, "--data", str(news)).exit_code == 0
    kept = (run / "eval-news.json").read_text()
    res = evaluate(run, "--data", str(same_name))
    assert res.exit_code == 0, res.output
    assert (run / "eval-news.json").read_text() == kept
    clash = [p for p in run.glob("eval-news-*.json")]
    assert len(clash) == 1 and json.loads(clash[0].read_text())["data"] == str(same_name)
    # --out: a folder takes the default name, a .json path is the file
    res = evaluate(run, "--data", str(news), "--out", str(tmp_path / "results"))
    assert res.exit_code == 0 and (tmp_path / "results" / "eval-news.json").is_file()
    res = evaluate(run, "--split", "train", "--out", str(tmp_path / "mine.json"))
    assert res.exit_code == 0 and json.loads((tmp_path / "mine.json").read_text())["split"] == "train"
    config = (run / "config.json").read_text()
    expect_error(evaluate(run, "--out", str(run / "config.json")), "not an evaluation result")
    assert (run / "config.json").read_text() == config
    notes = tmp_path / "notes"
    notes.write_text("mine")
    expect_error(evaluate(run, "--out", str(notes)), "is a file")
    assert notes.read_text() == "mine"


def test_eval_set_changes_data_and_train_keys_only(trained, tmp_path):
    run, _, _, cache = trained
    res = evaluate(run, "--set", "train.batch_size=2", "--out", str(tmp_path / "small.json"))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "small.json").read_text())["tokens"] == 2 * 2 * 32  # 2 batches of 2 x 32
    expect_error(evaluate(run, "--set", "model.d_model=64"), "only data.*, train.* keys")
    expect_error(evaluate(run, "--set", "data.seq_len=64"), "model.max_len")


def test_prepare_out_builds_the_cache_that_runs_reuse(trained, tmp_path):
    _, own, _, _ = trained
    cache = tmp_path / "mycache"
    res = runner.invoke(app, ["prepare", "--data", str(own), "--out", str(cache), *sets("data.vocab_size=420")])
    assert res.exit_code == 0, res.output
    built = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    assert list(cache.glob("tokenizers/*.model")) and list(cache.glob("*/manifest.json"))
    res = train("clm", own, tmp_path / "run", cache, "--max-steps", "2")  # --set data.cache_dir=CACHE
    assert res.exit_code == 0, res.output
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == built  # reused: nothing new, nothing rewritten
    meta = json.loads((tmp_path / "run" / "data.json").read_text())
    assert Path(meta["tokenizer"]["path"]).parent == cache / "tokenizers"  # the run's tokenizer came from there
    afile = tmp_path / "afile"
    afile.write_text("x")
    expect_error(runner.invoke(app, ["prepare", "--data", str(own), "--out", str(afile)]), "is a file")
    assert afile.read_text() == "x"
