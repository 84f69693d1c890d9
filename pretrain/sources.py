"""The two sources that are not local text files: the built-in corpus and a `datasets` dataset.

Both give "values" pieces (strings already parsed) through the same `Source` interface as local files
(pretrain/stream.py), so chunking, resuming and parts work the same way:
  - the built-in corpus is read file by file of the standard library (pretrain/corpus.py); a part is a
    contiguous range of its files, a position the next file to read;
  - a dataset is streamed, never downloaded whole: a hub name or a folder `datasets` understands through
    `datasets.load_dataset_builder(...).as_streaming_dataset(split)` (what `load_dataset(..., streaming=True)`
    does), a `save_to_disk` folder through `load_from_disk` (memory-mapped Arrow, read by batch). A part is
    `IterableDataset.shard(N, I, contiguous=True)` over its data files (or contiguous rows of a saved
    dataset), a position the rows already read (`skip` restarts there). nanochat's `nanochat/dataloader.py`
    streams Parquet shards the same way.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.errors import UserError
from pretrain.stream import CHUNK_BYTES, Source, _chunks, _rows_cut, sha_json
from pretrain.text import Piece

if TYPE_CHECKING:
    from pretrain.config import DataConfig

DATASET_BATCH = 1000  # rows asked of `datasets` at once


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (its .json files are metadata)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


class BuiltinSource(Source):
    """The built-in corpus: the standard library's docstrings, one source file at a time."""

    kind, unit = "builtin", "files"

    def __init__(self):
        from pretrain import corpus

        super().__init__(f"built-in {corpus.CORPUS_NAME} (Python {platform.python_version()})",
                         corpus.corpus_fingerprint())
        self.paths = corpus.source_files()
        self._sizes = [p.stat().st_size for p in self.paths]
        self._docs: dict[int, list[str]] = {}  # parsed once: the corpus is a fixed 1.5 MB, read up to 3 times

    def sizes(self) -> list[int]:
        """Bytes of each source file."""
        return self._sizes

    def documents(self, i: int) -> list[str]:
        """The documents of source file i (parsed with `ast` on first use)."""
        from pretrain import corpus

        if i not in self._docs:
            self._docs[i] = corpus.file_documents(self.paths[i])
        return self._docs[i]

    def chunks(self, part=(0, 1), start=None):
        """The docstrings of the part's files, a "values" piece per file; a position is the next file."""
        lo, hi = self.part_range(part)
        start = start or {"chunk": 0, "file": lo}

        def items():
            """(piece, units, position after, ends a file) per source file."""
            for i in range(start["file"], hi):
                yield Piece("values", str(self.paths[i]), self.documents(i), 0, True), self._sizes[i], \
                    {"file": i + 1}, False

        return _chunks(items(), start)


def _load_errors() -> tuple[type[BaseException], ...]:
    """What `datasets` raises for a dataset it cannot find, fetch, build or decode: its own DatasetsError, the
    hub's HTTP errors and missing files (OSError), a bad config or split name (ValueError, KeyError), a loading
    script that fails (ImportError, RuntimeError), a file that is no such format (pyarrow's ArrowException).
    Anything else is a bug, and shows as one."""
    import datasets.exceptions
    import pyarrow

    return (datasets.exceptions.DatasetsError, OSError, ValueError, KeyError, ImportError, RuntimeError,
            pyarrow.ArrowException)


