"""Launch a training run on Ray Train V2: checks first, then `TorchTrainer(...).fit()`.

Everything that can be wrong with the input (config, data, storage) fails here, on the driver,
with an error naming the key or file, before a worker starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ft_ray.config import Config, ConfigError, to_dict
from ft_ray.data.manifest import file_sha256
from ft_ray.data.pipeline import DataInfo, build_datasets, resolve_data
from ft_ray.train.checkpoint import CheckpointError, damaged_checkpoints, quarantine

# keys a resumed run may change: how long it runs, how often it logs, evaluates and saves, and
# how it is placed on the cluster (DCP reshards when the number of workers changes)
SAFE_TO_CHANGE = tuple(f"train.{k}" for k in (
    "name", "storage_path", "max_steps", "log_every", "eval_every", "eval_batches", "iwae_samples",
    "sample_groups", "eval_tasks", "eval_task_limit", "eval_task_num_plans",
    "checkpoint_every", "num_to_keep", "max_failures", "num_workers", "use_gpu",
    "cpus_per_worker", "precision", "activation_checkpointing", "compile", "worker_niceness",
    "export_bundle", "tracking", "tracking_experiment", "tracking_log_weights",
)) + ("data.path",)  # where the shards are may change; what they hold may not
RUN_FILE = "run.json"  # the identity of a run: resolved config and data fingerprint


@dataclass
class ResolvedRun:
    """A run checked on the driver, ready to launch: resolved config (seq_len from the data), run
    directory, tokenizer, data identity, and the checkpoint it resumes from (None: a new run)."""

    cfg: Config
    run_dir: Path
    tokenizer_path: str | None
    data: DataInfo
    identity: dict
    resume_from: str | None = None
    damaged: list = field(default_factory=list)  # [(checkpoint dir, problem)] newer than resume_from


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.storage_path).expanduser().resolve() / cfg.train.name


def check_storage(cfg: Config) -> Path:
    """The run directory exists and is writable, or can be created (else a ConfigError naming
    train.storage_path). Creates nothing: a refused run leaves no trace."""
    run_dir = run_dir_of(cfg)
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a directory" if not existing.is_dir() else "is not writable"
        raise ConfigError("train.storage_path", f"{cfg.train.storage_path!r} cannot hold the run: {existing} {what}")
    if (run_dir / "manifest.json").exists():
        raise ConfigError("train.name", f"{run_dir} is a shard directory (it has manifest.json), not a run "
                                        "directory: choose another train.name or train.storage_path")
    return run_dir


def resolve(cfg: Config) -> ResolvedRun:
    """Every check that needs no cluster: config against the data (seq_len filled in, split sizes
    against batch size and workers), the storage, and, for an existing run, its identity and its
    checkpoints. Reads only; `prepare` writes."""
    info = resolve_data(cfg.data, cfg.model, cfg.train.num_workers)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=info.seq_len))
    run_dir = check_storage(cfg)
    run = ResolvedRun(cfg, run_dir, info.tokenizer_path, info, data_identity(cfg, info))
    if has_checkpoints(run_dir):
        check_same_run(run)
        run.resume_from, run.damaged = damaged_checkpoints(run_dir)
        if run.resume_from is None:
            problems = "; ".join(f"{p.name}: {why}" for p, why in run.damaged)
            raise CheckpointError(f"{run_dir}: no intact checkpoint to resume from ({problems}); move the "
                                  "run directory away or choose another train.name to start again")
    return run


def prepare(run: ResolvedRun) -> None:
    """The run directory's files before launch: the directory itself, damaged checkpoints moved
    to quarantine/, the synthetic task's tokenizer, and the run's identity (run.json)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    for path, problem in run.damaged:
        moved = quarantine(path, run.run_dir)
        where = f"moved to {moved}" if moved else "left in place (Ray's run snapshot lists it)"
        print(f"[ft-ray] warning: checkpoint {path} is damaged ({problem}): skipped, {where}",
              file=sys.stderr, flush=True)
    if run.tokenizer_path is None:  # synthetic task: its character tokenizer travels with the run
        from ft_ray.data.tokenizer import letter_tokenizer

        run.tokenizer_path = str(run.run_dir / "tokenizer.json")
        _write_atomically(Path(run.tokenizer_path), letter_tokenizer().to_str())
    _write_atomically(run.run_dir / RUN_FILE, json.dumps(run.identity, indent=2))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def has_checkpoints(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.is_dir() for p in run_dir.glob("checkpoint_*"))


