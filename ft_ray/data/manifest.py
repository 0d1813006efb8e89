"""Reading a shard directory and checking it against its manifest and the model config.

Everything that can be wrong with shards on disk fails here with a `DataError` naming the file or
the manifest field: a missing or corrupt file, a sha256 or row count that disagrees with the
manifest, token ids outside the vocabulary, a vocab_size or seq_len that the model cannot take.
Shards are read one row group at a time, so checking costs memory of a row group, not a shard.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ft_ray.data.errors import DataError

Manifest = dict[str, Any]

FORMAT_VERSION = 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_TOP_KEYS = {"format_version": int, "vocab_size": int, "seq_len": int, "eos_id": int, "splits": dict}
_SPLIT_KEYS = {"num_sequences": int, "num_tokens": int, "num_documents": int, "shards": list}
_SHARD_KEYS = {"file": str, "num_rows": int, "sha256": str}


def _require(obj: dict, keys: dict[str, type], where: str, path: Path) -> None:
    for key, typ in keys.items():
        if key not in obj:
            raise DataError(f"{path}: missing key {where}{key}")
        if not isinstance(obj[key], typ) or isinstance(obj[key], bool):
            raise DataError(f"{path}: {where}{key} must be {typ.__name__}, got {obj[key]!r}")


def _check_manifest(m: Any, path: Path) -> None:
    """Every key that reading and validation rely on, so later code can index freely."""
    if not isinstance(m, dict):
        raise DataError(f"{path}: expected a JSON object")
    _require(m, _TOP_KEYS, "", path)
    if m["format_version"] != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {m['format_version']} is not {FORMAT_VERSION}")
    for split in ("train", "val"):  # always written, even when a split is empty
        if split not in m["splits"]:
            raise DataError(f"{path}: missing key splits.{split}")
    for split, info in m["splits"].items():
        if not isinstance(info, dict):
            raise DataError(f"{path}: splits.{split} must be an object")
        _require(info, _SPLIT_KEYS, f"splits.{split}.", path)
        for i, shard in enumerate(info["shards"]):
            where = f"splits.{split}.shards[{i}]."
            if not isinstance(shard, dict):
                raise DataError(f"{path}: {where[:-1]} must be an object")
            _require(shard, _SHARD_KEYS, where, path)
            if Path(shard["file"]).name != shard["file"]:
                raise DataError(f"{path}: {where}file must be a file name in the directory, "
                                f"got {shard['file']!r}")


def load_manifest(shard_dir: str | Path) -> Manifest:
    """The manifest of a shard directory, checked for every key the readers use."""
    root = Path(shard_dir)
    if not root.is_dir():
        raise DataError(f"shard directory not found: {root}")
    path = root / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (write shards with `ft-ray data synthetic|corpus`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    _check_manifest(manifest, path)
    return manifest


def _open_shard(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise DataError(f"{path}: shard listed in manifest.json is missing")
    try:
        shard = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:  # truncated or overwritten files land here
        raise DataError(f"{path}: corrupt Parquet file ({e})") from None
    if "tokens" not in shard.schema_arrow.names:
        raise DataError(f"{path}: no column 'tokens' (columns: {', '.join(shard.schema_arrow.names)})")
    return shard


def _row_groups(path: Path) -> tuple[int, Iterator[pa.ChunkedArray]]:
    """(num_rows from the footer, the `tokens` column one row group at a time)."""
    shard = _open_shard(path)

    def groups() -> Iterator[pa.ChunkedArray]:
        for i in range(shard.num_row_groups):
            try:
                yield shard.read_row_group(i, columns=["tokens"]).column("tokens")
            except (pa.ArrowException, OSError) as e:  # damaged data pages
                raise DataError(f"{path}: corrupt Parquet file, row group {i} ({e})") from None

    return shard.metadata.num_rows, groups()


def _check_tokens(path: Path, tokens: pa.ChunkedArray, row_len: int, vocab_limit: int) -> None:
    if not (pa.types.is_list(tokens.type) and pa.types.is_integer(tokens.type.value_type)):
        raise DataError(f"{path}: column 'tokens' must be a list of integers, got {tokens.type}")
    lengths = pc.min_max(pc.list_value_length(tokens)).as_py()
    if lengths["min"] is not None and lengths["min"] == lengths["max"] != row_len:
        raise DataError(f"{path}: rows hold {lengths['min']} tokens, manifest.json says "
                        f"seq_len + 1 = {row_len}")
    if lengths["min"] is not None and lengths["min"] != lengths["max"]:
        raise DataError(f"{path}: rows hold {lengths['min']}..{lengths['max']} tokens, expected "
                        f"{row_len} each")
    ids = pc.min_max(pc.list_flatten(tokens)).as_py()
    if ids["max"] is not None and (ids["max"] >= vocab_limit or ids["min"] < 0):
        bad = ids["max"] if ids["max"] >= vocab_limit else ids["min"]
        raise DataError(f"{path}: token id {bad} is outside [0, vocab_size={vocab_limit})")


def _check_shard(root: Path, shard: dict, row_len: int, vocab_limit: int, check_hash: bool) -> None:
    path = root / shard["file"]
    if not path.is_file():
        raise DataError(f"{path}: shard listed in manifest.json is missing")
    if check_hash and (digest := file_sha256(path)) != shard["sha256"]:
        raise DataError(f"{path}: sha256 {digest[:16]}... differs from manifest.json's "
                        f"{shard['sha256'][:16]}... (file changed or corrupt)")
    num_rows, groups = _row_groups(path)
    if num_rows != shard["num_rows"]:
        raise DataError(f"{path}: holds {num_rows} rows, manifest.json num_rows says "
                        f"{shard['num_rows']}")
    for tokens in groups:
        _check_tokens(path, tokens, row_len, vocab_limit)


def validate_shards(shard_dir: str | Path, vocab_size: int | None = None, seq_len: int | None = None,
                    check_hashes: bool = True) -> Manifest:
    """Check a shard directory against its manifest and (optionally) the model config.

    `vocab_size` is the model's: every id must be below it and below the manifest's.
    `seq_len` is the config's: it must equal the manifest's. Returns the manifest.
    """
    root = Path(shard_dir)
    manifest, path = load_manifest(root), root / "manifest.json"
    if vocab_size is not None and manifest["vocab_size"] > vocab_size:
        raise DataError(f"{path}: vocab_size {manifest['vocab_size']} exceeds the model's "
                        f"vocab_size {vocab_size}")
    if seq_len is not None and manifest["seq_len"] != seq_len:
        raise DataError(f"{path}: seq_len {manifest['seq_len']} differs from the config's "
                        f"seq_len {seq_len}")
    limit = min(manifest["vocab_size"], vocab_size or manifest["vocab_size"])
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            _check_shard(root, shard, manifest["seq_len"] + 1, limit, check_hashes)
        num_rows = sum(s["num_rows"] for s in info["shards"])
        if num_rows != info["num_sequences"]:
            raise DataError(f"{path}: splits.{split}.num_sequences is {info['num_sequences']} but "
                            f"its shards list {num_rows} rows")
    return manifest


def read_split(shard_dir: str | Path, split: str) -> np.ndarray:
    """All rows of one split as (num_rows, seq_len + 1) int64: for small sets and tests."""
    root = Path(shard_dir)
    manifest = load_manifest(root)
    if split not in manifest["splits"]:
        raise DataError(f"{root / 'manifest.json'}: no split {split!r} "
                        f"(splits: {', '.join(manifest['splits'])})")
    row_len = manifest["seq_len"] + 1
    parts = [pc.list_flatten(tokens).to_numpy() for s in manifest["splits"][split]["shards"]
             for tokens in _row_groups(root / s["file"])[1]]
    if not parts:
        return np.empty((0, row_len), np.int64)
    return np.concatenate(parts).astype(np.int64).reshape(-1, row_len)
