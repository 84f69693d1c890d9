"""The sharded token cache: indexing across shards, independence from worker count and shard layout, resume
after kill -9 / Ctrl-C / a full disk, cluster parts and their merge, and the one-line folder errors."""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from corpora import assert_round_trip, cfg_for, clean_env, content_files, split_arrays, write_corpus
from typer.testing import CliRunner

from pretrain import shards, stream
from pretrain.data import TokenCache, prepare, read_documents
from pretrain.errors import UserError
from pretrain.prepare import merge_cache, prepare_part
from pretrain.text import split_sentences
from pretrain.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four .txt files of 60 documents (about 80 KB, 30k tokens) and a tokenizer trained on them."""
    d = tmp_path_factory.mktemp("corpus")
    docs = write_corpus(d / "txt")
    tok = train_tokenizer((s for doc in docs for s in split_sentences(doc)), d / "tok", 450, "unigram")
    return d / "txt", str(tok), docs


def cfg(tmp_path, corpus, name="cache", **kw):
    kw.setdefault("workers", 1)
    return cfg_for(tmp_path, corpus[0], tokenizer=corpus[1], cache_dir=str(tmp_path / name), **kw)


def test_many_shards_index_like_one_array_and_give_the_same_batches(tmp_path, corpus):
    one = prepare(cfg(tmp_path, corpus, "one"), progress=False)
    many = prepare(cfg(tmp_path, corpus, "many", shard_tokens=700), progress=False)
    assert one.stats["shards"] == 1 and many.stats["shards"] > 20
    a, b = split_arrays(one.cache), split_arrays(many.cache)
    assert all((a[k] == b[k]).all() for k in a)  # the layout never changes what a split holds
    assert_round_trip(many, corpus[2], cfg(tmp_path, corpus))
    s, flat = many.cache.split("train"), a["train.tokens"]
    assert type(s.tokens).__name__ == "ShardedTokens" and len(s.tokens) == len(flat) == s.n_tokens
    idx = np.random.default_rng(0).integers(0, s.n_tokens, (8, 64))
    assert (s.tokens[idx] == flat[idx]).all() and s.tokens[idx].shape == (8, 64)
    cut = int(s.tokens.starts[3])
    assert (s.tokens[cut - 5:cut + 900] == flat[cut - 5:cut + 900]).all() and s.tokens[-1] == flat[-1]
    assert (s.unigram_counts(450) == np.bincount(flat, minlength=450)).all()
    blob = pickle.dumps(s)
    assert len(blob) < 2000  # paths, not tokens
    again = pickle.loads(blob)
    assert (again.tokens[idx] == flat[idx]).all() and (np.asarray(again.sent_doc) == a["train.sent_doc"]).all()
    from objectives import OBJECTIVES
    from pretrain.tokenizer import Tokenizer

    vocab = Tokenizer.load(corpus[1]).vocab
    for name in ("clm", "mlm", "span", "denoise"):
        obj = OBJECTIVES[name]()
        x = obj.batch(one.cache.split("train"), vocab, torch.Generator().manual_seed(5), 4, 32)
        y = obj.batch(s, vocab, torch.Generator().manual_seed(5), 4, 32)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_worker_count_does_not_change_a_byte(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(stream, "CHUNK_BYTES", 3000)  # ~25 chunks: both workers get many
    one = prepare(cfg(tmp_path, corpus, "w1", shard_tokens=4000, workers=1), progress=False)
    two = prepare(cfg(tmp_path, corpus, "w2", shard_tokens=4000, workers=2), progress=False)
    assert one.stats["workers"] == 1 and two.stats["workers"] == 2 and one.stats["shards"] > 3
    assert content_files(one.cache.path) == content_files(two.cache.path)


CHILD = """
import sys, time
from pretrain import shards
from pretrain.config import DataConfig
from pretrain.data import prepare

close = shards.ShardWriter.close


def slow_close(self, after):  # a slow disk: the parent has time to kill us between shards
    close(self, after)
    time.sleep(0.3)


if __name__ == "__main__":
    shards.ShardWriter.close = slow_close
    source, tok, cache = sys.argv[1:4]
    prepare(DataConfig(source=source, tokenizer=tok, cache_dir=cache, shard_tokens=2000, workers=1), progress=False)
