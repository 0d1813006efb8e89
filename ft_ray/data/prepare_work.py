"""Where an unfinished Ray Data preparation keeps its work, so that running it again resumes.

The work directory is a hidden sibling of --out, `.<out name>.prepare/` (the same file system,
so finished shards move into the new set by renaming; on a cluster it is as shared as --out):

    job.json         what is being prepared (settings, the source's fingerprint, the tokenizer's
                     hash): a rerun with anything else is refused, or with --overwrite discarded
    tokenizer.json   saved before any tokenizing, so a resumed BPE run is not trained again
    hf/              a streamed (hf:) source spooled by the driver, with hf/done.json when whole
    spool/           per unit: u<unit>.tok (ids) + u<unit>.json (marker, written last)
    shards/          per (split, bucket): the Parquet shards + <stem>.json (marker, written last)

Completion is a marker whose sha256 values still match the files, so a unit or bucket cut off
mid-write is redone and a complete one is kept. The manifest is written only into the atomic
--out (ft_ray/fsutil.py), after every bucket is complete: it never lists an incomplete shard.
Bad input (a DataError) deletes the work directory: a rerun has to change something anyway.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ft_ray.data import tokenizer as tk
from ft_ray.data.errors import DataError
from ft_ray.data.prepare_workers import write_json_atomic

WORK_FORMAT = 1


def work_dir_of(out: Path) -> Path:
    real = out.resolve()
    return real.parent / f".{real.name}.prepare"


class WorkDir:
    def __init__(self, out: Path):
        self.path = work_dir_of(out)
        self.spool, self.shards, self.hf = self.path / "spool", self.path / "shards", self.path / "hf"

    def open(self, identity: dict[str, Any], overwrite: bool, progress: Callable[[str], Any]) -> bool:
        """Start, or resume when the directory holds the same job; True when resuming."""
        identity = {"work_format": WORK_FORMAT, **identity}
        job = self.path / "job.json"
        if job.is_file():
            try:
                old = json.loads(job.read_text())
            except (OSError, ValueError):
                old = {}
            changed = [k for k in identity if old.get(k) != identity[k]]
            if not changed:
                progress(f"resuming the interrupted preparation in {self.path}")
                self._clear_temporaries()
                return True
            if not overwrite:
                diffs = ", ".join(f"{k}: {_short(old.get(k))} -> {_short(identity[k])}" for k in changed)
                raise DataError(f"{self.path} holds an interrupted preparation of something else ({diffs}): "
                                "rerun with its arguments to resume it, or add --overwrite to discard it")
            progress(f"discarding the interrupted preparation in {self.path} (--overwrite)")
        self.discard()  # also a directory cut off before job.json: nothing in it can be trusted
        for d in (self.spool, self.shards):
            d.mkdir(parents=True)
        write_json_atomic(job, identity)
        return False

    def _clear_temporaries(self) -> None:
        """Half-written files of a killed run (completed ones are renamed into place)."""
        for d in (self.spool, self.shards):
            d.mkdir(parents=True, exist_ok=True)
            for p in d.iterdir():
                if ".tmp-" in p.name or p.name.startswith("."):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()

    def tokenizer(self, make: Callable[[], Tokenizer]) -> Tokenizer:
        """The job's tokenizer: the one saved by an earlier attempt, else `make()` saved now."""
        path = self.path / "tokenizer.json"
        if path.is_file():
            return tk.load_tokenizer(str(path))
        tok = make()
        tmp = path.with_name("tokenizer.json.tmp")
        tok.save(str(tmp))
        tmp.replace(path)
        return tok

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
