"""Where real text comes from: the stdlib, local files, Hugging Face datasets, local tables.

Every source is streamed one `Document` at a time so that writing shards never holds the corpus.
Each document carries a stable id (a relative path, a file and row, a row index) because the
train/validation split is a hash of that id: the same corpus always splits the same way.
Binary files met by the file sources (a glob, the stdlib) are skipped, not tokenized, and
counted on the stream, so the manifest and the final report say how many were left out; so are
empty documents (an empty file or table cell: nothing to learn), while a file that cannot be read
is an error naming it.

Local sources are lists of `Piece`s (a file, a Parquet row group, a range of rows of a saved
dataset), read in order: `list_pieces` names them cheaply (listing, Parquet footers) and
`read_piece` reads one. The single-process writer reads them one after the other; the Ray Data
pipeline (prepare.py) reads them in parallel and gets the same documents in the same order.
"""

from __future__ import annotations

import functools
import glob
import json
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
TABLE_BATCH_ROWS = 1024  # rows of a table read at once
SAVED_PIECE_ROWS = 16384  # rows of a save_to_disk dataset that make one piece


@dataclass(frozen=True)
class Document:
    id: str  # stable across runs: decides the document's split
    text: str


@dataclass
class Skipped:
    """Documents a source passed over instead of tokenizing, counted while it streams."""

    num_binary: int = 0
    examples: list[str] = field(default_factory=list)  # the first few binary ids, to look at
    num_empty: int = 0
    empty_examples: list[str] = field(default_factory=list)

    def add_binary(self, doc_id: str) -> None:
        self.num_binary += 1
        if len(self.examples) < NUM_SKIPPED_EXAMPLES:
            self.examples.append(doc_id)

    def add_empty(self, doc_id: str) -> None:
        self.num_empty += 1
        if len(self.empty_examples) < NUM_SKIPPED_EXAMPLES:
            self.empty_examples.append(doc_id)

    def merge(self, other: dict) -> None:
        """Add counts of a later part of the stream (`to_manifest` form): examples stay the first."""
        self.num_binary += other["binary"]
        self.examples = (self.examples + other["examples"])[:NUM_SKIPPED_EXAMPLES]
        self.num_empty += other.get("empty", 0)
        self.empty_examples = (self.empty_examples + other.get("empty_examples", []))[:NUM_SKIPPED_EXAMPLES]

    def to_manifest(self) -> dict:
        out = {"binary": self.num_binary, "examples": list(self.examples)}
        if self.num_empty:  # only then: sets without empty documents keep their manifest as it was
            out |= {"empty": self.num_empty, "empty_examples": list(self.empty_examples)}
        return out


@dataclass(frozen=True)
class Piece:
    """A part of a local source read in one go; pieces in order give the source's documents."""

    kind: str  # file | parquet (a row group) | arrow | jsonl (a whole file) | saved (rows) | hf-part
    path: str
    name: str  # "file": the document id; tables: ids are f"{name}:{row}"
    index: int = 0  # parquet: the row group
    first_row: int = 0  # the row (within its file, or a saved dataset) the piece starts at
    num_rows: int | None = None  # None: known only by reading (arrow, jsonl)
    num_bytes: int = 0  # on disk (a share of the file for row groups and row ranges)


class DocumentStream(Iterator[Document]):
    """The documents of one source, one at a time; `skipped` counts what it left out so far.

    `max_doc_bytes` refuses (DataError naming it) a larger document (a file's size, a table
    cell's characters): tokenizing one document costs ~130 bytes of memory per character.
    """

    def __init__(self, source: str, column: str, max_doc_bytes: int | None = None):
        self.source, self.skipped = source, Skipped()
        self._docs = _non_empty(source, _resolve(source, column, self.skipped, max_doc_bytes), self.skipped)

    def __next__(self) -> Document:
        return next(self._docs)


def iter_documents(source: str, column: str = "text", max_doc_bytes: int | None = None) -> DocumentStream:
    """Stream the documents of `source`; raise DataError for an unknown or empty source.

    The source is resolved now, so an unknown one fails at the call, not at the first read.
    """
    return DocumentStream(source, column, max_doc_bytes)