def data_identity(cfg: Config, info: DataInfo) -> dict:
    """The resolved config and a fingerprint of the data (shards: their manifest and tokenizer)."""
    data: dict = {"seq_len": info.seq_len}
    if cfg.data.source == "shards":
        assert cfg.data.path is not None  # DataConfig.validate: shards need a path
        root = Path(cfg.data.path)
        data["manifest.json sha256"] = file_sha256(root / "manifest.json")
        data["tokenizer.json sha256"] = file_sha256(root / "tokenizer.json")
    return {"config": to_dict(cfg), "data": data}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat: dict = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        flat.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return flat


def check_same_run(run: ResolvedRun) -> None:
    """A run name with checkpoints resumes only the run it names: any change outside
    SAFE_TO_CHANGE (model, data, optimizer, batch, seed, ...) is refused, naming the keys."""
    stored = _stored_identity(run.run_dir)
    if stored is None:
        return
    old, new = _flatten(stored["config"]), _flatten(run.identity["config"])
    # a key the stored config lacks was added to ft-ray after the run started: nothing to compare
    changed = [(k, old[k], new.get(k)) for k in sorted(old)
               if k not in SAFE_TO_CHANGE and old[k] != new.get(k)]
    old_data = stored.get("data") or {}  # absent in runs written before run.json existed
    changed += [(f"data ({k})", old_data[k], v) for k, v in run.identity["data"].items()
                if k in old_data and old_data[k] != v]
    if changed:
        diffs = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed)
        raise ConfigError("train.name", f"{run.run_dir} holds checkpoints of another configuration "
                          f"({diffs}); a resumed run may change only {', '.join(SAFE_TO_CHANGE)}. To train "
                          "this configuration, choose a new train.name")


def _stored_identity(run_dir: Path) -> dict | None:
    """run.json, or for runs written before it existed, their config.yaml (config only)."""
    if (run_dir / RUN_FILE).is_file():
        return json.loads((run_dir / RUN_FILE).read_text())
    if (run_dir / "config.yaml").is_file():
        return {"config": yaml.safe_load((run_dir / "config.yaml").read_text())}
    return None


def cpus_per_worker(cfg: Config) -> float:
    """1 CPU per worker, unless that leaves Ray Data no CPU on this cluster: then split what
    remains after one CPU for data tasks (the small-machine starvation hang)."""
    if cfg.train.cpus_per_worker is not None:
        return cfg.train.cpus_per_worker
    import ray

    total = ray.cluster_resources().get("CPU", 1.0)
    n = max(cfg.train.num_workers, 1)
    if total >= n + 1:
        return 1.0
    return max(0.1, (total - 1.0) / n) if total > 1 else 0.5 / n


