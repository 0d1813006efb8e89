"""Entry points end to end on the session's Ray cluster: the demo (shards -> Ray Train ->
honest comparison report -> Ray Serve over HTTP with fresh and shared plans), and its reuse of
finished runs and data."""

from __future__ import annotations

import json
import math
import os

import pytest


@pytest.mark.timeout(420)
def test_demo_end_to_end_then_reuse(ray_cluster, tmp_path, capsys):
    from jobs.demo import main

    args = ["--steps", "12", "--num-sequences", "10000", "--data", str(tmp_path / "letters"),
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| baseline |" in report and "| FT kappa=1 |" in report
    for png in ("curves.png", "samples.png"):
        assert (tmp_path / "out" / png).stat().st_size > 5000
    rows = {r["arm"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert rows["baseline"]["nll"] > 0 and math.isfinite(rows["FT kappa=1"]["nll"])
    assert rows["FT kappa=1"]["nll"] >= rows["FT kappa=1"]["ce_post"]  # the ELBO includes the KL
    assert rows["FT kappa=1"]["iwae"] <= rows["FT kappa=1"]["nll"] + 0.05  # IWAE-8 is no looser
    ft = rows["FT kappa=1"]  # the plan test with its chance level, interval and spreads
    # (12 steps: samples may all be invalid, leaving the figures NaN; tests/test_report.py pins them)
    assert {"pos_agree_chance", "pos_agree_shared_ci95", "start_spread_fresh", "start_spread_shared"} <= set(ft)
    assert "its chance level" in report and "pos_agree_chance" not in rows["baseline"]
    downstream = json.loads((tmp_path / "out" / "downstream.json").read_text())  # lm-eval, over plan seeds
    assert {(r["model"], r["task"], r["metric"], r["n"]) for r in downstream} == {
        ("baseline", "ftray_letters", "valid", 1), ("FT kappa=1", "ftray_letters", "valid", 3)}
    assert all(0 <= r["mean"] <= 1 for r in downstream) and "## Downstream" in report
    assert "one shared plan" in out and "z=[" in out
    served = report.split("## Served over HTTP (Ray Serve)")[1]  # the Serve step's section
    assert "| baseline | (no latent) |" in served and "| ft-kappa1 | one shared plan |" in served
    assert "gives the same text" in served  # a served sample replayed from its returned seed and codes
    assert json.loads((tmp_path / "out" / "served.json").read_text())["models"] == ["baseline", "ft-kappa1"]
    bundle = tmp_path / "runs" / "letters-kappa1" / "bundle" / "model.safetensors"
    stamp = bundle.stat().st_mtime_ns
    assert main([*args, "--no-serve"]) == 0  # a second demo reuses the shards and the finished runs
    again = capsys.readouterr().out
    assert "reusing the letter-task shards" in again and again.count("reusing the finished run") == 2
    assert bundle.stat().st_mtime_ns == stamp
    assert "Served over HTTP" not in (tmp_path / "out" / "report.md").read_text()  # rewritten, Serve skipped


def test_prepare_data_entry_point_writes_shards_and_says_where(tmp_path, capsys):
    from ft_ray.data.shards import validate_shards
    from jobs.prepare_data import main

    assert main(["synthetic", "--task", "letters", "--num-sequences", "50", f"--out={tmp_path / 'd'}"]) == 0
    assert f"wrote {tmp_path / 'd'}: train 50 sequences" in capsys.readouterr().out  # where the shards went
    assert validate_shards(tmp_path / "d")["splits"]["train"]["num_sequences"] == 50
    assert main(["synthetic", "--num-sequences", "0", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "num_sequences" in err and "Traceback" not in err


def test_embedded_cluster_environment_differs_from_a_joined_one():
    from ft_ray.cluster import cluster_env

    embedded, joined = cluster_env(joining=False), cluster_env(joining=True)
    # a private embedded cluster: no token auth, no preemption watcher (one machine has no node to drain)
    assert embedded["RAY_AUTH_MODE"] == "disabled" and embedded["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    # a cluster we join keeps its own auth and Train's preemption handling
    assert "RAY_AUTH_MODE" not in joined and "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in joined
    assert joined["RAY_USAGE_STATS_ENABLED"] == embedded["RAY_USAGE_STATS_ENABLED"] == "0"
    # either way, a worker's print() reaches the driver once, not also through Train's logger
    assert joined["RAY_TRAIN_ENABLE_PRINT_PATCH"] == embedded["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    # patience on a busy machine, for the embedded cluster only: Serve's proxy ready check, Train's start
    ready = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
    assert float(embedded[ready]) >= 30 and ready not in joined
    assert float(embedded["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]) >= 120
    # and the CPU priority of a plain program for every worker process (Ray's default is 15)
    assert embedded["RAY_worker_niceness"] == "0" and "RAY_worker_niceness" not in joined


def test_embedded_cluster_runs_tasks_and_actors_at_niceness_0(ray_cluster):
    """The suite's cluster has the embedded cluster's environment: a task and an actor (what eval
    units, Ray Data and Serve's replicas and proxy are) run at the priority of the program that
    started it (niceness 0 usually), not 15 below it."""
    ray = ray_cluster

    def niceness():
        return os.getpriority(os.PRIO_PROCESS, 0)

    @ray.remote
    class Probe:
        def niceness(self):
            return niceness()

    assert ray.get(ray.remote(niceness).remote()) == niceness()
    assert ray.get(Probe.remote().niceness.remote()) == niceness()
