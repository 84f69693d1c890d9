"""Tests of the downstream probe (pretrain/probe.py, pretrain/probe_data.py, `pretrain probe`): the built-in task
and its split by module, a leak detector (labels drawn per module cannot be predicted across the split, and are
when the split is by docstring), every arrangement and pooling, a user's labeled files, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import TINY, sets, write_corpus
from typer.testing import CliRunner

from pretrain.cli import app
from pretrain.errors import UserError
from pretrain.probe import ProbeConfig, Reader, _features, fine_tune, linear_probe, probe_config, scores
from pretrain.probe_data import Examples, split, stdlib_packages
from pretrain.run import load

runner = CliRunner()
FAST = ["probe.classes=4", "probe.max_per_class=24", "probe.steps=3", "probe.linear_steps=20", "probe.seeds=2",
        "probe.max_len=24"]
ENC_DEC = ["model.n_dec_layers=1", "model.positions=relative", "model.rel_buckets=8", "model.rel_max_distance=16"]


@pytest.fixture(scope="module")
def packages() -> Examples:
    return stdlib_packages(12)


def test_the_builtin_task_is_top_level_packages_split_by_module(packages):
    ex = packages
    assert 10 <= len(ex.classes) <= 20 and len(set(ex.classes)) == len(ex.classes)
    for text, label, group in zip(ex.texts[::50], ex.labels[::50], ex.groups[::50], strict=True):
        assert group.split("/")[0] == ex.classes[label] and group.endswith(".py") and len(text) >= 40
    train, test = split(ex, 0.25, 0, 160)
    assert not set(train.groups) & set(test.groups)  # no module on both sides
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(len(ex.classes)))
    assert np.bincount(train.labels).max() <= 160 and np.bincount(test.labels).max() <= 40
    again = split(ex, 0.25, 0, 160)  # the same split every time (every run and seed is scored on it)
    assert again[0].texts == train.texts and again[1].texts == test.texts
    other = split(ex, 0.25, 1, 160)
    assert other[1].groups != test.groups


def test_scores_and_majority():
    gold = np.array([0, 0, 1, 1, 2, 2])
    assert scores(gold.copy(), gold) == {"acc": 1.0, "macro_f1": 1.0}
    s = scores(np.zeros(6, int), gold)
    assert s["acc"] == pytest.approx(1 / 3) and s["macro_f1"] == pytest.approx(0.5 / 3)  # class 0: P 1/3, R 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny runs of every arrangement (two steps each) on one small corpus and one cache."""
    root = tmp_path_factory.mktemp("probe_runs")
    corpus = write_corpus(root, n_docs=120)
    out = {}
    for name, args, extra in (("clm", ["--objective", "clm"], []), ("mlm", ["--objective", "mlm"], []),
                              ("span", ["--objective", "span"], ENC_DEC), ("ul2", ["--recipe", "ul2-tiny"], ENC_DEC)):
        res = runner.invoke(app, ["run", *args, "--data", str(corpus), "--out", str(root / name), "--max-steps", "2",
                                  *sets(*TINY, f"data.cache_dir={root / 'cache'}", "train.precision=fp32", *extra)])
        assert res.exit_code == 0, res.output
        out[name] = root / name
    return out


def test_labels_drawn_per_module_are_not_learnable_across_the_split(runs, packages):
    """A leak detector for the whole probe: give every module a random label. Kept on one side of the split, a
    module's label cannot be learned from other modules, so the probe scores near the majority class; a probe
    that saw the test rows (what a leak amounts to) fits them and scores well above it."""
    rng = np.random.default_rng(0)
    modules = sorted(set(packages.groups))
    coin = dict(zip(modules, rng.integers(0, 3, len(modules)).tolist(), strict=True))
    ex = Examples(packages.texts, np.array([coin[g] for g in packages.groups]), packages.groups, ["a", "b", "c"])
    loaded = load(runs["clm"])
    pc = ProbeConfig(max_len=48, linear_steps=400, mode="")
    from pretrain.runtime import setup_runtime

    reader, rt = Reader(loaded, pc), setup_runtime(loaded.cfg.train)
    train, test = split(ex, 0.3, 0, 40)
    assert not set(train.groups) & set(test.groups)
    feats = _features(loaded.model, reader, reader.encode(train.texts + test.texts), rt)
    n = len(train.texts)
    honest = scores(linear_probe(feats, train.labels, n, pc, 0), test.labels)["acc"]
    everything = np.concatenate([train.labels, test.labels])  # the leak: test rows in the training set
    leaked = scores(_in_sample(feats, everything, pc)[n:], test.labels)["acc"]
    majority = float((test.labels == np.bincount(train.labels).argmax()).mean())
    assert honest < max(majority, 1 / 3) + 0.1, (honest, majority)
    assert leaked > honest + 0.15, (leaked, honest)


def _in_sample(feats, labels, pc):
    """Predictions of a linear probe trained on every row, for every row (rows n: are the test rows)."""
    import torch

    x = torch.cat([feats, feats])  # linear_probe predicts the rows after n_train: predict all of them
    return linear_probe(x, labels, len(labels), pc, 0)


