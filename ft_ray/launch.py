"""What every entry point shares: joining or starting Ray, presets, and one-line errors."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

from ft_ray.config import ConfigError

PRESET_DIR = Path(__file__).resolve().parent.parent / "jobs" / "configs"
EXIT_BAD_INPUT = 2

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
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (for a private Serve instance, test clusters, ...)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_preset(name_or_path: str) -> Path:
    """`smoke` -> jobs/configs/smoke.yaml; a path is used as given."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.exists():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ConfigError("--config", f"unknown preset {name_or_path!r} (presets: {known})")
    return preset


def cluster_env(joining: bool) -> dict[str, str]:
    """The environment `ensure_ray` sets (where unset) before Ray starts or is joined."""
    return {**DEFAULT_ENV, **({} if joining else EMBEDDED_ENV)}


def ensure_ray(num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Join the cluster named by RAY_ADDRESS, or start an embedded local one sized to the machine.
    Returns True when this call connected (so the caller owns the shutdown)."""
    import ray

    if ray.is_initialized():
        return False
    joining = bool(os.environ.get("RAY_ADDRESS"))
    for k, v in cluster_env(joining).items():
        os.environ.setdefault(k, v)
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


@contextlib.contextmanager
def one_line_errors():
    """Bad input ends with one line on stderr and exit status 2, not a traceback."""
    from ft_ray.data.errors import DataError
    from ft_ray.train.checkpoint import CheckpointError

    try:
        yield
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"ft-ray: error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def command_main(doc: str | None, add_arguments, run, argv: list[str] | None = None) -> int:
    """`main()` of a `python -m jobs.<name>` entry point: parse with `add_arguments`, then `run`."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
