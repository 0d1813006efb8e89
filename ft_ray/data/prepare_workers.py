"""What the Ray Data workers of `prepare_corpus` run: tokenize a unit, pack a bucket.

Stage 1, `TokenizeUnits` (a `map_batches` actor class; the tokenizer is loaded once per actor):
a unit is a run of consecutive source pieces. Its documents are read and tokenized in order,
each one's ids + EOS appended to the section of its (split, bucket), and the unit's sections are
written as one spool file `spool/u<unit>.tok` (raw ids, sections in (split, bucket) order) with
its marker `spool/u<unit>.json` (section offsets, counts, skipped files, sha256 of the .tok),
written last: a unit with a marker whose sha256 verifies is complete and is not redone.

Stage 2, `pack_bucket` (a Ray task per (split, bucket)): it reads its sections from every unit's
spool in unit order, which is the source's order, packs them into rows of seq_len + 1 with the
single-process writer's `_SplitWriter` in a private temporary directory, renames the shards to
`shards/<stem>-<k>.parquet` and writes its marker `shards/<stem>.json` (shard files, rows,
sha256, the node that wrote them). Everything is renamed into place whole, and its content is
determined by its name, so a straggler of an interrupted run cannot spoil a rerun's files.

Memory per worker (the bound does not grow with the corpus):
- tokenizer actor: one encode batch (<= 64 documents and <= 1 MiB of text, or a single document
  of at most --max-doc-mb) at ~130 bytes per character while it is encoded (~130 MiB; ~1.1 GiB for
  an 8 MiB document), a table batch of 1024 rows, and SPOOL_FLUSH_BYTES of buffered ids;
- pack task: PACK_READ_TOKENS ids read at once (<= 16 MiB) and one row group (ROW_GROUP_BYTES).
Errors in the data come back as an `error` field (one line naming the file), not as exceptions,
so the driver can report them as the single-process writer does.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ft_ray.data import tokenizer as tk
from ft_ray.data.errors import DataError
from ft_ray.data.manifest import file_sha256
from ft_ray.data.shards import (
    SPLITS,
    _batched,
    _encode,
    _SplitWriter,
    bucket_of,
    shard_stem,
    split_of,
)
from ft_ray.data.sources import Piece, Skipped, read_pieces

SPOOL_FLUSH_BYTES = 8 << 20  # buffered ids of a unit before they go to its section files
PACK_READ_TOKENS = 4 << 20  # ids a pack task reads from a spool file at once


def write_json_atomic(path: Path, obj: Any) -> None:
    """A marker appears whole or not at all (readers treat its presence as completion)."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def read_marker(path: Path, files: Callable[[dict], list[Path]]) -> dict | None:
    """The marker at `path` if it and every file it vouches for are intact (sha256), else None."""
    try:
        marker = json.loads(path.read_text())
        checks = marker["sha256"]
        if all(f.is_file() and file_sha256(f) == checks[f.name] for f in files(marker)):
            return marker
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def section_key(split: str, bucket: int) -> str:
    return f"{split}/{bucket}"


class TokenizeUnits:
    """map_batches actor: rows {unit, pieces (JSON)} -> rows {unit, meta (JSON)}."""

    def __init__(self, work: str, column: str, val_fraction: float, num_buckets: int, dtype: str,
                 max_doc_bytes: int | None, source: str):
        # one CPU per actor: the pool is the parallelism, and Rust threads would fight it
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.work, self.column, self.source = Path(work), column, source
        self.val_fraction, self.num_buckets = val_fraction, num_buckets
        self.dtype, self.max_doc_bytes = np.dtype(dtype), max_doc_bytes
        self.tok = tk.load_tokenizer(str(self.work / "tokenizer.json"))
        self.eos = tk.eos_id(self.tok)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        metas = []
        for unit, pieces in zip(batch["unit"], batch["pieces"], strict=True):
            try:
                metas.append(self.unit(int(unit), [Piece(**p) for p in json.loads(pieces)]))
            except DataError as e:
                metas.append({"unit": int(unit), "error": str(e)})
        return {"unit": [m["unit"] for m in metas], "meta": [json.dumps(m) for m in metas]}

    def unit(self, unit: int, pieces: list[Piece]) -> dict:
        spool = self.work / "spool"
        marker = read_marker(spool / f"u{unit:06d}.json", lambda m: [spool / m["file"]])
        if marker is not None:
            return marker | {"resumed": True}
        started = time.monotonic()
        sections = _Sections(spool / f".u{unit:06d}-{uuid.uuid4().hex[:8]}", self.dtype)
        skipped, num_chars = Skipped(), 0
        try:
            docs = read_pieces(pieces, self.column, skipped, self.max_doc_bytes)
            for batch in _batched(docs):
                for doc, ids in zip(batch, _encode(self.tok, batch, self.source), strict=True):
                    split = split_of(doc.id, self.val_fraction)
                    sections.add(section_key(split, bucket_of(doc.id, self.num_buckets)), ids, self.eos)
                    num_chars += len(doc.text)
            name = f"u{unit:06d}.tok"
            offsets, digest = sections.concatenate(spool / name, self.order())
        finally:
            sections.discard()
        marker = {"unit": unit, "file": name, "sha256": {name: digest}, "sections": offsets,
                  "skipped": skipped.to_manifest(),
                  "num_chars": num_chars, "node": node_id(), "seconds": time.monotonic() - started,
                  "peak_rss_mb": peak_rss_mb()}
        write_json_atomic(spool / f"u{unit:06d}.json", marker)
        return marker

    def order(self) -> list[str]:
        return [section_key(s, b) for s in SPLITS for b in range(self.num_buckets)]