@pytest.mark.parametrize("name", ["clm", "mlm", "span", "ul2"])
def test_every_arrangement_is_probed_through_the_cli(runs, name):
    res = runner.invoke(app, ["probe", str(runs[name]), *sets(*FAST)])
    assert res.exit_code == 0, res.output
    out = json.loads((runs[name] / "probe-stdlib-packages.json").read_text())
    assert out["pooling"] == {"clm": "last", "mlm": "first", "span": "mean", "ul2": "mean"}[name]
    assert out["mode"] == ("[NLU]" if name == "ul2" else None)
    assert len(out["classes"]) == 4 and out["n_test"] > 0 and out["train_groups"] > 0
    for who in ("run", "random_init"):
        for how in ("linear", "finetune"):
            f = out[who][how]
            assert len(f["seeds"]) == 2 and 0 <= f["acc"] <= 1 and 0 <= f["macro_f1"] <= 1 and f["acc_std"] >= 0
    assert 0 < out["majority"]["acc"] < 0.5 and "majority class" in res.output and "random init" in res.output


def test_pooling_choices_and_the_report(runs, tmp_path):
    loaded = load(runs["clm"])
    with pytest.raises(UserError, match="first token"):
        Reader(loaded, ProbeConfig(pooling="first"))
    res = runner.invoke(app, ["probe", str(runs["mlm"]), *sets(*FAST, "probe.pooling=mean", "probe.seeds=1",
                                                                "probe.random_init=false")])
    assert res.exit_code == 0, res.output
    out = json.loads((runs["mlm"] / "probe-stdlib-packages.json").read_text())
    assert out["pooling"] == "mean" and "random_init" not in out
    res = runner.invoke(app, ["report", str(runs["mlm"]), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "stdlib-packages: linear" in (tmp_path / "rep" / "report.md").read_text()


def test_a_users_labeled_files(runs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = [{"review": f"the model {w} text number {i}", "stars": w, "doc": i // 3}
            for i, w in enumerate(rng.choice(["good", "bad", "odd"], 90))]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    for f in ("r.jsonl", "r.parquet"):
        res = runner.invoke(app, ["probe", str(runs["span"]), "--data", str(tmp_path / f), *sets(
            *FAST, "probe.text_field=review", "probe.label_field=stars", "probe.group_field=doc")])
        assert res.exit_code == 0, res.output
        out = json.loads((runs["span"] / "probe-r.json").read_text())
        assert out["classes"] == ["bad", "good", "odd"] and out["task"] == "r"
        # the word is the label: the run and the control both learn it from 60 examples
        assert out["run"]["linear"]["acc"] > 0.6


def test_bad_probe_input_is_one_line(runs, tmp_path):
    (tmp_path / "one.jsonl").write_text("\n".join(json.dumps({"text": f"t {i}", "label": "x"}) for i in range(9)))
    (tmp_path / "nolabel.jsonl").write_text("\n".join(json.dumps({"text": f"t {i}"}) for i in range(9)))
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\nnot json\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "x.csv").write_text("text,label\n")
    cases = [(["--data", str(tmp_path / "one.jsonl")], "one class"),
             (["--data", str(tmp_path / "nolabel.jsonl")], "has no 'label'"),
             (["--data", str(tmp_path / "bad.jsonl")], "line 2 is not JSON"),
             (["--data", str(tmp_path / "empty.jsonl")], "no labeled rows"),
             (["--data", str(tmp_path / "x.csv")], ".jsonl or .parquet"),
             (["--data", str(tmp_path / "missing.jsonl")], "is not a file"),
             (["--task", "sentiment"], "unknown probe task"),
             (["--task", "stdlib-packages", "--data", str(tmp_path / "one.jsonl")], "not both"),
             (["--set", "train.lr=1"], "probe.KEY=VALUE"),
             (["--set", "probe.stepz=3"], "unknown key 'probe.stepz'"),
             (["--set", "probe.mode=[S2S]"], "without the mode token")]
    for args, words in cases:
        res = runner.invoke(app, ["probe", str(runs["clm"]), *args])
        assert res.exit_code == 2, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output, res.output
        assert words in res.output, (words, res.output)
    with pytest.raises(UserError, match="probe.classes"):
        probe_config(["probe.classes=1"])


def test_fine_tuning_learns_an_easy_task(runs):
    """Full fine-tuning moves the model: on labels that are a word of the text it beats the majority class."""
    loaded = load(runs["mlm"])
    from pretrain.runtime import setup_runtime

    pc = ProbeConfig(steps=60, lr=3e-3, batch_size=16, max_len=16, mode="")
    reader, rt = Reader(loaded, pc), setup_runtime(loaded.cfg.train)
    words = ["model", "text", "loss"]
    texts = [f"the {words[i % 3]} reads" for i in range(120)]
    y = np.arange(120) % 3
    rows = reader.encode(texts)
    feats = _features(loaded.model, reader, rows[:90], rt)
    stats = feats.mean(0), feats.std(0).clamp_min(1e-6)
    pred = fine_tune(loaded.model, reader, (rows[:90], y[:90], rows[90:], stats), pc, 0, rt)
    assert scores(pred, y[90:])["acc"] > 0.6