def _resolve(source: str, column: str, skipped: Skipped, max_doc_bytes: int | None) -> Iterable[Document]:
    if source.startswith("hf:"):
        return _checked(_hf_documents(source[3:], column), skipped, max_doc_bytes)
    check_local_source(source)

    def lazily() -> Iterator[Document]:  # listing (globbing, footers) on the first read
        yield from read_pieces(list_pieces(source, column), column, skipped, max_doc_bytes)

    return lazily()


def check_local_source(source: str) -> None:
    """Raise DataError now for a source that is not one of SOURCE_FORMS (hf: excluded)."""
    if source == "stdlib" or GLOB_CHARS & set(source):
        return
    root = Path(source)
    if not root.is_dir():
        raise DataError(f"unknown source {source!r}: expected {SOURCE_FORMS}")
    if not _is_saved_dataset(root) and not _table_files(root):
        raise DataError(f"source {str(root)!r}: directory has no *.parquet, *.arrow or *.jsonl files "
                        "and is not a datasets save_to_disk folder")


def _non_empty(source: str, docs: Iterable[Document], skipped: Skipped) -> Iterator[Document]:
    num = 0
    for doc in docs:
        num += 1
        yield doc
    if num == 0 and (skipped.num_binary or skipped.num_empty):
        raise DataError(f"source {source!r} produced no text documents: {describe_skipped(skipped)}")
    if num == 0:
        raise DataError(f"source {source!r} produced no documents")


def describe_skipped(skipped: Skipped) -> str:
    parts = [f"{skipped.num_binary} binary files"] if skipped.num_binary else []
    parts += [f"{skipped.num_empty} empty documents"] if skipped.num_empty else []
    return " and ".join(parts) + " skipped"


def _checked(docs: Iterable[Document], skipped: Skipped, max_doc_bytes: int | None) -> Iterator[Document]:
    """Skip (and count) empty documents; refuse one larger than `max_doc_bytes`."""
    for doc in docs:
        if not doc.text:
            skipped.add_empty(doc.id)
            continue
        if max_doc_bytes is not None and len(doc.text) > max_doc_bytes:
            raise too_large(doc.id, len(doc.text), max_doc_bytes)
        yield doc


def too_large(doc_id: str, size: int, limit: int) -> DataError:
    return DataError(f"document {doc_id} is {size / 2**20:.3g} MiB, more than --max-doc-mb "
                     f"{limit / 2**20:.3g} allows (tokenizing it would take ~{size * 130 / 2**30:.2g} GiB "
                     "at once): split it, leave it out, or raise the limit")


# --- pieces: listing and reading local sources ------------------------------------------------


def list_pieces(source: str, column: str = "text") -> list[Piece]:
    """The pieces of a local source in reading order (no text is read: listings and footers)."""
    check_local_source(source)
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        # ids relative to the stdlib: the split is machine-independent
        return [_file_piece(p, f"stdlib/{p.relative_to(root).as_posix()}") for p in stdlib_files()]
    if GLOB_CHARS & set(source):
        names = sorted(glob.glob(source, recursive=True))
        return [_file_piece(Path(n), n) for n in names if Path(n).is_file()]
    root = Path(source)
    if _is_saved_dataset(root):
        return _saved_pieces(root, column)
    pieces = []
    for path in _table_files(root):
        pieces += _parquet_pieces(path, column) if path.suffix == ".parquet" else \
            [Piece(path.suffix[1:], str(path), path.name, num_bytes=path.stat().st_size)]
    return pieces


def read_pieces(pieces: Iterable[Piece], column: str, skipped: Skipped,
                max_doc_bytes: int | None = None) -> Iterator[Document]:
    for piece in pieces:
        yield from read_piece(piece, column, skipped, max_doc_bytes)


