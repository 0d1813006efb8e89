"""Sweep spaces (`tune_spaces/*.yaml`): schema, validation, and translation into Ray Tune.

    name: latent-free-bits            # sweep name; re-running it resumes (the same space only)
    storage_path: runs/sweeps
    base: {config: letters-ft, overrides: ["train.max_steps=600"]}
    space:                            # dotted config keys
      model.latent_bits: {grid: [4, 8]}
      model.free_bits: {grid: [0.125, 1.0]}
      optim.lr: {loguniform: [1.0e-3, 1.0e-2]}   # also: choice, uniform, randint (bounds inclusive)
    reference_arms: [{model.arch: baseline}]     # extra trials, each run once
    metric: val_nll                   # default: the honest validation NLL bound
    mode: min
    scheduler: {type: asha, max_t: 6, grace_period: 2, reduction_factor: 2}   # on evaluations
    num_samples: 1
    resources: {workers_per_trial: 1, cpus_per_worker: 0.5, gpus_per_worker: 0}
    max_concurrent_trials: null       # null: as many as the cluster's CPUs allow
    tracking: mlflow                  # none, mlflow (the sweep's own store) or http://host:port

Every key, every grid value and every sampling bound is checked against the config tree before
anything starts; errors name the file and the key. `uniform`/`loguniform` sample floats, so they
are refused over an int key (use `randint`); `randint` over a float key is allowed (it samples
whole numbers, which a float field accepts). Keys the sweep sets for every trial (`TRIAL_OWNED`)
cannot be swept.

Every trial is one MLflow run in one experiment named after the sweep (`tracking`: `mlflow` puts
the store in the sweep's directory, mlflow.db; a server URI is shared by every trial).

A sweep stores its resolved space (`space.json`, see `resolved_space`) in its directory when it
starts; a re-run with the same name must resolve to the same space, or it is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ft_ray.config import Config, ConfigError, check_tracking, is_single_name, load_config
from ft_ray.presets import resolve_preset
from ft_ray.train.tracking import embedded_store_uri

# what the training loop reports (see train/loop.py); FT-only ones are absent for the baseline
COMMON_METRICS = {"loss", "ce", "lr", "grad_norm", "tokens_per_s", "step_ms", "data_wait_frac",
                  "peak_mem_mib", "val_nll"}
FT_METRICS = {"kl", "kl_bits", "kl_penalty", "val_ce_post", "val_ce_random_z", "val_z_gap", "val_kl",
              "val_kl_bits", "val_iwae", "val_valid_fresh", "val_valid_shared", "val_pos_agree_fresh",
              "val_pos_agree_shared", "val_pos_agree_fresh_ci95", "val_pos_agree_shared_ci95",
              "val_pos_agree_chance", "val_start_spread_fresh", "val_start_spread_shared"}
DISTRIBUTIONS = {"grid", "choice", "uniform", "loguniform", "randint"}
TOP_KEYS = {"name", "storage_path", "base", "space", "reference_arms", "metric", "mode", "scheduler",
            "num_samples", "resources", "max_concurrent_trials", "tracking"}
ASHA_DEFAULTS = {"type": "asha", "max_t": 100, "grace_period": 1, "reduction_factor": 2}
SPACE_RECORD = "space.json"  # in the sweep directory: the resolved space the sweep started with

# set by `own_trial_settings` for every trial, whatever the space says: a space that swept them
# would report values that were never used
TRIAL_OWNED = {
    "train.name": "the trial's name (trial-<id>)",
    "train.storage_path": "the sweep's trials/ directory",
    "train.num_workers": "resources.workers_per_trial",
    "train.cpus_per_worker": "resources.cpus_per_worker",
    "train.use_gpu": "resources.gpus_per_worker",
    "train.log_every": "train.eval_every (every report to Tune is an evaluation)",
    "train.checkpoint_every": "train.eval_every (every report to Tune is an evaluation)",
    "train.tracking": "the sweep's `tracking` (one store for every trial)",
    "train.tracking_experiment": "the sweep's name (one MLflow experiment per sweep)",
}


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
    scheduler: dict[str, Any] = field(default_factory=dict)  # {} or ASHA_DEFAULTS' keys, all filled in
    num_samples: int = 1
    resources: Resources = field(default_factory=Resources)
    max_concurrent_trials: int | None = None
    tracking: str = "mlflow"  # as train.tracking; `mlflow`: the store in the sweep's directory

    @property
    def sweep_dir(self) -> Path:
        return Path(self.storage_path).expanduser().resolve() / self.name

    def grid_arms(self) -> list[dict[str, Any]]:
        """The cartesian product of the grid keys, then the reference arms."""
        grid = {k: v["grid"] for k, v in self.space.items() if "grid" in v}
        combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
        return combos + [dict(a) for a in self.reference_arms]

    def sampled(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.space.items() if "grid" not in v}


def trial_tracking(tracking: str, sweep_dir: Path) -> str:
    """A sweep's `tracking` as its trials' train.tracking: `mlflow` is the sweep's own store."""
    return embedded_store_uri(sweep_dir) if tracking == "mlflow" else tracking


