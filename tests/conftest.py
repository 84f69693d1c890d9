"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest (and least disturbed by a loaded machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small English-like corpus file (tests/tiny_runs.py); test_cli.py's own fixture gives its folder."""
    from tiny_runs import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A token-cache folder shared by a module's tiny runs."""
    return tmp_path_factory.mktemp("cache")
