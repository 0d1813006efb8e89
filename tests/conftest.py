"""Shared test set-up: Ray's environment, one local Ray cluster per session (started only by the
tests that need it), and torch kept to one thread in the test process."""

from __future__ import annotations

import os

import pytest

from ft_ray.cluster import EMBEDDED_ENV

os.environ.update(
    RAY_USAGE_STATS_ENABLED="0",
    RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0",
    RAY_AUTH_MODE="disabled",
    RAY_DATA_DISABLE_PROGRESS_BARS="1",
)
# the clusters tests start themselves get the embedded cluster's patience and CPU priority on a busy machine
for _key in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S",
             "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_worker_niceness"):
    os.environ.setdefault(_key, EMBEDDED_ENV[_key])


# Timeouts guard against hangs; they are not performance checks. A laptop or CI machine busy with
# something else runs the suite several times slower (measured: the demo test took over 7 minutes
# beside two CPU-bound processes on 2 cores, 2 minutes idle), so every timeout (the default in
# pyproject.toml and each @pytest.mark.timeout) is multiplied by this factor.
TIMEOUT_SCALE = float(os.environ.get("FT_RAY_TEST_TIMEOUT_SCALE", "4"))


def pytest_collection_modifyitems(config, items):
    default = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        base = float(marker.args[0]) if marker and marker.args else default
        if base > 0:
            item.add_marker(pytest.mark.timeout(base * TIMEOUT_SCALE), append=False)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread, and a second thread would fight the Ray workers
    (and anything else on a 2-core machine) for the other core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A private local Ray cluster for the session; shut down (only it) at the end."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