class _Sections:
    """A unit's ids per (split, bucket): buffered, spilled to one file per section when large."""

    def __init__(self, tmp: Path, dtype: np.dtype):
        self.tmp, self.dtype = tmp, dtype
        self.buffers: dict[str, list[np.ndarray]] = {}
        self.counts: dict[str, list[int]] = {}  # key -> [num_tokens, num_documents]
        self.buffered = 0

    def add(self, key: str, ids: list[int], eos: int) -> None:
        tokens = np.empty(len(ids) + 1, self.dtype)
        tokens[:-1], tokens[-1] = ids, eos
        self.buffers.setdefault(key, []).append(tokens)
        count = self.counts.setdefault(key, [0, 0])
        count[0] += len(tokens)
        count[1] += 1
        self.buffered += tokens.nbytes
        if self.buffered >= SPOOL_FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        for key, arrays in self.buffers.items():
            with open(self._path(key), "ab") as f:
                for a in arrays:
                    a.tofile(f)
        self.buffers, self.buffered = {}, 0

    def _path(self, key: str) -> Path:
        return self.tmp / key.replace("/", "-")

    def concatenate(self, dest: Path, order: list[str]) -> tuple[dict[str, list[int]], str]:
        """Write the sections into `dest` in `order`: {key: [offset, num_tokens, num_docs]}, sha256.

        A unit that never spilled (most: units are a few MB) goes from memory straight to `dest`.
        """
        spilled = self.tmp.exists()
        if spilled:
            self.flush()
        offsets, offset, digest = {}, 0, hashlib.sha256()
        part = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(part, "wb") as out:
            for key in order:
                if key not in self.counts:
                    continue
                for block in self._blocks(key, spilled):
                    out.write(block)
                    digest.update(block)
                num_tokens, num_docs = self.counts[key]
                offsets[key] = [offset, num_tokens, num_docs]
                offset += num_tokens
        os.replace(part, dest)
        return offsets, digest.hexdigest()

    def _blocks(self, key: str, spilled: bool) -> Iterator[bytes | memoryview]:
        if not spilled:
            yield from (a.data.cast("B") for a in self.buffers[key])
            return
        with open(self._path(key), "rb") as f:
            yield from iter(lambda: f.read(1 << 20), b"")

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def pack_bucket(work: str, split: str, bucket: int, segments: list[list], row_len: int, dtype: str,
                shard_max_bytes: int, num_buckets: int) -> dict:
    """Pack one (split, bucket)'s stream, `segments` ([spool file, offset, num_tokens, num_docs]
    in unit order), into shards; a complete earlier attempt (marker + sha256) is kept."""
    root, dt = Path(work), np.dtype(dtype)
    out, stem = root / "shards", shard_stem(split, bucket, num_buckets)
    marker_path = out / f"{stem}.json"
    marker = read_marker(marker_path, lambda m: [out / s["file"] for s in m["shards"]])
    if marker is not None:
        return marker | {"resumed": True}
    started, tmp = time.monotonic(), out / f".{stem}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = _SplitWriter(tmp, split, row_len, dt, shard_max_bytes, stem)
        writer.num_documents = sum(s[3] for s in segments)
        for file, offset, count, _ in segments:
            for start in range(0, count, PACK_READ_TOKENS):
                n = min(PACK_READ_TOKENS, count - start)
                writer.add_stream(np.fromfile(root / "spool" / file, dt, count=n,
                                              offset=(offset + start) * dt.itemsize))
        result = writer.close()
        for shard in result["shards"]:
            os.replace(tmp / shard["file"], out / shard["file"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    marker = result | {"split": split, "bucket": bucket, "node": node_id(),
                       "sha256": {s["file"]: s["sha256"] for s in result["shards"]},
                       "seconds": time.monotonic() - started, "peak_rss_mb": peak_rss_mb()}
    write_json_atomic(marker_path, marker)
    return marker
