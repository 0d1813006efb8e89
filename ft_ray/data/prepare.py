"""Corpus preparation as a Ray Data job (`ft-ray data corpus --ray | --workers N`).

The same shards as the single-process writer (shards.py), byte for byte, from many processes:

1. The driver plans: the source's pieces (files, Parquet row groups, row ranges; listings and
   footers only, no text), checks what it can cheaply (readable files, sizes, columns and their
   types), groups the pieces into units of consecutive pieces, and builds the tokenizer (a BPE
   tokenizer is trained on a seeded sample of `bpe_sample_docs` documents). The spec, the plan,
   the buckets and the sample are corpus_plan.py's, shared with the single-process writer.
   A streamed `hf:` source cannot be split, so the driver reads it, one bounded part at a time,
   into Parquet parts in the work directory; only the tokenization is parallel for it.
2. Ray Data, `map_batches` with `concurrency` tokenizer actors (default: the cluster's CPUs):
   each unit's documents are tokenized, split by document hash (`split_of`) and assigned to one
   of B buckets by another hash of their id (`bucket_of`); each unit spools its ids by
   (split, bucket) to the work directory.
3. One Ray task per (split, bucket), spread over the nodes: its ids, read from every unit in
   unit order (the source's order), are packed into rows of seq_len + 1 and written as Parquet
   shards, each bucket its own (`train-<bucket>-<k>.parquet`); it returns rows and sha256.
4. The driver moves the shards into the atomic --out and writes tokenizer.json and manifest.json.

Determinism: a bucket's rows are its documents' ids in source order, so they depend on the
source, the tokenizer and B only, never on the number of workers, the units or the scheduling;
`write_corpus_shards(num_buckets=B)` writes the same bytes in one process. B (`--buckets`) is
recorded in the manifest; `auto` is one bucket per BUCKET_BYTES of source (so a corpus under
1 GiB gets B = 1, today's layout) and 1 for a streamed hf: source, whose size is unknown.

Interruption: the work lives in `.<out>.prepare/` beside --out (prepare_work.py); a rerun with
the same arguments keeps every unit and bucket whose marker and sha256 verify.

Memory: per worker, see prepare_workers.py (a bounded batch, never a unit or a bucket); the
driver holds the plan and per-unit counts (a few hundred bytes per file or row group).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ft_ray.data import tokenizer as tk
from ft_ray.data.corpus_plan import (
    CorpusSpec,
    SourcePlan,
    build_tokenizer,
    plan_source,
    resolve_buckets,
)
from ft_ray.data.errors import DataError
from ft_ray.data.manifest import Manifest
from ft_ray.data.prepare_work import WorkDir
from ft_ray.data.prepare_workers import TokenizeUnits, pack_bucket, section_key, write_json_atomic
from ft_ray.data.shards import (
    PROGRESS_SECONDS,
    SPLITS,
    _report,
    _save,
    check_corpus_splits,
    check_out_dir,
    corpus_manifest,
    merge_buckets,
)
from ft_ray.data.sources import (
    Piece,
    Skipped,
    describe_skipped,
    iter_documents,
)
from ft_ray.fsutil import atomic_directory

# units: ~16 per corpus, more for large ones (each at most UNIT_MAX_BYTES). Not smaller: a Ray
# Data task costs ~50 ms of driver and raylet time, taken from the workers on a small machine
UNIT_TARGET_COUNT = 16
UNIT_MIN_BYTES, UNIT_MAX_BYTES = 64 << 10, 16 << 20
HF_PART_DOCS, HF_PART_BYTES = 16384, 32 << 20  # a streamed source's spooled parts
WAIT_FOR_WORKERS_S = 600  # a joined cluster may have to autoscale to --workers CPUs
ACTOR_INIT_DEATHS = 3  # tokenizer actors that may die while starting before the job fails


def prepare_corpus(spec: CorpusSpec, out_dir: str | Path, overwrite: bool = False,
                   concurrency: int | None = None, progress: Callable[[str], Any] = print,
                   stats: dict | None = None) -> Manifest:
    """Tokenize and pack `spec`'s corpus into shards at `out_dir` with Ray Data (module docstring).

    `concurrency`: tokenizer actors (default: the cluster's CPUs). Joins the cluster named by
    RAY_ADDRESS, uses the one this process already has, or starts an embedded one. `stats`, if
    given, receives the workers' own measurements (`worker_stats`).
    """
    started = time.monotonic()
    spec.check()
    out = check_out_dir(out_dir, overwrite)
    plan = plan_source(spec)
    given = None if spec.tokenizer.startswith("bpe:") else tk.load_tokenizer(spec.tokenizer)
    num_buckets = resolve_buckets(spec, plan)
    identity = dataclasses.asdict(spec) | {  # what a resumed run must share with the interrupted one
        "num_buckets": num_buckets, "source_fingerprint": plan.fingerprint if plan else None,
        "tokenizer_sha256": hashlib.sha256(given.to_str().encode()).hexdigest() if given else None}
    work = WorkDir(out)
    work.open(identity, overwrite, progress)
    try:
        plan = plan or _spool_stream(spec, work, progress)
        if given is None:
            progress(f"training {spec.tokenizer} on up to {spec.bpe_sample_docs} documents of "
                     f"{spec.source} (seed {spec.seed}) ...")
        tok = work.tokenizer(lambda: given or build_tokenizer(spec, plan))
        manifest = corpus_manifest(spec.source, spec.tokenizer, tok, spec.seq_len, spec.val_fraction,
                                   num_buckets)
        with _ray_data(concurrency, progress) as workers:
            t0 = time.monotonic()
            units = _tokenize(spec, plan, work, manifest, workers, progress)
            skipped = _skipped(plan, units)
            _check_counts(spec, units, skipped, num_buckets)  # before any packing
            t1 = time.monotonic()
            parts = _pack(spec, work, manifest, units, workers, progress)
            walls = {"tokenize_wall_seconds": t1 - t0, "pack_wall_seconds": time.monotonic() - t1}
        manifest["splits"] = merge_buckets(parts, num_buckets)
        manifest["skipped"] = skipped.to_manifest()  # keys in the single-process writer's order
        _report_workers(worker_stats(units, parts) | walls, parts, progress, stats)
        _move_into_place(work, manifest, tok, out, overwrite)
    except DataError:
        work.discard()  # bad input: a rerun must change something, so nothing is worth keeping
        raise
    work.discard()
    _report(out, manifest, progress, started)
    return manifest


def _move_into_place(work: WorkDir, manifest: Manifest, tok, out: Path, overwrite: bool) -> None:
    """The finished shards (renamed: same file system), tokenizer.json and manifest.json, all at
    once: the manifest is written only here, when every shard it lists is complete."""
    with atomic_directory(out) as tmp:
        for info in manifest["splits"].values():
            for shard in info["shards"]:
                os.replace(work.shards / shard["file"], tmp / shard["file"])
        _save(tmp, manifest, tok, out, overwrite)


def _spool_stream(spec: CorpusSpec, work: WorkDir, progress: Callable[[str], Any]) -> SourcePlan:
    """Read a streamed source on the driver into Parquet parts (bounded: one part at a time)."""
    done = work.hf / "done.json"
    if done.is_file():
        state = json.loads(done.read_text())
        return SourcePlan([Piece(**p) for p in state["pieces"]], state["num_bytes"], "", True, state["skipped"])
    shutil.rmtree(work.hf, ignore_errors=True)  # a part-way spool: the stream is read again
    work.hf.mkdir(parents=True)
    progress(f"reading {spec.source} on the driver into {work.hf} ...")
    stream = iter_documents(spec.source, spec.column, spec.max_doc_bytes)
    pieces: list[Piece] = []
    first = 0
    while batch := _take_part(stream):
        path = work.hf / f"part-{len(pieces):05d}.parquet"
        pq.write_table(pa.table({"id": [d.id for d in batch], "text": [d.text for d in batch]}), path)
        pieces.append(Piece("hf-part", str(path), spec.source, 0, first, len(batch), path.stat().st_size))
        first += len(batch)
    plan = SourcePlan(pieces, sum(p.num_bytes for p in pieces), "", True, stream.skipped.to_manifest())
    write_json_atomic(done, {"pieces": [dataclasses.asdict(p) for p in pieces], "num_bytes": plan.num_bytes,
                             "skipped": plan.skipped})
    return plan


def _take_part(stream: Iterator) -> list:
    batch, size = [], 0
    for doc in stream:
        batch.append(doc)
        size += len(doc.text)
        if len(batch) >= HF_PART_DOCS or size >= HF_PART_BYTES:
            break
    return batch


def plan_units(plan: SourcePlan) -> list[list[Piece]]:
    """Consecutive pieces, about num_bytes / UNIT_TARGET_COUNT each: the order is the source's."""
    target = min(UNIT_MAX_BYTES, max(UNIT_MIN_BYTES, plan.num_bytes // UNIT_TARGET_COUNT))
    units, unit, size = [], [], 0
    for piece in plan.pieces:
        unit.append(piece)
        size += piece.num_bytes
        if size >= target:
            units.append(unit)
            unit, size = [], 0
    return units + ([unit] if unit else [])


@contextlib.contextmanager
def _ray_data(concurrency: int | None, progress: Callable[[str], Any]) -> Iterator[int]:
    """Ray (joined, already running, or embedded) with Ray Data's progress bars unless
    RAY_DATA_DISABLE_PROGRESS_BARS; yields the number of tokenizer workers."""
    bars = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0") in ("", "0")
    import ray
    from ray.data import DataContext

    from ft_ray.cluster import ensure_ray

    owned = ensure_ray(quiet=not bars)
    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.max_consecutive_actor_init_deaths)
    try:
        ctx.enable_progress_bars = bars
        # an actor lost while starting (its node removed by the autoscaler) is replaced, not fatal
        ctx.max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS
        cpus = int(ray.cluster_resources().get("CPU", 0))
        workers = concurrency or max(1, cpus)
        if workers > cpus and owned and not os.environ.get("RAY_ADDRESS"):
            raise DataError(f"--workers {workers}: the local Ray cluster has {cpus} CPUs")
        _wait_for_cpus(workers, progress)
        yield workers
    finally:
        ctx.enable_progress_bars, ctx.max_consecutive_actor_init_deaths = saved
        if owned:
            ray.shutdown()


def _wait_for_cpus(workers: int, progress: Callable[[str], Any]) -> None:
    """Wait until the cluster can hold `workers` 1-CPU actors, so the work is spread over the nodes
    it needs from the start. A placement group of that shape is demand the autoscaler acts on;
    it is removed once granted (the actors then hold the nodes)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus >= workers:
        return
    progress(f"waiting up to {WAIT_FOR_WORKERS_S} s for {workers} CPUs (the cluster has {cpus:g} now)")
    probe = placement_group([{"CPU": 1}] * workers)
    try:
        if not probe.wait(timeout_seconds=WAIT_FOR_WORKERS_S):
            raise DataError(f"--workers {workers}: the cluster did not grow to {workers} CPUs within "
                            f"{WAIT_FOR_WORKERS_S} s; lower --workers")
    finally:
        remove_placement_group(probe)


class _Meter:
    def __init__(self, what: str, total: int, progress: Callable[[str], Any]):
        self.what, self.total, self.progress = what, total, progress
        self.done = self.resumed = self.chars = 0
        self.started = self.last = time.monotonic()

    def update(self, meta: dict) -> None:
        self.done += 1
        self.resumed += bool(meta.get("resumed"))
        self.chars += meta.get("num_chars", 0)
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS or self.done == self.total:
            self.last = now
            rate = self.chars / 1e6 / max(now - self.started, 1e-9)
            self.progress(f"  {self.what} {self.done}/{self.total}"
                          + (f" ({self.resumed} kept from the interrupted run)" if self.resumed else "")
                          + (f", {self.chars / 1e6:.1f} MB of text, {rate:.1f} MB/s" if self.chars else "")
                          + f" ({now - self.started:.0f}s)")


def _run(ds, what: str, total: int, progress: Callable[[str], Any]) -> list[dict]:
    """Execute a dataset of JSON `meta` rows; an `error` row is bad input (a DataError)."""
    metas, meter = [], _Meter(what, total, progress)
    for row in ds.iter_rows():
        meta = json.loads(row["meta"])
        if "error" in meta:
            raise DataError(meta["error"])
        metas.append(meta)
        meter.update(meta)
    return metas


def _tokenize(spec: CorpusSpec, plan: SourcePlan, work: WorkDir, manifest: Manifest, workers: int,
              progress: Callable[[str], Any]) -> list[dict]:
    """Stage 1: every unit tokenized and spooled; their markers in unit order."""
    import ray.data

    units = plan_units(plan)
    rows = [{"unit": i, "pieces": json.dumps([dataclasses.asdict(p) for p in unit])} for i, unit in enumerate(units)]
    kwargs = {"work": str(work.path), "column": spec.column, "val_fraction": spec.val_fraction,
              "num_buckets": manifest["num_buckets"], "dtype": manifest["dtype"],
              "max_doc_bytes": spec.max_doc_bytes, "source": spec.source}
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        TokenizeUnits, fn_constructor_kwargs=kwargs, batch_size=1, num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows))))
    progress(f"tokenizing {len(units)} units of {spec.source} ({plan.num_bytes / 1e6:.1f} MB) with "
             f"{min(workers, len(rows))} workers into {manifest['num_buckets']} buckets ...")
    return sorted(_run(ds, "units", len(rows), progress), key=lambda m: m["unit"])


def _skipped(plan: SourcePlan, units: list[dict]) -> Skipped:
    skipped = Skipped()
    for part in ([plan.skipped] if plan.skipped else []) + [u["skipped"] for u in units]:
        skipped.merge(part)
    return skipped


def _segments(units: list[dict], num_buckets: int) -> dict[tuple[str, int], list[list]]:
    """(split, bucket) -> its [spool file, offset, num_tokens, num_docs] in unit order."""
    return {(s, b): [[u["file"], *u["sections"][section_key(s, b)]]
                     for u in units if section_key(s, b) in u["sections"]]
            for s in SPLITS for b in range(num_buckets)}


def _check_counts(spec: CorpusSpec, units: list[dict], skipped: Skipped, num_buckets: int) -> None:
    """The single-process writer's errors, from the spooled counts: no text, no train row."""
    counts = {s: {"num_documents": 0, "num_sequences": 0} for s in SPLITS}
    for (split, _), segs in _segments(units, num_buckets).items():  # each bucket packs its own rows
        counts[split]["num_documents"] += sum(seg[3] for seg in segs)
        counts[split]["num_sequences"] += sum(seg[2] for seg in segs) // (spec.seq_len + 1)
    if sum(c["num_documents"] for c in counts.values()) == 0 and (skipped.num_binary or skipped.num_empty):
        raise DataError(f"source {spec.source!r} produced no text documents: {describe_skipped(skipped)}")
    check_corpus_splits(counts, spec.source, spec.seq_len, num_buckets)


def _pack(spec: CorpusSpec, work: WorkDir, manifest: Manifest, units: list[dict], workers: int,
          progress: Callable[[str], Any]) -> dict[tuple[str, int], dict]:
    """Stage 2: one Ray task per (split, bucket), at most `workers` at a time, in a SPREAD
    placement group of `workers` CPUs (so over every node that has one); their results. The
    group is granted once the tokenizer actors have given their CPUs back: tasks submitted
    before that would all land on whichever node freed its CPUs first (on a busy machine the
    whole stage did). Plain tasks, not a second dataset: a Ray Data task's worker first imports
    ray.data (~1 s each here, for ~0.3 s of work)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    num_buckets, row_len = manifest["num_buckets"], spec.seq_len + 1
    segments = _segments(units, num_buckets)
    parts = {key: {"num_sequences": 0, "num_tokens": 0, "num_documents": 0, "num_dropped_tokens": 0, "shards": []}
             for key in segments}  # an empty (split, bucket) has no task and no shard
    todo = [(key, segs) for key, segs in segments.items() if segs]
    if not todo:
        return parts
    task = ray.remote(num_cpus=1)(pack_bucket)
    progress(f"packing {len(todo)} (split, bucket) streams into rows of {row_len} ...")
    group = placement_group([{"CPU": 1}] * workers, strategy="SPREAD")
    pending: dict[Any, tuple[tuple[str, int], int]] = {}  # ref -> (split, bucket), its bundle
    try:
        if not group.wait(timeout_seconds=WAIT_FOR_WORKERS_S):
            raise DataError(f"--workers {workers}: {workers} CPUs did not come free for packing within "
                            f"{WAIT_FOR_WORKERS_S} s; lower --workers")
        meter = _Meter("buckets", len(todo), progress)
        free = list(range(workers))  # bundles with no task
        while todo or pending:
            while todo and free:
                (split, bucket), segs = todo.pop(0)
                bundle = free.pop(0)
                in_bundle = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)
                ref = task.options(scheduling_strategy=in_bundle).remote(
                    str(work.path), split, bucket, segs, row_len, manifest["dtype"], spec.shard_max_bytes, num_buckets)
                pending[ref] = ((split, bucket), bundle)
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                meta = ray.get(ref)
                key, bundle = pending.pop(ref)
                parts[key] = meta
                free.append(bundle)
                meter.update(meta)
    finally:
        for ref in pending:  # interrupted: the rest need not run
            ray.cancel(ref, force=True)
        remove_placement_group(group)
    return parts


def worker_stats(units: list[dict], parts: dict[tuple[str, int], dict]) -> dict[str, float]:
    """What the workers measured themselves (units and buckets kept from an interrupted run
    count with their original times)."""
    packs = [m for m in parts.values() if "seconds" in m]
    chars, seconds = sum(u["num_chars"] for u in units), sum(u["seconds"] for u in units)
    return {"num_chars": chars, "tokenize_seconds": seconds,
            "tokenize_mb_per_s_per_worker": chars / 1e6 / max(seconds, 1e-9),
            "pack_seconds": sum(m["seconds"] for m in packs),
            "tokenizer_peak_rss_mb": max(u["peak_rss_mb"] for u in units),
            "pack_peak_rss_mb": max((m["peak_rss_mb"] for m in packs), default=0.0)}


def _report_workers(measured: dict, parts: dict[tuple[str, int], dict], progress: Callable[[str], Any],
                    stats: dict | None) -> None:
    """The workers' own measurements, and which nodes wrote the shards (from the tasks' metadata)."""
    progress(f"workers: {measured['num_chars'] / 1e6:.1f} MB tokenized in {measured['tokenize_seconds']:.1f} "
             f"worker-s ({measured['tokenize_mb_per_s_per_worker']:.2f} MB/s each), packed in "
             f"{measured['pack_seconds']:.1f} task-s; peak RSS: tokenizer {measured['tokenizer_peak_rss_mb']:.0f} "
             f"MB, pack {measured['pack_peak_rss_mb']:.0f} MB")
    if stats is not None:
        stats.update(measured)
    nodes: Counter[str] = Counter()
    for meta in parts.values():
        if meta["shards"]:
            nodes[meta["node"]] += len(meta["shards"])
    progress(f"shards written on {len(nodes)} node(s): "
             + ", ".join(f"{node} ({n} shards)" for node, n in sorted(nodes.items())))
