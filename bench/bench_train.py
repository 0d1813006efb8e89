"""Training benchmarks on 2 CPU workers: Ray Train vs a plain torch.distributed launch of the
same loop, FT vs baseline, Ray Data ingest vs consumption and data wait, checkpoint cost, memory.

Targets: Ray/plain tokens/s >= 0.95 (issue 4); data wait < 5% of step time (issue 3).
"""

from __future__ import annotations

import csv
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Row
from ft_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SCALE = ["model.hidden_dim=256", "model.num_layers=8", "model.num_heads=8", "model.latent_bits=8",
         "data.batch_size=16", "train.log_every=20", "train.eval_every=1000", "train.checkpoint_every=1000",
         "train.export_bundle=false", "train.sample_groups=0", "optim.warmup_steps=10"]


def _cfg(tmp: Path, name: str, steps: int, *extra: str):
    return load_config(ROOT / "jobs/configs/letters-ft.yaml",
                       [f"train.storage_path={tmp}", f"train.name={name}", f"train.max_steps={steps}", *SCALE, *extra])


def _windows(run_dir: Path, key: str) -> list[float]:
    """A metric over the logged windows after the first (which holds start-up)."""
    rows = list(csv.DictReader((run_dir / "train.csv").open()))
    return [float(r[key]) for r in rows[1:]]


def _steady(run_dir: Path, key: str) -> float:
    return statistics.median(_windows(run_dir, key))


def _dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def checkpoint_rows(tmp: Path) -> list[Row]:
    from ft_ray.model import build_model
    from ft_ray.train.checkpoint import load_checkpoint, save_checkpoint
    from ft_ray.train.optim import build_optimizer, build_scheduler

    cfg = _cfg(tmp, "ckpt", 1, "model.latent_bits=16")
    model = build_model(cfg.model)
    opt = build_optimizer(model, 1e-3)
    sched = build_scheduler(opt, 10, 100, 1e-4)
    model.loss(torch.randint(0, 32, (2, 68)))["loss"].backward()
    opt.step()
    path = tmp / "ckpt-dir"
    t0 = time.perf_counter()
    save_checkpoint(path, model, opt, sched, {"step": 1, "epoch": 0, "batches_in_epoch": 1}, rank=0)
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_checkpoint(path, model, opt, sched, rank=0)
    t_load = time.perf_counter() - t0
    size = _dir_mib(path)
    params = model.num_params() * 4 / 2**20
    return [Row("checkpoint save (FT D=256 L=8 H=16, model+AdamW)", t_save, "s"),
            Row("checkpoint load", t_load, "s"),
            Row("checkpoint size / fp32 params", size / params, "x", "",
                f"{size:.0f} MiB for {params:.0f} MiB of fp32 weights")]


def run(quick: bool = False) -> list[Row]:
    import ray

    from ft_ray.cluster import ensure_ray
    from ft_ray.train.plain import launch_plain
    from ft_ray.train.trainer import fit

    steps, rounds = (60, 2) if quick else (100, 3)
    tmp = Path(tempfile.mkdtemp(prefix="ft-ray-bench-"))
    rows: list[Row] = []
    plain: list[float] = []
    ray_ft: list[float] = []
    try:
        # plain and Ray runs alternate, so that load from elsewhere on the machine (which moves
        # single runs by 10-20% within minutes here) weighs on both alike. The plain launch runs
        # with no Ray process around; Ray runs on the embedded cluster that `ft-ray train` starts.
        for r in range(rounds):
            launch_plain(_cfg(tmp, f"plain-ft-{r}", steps), tmp / f"plain-ft-{r}", world_size=2)
            plain += _windows(tmp / f"plain-ft-{r}", "tokens_per_s")
            ensure_ray(num_cpus=2)
            try:
                t0 = time.perf_counter()
                final = fit(_cfg(tmp, f"ray-ft-{r}", steps)).return_value
                tracking = (final["tracking_blocking_s"], final["tracking_close_s"], time.perf_counter() - t0)
                ray_ft += _windows(tmp / f"ray-ft-{r}", "tokens_per_s")
                if r == rounds - 1:
                    fit(_cfg(tmp, "ray-base", steps, "model.arch=baseline"))
                    ingest = ingest_tokens_per_s(tmp)
            finally:
                ray.shutdown()
        ray_med, plain_med = statistics.median(ray_ft), statistics.median(plain)
        ray_base = _steady(tmp / "ray-base", "tokens_per_s")
        last = tmp / f"ray-ft-{rounds - 1}"
        last_ft = _steady(last, "tokens_per_s")
        rows += [
            Row("Ray Train / plain torch.distributed tokens/s (FT, 2 workers)", ray_med / plain_med, "x", ">= 0.95",
                f"medians of {len(ray_ft)} and {len(plain)} windows of 20 steps over {rounds} alternating runs each: "
                f"Ray {ray_med:.0f} tok/s (range {min(ray_ft):.0f}-{max(ray_ft):.0f}), "
                f"plain {plain_med:.0f} tok/s (range {min(plain):.0f}-{max(plain):.0f})"),
            Row("FT / baseline training tokens/s (Ray, D=256 L=8 H=8)", last_ft / ray_base, "x", "",
                f"FT {last_ft:.0f}, baseline {ray_base:.0f} tok/s (last round)"),
            Row("data wait fraction of step time (Ray FT run)", _steady(last, "data_wait_frac"), "", "<= 0.05"),
            Row("Ray Data ingest into 2 workers / training consumption", ingest / ray_med, "x", ">= 1",
                f"ingest {ingest:.0f} tok/s alone"),
            Row("training peak memory per worker (FT)", _steady(last, "peak_mem_mib"), "MiB"),
            Row("MLflow tracking: time the loop waited on it / run time (embedded store, rank 0)",
                tracking[0] / tracking[2], "", "<= 0.01",
                f"{tracking[0] * 1e3:.0f} ms of a {tracking[2]:.0f} s run (every train and eval row logged); "
                f"{tracking[1]:.1f} s flushing at the end"),
        ]
        rows += checkpoint_rows(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def ingest_tokens_per_s(tmp: Path) -> float:
    """Both workers only consume batches: the pipeline's delivery rate, summed over workers."""
    import json

    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bench.ingest_probe import probe_loop
    from ft_ray.data.pipeline import build_datasets

    cfg = _cfg(tmp, "ingest", 1, "data.num_train_sequences=20000")
    datasets, _ = build_datasets(cfg.data, cfg.model)
    result = TorchTrainer(
        probe_loop(), train_loop_config={"batch_size": 16},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp), name="ingest"), datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"])).fit()
    stats = result.return_value
    if "tokens_per_s" in stats:
        return stats["tokens_per_s"] * 2
    return json.loads(result.metrics["stats"])["tokens_per_s"] * 2
