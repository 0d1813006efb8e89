"""Launch a training run on Ray Train V2: checks first, then `TorchTrainer(...).fit()`.

Everything that can be wrong with the input (config, data, storage) fails here, on the driver,
with an error naming the key or file, before a worker starts.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

from ft_ray.config import Config, ConfigError, to_dict
from ft_ray.data.pipeline import build_datasets, resolve_data


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.storage_path).expanduser().resolve() / cfg.train.name


def check_storage(cfg: Config) -> Path:
    """The run directory exists and is writable (else a ConfigError naming train.storage_path)."""
    run_dir = run_dir_of(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError("train.storage_path", f"{cfg.train.storage_path!r} is not writable: {e.strerror}") from None
    return run_dir


def resolve(cfg: Config) -> tuple[Config, Path, str | None]:
    """Fill in what the data decide (seq_len), check storage; return (cfg, run_dir, tokenizer)."""
    info = resolve_data(cfg.data, cfg.model)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=info.seq_len))
    run_dir = check_storage(cfg)
    tokenizer_path = info.tokenizer_path
    if tokenizer_path is None:  # synthetic task: its character tokenizer travels with the run
        from ft_ray.data.tokenizer import letter_tokenizer

        tokenizer_path = str(run_dir / "tokenizer.json")
        letter_tokenizer().save(tokenizer_path)
    return cfg, run_dir, tokenizer_path


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


def fit(cfg: Config, kill_at: str | None = None, callbacks: list | None = None):
    """Run training and return Ray's `Result` (with `.return_value` = the final metrics).
    `kill_at` is the fault drill of `loop._maybe_inject_failure` (tests); `callbacks` are Ray
    Train callbacks (a sweep passes Tune's report callback)."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ft_ray.train.loop import train_loop_per_worker

    cfg, run_dir, tokenizer_path = resolve(cfg)
    datasets, _ = build_datasets(cfg.data, cfg.model)
    tc = cfg.train
    resources = {"CPU": cpus_per_worker(cfg)}
    if tc.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "run_dir": str(run_dir), "tokenizer_path": tokenizer_path,
                           "kill_at": kill_at},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker=resources if tc.num_workers else None),
        run_config=RunConfig(
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
    """Ray starts every worker process at niceness 15 (`RAY_worker_niceness`), below its raylet,
    GCS, dashboard and log monitor at 0. The training workers are the job's compute, so they run
    at `train.worker_niceness` (0: like a plain launch, and like Ray's job manager runs its job
    supervisors). Where they fill the cores, Ray's helper actors (Train controller, Ray Data's
    coordinator and stats actors, ...) then yield to them instead of competing as equals (the
    README's benchmark section has the measurement)."""
    n = cfg.train.worker_niceness
    return {} if n is None else {"env_vars": {"RAY_worker_niceness": str(n)}}


def data_execution_options():
    """Deterministic order (exact resume), and a bounded read-ahead: without a limit Ray Data
    keeps producing into the object store and takes CPU from training on a small machine."""
    from ray.data import ExecutionOptions, ExecutionResources

    return ExecutionOptions(preserve_order=True,
                            resource_limits=ExecutionResources(object_store_memory=256 * 2**20))
