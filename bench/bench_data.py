"""Data benchmarks on the Python standard library (~30 MB of code): tokenize + pack throughput of
the single-process writer and of the Ray Data job with 1 and 2 workers (byte-level and BPE 4096),
the workers' peak memory at two corpus sizes, and the cost model those numbers imply.

Targets: 2 workers / 1 worker >= 1.7x on this 2-core machine (the stdlib, and the stdlib copied
3x / 6x with --quick / without, where the job's fixed start-up costs weigh less); peak RSS of the
driver and of a worker independent of the corpus size (the copies vs the stdlib: <= 1.25). Ray runs on a private 2-CPU
cluster started once (no dashboard); its start-up is not timed, every dataset's actor start-up
is. Each configuration runs twice and the faster run counts (the machine is shared). Beside the
target: what two plain tokenizer processes (no Ray) gain over one here, the machine's ceiling.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import Row

SEQ_LEN = 512
COST_CPUS = (8, 64, 512)  # the cost model's cluster sizes
CORPUS_GB = 100


def _mb(path_glob_files: list[Path]) -> float:
    return sum(f.stat().st_size for f in path_glob_files) / 1e6


class _PeakRss:
    """The driver's resident memory, sampled every 50 ms while a block runs."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> tuple[float, float]:
        """(peak, growth during the block) in MiB."""
        return self.peak / 2**20, (self.peak - self.start) / 2**20


def _single(spec, tok, out: Path) -> float:
    """The single-process writer (what `ft-ray data corpus` does without --ray): seconds."""
    from ft_ray.data.corpus_plan import plan_source, resolve_buckets
    from ft_ray.data.shards import write_corpus_shards
    from ft_ray.data.sources import iter_documents

    t0 = time.perf_counter()
    write_corpus_shards(iter_documents(spec.source, spec.column, spec.max_doc_bytes), tok, spec.seq_len, out,
                        val_fraction=spec.val_fraction, progress=lambda _: None, source=spec.source,
                        tokenizer_spec=spec.tokenizer, num_buckets=resolve_buckets(spec, plan_source(spec)))
    return time.perf_counter() - t0


def _ray(spec, out: Path, workers: int) -> tuple[float, dict, tuple[float, float]]:
    """The Ray Data job: (seconds, the workers' stats, the driver's (peak, growth) RSS in MiB)."""
    from ft_ray.data.prepare import prepare_corpus

    stats: dict = {}
    with _PeakRss() as rss:
        t0 = time.perf_counter()
        prepare_corpus(spec, out, concurrency=workers, progress=lambda _: None, stats=stats)
        seconds = time.perf_counter() - t0
    return seconds, stats, rss.mb


def _best_of_2(fn, out: Path):
    """The faster of two runs (the second replaces the first's output)."""
    first = fn(out)
    shutil.rmtree(out)
    second = fn(out)
    return min(first, second, key=lambda r: r[0] if isinstance(r, tuple) else r)


def _throughput(name: str, spec, tok, mb: float, tmp: Path) -> tuple[list[Row], dict, tuple]:
    t_single = _best_of_2(lambda out: _single(spec, tok, out), tmp / f"{name}-single")
    t1, stats1, _ = _best_of_2(lambda out: _ray(spec, out, 1), tmp / f"{name}-ray1")
    two = t2, stats2, _ = _best_of_2(lambda out: _ray(spec, out, 2), tmp / f"{name}-ray2")
    same = _same_files(tmp / f"{name}-single", tmp / f"{name}-ray1", tmp / f"{name}-ray2")
    stage = stats1["tokenize_wall_seconds"] / stats2["tokenize_wall_seconds"]
    fixed = t1 - stats1["tokenize_seconds"]
    rows = [Row(f"tokenize + pack stdlib, {name}: single process", mb / t_single, "MB/s", "",
                f"{mb:.1f} MB in {t_single:.1f} s; the Ray job writes the same bytes: {same}"),
            Row(f"tokenize + pack stdlib, {name}: Ray Data, 1 worker", mb / t1, "MB/s", "",
                f"{t1:.1f} s wall, of which {fixed:.1f} s not tokenizing (actor and task start, packing); "
                f"tokenizer {stats1['tokenize_mb_per_s_per_worker']:.2f} MB/s per worker"),
            Row(f"tokenize + pack stdlib, {name}: Ray Data, 2 workers", mb / t2, "MB/s", "",
                f"{t2:.1f} s wall; tokenizer {stats2['tokenize_mb_per_s_per_worker']:.2f} MB/s per worker"),
            Row(f"Ray Data 2 workers / 1 worker, {name}", t1 / t2, "x", ">= 1.7",
                f"whole job; the tokenize stage alone {stage:.2f}x")]
    return rows, stats1, two


