"""One typed configuration tree, loaded from YAML with dotted overrides.

Every section is a dataclass whose fields carry their meaning in a comment. Loading checks every
key and type and runs each section's validation, so a bad value fails with an error that names the
file, the dotted key and what was expected, before anything expensive starts. The resolved config
(defaults filled in, derived values computed) serialises back to YAML/JSON and loads to an equal
object.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or invalid. The message names the key."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key, self.detail, self.source = key, message, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")

    def __reduce__(self):  # Ray and Tune copy and pickle errors: rebuild from the same arguments
        return type(self), (self.key, self.detail, self.source)


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def is_single_name(name: str) -> bool:
    """A run or sweep name is one directory under its storage path, never a path out of it."""
    return bool(name) and name not in (".", "..") and not {"/", "\\", "\0"} & set(name)


_TRACKING_URI = re.compile(r"https?://[^/\s:]+(:\d{1,5})?(/\S*)?|sqlite:///.+")


def check_tracking(value: str, key: str = "tracking") -> None:
    """`train.tracking` (and a sweep's `tracking`): none, mlflow, or a tracking URI."""
    _check(value in ("none", "mlflow") or bool(_TRACKING_URI.fullmatch(value)), key,
           f"expected none, mlflow (the embedded store), an MLflow server's http(s)://host:port or a "
           f"sqlite:///path database, got {value!r}")


# YAML 1.1 (PyYAML) reads 1e-3 as a string: it wants a dot (1.0e-3). Numbers written either way
# are accepted for float keys.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Shape of the decoder and of the Free Transformer's latent plan."""

    arch: Literal["baseline", "free_transformer"] = "free_transformer"
    vocab_size: int = 256
    hidden_dim: int = 256  # D, the residual width
    num_layers: int = 8  # L decoder blocks (the FT's encoder adds one block of its own)
    num_heads: int = 8
    num_key_value_heads: int | None = None  # GQA; None -> num_heads
    intermediate_size: int | None = None  # SwiGLU width; None -> ~8/3 D rounded up to 32
    max_seq_len: int = 512  # longest sequence (prompt + generation) RoPE and caches cover
    dropout: float = 0.0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02  # std of linear and embedding weights
    # Free Transformer
    latent_bits: int = 16  # H: one code in [0, 2^H) per token
    free_bits: float = 0.5  # kappa in bits per token (the paper's unit); nats = bits * ln 2
    inject_layer: int | None = None  # 0-based injection block; None -> num_layers // 2
    latent_init: Literal["normal", "zero"] = "normal"  # init of the post-sampler table W
    latent_init_std: float = 1.0  # std of W when latent_init == "normal"
    mapper_chunk_elems: int = 1 << 21  # bound on (tokens x codes) floats per chunk in the mapper

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = 32 * math.ceil(8 * self.hidden_dim / 3 / 32)
        if self.inject_layer is None:
            self.inject_layer = self.num_layers // 2
        self.validate()

    def validate(self) -> None:
        # resolved by __post_init__ (a None left here fails the >= 1 check below)
        num_kv_heads, inject_layer = typing.cast(int, self.num_key_value_heads), typing.cast(int, self.inject_layer)
        for name in ("vocab_size", "hidden_dim", "num_layers", "num_heads", "num_key_value_heads",
                     "intermediate_size", "max_seq_len", "mapper_chunk_elems"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.hidden_dim % self.num_heads == 0, "num_heads",
               f"must divide hidden_dim={self.hidden_dim}, got {self.num_heads}")
        _check((self.hidden_dim // self.num_heads) % 2 == 0, "num_heads",
               f"head dim hidden_dim/num_heads={self.hidden_dim / self.num_heads:g} must be even for RoPE")
        _check(self.num_heads % num_kv_heads == 0, "num_key_value_heads",
               f"must divide num_heads={self.num_heads}, got {self.num_key_value_heads}")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        _check(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        _check(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        _check(1 <= self.latent_bits <= 20, "latent_bits", f"must be in [1, 20], got {self.latent_bits}")
        _check(self.free_bits >= 0 and math.isfinite(self.free_bits), "free_bits",
               f"must be a finite number of bits >= 0, got {self.free_bits}")
        _check(self.num_layers >= 2, "num_layers",
               f"must be >= 2 (a first half and an injection block), got {self.num_layers}")
        _check(1 <= inject_layer < self.num_layers, "inject_layer",
               f"must be in [1, num_layers-1={self.num_layers - 1}], got {self.inject_layer}")
        _check(self.latent_init_std >= 0, "latent_init_std", f"must be >= 0, got {self.latent_init_std}")

    @property
    def has_latent(self) -> bool:
        """Whether the model has a latent plan Z (the one answer; models carry it as `has_latent`)."""
        return self.arch == "free_transformer"

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def free_nats(self) -> float:
        """kappa in nats, the unit the loss uses."""
        return self.free_bits * math.log(2)


SYNTHETIC_TASKS = ("letters", "modes", "arith")  # ft_ray/data/synthetic.py TASKS


@dataclass
class DataConfig:
    """Where training sequences come from and how they are batched."""

    source: Literal["synthetic", "shards"] = "synthetic"
    task: str = "letters"  # synthetic task generated on the fly (source: synthetic)
    path: str | None = None  # shard directory written by `ft-ray data ...` (source: shards)
    seq_len: int | None = None  # tokens per training sequence + 1; None -> from the task/manifest
    batch_size: int = 32  # sequences per optimiser micro-step on each worker
    shuffle_seed: int = 0  # shard order (reshuffled every epoch) and synthetic streams
    val_fraction: float = 0.01  # share of documents held out (when writing shards)
    num_train_sequences: int = 1 << 20  # synthetic: sequences per epoch
    num_val_sequences: int = 512  # synthetic: validation sequences (fixed seed, disjoint stream)

    def __post_init__(self) -> None:
        if self.source == "synthetic":
            _check(self.task in SYNTHETIC_TASKS, "task",
                   f"expected one of {', '.join(SYNTHETIC_TASKS)}, got {self.task!r}")
        else:
            _check(bool(self.path), "path", "a shard directory is required when source is 'shards'")
        _check(self.seq_len is None or self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(0.0 <= self.val_fraction < 1.0, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        _check(self.num_train_sequences >= 1, "num_train_sequences", "must be >= 1")
        _check(self.num_val_sequences >= 1, "num_val_sequences", "must be >= 1")

    @property
    def shards(self) -> Path:
        """The shard directory of `source: shards` (checked to be set when the config was made)."""
        _check(self.path is not None, "path", "a shard directory is required when source is 'shards'")
        return Path(typing.cast(str, self.path))


@dataclass
class OptimConfig:
    """AdamW with linear warmup then a single cosine decay to min_lr."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1  # decoupled; matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        _check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")


@dataclass
class TrainConfig:
    """The run: where it lives, how it is parallelised, how long, what it logs and saves."""

    name: str = "ft-run"  # run name; re-running the same name resumes it
    storage_path: str = "runs"  # run directories live in storage_path/name (every node must reach it)
    num_workers: int = 2  # Ray Train workers; 0 runs the loop in-process (no cluster)
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: 1, or less on a small machine so Ray Data keeps CPUs
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile per block (GPU)
    max_steps: int = 1000  # optimiser steps
    grad_accum_steps: int = 1
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200  # steps between validation passes (and at the end)
    eval_batches: int = 8  # validation batches per pass per worker
    iwae_samples: int = 0  # > 1: also report the IWAE bound with this many samples
    sample_groups: int = 4  # letter task: prompts whose sample groups are scored at each eval
    # downstream tasks of the offline suite (ft_ray/eval/tasks: ftray_arith_choice, ...) scored by
    # rank 0 through lm-eval at each eval, reported as eval/<task>/<metric> (a sweep's objective)
    eval_tasks: list[str] = field(default_factory=list)
    eval_task_limit: int = 100  # documents per task and evaluation
    eval_task_num_plans: int = 4  # K prior plans per Free Transformer score (ft_ray/eval/scoring.py)
    checkpoint_every: int = 200  # steps between checkpoints (and at the end)
    num_to_keep: int = 2
    max_failures: int = 0  # worker-group restarts from the last checkpoint
    worker_niceness: int | None = 0  # CPU priority of the training workers (0-19); None: Ray's default, 15
    export_bundle: bool = True  # write the serving bundle into the run directory at the end
    # experiment tracking from rank 0, in the background (ft_ray/train/tracking.py; the CSV files
    # stay the record): "none"; "mlflow", an embedded store beside the run directories
    # (storage_path/mlflow.db, artifacts in storage_path/mlartifacts, nothing to start); or a
    # tracking server's URI (http://host:port) or another database (sqlite:////abs/path.db)
    tracking: str = "mlflow"
    tracking_experiment: str = "ft-ray"  # the MLflow experiment (a sweep's trials: the sweep's name)
    tracking_log_weights: bool = False  # also upload the bundle's weights at the end

    def __post_init__(self) -> None:
        _check(is_single_name(self.name), "name",
               f"must be one path component (no '/', '\\', '.' or '..'), got {self.name!r}")
        _check(bool(self.storage_path), "storage_path", "must be a path")
        _check("://" not in self.storage_path, "storage_path",
               f"must be a local or mounted path that every node reaches, not a URI: {self.storage_path!r} "
               "(mount the bucket, e.g. with Mountpoint for Amazon S3)")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.cpus_per_worker is None or self.cpus_per_worker > 0, "cpus_per_worker",
               f"must be > 0, got {self.cpus_per_worker}")
        for name in ("max_steps", "grad_accum_steps", "log_every", "eval_every", "eval_batches",
                     "checkpoint_every", "num_to_keep"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(self.iwae_samples >= 0, "iwae_samples", f"must be >= 0, got {self.iwae_samples}")
        _check(self.sample_groups >= 0, "sample_groups", f"must be >= 0, got {self.sample_groups}")
        from ft_ray.eval.tasks import TASK_NAMES  # the offline suite: no hub during training

        unknown = [t for t in self.eval_tasks if t not in TASK_NAMES]
        _check(not unknown, "eval_tasks", f"unknown task(s) {', '.join(map(repr, unknown))}: expected tasks of the "
                                          f"offline suite ({', '.join(TASK_NAMES)})")
        _check(self.eval_task_limit >= 1, "eval_task_limit", f"must be >= 1, got {self.eval_task_limit}")
        _check(self.eval_task_num_plans >= 1, "eval_task_num_plans", f"must be >= 1, got {self.eval_task_num_plans}")
        _check(self.worker_niceness is None or 0 <= self.worker_niceness <= 19, "worker_niceness",
               f"must be a niceness from 0 to 19 (or null for Ray's default), got {self.worker_niceness}")
        _check(self.max_failures >= -1, "max_failures", f"must be >= -1 (-1: unlimited), got {self.max_failures}")
        check_tracking(self.tracking)
        _check(bool(self.tracking_experiment.strip()), "tracking_experiment", "must be a name")


@dataclass
class Config:
    """The root of the tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------
# Loading, overrides, serialisation
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(arg)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} keys"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        (arg, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(key, f"unknown key (known keys of {cls.__name__}: {known})")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # validation inside the section: make the key absolute
        key = f"{prefix}.{e.key}" if prefix else e.key
        raise ConfigError(key, e.detail) from None


def from_dict(cls: type, data: dict, source: str | None = None) -> Any:
    """Build the dataclass `cls` from plain data, checking keys, types and values."""
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"expected a mapping, got {type(data).__name__}", source)
    try:
        return _from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(e.key, e.detail, source) from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2)


def parse_overrides(overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """`a.b=c` strings (the command line's --set) -> {"a.b": value}, values parsed as YAML scalars."""
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key.path=value", source)
        key, raw = item.split("=", 1)
        try:
            changes[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            changes[key.strip()] = raw
    return changes


def apply_changes(data: dict, changes: dict[str, Any], source: str = "--set") -> dict:
    """Set dotted keys ({"model.latent_bits": 8}) in a copy of nested plain data; values as given."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for key, value in changes.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"'{part}' is not a section", source)
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = Config, changes: dict[str, Any] | None = None) -> Any:
    """Load `cls` from a YAML file (or defaults when `path` is None) plus dotted overrides: `a.b=c`
    strings (the command line's --set) and then typed `changes` ({"a.b": value}: a sweep's arm, a
    comparison's arms). Both apply to the file's data before any default is derived, so a derived
    value (e.g. the SwiGLU width from hidden_dim) follows the change."""
    data: Any = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError("<file>", "config file not found", source)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("<file>", f"not valid YAML: {e}", source) from None
        if not isinstance(data, dict):
            raise ConfigError("<root>", f"expected a mapping, got {type(data).__name__}", source)
    if overrides:
        where = source if path is not None else "--set"
        data = apply_changes(data, parse_overrides(overrides, where), where)
        source = f"{source} with --set {' '.join(overrides)}" if path is not None else "--set"
    if changes:
        data = apply_changes(data, changes, source)
        source = f"{source} with {', '.join(f'{k}={v!r}' for k, v in changes.items())}"
    return from_dict(cls, data, source)
