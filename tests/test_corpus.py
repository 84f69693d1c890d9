"""The built-in corpus: standard-library docstrings read with ast, doctests dropped, deterministic."""

import textwrap

import pytest

from pretrain import corpus


@pytest.fixture(scope="module")
def docs():
    return corpus.stdlib_documents()


def test_builtin_corpus_is_large_clean_and_deterministic(docs):
    n_bytes = sum(len(d.encode()) for d in docs)
    assert n_bytes > 1_000_000, n_bytes
    assert len(docs) > 1000
    assert all(len(d) >= corpus.MIN_CHARS for d in docs)
    lines = [line.lstrip() for d in docs for line in d.split("\n")]
    assert not any(line.startswith(">>>") for line in lines)
    assert all(d == d.strip() and "\n\n\n" not in d for d in docs)
    assert any("\n\n" in d for d in docs)  # paragraphs kept for the sentence splitter
    assert corpus.stdlib_documents() == docs


def test_corpus_info_hashes_the_given_documents(docs):
    info = corpus.corpus_info(docs)
    assert info["name"] == "python-stdlib-docstrings"
    assert info["documents"] == len(docs) and info["bytes"] == sum(len(d.encode()) for d in docs)
    assert len(info["sha256"]) == 64
    assert corpus.corpus_info(docs[:-1])["sha256"] != info["sha256"]
    assert corpus.corpus_fingerprint() == corpus.corpus_fingerprint()


def test_drop_doctests_removes_examples_and_their_output():
    text = textwrap.dedent("""\
        Add two numbers.

        >>> add(1,
        ...     2)
        3
        >>> add(0, 0)
        0

        The result is an int.
        ... an ellipsis in prose stays.""")
    assert corpus.drop_doctests(text) == "Add two numbers.\n\nThe result is an int.\n... an ellipsis in prose stays."


def test_extraction_rules_on_a_fake_stdlib(tmp_path, monkeypatch):
    long = "This docstring is long enough to be kept as one document."
    (tmp_path / "mod.py").write_text(
        f'"""Module: {long}\n\n    Second paragraph.\n    """\n'
        f'class A:\n    """\n    Class: {long}\n\n    >>> A()\n    A\n    """\n'
        f'    def f(self):\n        """Short."""\n'
        f'async def g():\n    """Function: {long}"""\n'
    )
    for skipped in ("tests/x.py", "test_mod.py", "site-packages/y.py", "idlelib/z.py"):
        (tmp_path / skipped).parent.mkdir(exist_ok=True)
        (tmp_path / skipped).write_text(f'"""Skipped: {long}"""\n')
    (tmp_path / "broken.py").write_text("def (:\n")  # unparsable files are skipped, not fatal
    monkeypatch.setattr(corpus, "stdlib_dir", lambda: tmp_path)
    got = corpus.stdlib_documents()
    assert got == [f"Module: {long}\n\nSecond paragraph.", f"Class: {long}", f"Function: {long}"]
    before = corpus.corpus_fingerprint()
    (tmp_path / "mod.py").write_text((tmp_path / "mod.py").read_text() + "\n# changed size\n")
    assert corpus.corpus_fingerprint() != before


def test_documents_file_by_file_concatenate_to_the_corpus(tmp_path, monkeypatch):
    long = "This docstring is long enough to be kept as one document."
    for name in ("a.py", "b.py", "sub/c.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(f'"""{name}: {long}"""\ndef f():\n    """In {name}: {long}"""\n')
    monkeypatch.setattr(corpus, "stdlib_dir", lambda: tmp_path)
    files = corpus.source_files()
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a.py", "b.py", "sub/c.py"]
    per_file = [corpus.file_documents(p) for p in files]
    assert [len(d) for d in per_file] == [2, 2, 2]
    assert [d for docs in per_file for d in docs] == corpus.stdlib_documents()
    assert corpus.file_documents(tmp_path / "missing.py") == []