"""


def test_kill_9_during_prepare_then_rerun_resumes_and_equals_an_uninterrupted_prepare(tmp_path, corpus):
    (tmp_path / "child.py").write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(corpus[0]), corpus[1],
                              str(tmp_path / "cache")], env=clean_env())
    deadline, done = time.time() + 60, 0
    while time.time() < deadline and done < 3:
        time.sleep(0.05)
        found = list((tmp_path / "cache").glob("*/part-00000-of-00001/progress.json"))
        done = len(json.loads(found[0].read_text())["shards"]) if found else 0
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert done >= 3, "the child finished no shard in time"
    key = found[0].parent.parent
    assert not (key / "manifest.json").exists()
    with pytest.raises(UserError, match="not complete"):
        TokenCache.open(key)
    kept = len(json.loads(found[0].read_text())["shards"])
    resumed = prepare(cfg(tmp_path, corpus, shard_tokens=2000), progress=False)
    clean = prepare(cfg(tmp_path, corpus, "clean", shard_tokens=2000), progress=False)
    assert resumed.stats["shards_resumed"] == kept and 0 < resumed.stats["shards_built"] < resumed.stats["shards"]
    assert clean.stats["shards_resumed"] == 0 and clean.stats["shards_built"] == clean.stats["shards"]
    assert content_files(resumed.cache.path) == content_files(clean.cache.path)


def test_parts_then_merge_equal_one_prepare(tmp_path, corpus):
    one = prepare(cfg(tmp_path, corpus, "one"), progress=False)
    c = cfg(tmp_path, corpus, "parts", shard_tokens=3000)
    with pytest.raises(UserError, match=r"cannot merge.*missing: 0/2, 1/2|no parts to merge"):
        merge_cache(c, progress=False)
    p1 = prepare_part(c, (1, 2), progress=False)
    assert p1["part"] == "1/2" and p1["documents"] == 120  # files 2 and 3: 2 x 60 documents
    with pytest.raises(UserError, match=r"cannot merge the 2 parts.*missing: 0/2.*--part I/2"):
        merge_cache(c, progress=False)
    with pytest.raises(UserError, match=r"missing: 0/2"):  # a run does not train on half the data either
        prepare(c, progress=False)
    prepare_part(c, (0, 2), progress=False)
    merged = merge_cache(c, progress=False)
    assert merged.stats["parts"] == 2 and merged.stats["documents"] == len(corpus[2])
    a, b = split_arrays(one.cache), split_arrays(merged.cache)
    assert all((a[k] == b[k]).all() for k in a)
    assert prepare(c, progress=False).stats["reused"] is True  # and `pretrain run` finds it


def test_unfinished_part_is_named_and_a_run_merges_finished_parts(tmp_path, corpus, monkeypatch):
    c = cfg(tmp_path, corpus, shard_tokens=3000)
    prepare_part(c, (0, 3), progress=False)
    close = shards.ShardWriter.close

    def interrupted(self, after):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.ShardWriter, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_part(c, (1, 3), progress=False)
    monkeypatch.setattr(shards.ShardWriter, "close", close)
    with pytest.raises(UserError, match=r"missing: 2/3; unfinished: 1/3"):
        merge_cache(c, progress=False)
    prepare_part(c, (2, 3), progress=False)
    prepare_part(c, (1, 3), progress=False)
    merged = prepare(c, progress=False)  # what the first `pretrain run` does
    assert merged.stats["parts"] == 3 and merged.stats["reused"] is False
    assert_round_trip(merged, corpus[2], c)


def test_disk_full_in_the_middle_of_a_shard(tmp_path, corpus, monkeypatch):
    c = cfg(tmp_path, corpus, shard_tokens=2000)
    add = shards.ShardWriter.add

    def full_disk(self, res, lo, hi):
        if len(self.progress["shards"]) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        add(self, res, lo, hi)

    monkeypatch.setattr(shards.ShardWriter, "add", full_disk)
    with pytest.raises(UserError) as e:
        prepare(c, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "no space left on the disk mounted at" in msg and "GiB free" in msg
    assert "run the same command again" in msg
    monkeypatch.setattr(shards.ShardWriter, "add", add)
    (part,) = (tmp_path / "cache").glob("*/part-00000-of-00001")
    assert sorted(p.name for p in part.iterdir()) == ["progress.json", "shard-000000", "shard-000001"]
    assert not (part.parent / "manifest.json").exists()
    again = prepare(c, progress=False)
    assert again.stats["shards_resumed"] == 2
    clean = prepare(cfg(tmp_path, corpus, "clean", shard_tokens=2000), progress=False)
    assert content_files(again.cache.path) == content_files(clean.cache.path)


def test_a_file_where_the_cache_folder_should_be(tmp_path, corpus):
    (tmp_path / "blocker").write_text("my notes")
    with pytest.raises(UserError, match="a file is where a folder should be"):
        prepare(cfg_for(tmp_path, corpus[0], tokenizer=corpus[1], cache_dir=str(tmp_path / "blocker" / "cache")),
                progress=False)
    assert (tmp_path / "blocker").read_text() == "my notes"


def test_stream_limits_take_a_prefix(tmp_path, corpus):
    docs = corpus[2]
    few = prepare(cfg(tmp_path, corpus, max_docs=25, shard_tokens=900), progress=False)
    assert few.stats["documents"] == 25
    assert_round_trip(few, docs[:25], cfg(tmp_path, corpus))
    lim = prepare(cfg(tmp_path, corpus, "t", max_tokens=5000, shard_tokens=900), progress=False)
    n = lim.stats["documents"]
    assert 0 < n < len(docs) and lim.stats["tokens"] <= 5000
    whole = prepare(cfg(tmp_path, corpus, "t2", max_docs=n + 1), progress=False)
    assert whole.stats["tokens"] > 5000  # one more document would have passed the limit
    assert_round_trip(lim, docs[:n], cfg(tmp_path, corpus))


def test_a_tiny_corpus_still_gets_a_validation_document(tmp_path, corpus):
    docs = corpus[2][:12]
    seed = next(s for s in range(1000) if _raw_none(docs, s))  # a split seed that holds out no document
    (tmp_path / "tiny.txt").write_text("\n\n".join(docs))
    c = cfg_for(tmp_path, tmp_path / "tiny.txt", tokenizer=corpus[1], split_seed=seed, shard_tokens=300, workers=1)
    prep = prepare(c, progress=False)
    assert prep.stats["valid"]["documents"] == 1 and prep.stats["shards"] > 3
    assert_round_trip(prep, docs, c)  # the train document with the smallest hash, cut out of its shard
    assert prep.stats["bytes"] == sum(len(d.encode()) for d in docs)
    assert list(read_documents(c)) == docs


def _raw_none(docs, seed):
    from pretrain.workers import is_valid, split_hashes

    return not is_valid(split_hashes([d.encode() for d in docs], seed), 0.02).any()


def test_part_errors_are_one_line_exit_2(tmp_path, corpus):
    from pretrain.cli import app

    runner = CliRunner()
    base = ["prepare", "--data", str(corpus[0]), "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    tok = ["--set", f"data.tokenizer={corpus[1]}"]
    for args, words in (([*tok, "--part", "2/2"], "part index must be in 0..1"),
                        ([*tok, "--part", "one/two"], "must look like I/N"),
                        (["--part", "0/2"], "--part needs the tokenizer every part shares"),
                        ([*tok, "--part", "0/5"], "needs at least 5 files, but the input has 4"),
                        ([*tok, "--part", "0/2", "--max-docs", "5"], "cannot be combined with --part"),
                        ([*tok, "--merge"], "no parts to merge"),
                        ([*tok, "--merge", "--part", "0/2"], "not both")):
        res = runner.invoke(app, [*base, *args])
        assert res.exit_code == 2, (args, res.output)
        assert words in res.output and res.output.count("error:") == 1 and "Traceback" not in res.output, res.output
    assert not (tmp_path / "cache").exists()
    res = runner.invoke(app, [*base, *tok, "--part", "1/2"])
    assert res.exit_code == 0 and "pretrain prepare --merge" in res.output
    res = runner.invoke(app, [*base, *tok, "--merge"])
    assert res.exit_code == 2 and "missing: 0/2" in res.output


def test_prepare_reports_rates_and_the_lock_names_a_foreign_writer(tmp_path, corpus):
    c = cfg(tmp_path, corpus, shard_tokens=3000)
    prepare_part(c, (0, 2), progress=False)
    key = next((tmp_path / "cache").glob("*/part-00000-of-00002")).parent
    (key / "part-00001-of-00002").mkdir()
    (key / "part-00001-of-00002" / "lock.json").write_text(json.dumps({"host": "node-17", "pid": 4242}))
    with pytest.raises(UserError, match="being written by pid 4242 on node-17"):
        prepare_part(c, (1, 2), progress=False)
    assert (key / "part-00001-of-00002" / "lock.json").exists()  # another machine's lock is left alone
    os.remove(key / "part-00001-of-00002" / "lock.json")
    from rich.console import Console

    console = Console(record=True, width=200, force_terminal=False)
    stats = prepare_part(c, (1, 2), progress=True, console=console)
    assert stats["tokens_per_s"] > 0 and stats["shards"] >= 1
    shown = console.export_text()
    assert "part 1/2" in shown and "MB/s" in shown and "docs/s" in shown and "tok/s" in shown and "100%" in shown
    (key / ".train.docs.npy.999999999.tmp").write_bytes(b"left by a killed merge")
    merge_cache(c, progress=False)
    assert not list(key.glob(".*.tmp"))