def check_resources(cfg: Config, per_worker: dict[str, float]) -> None:
    """Refuse a request this cluster can never grant (Train would wait for it forever, deaf to
    Ctrl-C): more CPUs or GPUs than it has, a worker larger than any node, or no CPU left for
    Ray Data's tasks (the starvation hang). A joined cluster may autoscale: only a warning there."""
    import ray

    if cfg.train.num_workers == 0:  # local mode: the loop runs in this process
        return
    n, total = cfg.train.num_workers, ray.cluster_resources()
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    problems = []
    for res, each in per_worker.items():
        have, largest = total.get(res, 0.0), max((r.get(res, 0.0) for r in nodes), default=0.0)
        key = "train.use_gpu" if res == "GPU" else "train.cpus_per_worker"
        if n * each > have:
            problems.append((key, f"{n} workers x {each:g} {res} = {n * each:g} {res}, the cluster has {have:g}"))
        elif each > largest:
            problems.append((key, f"one worker needs {each:g} {res}, the largest node has {largest:g}"))
    cpus = total.get("CPU", 0.0)
    if not problems and cpus >= 2 and cpus - n * per_worker.get("CPU", 0.0) < 1:
        problems.append(("train.cpus_per_worker", f"{n} workers x {per_worker['CPU']:g} CPU leave "
                         f"{cpus - n * per_worker['CPU']:g} of the cluster's {cpus:g} CPUs; Ray Data's "
                         "tasks need 1 (the run would hang)"))
    if not problems:
        return
    key, why = problems[0]
    if os.environ.get("RAY_ADDRESS"):
        print(f"[ft-ray] warning: {why} now; the run waits until the autoscaler adds nodes", flush=True)
        return
    raise ConfigError(key, f"the run can never be scheduled: {why}")


def fit(run: Config | ResolvedRun, kill_at: str | None = None, callbacks: list | None = None):
    """Run training and return Ray's `Result` (with `.return_value` = the final metrics).
    `run`: a config (resolved here) or what `resolve` returned. `kill_at` is the fault drill of
    `loop._maybe_inject_failure` (tests); `callbacks` are Ray Train callbacks (a sweep passes
    Tune's report callback)."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ft_ray.train.loop import WorkerJob, train_loop_per_worker

    run = run if isinstance(run, ResolvedRun) else resolve(run)
    cfg, tc = run.cfg, run.cfg.train
    resources = {"CPU": cpus_per_worker(cfg)}
    if tc.use_gpu:
        resources["GPU"] = 1
    check_resources(cfg, resources)
    prepare(run)
    datasets, _ = build_datasets(cfg.data, cfg.model, run.data)
    run_dir = run.run_dir
    # Ray's annotations describe Train V1 (whose loop returns None and whose RunConfig lacks
    # worker_runtime_env/logging_config); RAY_TRAIN_V2_ENABLED selects V2 at run time.
    trainer = TorchTrainer(
        train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config={"job": WorkerJob(cfg, str(run_dir), run.tokenizer_path, kill_at)},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker=resources if tc.num_workers else None),
        run_config=RunConfig(  # type: ignore[call-arg]
            name=tc.name, storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.num_to_keep),
            failure_config=FailureConfig(max_failures=tc.max_failures), callbacks=callbacks or [],
            worker_runtime_env=worker_runtime_env(cfg),
            # ft-ray's own lines say what a run does; Train's INFO lines ("Checkpoint successfully
            # created at ..." per rank and checkpoint) repeat it (its per-report line: loop._quiet_report_lines)
            logging_config=LoggingConfig(log_level="WARNING")),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"], execution_options=data_execution_options()),
    )
    result = trainer.fit()
    return result


def worker_runtime_env(cfg: Config) -> dict:
    """A cluster Ray starts by default runs every worker process at niceness 15
    (`RAY_worker_niceness`), below its raylet, GCS, dashboard and log monitor at 0. The training
    workers are the job's compute, so on any cluster they run at `train.worker_niceness` (0: like a
    plain launch, and like Ray's job manager runs its job supervisors). ft-ray's embedded cluster
    runs all its worker processes at 0 (`ft_ray.cluster.EMBEDDED_ENV`); see the performance page."""
    n = cfg.train.worker_niceness
    return {} if n is None else {"env_vars": {"RAY_worker_niceness": str(n)}}


def data_execution_options():
    """Deterministic order (exact resume), and a bounded read-ahead: without a limit Ray Data
    keeps producing into the object store and takes CPU from training on a small machine."""
    from ray.data import ExecutionOptions, ExecutionResources

    return ExecutionOptions(preserve_order=True,
                            resource_limits=ExecutionResources(object_store_memory=256 * 2**20))
