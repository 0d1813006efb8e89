"""Sweeps: the smoke space end to end on the session's Ray cluster with ASHA, a re-run that
resumes instead of retraining, and every validation error of a space file."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml

from ft_ray.config import ConfigError
from ft_ray.tune.space import load_space

ROOT = Path(__file__).resolve().parent.parent


def _space(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    raw["storage_path"] = str(tmp_path / "sweeps")
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.timeout(420)
def test_smoke_sweep_then_rerun_resumes(ray_cluster, tmp_path):
    from ft_ray.tune.runner import run_sweep

    space = _space(tmp_path)
    sweep_dir = run_sweep(space)
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert len(rows) == 2 and {r["model.free_bits"] for r in rows} == {"0.125", "1.0"}
    for r in rows:
        assert math.isfinite(float(r["val_nll"])) and math.isfinite(float(r["kl_bits"]))
        # ASHA (grace 2, max_t 4, factor 2) may stop the worse trial at its second evaluation
        assert (int(r["evaluations"]), r["status"]) in {(4, "ok"), (2, "stopped early (ASHA)")}
    finished = [r for r in rows if r["status"] == "ok"]
    assert finished
    assert (sweep_dir / "results.md").read_text().count("| trial-") == 2
    assert (sweep_dir / "nll_kl_vs_kappa.png").stat().st_size > 5000
    best = min(finished, key=lambda r: float(r["val_nll"]))
    assert (sweep_dir / "best_bundle" / "model.safetensors").read_bytes() == (
        sweep_dir / "trials" / best["trial"] / "bundle" / "model.safetensors").read_bytes()
    bundles = {p: p.stat().st_mtime_ns for p in (sweep_dir / "trials").glob("*/bundle/model.safetensors")}
    assert len(bundles) == len(finished)
    run_sweep(space)  # the same name again: restored, finished trials are not trained again
    assert {p: p.stat().st_mtime_ns for p in bundles} == bundles
    assert len(list(csv.DictReader((sweep_dir / "results.csv").open()))) == 2


@pytest.mark.parametrize("change, key", [
    ({"bogus": 1}, "bogus"),
    ({"space": {"model.nope": {"grid": [1, 2]}}}, "model.nope"),
    ({"space": {"model.latent_bits": {"grid": [4, 0]}}}, "latent_bits"),
    ({"space": {"model.free_bits": {"gaussian": [0, 1]}}}, "space.model.free_bits"),
    ({"space": {"optim.lr": {"loguniform": [0, 1]}}}, "space.optim.lr.loguniform"),
    ({"space": {"optim.lr": {"uniform": [0.1, 0.01]}}}, "space.optim.lr.uniform"),
    ({"metric": "val_accuracy"}, "metric"),
    ({"mode": "best"}, "mode"),
    ({"base": {"config": "no-such-preset"}}, "base.config"),
    ({"scheduler": {"type": "hyperband"}}, "scheduler"),
    ({"resources": {"gpus": 1}}, "resources"),
])
def test_space_validation_names_file_and_key(tmp_path, change, key):
    path = _space(tmp_path, **change)
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert str(path) in str(err.value) and key in str(err.value)


def test_metric_must_be_reported_by_every_arm(tmp_path):
    path = _space(tmp_path, metric="val_z_gap", reference_arms=[{"model.arch": "baseline"}])
    with pytest.raises(ConfigError, match="val_z_gap"):
        load_space(path)
    assert load_space(_space(tmp_path, metric="val_z_gap")).metric == "val_z_gap"  # FT-only sweep: fine


def test_shipped_spaces_are_valid():
    sizes = {p.stem: len(load_space(p).grid_arms()) for p in (ROOT / "tune_spaces").glob("*.yaml")}
    assert sizes == {"smoke": 2, "latent_free_bits": 25, "seeds": 6}


@pytest.mark.timeout(420)
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path):
    """A sweep stopped with Ctrl-C (SIGINT) after its first trial finished, then run again: the
    finished trial keeps its bundle untouched, the other one completes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from ft_ray.tune.runner import run_sweep

    space = _space(tmp_path, max_concurrent_trials=1, scheduler=None)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.sweep", "--space", str(space)], cwd=ROOT,
                            env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    sweep_dir = tmp_path / "sweeps" / "smoke"
    deadline = time.monotonic() + 240
    bundles: list[Path] = []
    while time.monotonic() < deadline and not (bundles and len(list((sweep_dir / "trials").glob("*/train.csv"))) == 2):
        bundles = list((sweep_dir / "trials").glob("*/bundle/model.safetensors"))
        time.sleep(0.5)  # until the first trial finished and the second one is training
    assert bundles, "the first trial did not finish in time"
    proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    first = bundles[0]
    stamp = first.stat().st_mtime_ns
    # it really stopped before the end: the second trial has no bundle
    assert list((sweep_dir / "trials").glob("*/bundle/model.safetensors")) == [first]
    run_sweep(space)
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert first.stat().st_mtime_ns == stamp  # the finished trial was not trained again
    assert len(list((sweep_dir / "trials").glob("*/bundle/model.safetensors"))) == 2
