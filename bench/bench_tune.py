"""Sweep overhead: wall time of the smoke sweep vs the sum of its trials' own training time."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import Row

ROOT = Path(__file__).resolve().parent.parent


def run(quick: bool = False) -> list[Row]:
    import ray

    from ft_ray.cluster import set_cluster_env
    from ft_ray.tune.runner import run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="ft-ray-bench-tune-"))
    os.environ.update(RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0")
    set_cluster_env(joining=False)  # the embedded cluster's environment: a private cluster
    try:
        space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
        space["storage_path"] = str(tmp)
        path = tmp / "smoke.yaml"
        path.write_text(yaml.safe_dump(space))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            t0 = time.perf_counter()
            sweep_dir = run_sweep(path)
            wall = time.perf_counter() - t0
        finally:
            ray.shutdown()
        import csv

        trials = list(csv.DictReader((sweep_dir / "results.csv").open()))
        train_s = 0.0
        for t in trials:  # each trial's own time: first to last training metric written
            rows = list(csv.DictReader((sweep_dir / "trials" / t["trial"] / "train.csv").open()))
            start = (sweep_dir / "trials" / t["trial"] / "config.yaml").stat().st_mtime
            end = (sweep_dir / "trials" / t["trial"] / "train.csv").stat().st_mtime
            train_s += max(0.0, end - start) if rows else 0.0
        return [Row("smoke sweep wall time / sum of trials' training time", wall / train_s, "x", "",
                    f"{len(trials)} trials, wall {wall:.0f} s, training {train_s:.0f} s (trials run 2 at a time)")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
