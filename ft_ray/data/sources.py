"""Where real text comes from: the stdlib, local files, Hugging Face datasets, local tables.

Every source is streamed one `Document` at a time so that writing shards never holds the corpus.
Each document carries a stable id (a relative path, a file and row, a row index) because the
train/validation split is a hash of that id: the same corpus always splits the same way.
"""

from __future__ import annotations

import glob
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ft_ray.data.errors import DataError

GLOB_CHARS = set("*?[")
SOURCE_FORMS = "'stdlib', a glob of text files, 'hf:<name>[:<config>]' or a local dataset directory"


@dataclass(frozen=True)
class Document:
    id: str  # stable across runs: decides the document's split
    text: str


def iter_documents(source: str, column: str = "text") -> Iterator[Document]:
    """Stream the documents of `source`; raise DataError for an unknown or empty source.

    The source is resolved now, so an unknown one fails at the call, not at the first read.
    """
    return _non_empty(source, _resolve(source, column))


def _resolve(source: str, column: str) -> Iterable[Document]:
    if source == "stdlib":
        return _stdlib_documents()
    if source.startswith("hf:"):
        return _hf_documents(source[3:], column)
    if GLOB_CHARS & set(source):
        return _glob_documents(source)
    if Path(source).is_dir():
        return _directory_documents(Path(source), column)
    raise DataError(f"unknown source {source!r}: expected {SOURCE_FORMS}")


def _non_empty(source: str, docs: Iterable[Document]) -> Iterator[Document]:
    num = 0
    for doc in docs:
        num += 1
        yield doc
    if num == 0:
        raise DataError(f"source {source!r} produced no documents")


def _read_text(path: Path) -> str:
    """Text or code of any encoding: undecodable bytes become U+FFFD rather than an error."""
    return path.read_text(encoding="utf-8", errors="replace")


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library sources (~30 MB of real code), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    files = [p for p in root.rglob("*.py") if p.is_file() and not skip & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_documents() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():  # ids relative to the stdlib: the split is machine-independent
        yield Document(f"stdlib/{path.relative_to(root).as_posix()}", _read_text(path))


def _glob_documents(pattern: str) -> Iterator[Document]:
    for name in sorted(glob.glob(pattern, recursive=True)):
        path = Path(name)
        if path.is_file():
            yield Document(name, _read_text(path))


def _parse_hf(spec: str) -> tuple[str, str | None]:
    name, _, config = spec.partition(":")
    if not name:
        raise DataError(f"source 'hf:{spec}': expected hf:<name>[:<config>]")
    return name, config or None


def _hf_documents(spec: str, column: str) -> Iterator[Document]:
    """A Hugging Face dataset's train split, streamed (a hub name or a local dataset folder)."""
    import datasets  # slow import: only for this source

    name, config = _parse_hf(spec)
    try:
        rows = datasets.load_dataset(name, config, split="train", streaming=True)
    except Exception as e:  # hub, network and builder errors come in many types
        raise DataError(f"source 'hf:{spec}': cannot load dataset ({type(e).__name__}: {e})") from None
    for i, row in enumerate(rows):
        if i == 0:
            _require_column(column, list(row), f"hf:{spec}")
        yield Document(f"hf:{name}:{i}", _as_text(row[column], f"hf:{spec}", column, i))


def _require_column(column: str, available: list[str], where: str) -> None:
    if column not in available:
        raise DataError(f"{where}: no column {column!r} (available: {', '.join(available)}); "
                        "choose one with --column")


def _as_text(value: object, where: str, column: str, row: int) -> str:
    """Documents must be strings: a null or number is reported, never silently skipped."""
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} row {row} is {type(value).__name__}, not text")
    return value


def _directory_documents(root: Path, column: str) -> Iterator[Document]:
    if (root / "dataset_info.json").is_file() or (root / "state.json").is_file() \
            or (root / "dataset_dict.json").is_file():
        return _saved_dataset_documents(root, column)
    tables = sorted(root.glob("*.parquet")) + sorted(root.glob("*.arrow"))
    if not tables:
        raise DataError(f"source {str(root)!r}: directory has no *.parquet or *.arrow files and is "
                        "not a datasets save_to_disk folder")
    return _table_documents(tables, column)


def _saved_dataset_documents(root: Path, column: str) -> Iterator[Document]:
    """A `Dataset.save_to_disk` folder (memory-mapped, so iterating does not load it)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as e:
        raise DataError(f"{root}: cannot load saved dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{root}: saved DatasetDict has no 'train' split ({', '.join(ds)})")
        ds = ds["train"]
    _require_column(column, ds.column_names, str(root))
    for i, row in enumerate(ds.select_columns([column])):
        yield Document(f"row:{i}", _as_text(row[column], str(root), column, i))


def _record_batches(path: Path, column: str) -> Iterator[pa.RecordBatch]:
    """Stream one column of a Parquet or Arrow (IPC stream or file) table in batches."""
    try:
        if path.suffix == ".parquet":
            f = pq.ParquetFile(path)
            _require_column(column, f.schema_arrow.names, str(path))
            yield from f.iter_batches(batch_size=1024, columns=[column])
            return
        with open(path, "rb") as fh:
            try:
                reader = pa.ipc.open_stream(fh)  # what datasets writes
            except pa.ArrowInvalid:
                fh.seek(0)
                reader = pa.ipc.open_file(fh)
                reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in reader:
                _require_column(column, batch.schema.names, str(path))
                yield batch.select([column])
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot read table ({e})") from None


def _table_documents(paths: list[Path], column: str) -> Iterator[Document]:
    for path in paths:
        row = 0
        for batch in _record_batches(path, column):
            for value in batch.column(0).to_pylist():
                yield Document(f"{path.name}:{row}", _as_text(value, str(path), column, row))
                row += 1