def own_trial_settings(cfg: Config, resources: Resources, trial_name: str, trials_dir: Path,
                       tracking: str = "mlflow") -> None:
    """What the sweep decides for every trial (the keys of TRIAL_OWNED, which a space may not set).
    `trials_dir` is the sweep directory's trials/: its MLflow experiment is the sweep's name."""
    tc = cfg.train
    tc.tracking, tc.tracking_experiment = trial_tracking(tracking, trials_dir.parent), trials_dir.parent.name
    # every report is an evaluation: ASHA's iterations are evaluations
    tc.log_every = tc.checkpoint_every = tc.eval_every
    tc.name, tc.storage_path = trial_name, str(trials_dir)
    tc.num_workers, tc.cpus_per_worker = resources.workers_per_trial, resources.cpus_per_worker
    tc.use_gpu = resources.gpus_per_worker > 0


def _err(path: Path, key: str, message: str) -> ConfigError:
    return ConfigError(key, message, str(path))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _field_type(key: str) -> Any:
    """The annotation of a dotted config key, `X | None` read as X (None: not a config field)."""
    tp: Any = Config
    for part in key.split("."):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return None
        tp = hints[part]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1
    return args[0] if optional else tp


def _check_values(spec: SweepSpec) -> None:
    """Each grid arm, and each sampling bound, must make a valid config."""
    for arm in spec.grid_arms():
        for key, dist in spec.sampled().items():
            (kind, values), = dist.items()
            for v in (values if kind == "choice" else values[:2]):
                _try(spec, {**arm, key: v}, key)
        _try(spec, arm, next(iter(arm), "space"))


def _try(spec: SweepSpec, arm: dict[str, Any], key: str) -> None:
    try:
        load_config(spec.base_config, spec.base_overrides, changes=arm)
    except ConfigError as e:
        raise _err(spec.path, f"space.{e.key}" if e.key in arm else e.key,
                   f"{e.detail} (in the trial {arm})") from None


def _check_not_owned(path: Path, where: str, keys) -> None:
    for key in keys:
        if key in TRIAL_OWNED:
            raise _err(path, f"{where}{key}", f"the sweep sets it for every trial, from {TRIAL_OWNED[key]}: "
                                              "it cannot be swept or overridden here")


def _parse_distribution(path: Path, key: str, dist: Any) -> None:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise _err(path, f"space.{key}", f"expected one of {sorted(DISTRIBUTIONS)} with its values")
    (kind, values), = dist.items()
    where = f"space.{key}.{kind}"
    if not isinstance(values, list) or not values:
        raise _err(path, where, "expected a non-empty list")
    if kind in ("grid", "choice"):
        return
    if len(values) != 2 or not all(_is_number(v) for v in values) or not values[0] < values[1]:
        raise _err(path, where, f"expected [low, high], two numbers with low < high, got {values}")
    if kind == "loguniform" and values[0] <= 0:
        raise _err(path, where, "bounds must be > 0")
    if kind == "randint" and not all(_is_int(v) for v in values):
        raise _err(path, where, f"bounds must be integers, got {values}")
    if kind in ("uniform", "loguniform") and _field_type(key) is int:
        # the bounds alone would pass the config check; every sampled value (a float) would fail
        raise _err(path, where, f"samples floats but {key} is an int: use randint: [low, high]")


def _parse_space(path: Path, space: Any) -> dict:
    if not isinstance(space, dict) or not space:
        raise _err(path, "space", "a mapping of dotted config keys to distributions is required")
    _check_not_owned(path, "space.", space)
    for key, dist in space.items():
        _parse_distribution(path, str(key), dist)
    return space


