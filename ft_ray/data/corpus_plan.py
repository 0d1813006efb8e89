"""What to prepare, and from which pieces: shared by the single-process writer and the Ray Data job.

`CorpusSpec` is `ft-ray data corpus`'s arguments, checked once. `plan_source` lists a local
source's pieces (no text read) and checks what is cheap to check up front; `resolve_buckets`
turns `--buckets auto` into a number; `bpe_texts` is the BPE training sample. Both writers use
these, so they read the same documents, train the same tokenizer and pack the same buckets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from ft_ray.data import tokenizer as tk
from ft_ray.data.errors import DataError
from ft_ray.data.shards import MAX_BUCKETS, SHARD_MAX_BYTES, _check_args, check_num_buckets
from ft_ray.data.sources import (
    Piece,
    Skipped,
    iter_documents,
    list_pieces,
    piece_num_rows,
    read_pieces,
    too_large,
)

BUCKET_BYTES = 1 << 30  # `--buckets auto`: one bucket per GiB of source
DEFAULT_BPE_SAMPLE_DOCS = 100_000
DEFAULT_MAX_DOC_MB = 8.0


@dataclass(frozen=True)
class CorpusSpec:
    """What to prepare: the CLI's arguments, checked once and given to either writer."""

    source: str
    tokenizer: str  # bytes | bpe:<size> | a tokenizer.json
    seq_len: int
    column: str = "text"  # the text column of table sources
    val_fraction: float = 0.01
    shard_max_bytes: int = SHARD_MAX_BYTES
    num_buckets: int | None = None  # None: auto (BUCKET_BYTES of source per bucket)
    max_doc_bytes: int | None = int(DEFAULT_MAX_DOC_MB * (1 << 20))  # a larger document is refused
    bpe_sample_docs: int = DEFAULT_BPE_SAMPLE_DOCS  # BPE training sample (documents, at most)
    seed: int = 0  # of the BPE sample

    def check(self) -> None:
        _check_args(self.seq_len, self.val_fraction, self.shard_max_bytes)
        if self.num_buckets is not None:
            check_num_buckets(self.num_buckets)
        if self.bpe_sample_docs < 1:
            raise DataError(f"--bpe-sample-docs must be >= 1, got {self.bpe_sample_docs}")
        if self.max_doc_bytes is not None and self.max_doc_bytes < 1:
            raise DataError(f"--max-doc-mb must be > 0, got {self.max_doc_bytes / 2**20:g}")


@dataclass
class SourcePlan:
    pieces: list[Piece]
    num_bytes: int
    fingerprint: str  # changes when a file is added, removed, resized or touched
    streamed: bool = False  # an hf: source spooled by the driver: its order is the stream's
    skipped: dict | None = None  # what the driver's read of a streamed source skipped


def plan_source(spec: CorpusSpec) -> SourcePlan | None:
    """The pieces of a local source, checked up front; None for a streamed hf: source."""
    if spec.source.startswith("hf:"):
        return None
    pieces = list_pieces(spec.source, spec.column)
    if not pieces:
        raise DataError(f"source {spec.source!r} produced no documents")
    stamps = []
    for p in pieces:
        if p.kind == "file" and not os.access(p.path, os.R_OK):
            raise DataError(f"{p.path}: cannot read (permission denied)")
        if p.kind == "file" and spec.max_doc_bytes is not None and p.num_bytes > spec.max_doc_bytes:
            raise too_large(p.name, p.num_bytes, spec.max_doc_bytes)
        stamps.append([*dataclasses.astuple(p), os.stat(p.path).st_mtime_ns])
    fingerprint = hashlib.sha256(json.dumps(stamps).encode()).hexdigest()
    return SourcePlan(pieces, sum(p.num_bytes for p in pieces), fingerprint)


def resolve_buckets(spec: CorpusSpec, plan: SourcePlan | None) -> int:
    if spec.num_buckets is not None:
        return spec.num_buckets
    if plan is None or plan.streamed:
        return 1  # the size of a stream is not known before it is read
    return min(MAX_BUCKETS, max(1, -(-plan.num_bytes // BUCKET_BYTES)))


def bpe_texts(spec: CorpusSpec, plan: SourcePlan | None) -> Iterator[str]:
    """The BPE training sample: at most `bpe_sample_docs` documents, never the whole corpus.

    Local sources: pieces (files, Parquet row groups, row ranges) are drawn in a seeded random
    order until they hold `bpe_sample_docs` documents, then read in source order (a corpus with
    fewer documents is read whole). A streamed hf: source: its first `bpe_sample_docs`.
    """
    if plan is None or plan.streamed:
        docs = iter_documents(spec.source, spec.column, spec.max_doc_bytes) if plan is None else \
            read_pieces(plan.pieces, spec.column, Skipped(), spec.max_doc_bytes)
        return (d.text for d in itertools.islice(docs, spec.bpe_sample_docs))
    counts = [piece_num_rows(p, spec.column) for p in plan.pieces]
    chosen = list(range(len(plan.pieces)))
    if sum(counts) > spec.bpe_sample_docs:
        order = np.random.default_rng(spec.seed).permutation(len(plan.pieces))
        stop = int(np.searchsorted(np.cumsum(np.asarray(counts)[order]), spec.bpe_sample_docs)) + 1
        chosen = sorted(order[:stop].tolist())
    pieces = [plan.pieces[i] for i in chosen]
    return (d.text for d in read_pieces(pieces, spec.column, Skipped(), spec.max_doc_bytes))


def build_tokenizer(spec: CorpusSpec, plan: SourcePlan | None) -> Tokenizer:
    return tk.load_tokenizer(spec.tokenizer, lambda: bpe_texts(spec, plan))