def read_piece(piece: Piece, column: str, skipped: Skipped, max_doc_bytes: int | None = None) -> Iterator[Document]:
    """The piece's documents; binary files and empty documents are counted in `skipped`."""
    if piece.kind == "file":
        if max_doc_bytes is not None and piece.num_bytes > max_doc_bytes:
            raise too_large(piece.name, piece.num_bytes, max_doc_bytes)  # before reading it
        text = _read_text(Path(piece.path))
        if text is None:
            skipped.add_binary(piece.name)
            return iter(())
        docs: Iterable[Document] = [Document(piece.name, text)]
    else:
        docs = _table_piece_documents(piece, column)
    return _checked(docs, skipped, max_doc_bytes)


def piece_num_rows(piece: Piece, column: str) -> int:
    """Documents (before skipping) in a piece; reads the file when its footer does not say."""
    if piece.num_rows is not None:
        return piece.num_rows
    if piece.kind == "file":
        return 1
    if piece.kind == "jsonl":
        with open(piece.path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return sum(len(b) for b in _record_batches(Path(piece.path), column))  # arrow: memory-mapped


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library sources (~30 MB of real code), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    files = [p for p in root.rglob("*.py") if p.is_file() and not skip & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _file_piece(path: Path, doc_id: str) -> Piece:
    return Piece("file", str(path), doc_id, num_rows=1, num_bytes=path.stat().st_size)


def _read_text(path: Path) -> str | None:
    """Text or code of any encoding, or None for a binary file.

    Undecodable bytes become U+FFFD rather than an error (a latin-1 comment is still code), but
    a file that is mostly undecodable, or holds a NUL byte, is not text: tokenizing it would
    teach the model noise. A file that cannot be read is an error: silently leaving out what
    the user asked for would be worse than stopping.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(BINARY_SNIFF_BYTES)
            if b"\0" in head:
                return None  # before reading the rest: binaries can be large
            data = head + f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return _universal_newlines(data.decode("utf-8"))
    except UnicodeDecodeError:
        text = _universal_newlines(data.decode("utf-8", errors="replace"))
    return None if text.count("\ufffd") > BINARY_REPLACEMENT_FRACTION * len(text) else text


def _universal_newlines(text: str) -> str:
    """What Path.read_text (text mode) does: the same corpus keeps giving the same tokens."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _parse_hf(spec: str) -> tuple[str, str | None]:
    name, _, config = spec.partition(":")
    if not name:
        raise DataError(f"source 'hf:{spec}': expected hf:<name>[:<config>]")
    return name, config or None


def hf_id_prefix(spec: str) -> str:
    """Documents of `hf:<spec>` are f"{prefix}:{row}"."""
    return f"hf:{_parse_hf(spec)[0]}"


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


def _require_text_type(column: str, typ: pa.DataType, where: str) -> None:
    """A table column of documents holds strings; say so before reading a row of another type."""
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
        raise DataError(f"{where}: column {column!r} is {typ}, not text; choose a text column with --column")


def _as_text(value: object, where: str, column: str, row: int) -> str:
    """Documents must be strings: a null or number is reported, never silently skipped."""
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} row {row} is {type(value).__name__}, not text")
    return value


# --- tables: Parquet, Arrow, JSON lines, save_to_disk folders --------------------------------


def _is_saved_dataset(root: Path) -> bool:
    return any((root / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _table_files(root: Path) -> list[Path]:
    return sorted(root.glob("*.parquet")) + sorted(root.glob("*.arrow")) + sorted(root.glob("*.jsonl"))


def _parquet_pieces(path: Path, column: str) -> list[Piece]:
    """One piece per row group: a large file is read by several workers."""
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot read table ({e})") from None
    schema = meta.schema.to_arrow_schema()
    _require_column(column, schema.names, str(path))
    _require_text_type(column, schema.field(column).type, str(path))
    size, pieces, first = path.stat().st_size, [], 0
    for i in range(meta.num_row_groups):
        rows = meta.row_group(i).num_rows
        pieces.append(Piece("parquet", str(path), path.name, i, first, rows,
                            size * rows // max(1, meta.num_rows)))
        first += rows
    return pieces


def _load_saved(root: str, column: str):
    """The train split of a `Dataset.save_to_disk` folder (memory-mapped: loading reads nothing).

    Cached per process (a worker reads many pieces of it), keyed by the folder's mtime too, so a
    folder saved again is loaded again.
    """
    return _load_saved_cached(root, column, Path(root).stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_saved_cached(root: str, column: str, mtime_ns: int):
    import datasets

    try:
        ds = datasets.load_from_disk(root)
    except Exception as e:
        raise DataError(f"{root}: cannot load saved dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{root}: saved DatasetDict has no 'train' split ({', '.join(ds)})")
        ds = ds["train"]
    _require_column(column, ds.column_names, root)
    dtype = getattr(ds.features[column], "dtype", None)
    if dtype not in ("string", "large_string", None):
        raise DataError(f"{root}: column {column!r} is {dtype}, not text; choose a text column with --column")
    return ds.select_columns([column])


def _saved_pieces(root: Path, column: str) -> list[Piece]:
    ds = _load_saved(str(root), column)
    total = sum(Path(f["filename"]).stat().st_size for f in ds.cache_files)
    n = len(ds)
    return [Piece("saved", str(root), "row", 0, a, min(n, a + SAVED_PIECE_ROWS) - a,
                  total * (min(n, a + SAVED_PIECE_ROWS) - a) // max(1, n))
            for a in range(0, n, SAVED_PIECE_ROWS)]


def _table_piece_documents(piece: Piece, column: str) -> Iterator[Document]:
    path = Path(piece.path)
    if piece.kind == "saved":
        ds = _load_saved(piece.path, column)
        assert piece.num_rows is not None  # a saved dataset's pieces are row ranges
        end = piece.first_row + piece.num_rows
        for a in range(piece.first_row, end, TABLE_BATCH_ROWS):
            b = min(a + TABLE_BATCH_ROWS, end)
            for row, value in enumerate(ds[a:b][column], a):
                yield Document(f"row:{row}", _as_text(value, piece.path, column, row))
        return
    if piece.kind == "jsonl":
        yield from _jsonl_documents(path, column)
        return
    if piece.kind == "hf-part":  # a streamed dataset spooled with its ids (prepare.py)
        for batch in pq.ParquetFile(path).iter_batches(batch_size=TABLE_BATCH_ROWS, columns=["id", "text"]):
            yield from (Document(i, t) for i, t in zip(*(c.to_pylist() for c in batch.columns), strict=True))
        return
    row = piece.first_row
    for batch in _record_batches(path, column, row_group=piece.index if piece.kind == "parquet" else None):
        for value in batch.column(0).to_pylist():
            yield Document(f"{piece.name}:{row}", _as_text(value, str(path), column, row))
            row += 1


def _record_batches(path: Path, column: str, row_group: int | None = None) -> Iterator[pa.RecordBatch]:
    """Stream one column of a Parquet (one row group, or all) or Arrow (IPC stream or file) table."""
    try:
        if path.suffix == ".parquet":
            f = pq.ParquetFile(path)
            _require_column(column, f.schema_arrow.names, str(path))
            _require_text_type(column, f.schema_arrow.field(column).type, str(path))
            groups = None if row_group is None else [row_group]
            yield from f.iter_batches(batch_size=TABLE_BATCH_ROWS, row_groups=groups, columns=[column])
            return
        with pa.memory_map(str(path)) as fh:
            try:
                reader = pa.ipc.open_stream(fh)  # what datasets writes
            except pa.ArrowInvalid:
                fh.seek(0)
                reader = pa.ipc.open_file(fh)
                reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in reader:
                _require_column(column, batch.schema.names, str(path))
                _require_text_type(column, batch.schema.field(column).type, str(path))
                yield batch.select([column])
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot read table ({e})") from None


def _jsonl_documents(path: Path, column: str) -> Iterator[Document]:
    """JSON lines: one object per non-blank line, its `column` the text; ids f"{file}:{row}"."""
    try:
        with open(path, encoding="utf-8") as f:
            row = 0
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {line_no} is not JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}: line {line_no} is not a JSON object")
                _require_column(column, list(obj), f"{path}: line {line_no}")
                yield Document(f"{path.name}:{row}", _as_text(obj[column], str(path), column, row))
                row += 1
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
