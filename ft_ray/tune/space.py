"""Sweep spaces (`tune_spaces/*.yaml`): schema, validation, and translation into Ray Tune.

    name: latent-free-bits            # sweep name; re-running it resumes
    storage_path: runs/sweeps
    base: {config: letters-ft, overrides: ["train.max_steps=600"]}
    space:                            # dotted config keys
      model.latent_bits: {grid: [4, 8]}
      model.free_bits: {grid: [0.125, 1.0]}
      optim.lr: {loguniform: [1.0e-3, 1.0e-2]}   # also: choice, uniform, randint
    reference_arms: [{model.arch: baseline}]     # extra trials, each run once
    metric: val_nll                   # default: the honest validation NLL bound
    mode: min
    scheduler: {type: asha, max_t: 6, grace_period: 2, reduction_factor: 2}   # on evaluations
    num_samples: 1
    resources: {workers_per_trial: 1, cpus_per_worker: 0.5, gpus_per_worker: 0}
    max_concurrent_trials: null       # null: as many as the cluster's CPUs allow

Every key, every grid value and every sampling bound is checked against the config tree before
anything starts; errors name the file and the key.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ft_ray.config import ConfigError, load_config
from ft_ray.launch import resolve_preset

# what the training loop reports (see train/loop.py); FT-only ones are absent for the baseline
COMMON_METRICS = {"loss", "ce", "lr", "grad_norm", "tokens_per_s", "step_ms", "data_wait_frac",
                  "peak_mem_mib", "val_nll"}
FT_METRICS = {"kl", "kl_bits", "kl_penalty", "val_ce_post", "val_ce_random_z", "val_z_gap", "val_kl",
              "val_kl_bits", "val_iwae", "val_valid_fresh", "val_valid_shared", "val_pos_agree_fresh",
              "val_pos_agree_shared"}
DISTRIBUTIONS = {"grid", "choice", "uniform", "loguniform", "randint"}
TOP_KEYS = {"name", "storage_path", "base", "space", "reference_arms", "metric", "mode", "scheduler",
            "num_samples", "resources", "max_concurrent_trials"}


@dataclass
class Resources:
    workers_per_trial: int = 1
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0


@dataclass
class SweepSpec:
    path: Path
    name: str
    storage_path: str
    base_config: Path
    base_overrides: list[str]
    space: dict[str, dict[str, Any]]
    reference_arms: list[dict[str, Any]] = field(default_factory=list)
    metric: str = "val_nll"
    mode: str = "min"
    scheduler: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 1
    resources: Resources = field(default_factory=Resources)
    max_concurrent_trials: int | None = None

    def grid_arms(self) -> list[dict[str, Any]]:
        """The cartesian product of the grid keys, then the reference arms."""
        grid = {k: v["grid"] for k, v in self.space.items() if "grid" in v}
        combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
        return combos + [dict(a) for a in self.reference_arms]

    def sampled(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.space.items() if "grid" not in v}


def _err(path: Path, key: str, message: str) -> ConfigError:
    return ConfigError(key, message, str(path))


def _overrides(arm: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in arm.items()]


def _check_values(spec: SweepSpec) -> None:
    """Each grid arm, and each sampling bound, must make a valid config."""
    for arm in spec.grid_arms():
        for key, dist in spec.sampled().items():
            (kind, values), = dist.items()
            for v in (values if kind == "choice" else values[:2]):
                _try(spec, {**arm, key: int(v) if kind == "randint" else v}, key)
        _try(spec, arm, next(iter(arm), "space"))


def _try(spec: SweepSpec, arm: dict[str, Any], key: str) -> None:
    try:
        load_config(spec.base_config, [*spec.base_overrides, *_overrides(arm)])
    except ConfigError as e:
        raise _err(spec.path, f"space.{e.key}" if e.key in arm else e.key,
                   f"{e.detail} (in the trial {arm})") from None


def load_space(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise _err(path, "<file>", "sweep space file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise _err(path, "<file>", f"not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise _err(path, "<root>", "expected a mapping")
    for key in raw:
        if key not in TOP_KEYS:
            raise _err(path, str(key), f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    base = raw.get("base") or {}
    if not isinstance(base, dict) or "config" not in base:
        raise _err(path, "base.config", "a preset name or config path is required")
    try:
        base_config = resolve_preset(str(base["config"]))
    except ConfigError as e:
        raise _err(path, "base.config", e.detail) from None
    space = raw.get("space") or {}
    if not isinstance(space, dict) or not space:
        raise _err(path, "space", "a mapping of dotted config keys to distributions is required")
    for key, dist in space.items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise _err(path, f"space.{key}", f"expected one of {sorted(DISTRIBUTIONS)} with its values")
        (kind, values), = dist.items()
        if not isinstance(values, list) or not values:
            raise _err(path, f"space.{key}.{kind}", "expected a non-empty list")
        if kind in ("uniform", "loguniform", "randint") and (len(values) != 2 or not values[0] < values[1]):
            raise _err(path, f"space.{key}.{kind}", "expected [low, high] with low < high")
        if kind == "loguniform" and values[0] <= 0:
            raise _err(path, f"space.{key}.{kind}", "bounds must be > 0")
    res = raw.get("resources") or {}
    try:
        resources = Resources(**res)
    except TypeError:
        raise _err(path, "resources", f"known keys: workers_per_trial, cpus_per_worker, gpus_per_worker; got {sorted(res)}") from None
    spec = SweepSpec(
        path=path, name=str(raw.get("name") or path.stem), storage_path=str(raw.get("storage_path", "runs/sweeps")),
        base_config=base_config, base_overrides=list(base.get("overrides") or []), space=space,
        reference_arms=list(raw.get("reference_arms") or []), metric=str(raw.get("metric", "val_nll")),
        mode=str(raw.get("mode", "min")), scheduler=dict(raw.get("scheduler") or {}),
        num_samples=int(raw.get("num_samples", 1)), resources=resources,
        max_concurrent_trials=raw.get("max_concurrent_trials"))
    if spec.mode not in ("min", "max"):
        raise _err(path, "mode", f"expected min or max, got {spec.mode!r}")
    if resources.workers_per_trial < 1 or resources.cpus_per_worker <= 0:
        raise _err(path, "resources", "workers_per_trial >= 1 and cpus_per_worker > 0 are required")
    sched = spec.scheduler
    if sched and (sched.get("type", "asha") != "asha" or set(sched) - {"type", "max_t", "grace_period", "reduction_factor"}):
        raise _err(path, "scheduler", "expected {type: asha, max_t, grace_period, reduction_factor}")
    try:
        base_arch = load_config(base_config, spec.base_overrides).model.arch
    except ConfigError as e:
        raise _err(path, f"base.overrides: {e.key}", e.detail) from None
    arches = {arm.get("model.arch", base_arch) for arm in spec.grid_arms()}
    known = COMMON_METRICS | (FT_METRICS if arches == {"free_transformer"} else set())
    if spec.metric not in known:
        raise _err(path, "metric", f"the trainer does not report {spec.metric!r} for every trial "
                                   f"(reported: {', '.join(sorted(known))})")
    _check_values(spec)
    return spec