def _ceiling(tmp: Path) -> Row:
    """Two plain tokenizer processes at once vs one (no Ray): what 2 cores give here."""
    script = ("import os, time; os.environ['TOKENIZERS_PARALLELISM'] = 'false'\n"
              "from ft_ray.data.sources import iter_documents; from ft_ray.data import tokenizer as tk\n"
              "docs = [d.text for d, _ in zip(iter_documents('stdlib'), range(600))]; tok = tk.byte_tokenizer()\n"
              "t0 = time.perf_counter()\n"
              "for i in range(0, len(docs), 64): tk.encode_batch(tok, docs[i:i + 64])\n"
              "print(time.perf_counter() - t0)\n")

    def run(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
                 for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    one, two = min(run(1) for _ in range(2)), min(run(2) for _ in range(2))
    return Row("machine ceiling: 2 tokenizer processes / 1 (no Ray)", 2 * one / two, "x", "",
               f"{one:.2f} s alone, {two:.2f} s for two at once")


def _same_files(*dirs: Path) -> bool:
    names = [sorted(p.name for p in d.iterdir()) for d in dirs]
    return all(n == names[0] for n in names) and all(
        (d / n).read_bytes() == (dirs[0] / n).read_bytes() for d in dirs[1:] for n in names[0])


def _copies(tmp: Path, times: int) -> tuple[str, float]:
    """The stdlib copied `times` times: a larger corpus of the same documents (glob, MB)."""
    from ft_ray.data.sources import stdlib_files

    files = stdlib_files() * times
    for i, f in enumerate(files):
        dest = tmp / f"copies-{times}" / f"{i // 1000:03d}" / f"{i:06d}.py"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    return str(tmp / f"copies-{times}" / "*" / "*.py"), _mb(files)


def _larger_rows(tmp: Path, times: int, small: tuple[float, dict, tuple], mb_small: float) -> list[Row]:
    """1 vs 2 workers on `times` x the stdlib (fixed costs amortized), and peak RSS there vs on
    the stdlib: the same documents, so only the corpus size differs."""
    from ft_ray.data.corpus_plan import CorpusSpec

    source, mb = _copies(tmp, times)
    spec = CorpusSpec(source=source, tokenizer="bytes", seq_len=SEQ_LEN)
    t1, _, _ = _ray(spec, tmp / "larger-1", 1)
    t2, big, (drv_l, grow_l) = _ray(spec, tmp / "larger-2", 2)
    _, small_stats, (drv_s, grow_s) = small
    label = f"{mb_small:.0f} MB vs {mb:.0f} MB of the same files"
    return [Row(f"Ray Data 2 workers / 1 worker, bytes, stdlib x{times}", t1 / t2, "x", ">= 1.7",
                f"{mb:.0f} MB: {t1:.1f} s vs {t2:.1f} s ({mb / t2:.2f} MB/s)"),
            Row("peak RSS, driver (larger / smaller corpus)", drv_l / drv_s, "x", "<= 1.25",
                f"{drv_s:.0f} -> {drv_l:.0f} MiB (+{grow_s:.0f} / +{grow_l:.0f} MiB during the run); {label}"),
            Row("peak RSS, tokenizer worker (larger / smaller corpus)",
                big["tokenizer_peak_rss_mb"] / small_stats["tokenizer_peak_rss_mb"], "x", "<= 1.25",
                f"{small_stats['tokenizer_peak_rss_mb']:.0f} -> {big['tokenizer_peak_rss_mb']:.0f} MiB"),
            Row("peak RSS, pack task (larger / smaller corpus)",
                big["pack_peak_rss_mb"] / max(small_stats["pack_peak_rss_mb"], 1e-9), "x", "<= 1.25",
                f"{small_stats['pack_peak_rss_mb']:.0f} -> {big['pack_peak_rss_mb']:.0f} MiB (pooled processes: a "
                "later run's peak includes an earlier one's)")]


def _cost_rows(name: str, stats: dict) -> list[Row]:
    """MB/s per CPU measured here -> hours for CORPUS_GB on N CPUs: an extrapolation that
    assumes linear scaling, a shared file system that keeps up, and B = auto buckets."""
    from ft_ray.data.corpus_plan import BUCKET_BYTES

    per_cpu = stats["tokenize_mb_per_s_per_worker"]
    pack_per_task = stats["num_chars"] / 1e6 / max(stats["pack_seconds"], 1e-9)
    buckets = -(-CORPUS_GB * 10**9 // BUCKET_BYTES)
    hours = {n: (CORPUS_GB * 1e3 / (per_cpu * n) + CORPUS_GB * 1e3 / (pack_per_task * min(n, buckets))) / 3600
             for n in COST_CPUS}
    note = ", ".join(f"{n} CPUs: {h:.2f} h" for n, h in hours.items())
    return [Row(f"cost model, {name}: tokenize MB/s per CPU (measured)", per_cpu, "MB/s", "",
                f"pack {pack_per_task:.0f} MB of text/s per task"),
            Row(f"extrapolation, {name}: {CORPUS_GB} GB on {COST_CPUS[1]} CPUs", hours[COST_CPUS[1]], "h", "",
                f"{note} (linear scaling, {buckets} buckets, shared FS keeps up)")]


def run(quick: bool = False) -> list[Row]:
    import ray

    from ft_ray.cluster import set_cluster_env
    from ft_ray.data.corpus_plan import CorpusSpec, build_tokenizer, plan_source
    from ft_ray.data.sources import stdlib_files
    from ft_ray.data.tokenizer import byte_tokenizer

    set_cluster_env(joining=False)  # the embedded cluster's environment: a private cluster
    mb = _mb(stdlib_files())
    tmp = Path(tempfile.mkdtemp(prefix="ft-ray-bench-data-"))
    rows: list[Row] = [_ceiling(tmp)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=str(tmp / "ray"))
    try:
        spec = CorpusSpec(source="stdlib", tokenizer="bytes", seq_len=SEQ_LEN)
        part, stats_bytes, two_bytes = _throughput("bytes", spec, byte_tokenizer(), mb, tmp)
        rows += part
        bpe = CorpusSpec(source="stdlib", tokenizer="bpe:4096", seq_len=SEQ_LEN)
        t0 = time.perf_counter()
        tok = build_tokenizer(bpe, plan_source(bpe))
        rows.append(Row("BPE training on stdlib (vocab 4096)", time.perf_counter() - t0, "s", "",
                        f"{mb:.1f} MB, sample of <= {bpe.bpe_sample_docs} documents"))
        tok.save(str(tmp / "bpe4096.json"))
        part, stats_bpe, _ = _throughput("BPE 4096", CorpusSpec(source="stdlib", tokenizer=str(tmp / "bpe4096.json"),
                                                              seq_len=SEQ_LEN), tok, mb, tmp)
        rows += part
        rows += _larger_rows(tmp, 3 if quick else 6, two_bytes, mb)
        rows += _cost_rows("bytes", stats_bytes) + _cost_rows("BPE 4096", stats_bpe)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
