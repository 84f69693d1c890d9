"""Small deterministic corpora and cache helpers shared by the data-path tests."""

import os
import random
from pathlib import Path

import numpy as np

from pretrain.config import DataConfig
from pretrain.data import held_out

MULTI = ["café", "naïve", "Zürich", "东京", "日本語", "😀", "🎉", "[MASK]", "<pad>", "<s>", "e.g.", "Mr."]


def make_docs(n_docs: int = 80, seed: int = 0) -> list[str]:
    """Deterministic documents of a few paragraphs of sentences, with accents, CJK, emoji and literal
    special strings."""
    rng = random.Random(seed)
    syl = ["ta", "ko", "ri", "men", "sol", "ex", "an", "der", "pro", "ver", "lin", "qu", "est", "ion"]
    words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 3))) for _ in range(250)]
    words += ["the", "of", "and", "a", "to", "in", "is"] * 10 + MULTI
    docs = []
    for _ in range(n_docs):
        paras = []
        for _ in range(rng.randint(1, 3)):
            sents = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(rng.randint(1, 4))]
            paras.append(" ".join(s[0].upper() + s[1:] + rng.choice([".", "!", "?"]) for s in sents))
        docs.append("\n\n".join(paras))
    return docs


def write_corpus(folder: Path, n_files: int = 4, docs_per_file: int = 60, seed: int = 0) -> list[str]:
    """n_files .txt files of one-paragraph documents (blank-line separated); returns all documents in order."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in range(n_files):
        docs = [d.replace("\n\n", " ") for d in make_docs(docs_per_file, seed=seed * 100 + f)]
        (folder / f"part{f:02d}.txt").write_text("\n\n".join(docs) + "\n")
        out += docs
    return out


def cfg_for(tmp_path, source, **kw) -> DataConfig:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataConfig(source=str(source), **kw)


def decoded_docs(prep) -> dict[str, list[str]]:
    """Every document of both splits, decoded from the cache."""
    out = {}
    for name in ("train", "valid"):
        s = prep.cache.split(name)
        out[name] = [prep.tokenizer.decode(s.tokens[s.doc_offsets[d]:s.doc_offsets[d + 1]]) for d in range(s.n_docs)]
    return out


def assert_round_trip(prep, docs: list[str], cfg: DataConfig) -> None:
    """Each split's decoded documents are exactly its documents, in corpus order."""
    is_valid = held_out(docs, cfg.valid_fraction, cfg.split_seed)
    got = decoded_docs(prep)
    assert got["train"] == [d for d, v in zip(docs, is_valid, strict=True) if not v]
    assert got["valid"] == [d for d, v in zip(docs, is_valid, strict=True) if v]


def split_arrays(cache) -> dict[str, np.ndarray]:
    """Every array of both splits as plain arrays (to compare caches whatever their shard layout)."""
    out = {}
    for name in ("train", "valid"):
        s = cache.split(name)
        for key in ("doc_offsets", "sent_offsets", "sent_doc", "doc_first_sent"):
            out[f"{name}.{key}"] = np.asarray(getattr(s, key))
        out[f"{name}.tokens"] = np.asarray(s.tokens)
        out[f"{name}.unigram"] = s.unigram_counts(cache.meta["vocab_size"])
    return out


def content_files(path: Path) -> dict[str, bytes]:
    """The bytes of every file of a cache folder that holds its content (not timings, locks or progress)."""
    skip = {"build.json", "progress.json", "lock.json"}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in skip}


def clean_env() -> dict:
    """The environment for a child Python that imports this checkout."""
    root = Path(__file__).resolve().parent.parent
    return {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
