"""Token shards on disk: packed fixed-length rows in Parquet, a tokenizer.json and a manifest.

Layout of a shard directory:

    train-00000.parquet ...  one column `tokens`: list<uint8|16|32>, every row seq_len + 1 ids
    val-00000.parquet ...    (with B > 1 buckets: train-<bucket>-<k>.parquet, see below)
    tokenizer.json           decodes the ids (Hugging Face `tokenizers`)
    manifest.json            source, tokenizer, vocab_size, seq_len, per split counts and shards
                             (file, num_rows, sha256)

Writing streams: documents are tokenized in small batches, their ids (each followed by EOS)
appended to their split's stream, the stream cut into rows, and rows written to the open shard
one row group at a time, so memory is bounded by a row group (and the tokenizer's work on the
largest single document), not by the shard or the corpus. Reading and validation live in
manifest.py and are re-exported here.

Buckets: with `num_buckets` B > 1, every document also goes to one of B buckets by a hash of its
id (`bucket_of`), and each (split, bucket) is its own stream, packed into its own rows and shards
(`train-0003-00000.parquet`), its tail shorter than a row dropped. The rows then depend only on
the documents, their order and B, never on how the work is divided: the Ray Data pipeline
(prepare.py) packs each bucket in its own task and writes byte-identical shards. B = 1 is one
stream per split, the layout above.

A shard set is written whole or not at all: every file goes into a hidden sibling of the output
directory, which replaces it only once complete (ft_ray/fsutil.py), so a failed run leaves the
old set byte for byte. A non-empty output is replaced only when asked (`overwrite`), and never
when it holds a file that a shard set does not: we do not delete files we did not write.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from ft_ray.data import tokenizer as tk
from ft_ray.data.errors import DataError
from ft_ray.data.manifest import (  # noqa: F401  (re-exported)
    FORMAT_VERSION,
    Manifest,
    file_sha256,
    load_manifest,
    read_split,
    validate_shards,
)
from ft_ray.data.sources import Document, DocumentStream, Skipped
from ft_ray.data.synthetic import Task, get_task, synthetic_rows
from ft_ray.fsutil import atomic_directory

SPLITS = ("train", "val")
SHARD_SET_FILES = ("manifest.json", "tokenizer.json", *(f"{s}-*.parquet" for s in SPLITS))
SHARD_MAX_BYTES = 64 << 20
ROW_GROUP_BYTES = 4 << 20  # rows buffered in memory between writes
PROGRESS_SECONDS = 10.0
ENCODE_BATCH_DOCS = 64  # documents tokenized per encode_batch call ...
ENCODE_BATCH_CHARS = 1 << 20  # ... or fewer: a batch's encodings cost ~100 bytes per character
SYNTHETIC_CHUNK_ROWS = 8192  # rows generated and written at a time (their seeds: synthetic_rows)
MAX_LIST_VALUES = 2**31 - 1  # int32 list offsets bound the values in one shard
MAX_BUCKETS = 1024  # file names carry the bucket in 4 digits


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type holding every id below `vocab_size`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32")


def split_of(doc_id: str, val_fraction: float) -> str:
    """'val' for a deterministic `val_fraction` of document ids (sha256), else 'train'."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return "val" if h < val_fraction * 2**64 else "train"


def bucket_of(doc_id: str, num_buckets: int) -> int:
    """The document's bucket: other bits of the same hash as `split_of`, so independent of it."""
    if num_buckets == 1:
        return 0
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[8:16], "big") % num_buckets


def shard_stem(split: str, bucket: int, num_buckets: int) -> str:
    """File names of a (split, bucket)'s shards before "-<k>.parquet": `train` or `train-0003`."""
    return split if num_buckets == 1 else f"{split}-{bucket:04d}"


def rows_table(rows: np.ndarray) -> pa.Table:
    """(num_rows, row_len) ids -> a table with one list column `tokens` of the array's dtype."""
    num_rows, row_len = rows.shape
    offsets = pa.array(np.arange(0, (num_rows + 1) * row_len, row_len, dtype=np.int32))
    return pa.table({"tokens": pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1)))})