class DatasetSource(Source):
    """A `datasets` dataset, streamed by batch of rows (see the module docstring)."""

    kind = "dataset"

    def __init__(self, cfg: DataConfig, name: str):
        self.cfg, self.name, self.saved, self.builder = cfg, name, None, None
        try:
            import datasets

            if Path(name).is_dir() and is_saved_dataset(Path(name)):
                ds = datasets.load_from_disk(name)
                self.saved = ds[cfg.dataset_split] if isinstance(ds, datasets.DatasetDict) else ds
                fp = self.saved._fingerprint
            else:
                self.builder = datasets.load_dataset_builder(name, cfg.dataset_config or None)
                fp = self.builder.hash
        except _load_errors() as e:  # the hub, a script or a loader: keep the first line of what it says
            raise self._error("could not load", e) from None
        if self.saved is not None and cfg.text_field not in self.saved.column_names:
            raise self._no_column(self.saved.column_names)
        desc = f"dataset {name}" + (f" ({cfg.dataset_config})" if cfg.dataset_config else "") + \
            f" [{cfg.dataset_split}]"
        super().__init__(desc, sha_json({"dataset": name, "config": cfg.dataset_config, "split": cfg.dataset_split,
                                         "fingerprint": fp, "text_field": cfg.text_field}))
        self._stream = None

    def _error(self, what: str, e: Exception) -> UserError:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if Path(self.name).is_dir():
            return UserError(f"the folder {self.name} holds no .txt, .jsonl, .json or .parquet file, and `datasets` "
                             f"{what.replace('could not ', 'cannot ')} it either ({msg}); give a folder of text files")
        return UserError(f"{what} dataset {self.name!r} (config {self.cfg.dataset_config or 'default'!r}, split "
                         f"{self.cfg.dataset_split!r}): {msg}; check the name, data.dataset_config and "
                         "data.dataset_split, or give a local path")

    def _no_column(self, columns) -> UserError:
        return UserError(f"dataset {self.name!r} has no column {self.cfg.text_field!r} (columns: "
                         f"{', '.join(map(str, columns))}); use --set data.text_field=NAME")

    def stream(self):
        """The split as an IterableDataset (opened once), or the saved Dataset."""
        if self.saved is not None:
            return self.saved
        if self._stream is None:
            try:
                self._stream = self.builder.as_streaming_dataset(split=self.cfg.dataset_split)
            except _load_errors() as e:
                raise self._error("could not stream", e) from None
        return self._stream

    def sizes(self) -> list[int]:
        """Units of a part: the data files of a stream (a saved dataset is split by rows instead)."""
        return [1] * self.stream().n_shards

    def check_part(self, part):
        """UserError when the dataset has fewer data files (or rows) than parts."""
        self._part(part)

    def _part(self, part: tuple[int, int]):
        index, count = part
        ds = self.stream()
        if count == 1:
            return ds
        if self.saved is not None:
            if len(ds) < count:
                raise UserError(f"--part I/{count} needs at least {count} rows, but the dataset has {len(ds)}")
            return ds.shard(num_shards=count, index=index, contiguous=True)
        self.part_range(part)  # UserError when it has fewer data files than parts
        return ds.shard(num_shards=count, index=index, contiguous=True)

    def total(self, part):
        """Rows of the part, when the dataset says how many it has."""
        if self.saved is not None:
            return len(self._part(part))
        splits = self.builder.info.splits or {}
        info = splits.get(self.cfg.dataset_split) if hasattr(splits, "get") else None
        return info.num_examples // part[1] if info is not None and info.num_examples else None

    def chunks(self, part=(0, 1), start=None):
        """Rows of the part by batch, cut at CHUNK_BYTES characters; a position is the rows read."""
        start = start or {"chunk": 0, "row": 0}
        return _chunks(self._items(part, start["row"]), start)

    def _items(self, part: tuple[int, int], row: int):
        ds, field, where = self._part(part), self.cfg.text_field, f"dataset {self.name!r}"
        if ds.column_names is not None and field in ds.column_names:
            ds = ds.select_columns([field])  # only the text is converted to Python
        if row:
            ds = ds.skip(row)
        pending, done = [], row
        try:
            for batch in ds.iter(batch_size=DATASET_BATCH):
                if field not in batch:
                    raise self._no_column(batch)
                pending += batch[field]
                while pending and (k := _rows_cut(pending, CHUNK_BYTES)) < len(pending):
                    yield Piece("values", where, pending[:k], done, done == 0), k, {"row": done + k}, False
                    done, pending = done + k, pending[k:]
        except UserError:
            raise
        except _load_errors() as e:  # a file the stream could not fetch or decode
            raise self._error("could not read", e) from None
        if pending:
            yield Piece("values", where, pending, done, done == 0), len(pending), {"row": done + len(pending)}, False
