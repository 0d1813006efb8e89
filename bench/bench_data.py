"""Data benchmarks: tokenization throughput on the Python standard library (about 30 MB of code)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench.common import Row


def run(quick: bool = False) -> list[Row]:
    from ft_ray.data.shards import write_corpus_shards
    from ft_ray.data.sources import iter_documents, stdlib_files
    from ft_ray.data.tokenizer import byte_tokenizer, train_bpe

    files = stdlib_files()
    if quick:
        files = files[:400]
    mb = sum(f.stat().st_size for f in files) / 1e6
    tmp = Path(tempfile.mkdtemp(prefix="ft-ray-bench-data-"))
    rows = []
    try:
        source = "stdlib"
        docs = (d for d, _ in zip(iter_documents(source), range(len(files))))
        t0 = time.perf_counter()
        write_corpus_shards(docs, byte_tokenizer(), seq_len=512, out_dir=tmp / "bytes", progress=lambda _: None)
        t_bytes = time.perf_counter() - t0
        rows.append(Row("tokenize + shard stdlib, byte-level", mb / t_bytes, "MB/s", "", f"{mb:.1f} MB in {t_bytes:.1f} s"))
        t0 = time.perf_counter()
        texts = (d.text for d, _ in zip(iter_documents(source), range(len(files))))
        tok = train_bpe(texts, 4096)
        t_train = time.perf_counter() - t0
        docs = (d for d, _ in zip(iter_documents(source), range(len(files))))
        t0 = time.perf_counter()
        manifest = write_corpus_shards(docs, tok, seq_len=512, out_dir=tmp / "bpe", progress=lambda _: None)
        t_bpe = time.perf_counter() - t0
        tokens = manifest["splits"]["train"]["num_tokens"] + manifest["splits"]["val"]["num_tokens"]
        rows += [Row("BPE training on stdlib (vocab 4096)", t_train, "s", "", f"{mb:.1f} MB"),
                 Row("tokenize + shard stdlib, BPE 4096", mb / t_bpe, "MB/s", "",
                     f"{tokens / 1e6:.1f}M tokens, {mb * 1e6 / max(tokens, 1):.2f} bytes/token")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