def _parse_reference_arms(path: Path, arms: Any) -> list[dict]:
    if not isinstance(arms, list) or not all(isinstance(a, dict) for a in arms):
        raise _err(path, "reference_arms", "expected a list of mappings of dotted config keys to values")
    for i, arm in enumerate(arms):
        _check_not_owned(path, f"reference_arms[{i}].", arm)
    return arms


def _int_at_least(path: Path, key: str, value: Any, low: int) -> int:
    if not _is_int(value) or value < low:
        raise _err(path, key, f"must be an integer >= {low}, got {value!r}")
    return value


def _parse_scheduler(path: Path, raw: Any) -> dict:
    """{} (no early stopping) or ASHA with every setting filled in and checked (Ray would only assert)."""
    if not raw:
        return {}
    if not isinstance(raw, dict) or raw.get("type", "asha") != "asha" or set(raw) - set(ASHA_DEFAULTS):
        raise _err(path, "scheduler", "expected {type: asha, max_t, grace_period, reduction_factor}")
    sched = {**ASHA_DEFAULTS, **raw}
    max_t = _int_at_least(path, "scheduler.max_t", sched["max_t"], 1)
    grace = _int_at_least(path, "scheduler.grace_period", sched["grace_period"], 1)
    if grace > max_t:
        raise _err(path, "scheduler.grace_period", f"must be <= max_t ({max_t}), got {grace}")
    if not _is_number(sched["reduction_factor"]) or sched["reduction_factor"] <= 1:
        raise _err(path, "scheduler.reduction_factor", f"must be a number > 1, got {sched['reduction_factor']!r}")
    return sched


def _parse_resources(path: Path, raw: Any) -> Resources:
    if not isinstance(raw, dict) or set(raw) - {"workers_per_trial", "cpus_per_worker", "gpus_per_worker"}:
        raise _err(path, "resources", f"known keys: workers_per_trial, cpus_per_worker, gpus_per_worker; got {raw!r}")
    res = Resources(**raw)
    _int_at_least(path, "resources.workers_per_trial", res.workers_per_trial, 1)
    if not _is_number(res.cpus_per_worker) or res.cpus_per_worker <= 0:
        raise _err(path, "resources.cpus_per_worker", f"must be a number > 0, got {res.cpus_per_worker!r}")
    if not _is_number(res.gpus_per_worker) or res.gpus_per_worker < 0:
        raise _err(path, "resources.gpus_per_worker", f"must be a number >= 0, got {res.gpus_per_worker!r}")
    return res


def _parse_max_concurrent(path: Path, value: Any) -> int | None:
    return None if value is None else _int_at_least(path, "max_concurrent_trials", value, 1)


def _parse_tracking(path: Path, value: Any) -> str:
    try:
        check_tracking(value if isinstance(value, str) else repr(value))
    except ConfigError as e:
        raise _err(path, "tracking", e.detail) from None
    return value


def _read_yaml(path: Path) -> dict:
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
    return raw


def _parse_base(path: Path, base: Any) -> tuple[Path, list[str]]:
    if not isinstance(base, dict) or "config" not in base:
        raise _err(path, "base.config", "a preset name or config path is required")
    try:
        config = resolve_preset(str(base["config"]))
    except ConfigError as e:
        raise _err(path, "base.config", e.detail) from None
    overrides = [str(o) for o in base.get("overrides") or []]
    _check_not_owned(path, "base.overrides: ", [o.split("=", 1)[0].strip() for o in overrides])
    return config, overrides


def _check_metric(spec: SweepSpec) -> None:
    from ft_ray.eval.tasks import TASK_METRICS

    try:
        base = load_config(spec.base_config, spec.base_overrides)
    except ConfigError as e:
        raise _err(spec.path, f"base.overrides: {e.key}", e.detail) from None
    arches = {arm.get("model.arch", base.model.arch) for arm in spec.grid_arms()}
    known = COMMON_METRICS | (FT_METRICS if arches == {"free_transformer"} else set())
    # downstream metrics of the base's train.eval_tasks (eval/<task>/<metric>, not prefixed val_)
    known |= {f"eval/{task}/{m}" for task in base.train.eval_tasks for m in TASK_METRICS[task]}
    if spec.metric not in known:
        raise _err(spec.path, "metric", f"the trainer does not report {spec.metric!r} for every trial "
                                        f"(reported: {', '.join(sorted(known))})")


