"""Joining or starting Ray: what every entry point does before any Ray work.

`ensure_ray()` joins the cluster named by RAY_ADDRESS (a `ray job submit` job, a cluster you
started) or starts an embedded local one sized to the machine, with the environment every
process of the cluster should inherit (`cluster_env`).
"""

from __future__ import annotations

import os
import socket

# set before Ray starts so every process of the cluster inherits them
DEFAULT_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # workers' datasets would flood the job log
    # Train's print patch sends a worker's print() both to stdout and to the logging system, so
    # every line reached the driver twice (Ray 2.60); plain stdout reaches it once
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# only for an embedded cluster, which is private to this process; a cluster we join decides for itself
EMBEDDED_ENV = {
    "RAY_AUTH_MODE": "disabled",
    # Train's preemption watcher polls for nodes being drained (spot instances taken back); one
    # machine has no node to drain, and the watcher is one more process taking CPU from training
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # a laptop busy with something else: Ray's start-up checks give up too soon there (measured beside
    # two CPU-bound processes on 2 cores: Serve killed its own HTTP proxy after the 5 s ready check),
    # so the embedded cluster waits longer for its proxy and for a Train worker group to start
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    # Ray starts its worker processes at niceness 15 so that a cluster's own raylet and GCS keep
    # priority; beside the other programs of a laptop (at 0) that starves them: two CPU-bound
    # processes on 2 cores left ft-ray's eval tasks, Serve replicas and proxy, Ray Data tasks and
    # Train's controller 2.5% of a core each. The embedded cluster runs them like a plain program.
    "RAY_worker_niceness": "0",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (for a private Serve instance, test clusters, ...)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cluster_env(joining: bool) -> dict[str, str]:
    """The environment `ensure_ray` sets (where unset) before Ray starts or is joined."""
    return {**DEFAULT_ENV, **({} if joining else EMBEDDED_ENV)}


def set_cluster_env(joining: bool) -> None:
    """Put `cluster_env` into this process's environment, where unset (before Ray starts)."""
    for key, value in cluster_env(joining).items():
        os.environ.setdefault(key, value)


def ensure_ray(num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Join the cluster named by RAY_ADDRESS, or start an embedded local one sized to the machine.
    Returns True when this call connected (so the caller owns the shutdown)."""
    import ray

    if ray.is_initialized():
        return False
    joining = bool(os.environ.get("RAY_ADDRESS"))
    set_cluster_env(joining)
    if joining:
        ray.init(log_to_driver=True)
        print(f"[ft-ray] joined the Ray cluster at {os.environ['RAY_ADDRESS']}", flush=True)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count())
        print(f"[ft-ray] started an embedded local Ray cluster ({ray.cluster_resources().get('CPU', 0):g} CPUs)",
              flush=True)
    if quiet:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    return True
