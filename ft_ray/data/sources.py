"""Where real text comes from: the stdlib, local files, Hugging Face datasets, local tables.

Every source is streamed one `Document` at a time so that writing shards never holds the corpus.
Each document carries a stable id (a relative path, a file and row, a row index) because the
train/validation split is a hash of that id: the same corpus always splits the same way.
Binary files met by the file sources (a glob, the stdlib) are skipped, not tokenized, and
counted on the stream, so the manifest and the final report say how many were left out.
"""

from __future__ import annotations

import glob
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ft_ray.data.errors import DataError

GLOB_CHARS = set("*?[")
SOURCE_FORMS = "'stdlib', a glob of text files, 'hf:<name>[:<config>]' or a local dataset directory"
BINARY_SNIFF_BYTES = 8192  # a NUL byte in the head of a file marks it binary (as git and grep do)
BINARY_REPLACEMENT_FRACTION = 0.3  # more U+FFFD than this in non-UTF-8 text: binary, not text
NUM_SKIPPED_EXAMPLES = 5


@dataclass(frozen=True)
class Document:
    id: str  # stable across runs: decides the document's split
    text: str


@dataclass
class Skipped:
    """Files a source passed over instead of tokenizing, counted while it streams."""

    num_binary: int = 0
    examples: list[str] = field(default_factory=list)  # the first few ids, to look at

    def add_binary(self, doc_id: str) -> None:
        self.num_binary += 1
        if len(self.examples) < NUM_SKIPPED_EXAMPLES:
            self.examples.append(doc_id)

    def to_manifest(self) -> dict:
        return {"binary": self.num_binary, "examples": list(self.examples)}


class DocumentStream(Iterator[Document]):
    """The documents of one source, one at a time; `skipped` counts what it left out so far."""

    def __init__(self, source: str, column: str):
        self.source, self.skipped = source, Skipped()
        self._docs = _non_empty(source, _resolve(source, column, self.skipped), self.skipped)

    def __next__(self) -> Document:
        return next(self._docs)


def iter_documents(source: str, column: str = "text") -> DocumentStream:
    """Stream the documents of `source`; raise DataError for an unknown or empty source.

    The source is resolved now, so an unknown one fails at the call, not at the first read.
    """
    return DocumentStream(source, column)


def _resolve(source: str, column: str, skipped: Skipped) -> Iterable[Document]:
    if source == "stdlib":
        return _stdlib_documents(skipped)
    if source.startswith("hf:"):
        return _hf_documents(source[3:], column)
    if GLOB_CHARS & set(source):
        return _glob_documents(source, skipped)
    if Path(source).is_dir():
        return _directory_documents(Path(source), column)
    raise DataError(f"unknown source {source!r}: expected {SOURCE_FORMS}")


def _non_empty(source: str, docs: Iterable[Document], skipped: Skipped) -> Iterator[Document]:
    num = 0
    for doc in docs:
        num += 1
        yield doc
    if num == 0 and skipped.num_binary:
        raise DataError(f"source {source!r} produced no text documents: "
                        f"{skipped.num_binary} binary files skipped")
    if num == 0:
        raise DataError(f"source {source!r} produced no documents")


def _read_text(path: Path) -> str | None:
    """Text or code of any encoding, or None for a binary file.

    Undecodable bytes become U+FFFD rather than an error (a latin-1 comment is still code), but
    a file that is mostly undecodable, or holds a NUL byte, is not text: tokenizing it would
    teach the model noise.
    """
    with open(path, "rb") as f:
        head = f.read(BINARY_SNIFF_BYTES)
        if b"\0" in head:
            return None  # before reading the rest: binaries can be large
        data = head + f.read()
    try:
        return _universal_newlines(data.decode("utf-8"))
    except UnicodeDecodeError:
        text = _universal_newlines(data.decode("utf-8", errors="replace"))
    return None if text.count("\ufffd") > BINARY_REPLACEMENT_FRACTION * len(text) else text


def _universal_newlines(text: str) -> str:
    """What Path.read_text (text mode) does: the same corpus keeps giving the same tokens."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _file_documents(paths: Iterable[tuple[str, Path]], skipped: Skipped) -> Iterator[Document]:
    """(id, path) pairs -> documents of the text files; binary ones are counted in `skipped`."""
    for doc_id, path in paths:
        text = _read_text(path)
        if text is None:
            skipped.add_binary(doc_id)
        else:
            yield Document(doc_id, text)


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library sources (~30 MB of real code), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    files = [p for p in root.rglob("*.py") if p.is_file() and not skip & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_documents(skipped: Skipped) -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # ids relative to the stdlib: the split is machine-independent
    paths = ((f"stdlib/{path.relative_to(root).as_posix()}", path) for path in stdlib_files())
    yield from _file_documents(paths, skipped)


def _glob_documents(pattern: str, skipped: Skipped) -> Iterator[Document]:
    names = sorted(glob.glob(pattern, recursive=True))  # on the first read, like every source
    yield from _file_documents(((name, Path(name)) for name in names if Path(name).is_file()), skipped)


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