def load_space(path: str | Path) -> SweepSpec:
    path = Path(path)
    raw = _read_yaml(path)
    base_config, base_overrides = _parse_base(path, raw.get("base") or {})
    spec = SweepSpec(
        path=path, name=str(raw.get("name") or path.stem), storage_path=str(raw.get("storage_path", "runs/sweeps")),
        base_config=base_config, base_overrides=base_overrides, space=_parse_space(path, raw.get("space")),
        reference_arms=_parse_reference_arms(path, raw.get("reference_arms") or []),
        metric=str(raw.get("metric", "val_nll")), mode=str(raw.get("mode", "min")),
        scheduler=_parse_scheduler(path, raw.get("scheduler")),
        num_samples=_int_at_least(path, "num_samples", raw.get("num_samples", 1), 1),
        resources=_parse_resources(path, raw.get("resources") or {}),
        max_concurrent_trials=_parse_max_concurrent(path, raw.get("max_concurrent_trials")),
        tracking=_parse_tracking(path, raw.get("tracking", "mlflow")))
    if not is_single_name(spec.name):
        raise _err(path, "name", f"must be one path component (no '/', '\\', '.' or '..'), got {spec.name!r}")
    if spec.mode not in ("min", "max"):
        raise _err(path, "mode", f"expected min or max, got {spec.mode!r}")
    _check_metric(spec)
    _check_values(spec)
    return spec


# ----------------------------------------------------------------------------------------------
# The stored space: a re-run with the same name must be the same sweep
# ----------------------------------------------------------------------------------------------


def resolved_space(spec: SweepSpec) -> dict:
    """Everything that decides what the trials are and how they are judged, as plain JSON data. The
    base config enters by content (its sha256), not by path: a job's working_dir moves between
    submissions. Left out: what only changes where and how fast trials run (cpus_per_worker,
    max_concurrent_trials) and where they are tracked, so a resumed sweep may use a different
    cluster or tracking server."""
    return json.loads(json.dumps({
        "base": {"file": spec.base_config.name, "sha256": hashlib.sha256(spec.base_config.read_bytes()).hexdigest(),
                 "overrides": spec.base_overrides},
        "space": spec.space, "reference_arms": spec.reference_arms, "metric": spec.metric, "mode": spec.mode,
        "scheduler": spec.scheduler, "num_samples": spec.num_samples,
        # the global batch grows with the workers, and a GPU trains in bf16: both change the results
        "resources": {"workers_per_trial": spec.resources.workers_per_trial,
                      "use_gpu": spec.resources.gpus_per_worker > 0},
    }, default=str))


def write_space_record(spec: SweepSpec, sweep_dir: Path) -> Path:
    target = sweep_dir / SPACE_RECORD
    target.write_text(json.dumps(resolved_space(spec), indent=1, sort_keys=True) + "\n")
    return target


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and empty mappings are leaves."""
    if not isinstance(data, dict) or not data:
        return {prefix: data}
    return {k: v for key, value in data.items()
            for k, v in _flatten(value, f"{prefix}.{key}" if prefix else str(key)).items()}


def _changes(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every leaf that differs."""
    old, new = _flatten(old), _flatten(new)
    show = lambda flat, k: json.dumps(flat[k]) if k in flat else "(absent)"  # noqa: E731
    return [f"{k}: {show(old, k)} -> {show(new, k)}" for k in sorted(old.keys() | new.keys())
            if k not in old or k not in new or old[k] != new[k]]


def check_space_record(spec: SweepSpec, sweep_dir: Path) -> bool:
    """True when the sweep started before with this same space; False when it has no record (a new
    sweep, or one started by an older ft-ray); a ConfigError when the space changed since."""
    record = sweep_dir / SPACE_RECORD
    if not record.is_file():
        return False
    changes = _changes(json.loads(record.read_text()), resolved_space(spec))
    if changes:
        raise _err(spec.path, "name", f"the sweep {spec.name!r} was started with another space (stored in {record}); "
                                      f"changed: {'; '.join(changes)}. Resuming would mix the two: give the edited "
                                      f"sweep a new `name` (or restore the old space to resume it)")
    return True