class _SplitWriter:
    """Packs one split's token stream into rows of `row_len` and writes them as rolling shards.

    Rows go to the open shard one row group (ROW_GROUP_BYTES) at a time, so memory holds at
    most a row group of rows, whatever the shard size.
    """

    def __init__(self, out: Path, split: str, row_len: int, dtype: np.dtype, shard_max_bytes: int,
                 stem: str | None = None):
        self.out, self.split, self.row_len, self.dtype = out, split, row_len, dtype
        self.stem = stem or split  # shards are <stem>-<k>.parquet
        row_bytes = row_len * dtype.itemsize  # raw ids; Parquet compression only makes files smaller
        self.rows_per_shard = max(1, min(shard_max_bytes // row_bytes, MAX_LIST_VALUES // row_len))
        self.rows_per_group = max(1, ROW_GROUP_BYTES // row_bytes)
        self.carry = np.empty(0, dtype)  # tail of the stream shorter than a row
        self.pending: list[np.ndarray] = []  # full rows not yet written
        self.num_pending = self.num_documents = self.num_sequences = self.bytes_written = 0
        self.shards: list[dict[str, Any]] = []
        self.writer: pq.ParquetWriter | None = None
        self.rows_in_shard = 0

    def add_document(self, ids: list[int], eos: int) -> None:
        self.num_documents += 1
        tokens = np.empty(len(ids) + 1, self.dtype)
        tokens[:-1], tokens[-1] = ids, eos
        self.add_stream(tokens)

    def add_stream(self, tokens: np.ndarray) -> None:
        """Append ids (documents already followed by their EOS) to the stream and pack them."""
        stream = np.concatenate([self.carry, tokens.astype(self.dtype, copy=False)])
        num_rows = len(stream) // self.row_len
        self.carry = stream[num_rows * self.row_len:].copy()  # copy: do not pin the whole stream
        if num_rows:
            self.add_rows(stream[: num_rows * self.row_len].reshape(num_rows, self.row_len))

    def add_rows(self, rows: np.ndarray) -> None:
        self.pending.append(rows.astype(self.dtype, copy=False))
        self.num_pending += len(rows)
        while self.num_pending >= self._room():
            self._write(self._room())

    def _room(self) -> int:
        """Rows to buffer before the next write: a row group, or what the open shard still takes."""
        return min(self.rows_per_group, self.rows_per_shard - self.rows_in_shard)

    def _write(self, num_rows: int) -> None:
        block = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        rows, rest = block[:num_rows], block[num_rows:]
        self.pending, self.num_pending = ([rest] if len(rest) else []), len(rest)
        table = rows_table(rows)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.out / self._name(), table.schema)
        self.writer.write_table(table)
        self.rows_in_shard += num_rows
        self.num_sequences += num_rows
        if self.rows_in_shard == self.rows_per_shard:
            self._close_shard()

    def _name(self) -> str:
        return f"{self.stem}-{len(self.shards):05d}.parquet"

    def _close_shard(self) -> None:
        path = self.out / self._name()
        assert self.writer is not None  # called only with a shard open
        self.writer.close()
        self.shards.append({"file": path.name, "num_rows": self.rows_in_shard, "sha256": file_sha256(path)})
        self.bytes_written += path.stat().st_size
        self.writer, self.rows_in_shard = None, 0

    def bytes_on_disk(self) -> int:
        """Closed shards plus the row groups already flushed to the open one."""
        open_path = self.out / self._name()
        return self.bytes_written + (open_path.stat().st_size if self.writer is not None else 0)

    def close(self) -> dict[str, Any]:
        """Write the last partial shard; the stream's tail shorter than a row is dropped."""
        if self.num_pending:
            self._write(self.num_pending)
        if self.writer is not None:
            self._close_shard()
        return {"num_sequences": self.num_sequences, "num_tokens": self.num_sequences * self.row_len,
                "num_documents": self.num_documents, "num_dropped_tokens": len(self.carry),
                "shards": self.shards}


class _Progress:
    """Reports documents, tokens and MB written at most every PROGRESS_SECONDS."""

    def __init__(self, report: Callable[[str], Any]):
        self.report, self.started = report, time.monotonic()
        self.last = self.started

    def update(self, writers: dict[Any, _SplitWriter]) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        w = writers.values()
        docs = sum(x.num_documents for x in w)
        tokens = sum(x.num_sequences for x in w) * next(iter(w)).row_len  # written so far
        mb = sum(x.bytes_on_disk() for x in w) / 1e6
        self.report(f"  {docs} documents, {tokens / 1e6:.1f}M tokens, {mb:.1f} MB written "
                    f"({now - self.started:.0f}s)")


def _check_args(seq_len: int, val_fraction: float, shard_max_bytes: int) -> None:
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_max_bytes < 1:
        raise DataError(f"shard_max_bytes must be >= 1, got {shard_max_bytes}")


def check_out_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """`out_dir` if a shard set may be written there: absent, empty, or (with `overwrite`) a set.

    Cheap, so callers run it before any expensive work; the writers run it again just before
    they replace the directory, in case a file appeared there meanwhile.
    """
    out = Path(out_dir)
    if not out.exists():
        return out
    if not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    names = sorted(p.name for p in out.iterdir())
    foreign = next((n for n in names if not _is_shard_set_file(out / n)), None)
    if foreign is not None:  # first: --overwrite would not help, so do not suggest it
        raise DataError(f"--out {out} holds {foreign}, which is not part of a shard set: "
                        "ft-ray data never deletes files it did not write; choose another --out")
    if names and not overwrite:
        raise DataError(f"--out {out} is not empty: pass --overwrite to replace the shard set "
                        "there, or choose another --out")
    return out


def _is_shard_set_file(path: Path) -> bool:
    return path.is_file() and any(fnmatch(path.name, pattern) for pattern in SHARD_SET_FILES)


def _batched(docs: Iterable[Document]) -> Iterator[list[Document]]:
    """Batches of documents for the tokenizer, bounded in count and in characters."""
    batch, num_chars = [], 0
    for doc in docs:
        batch.append(doc)
        num_chars += len(doc.text)
        if len(batch) == ENCODE_BATCH_DOCS or num_chars >= ENCODE_BATCH_CHARS:
            yield batch
            batch, num_chars = [], 0
    if batch:
        yield batch


def _encode(tok: Tokenizer, batch: list[Document], source: str) -> list[list[int]]:
    try:
        return tk.encode_batch(tok, [d.text for d in batch])
    except Exception as e:  # e.g. a character a closed (word-level) vocabulary lacks
        raise DataError(f"source {source!r}: the tokenizer cannot encode documents "
                        f"{batch[0].id} .. {batch[-1].id} ({e})") from None


def _base_manifest(kind: str, source: str, tokenizer_spec: str, tok: Tokenizer, seq_len: int,
                   val_fraction: float) -> Manifest:
    size = tk.vocab_size(tok)
    return {"format_version": FORMAT_VERSION, "kind": kind, "source": source,
            "tokenizer": tokenizer_spec, "vocab_size": size, "seq_len": seq_len,
            "tokens_per_row": seq_len + 1, "dtype": str(token_dtype(size)), "bos_id": tk.bos_id(tok),
            "eos_id": tk.eos_id(tok), "pad_id": tk.pad_id(tok), "val_fraction": val_fraction}


def _save(tmp: Path, manifest: Manifest, tok: Tokenizer, out: Path, overwrite: bool) -> None:
    """Save tokenizer.json and manifest.json (last: its presence means the set is complete)."""
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    check_out_dir(out, overwrite)  # again: the write took time, and `out` is about to be replaced


def _report(out: Path, manifest: Manifest, progress: Callable[[str], Any], started: float) -> None:
    splits = manifest["splits"]
    skipped = manifest.get("skipped", {})  # corpus sets count skipped files
    num_binary, num_empty = skipped.get("binary", 0), skipped.get("empty", 0)
    if splits["val"]["num_sequences"] == 0:
        progress(f"warning: the validation split is empty (val_fraction={manifest['val_fraction']})")
    if num_binary:
        progress(f"warning: skipped {num_binary} binary files, e.g. {', '.join(skipped['examples'])}")
    if num_empty:
        progress(f"warning: skipped {num_empty} empty documents, e.g. {', '.join(skipped['empty_examples'])}")
    parts = [f"{s} {v['num_sequences']} sequences / {v['num_tokens']} tokens / "
             f"{len(v['shards'])} shards" for s, v in splits.items()]
    mb = sum((out / sh["file"]).stat().st_size for v in splits.values() for sh in v["shards"]) / 1e6
    progress(f"wrote {out}: {'; '.join(parts)}; seq_len {manifest['seq_len']}, vocab "
             f"{manifest['vocab_size']}, {mb:.2f} MB in {time.monotonic() - started:.1f}s"
             + (f"; {num_binary} binary files skipped" if num_binary else "")
             + (f"; {num_empty} empty documents skipped" if num_empty else ""))


def write_corpus_shards(documents: Iterable[Document], tokenizer: Tokenizer, seq_len: int,
                        out_dir: str | Path, val_fraction: float = 0.01,
                        shard_max_bytes: int = SHARD_MAX_BYTES, progress: Callable[[str], Any] = print,
                        source: str = "", tokenizer_spec: str = "",
                        on_document: Callable[[str, str], Any] | None = None,
                        overwrite: bool = False, num_buckets: int = 1) -> Manifest:
    """Tokenize, split by document hash, pack into rows of seq_len + 1 and write the shards.

    `on_document(split, doc_id)` is called for every document, e.g. to audit the split.
    Files the source skipped (a `DocumentStream`'s binary files) are recorded in the manifest.
    `num_buckets` > 1 packs each bucket of documents on its own (module docstring): the layout
    the Ray Data pipeline writes; memory then holds a row group per (split, bucket).
    """
    _check_args(seq_len, val_fraction, shard_max_bytes)
    check_num_buckets(num_buckets)
    started, out = time.monotonic(), check_out_dir(out_dir, overwrite)
    manifest = corpus_manifest(source, tokenizer_spec, tokenizer, seq_len, val_fraction, num_buckets)
    with atomic_directory(out) as tmp:
        manifest["splits"] = _write_corpus_splits(documents, tokenizer, tmp, manifest,
                                                  shard_max_bytes, _Progress(progress), on_document)
        skipped = documents.skipped if isinstance(documents, DocumentStream) else Skipped()
        manifest["skipped"] = skipped.to_manifest()  # read now: the stream is exhausted
        _save(tmp, manifest, tokenizer, out, overwrite)
    _report(out, manifest, progress, started)
    return manifest


def check_num_buckets(num_buckets: int) -> None:
    if not 1 <= num_buckets <= MAX_BUCKETS:
        raise DataError(f"--buckets must be in [1, {MAX_BUCKETS}], got {num_buckets}")


def corpus_manifest(source: str, tokenizer_spec: str, tok: Tokenizer, seq_len: int, val_fraction: float,
                    num_buckets: int) -> Manifest:
    """A corpus set's manifest before its splits: the same for both writers."""
    return _base_manifest("corpus", source, tokenizer_spec, tok, seq_len, val_fraction) | \
        {"num_buckets": num_buckets}


def _write_corpus_splits(documents: Iterable[Document], tokenizer: Tokenizer, tmp: Path,
                         manifest: Manifest, shard_max_bytes: int, meter: _Progress,
                         on_document: Callable[[str, str], Any] | None) -> dict[str, Any]:
    source, seq_len, val_fraction = manifest["source"], manifest["seq_len"], manifest["val_fraction"]
    eos, dtype, num_buckets = manifest["eos_id"], token_dtype(manifest["vocab_size"]), manifest["num_buckets"]
    writers = {(s, b): _SplitWriter(tmp, s, seq_len + 1, dtype, shard_max_bytes, shard_stem(s, b, num_buckets))
               for s in SPLITS for b in range(num_buckets)}
    for batch in _batched(documents):
        for doc, ids in zip(batch, _encode(tokenizer, batch, source), strict=True):
            split = split_of(doc.id, val_fraction)
            writers[split, bucket_of(doc.id, num_buckets)].add_document(ids, eos)
            if on_document is not None:
                on_document(split, doc.id)
        meter.update(writers)
    splits = merge_buckets({key: w.close() for key, w in writers.items()}, num_buckets)
    check_corpus_splits(splits, source, seq_len, num_buckets)
    return splits


def merge_buckets(parts: dict[tuple[str, int], dict[str, Any]], num_buckets: int) -> dict[str, Any]:
    """Per (split, bucket) results -> the manifest's splits: counts summed, shards in bucket order."""
    splits = {}
    for s in SPLITS:
        buckets = [parts[s, b] for b in range(num_buckets)]
        splits[s] = {key: sum(p[key] for p in buckets) for key in
                     ("num_sequences", "num_tokens", "num_documents", "num_dropped_tokens")}
        splits[s]["shards"] = [shard for p in buckets for shard in p["shards"]]
    return splits


def check_corpus_splits(splits: dict[str, Any], source: str, seq_len: int, num_buckets: int) -> None:
    """Counts only (the Ray pipeline checks them before packing): no documents, no train row."""
    if sum(v["num_documents"] for v in splits.values()) == 0:
        raise DataError(f"source {source!r} produced no documents")
    if splits["train"]["num_sequences"] == 0:
        where = "split" if num_buckets == 1 else f"split's every bucket (of {num_buckets})"
        raise DataError(f"source {source!r}: the train {where} has fewer than seq_len + 1 = "
                        f"{seq_len + 1} tokens, so no sequence could be written")


def write_synthetic_shards(task: str, num_sequences: int, seed: int, out_dir: str | Path,
                           val_fraction: float = 0.05, shard_max_bytes: int = SHARD_MAX_BYTES,
                           progress: Callable[[str], Any] = print, overwrite: bool = False) -> Manifest:
    """`num_sequences` train rows plus round(num_sequences * val_fraction) validation rows.

    Row i of a split is `synthetic_rows(task, seed, split, [i])`: the rows training generates on
    the fly with `data.source: synthetic` and the same `data.shuffle_seed`, and a larger set
    starts with the rows of a smaller one, whatever the shard size.
    """
    spec = get_task(task)
    if num_sequences < 1:
        raise DataError(f"num_sequences must be >= 1, got {num_sequences}")
    _check_args(spec.seq_tokens - 1, val_fraction, shard_max_bytes)
    started, out, tok = time.monotonic(), check_out_dir(out_dir, overwrite), tk.letter_tokenizer()
    manifest = _base_manifest("synthetic", f"synthetic:{task}", "letters", tok, spec.seq_tokens - 1,
                              val_fraction) | {"task": task, "seed": seed}
    counts = {"train": num_sequences, "val": round(num_sequences * val_fraction)}
    meter = _Progress(progress)
    with atomic_directory(out) as tmp:
        manifest["splits"] = {split: _write_synthetic_split(task, spec, split, count, seed, tmp, manifest,
                                                            shard_max_bytes, meter)
                              for split, count in counts.items()}
        _save(tmp, manifest, tok, out, overwrite)
    _report(out, manifest, progress, started)
    return manifest


def _write_synthetic_split(task: str, spec: Task, split: str, count: int, seed: int, tmp: Path,
                           manifest: Manifest, shard_max_bytes: int, meter: _Progress) -> dict[str, Any]:
    dtype = token_dtype(manifest["vocab_size"])
    writer = _SplitWriter(tmp, split, spec.seq_tokens, dtype, shard_max_bytes)
    for start in range(0, count, SYNTHETIC_CHUNK_ROWS):
        rows = synthetic_rows(task, seed, split, np.arange(start, min(start + SYNTHETIC_CHUNK_ROWS, count)))
        writer.add_rows(rows)
        writer.num_documents += len(rows)  # one sequence is one document
        meter.update({split: writer})
    return writer.close()
