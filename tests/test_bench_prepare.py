"""The data-path benchmark's corpus: the built-in corpus repeated with per-copy word changes, cut at documents."""

import pytest

from benchmarks.prepare import corpus_file, parse_size
from pretrain.errors import UserError


def test_generated_corpus_has_the_size_changes_words_per_copy_and_cuts_at_documents(tmp_path):
    assert parse_size("20MB") == 20_000_000 and parse_size("1gb") == 10**9 and parse_size("1.5 KB") == 1500
    with pytest.raises(UserError, match="must look like 20MB"):
        parse_size("lots")
    big = corpus_file(tmp_path, 4_000_000, None)
    text = big.read_bytes()
    assert 3_990_000 < len(text) <= 4_000_000 and text.endswith(b"\n\n")
    copies = text.decode().split("\n\n")
    first = copies[:6000]
    second_start = next(i for i in range(6000, len(copies)) if copies[i].split()[:3] == first[0].split()[:3])
    second = copies[second_start:second_start + 6000]
    assert sum(a != b for a, b in zip(first, second, strict=True)) > 3000  # most documents differ between copies
    assert sum(a.split()[:1] == b.split()[:1] for a, b in zip(first, second, strict=True)) > 1000  # same documents
    small = corpus_file(tmp_path, 1_000_000, big)
    assert text.startswith(small.read_bytes()) and small.read_bytes().endswith(b"\n\n")
    assert corpus_file(tmp_path, 4_000_000, None).stat().st_mtime_ns == big.stat().st_mtime_ns  # reused
