"""The training loop: one function for both models, under Ray Train or a plain launch.

`train_loop_per_worker(config)` is what `TorchTrainer` runs on each worker: it rebuilds the typed
config and calls `run_training(cfg, RayRuntime())`. Per step: `grad_accum_steps` micro-batches,
clipping on the (sharded) gradients, AdamW, LR schedule. Every `log_every` steps rank 0 logs and
every rank reports (Ray's report is a barrier, so all ranks call it equally often); every
`eval_every` steps an honest validation pass; every `checkpoint_every` steps (and at the end) a
DCP checkpoint; at the end the serving bundle. Rank 0's metrics also go to the run's experiment
tracker (`train.tracking`, see tracking.py), which never makes the loop wait.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from ft_ray.bundle import write_bundle
from ft_ray.config import Config, to_dict
from ft_ray.data.pipeline import synthetic_task_of
from ft_ray.eval.validation import batch_metrics, letter_plan_eval
from ft_ray.model import build_model
from ft_ray.train.checkpoint import full_state_dict, load_checkpoint, save_checkpoint
from ft_ray.train.metrics import MetricsWriter, peak_flops, peak_memory_mib
from ft_ray.train.optim import build_optimizer, build_scheduler
from ft_ray.train.parallel import autocast_context, parallelize, resolve_precision
from ft_ray.train.runtime import scratch_dir
from ft_ray.train.tracking import make_tracker, run_artifacts


@dataclass
class Position:
    """Where training is: optimiser steps done, epoch, micro-batches consumed in that epoch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


@dataclass(frozen=True)
class WorkerJob:
    """What `fit` gives every Ray Train worker (the one value of `train_loop_config`, key "job"):
    the resolved config, the run directory, the shards' tokenizer, the fault drill (`kill_at`)."""

    cfg: Config
    run_dir: str
    tokenizer_path: str | None = None
    kill_at: str | None = None


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train entry point: `config["job"]` is a `WorkerJob`."""
    from ft_ray.train.runtime import RayRuntime

    job: WorkerJob = config["job"]
    _quiet_report_lines()
    return run_training(job.cfg, RayRuntime(job.run_dir), run_dir=job.run_dir,
                        tokenizer_path=job.tokenizer_path, kill_at=job.kill_at)


def _quiet_report_lines() -> None:
    """Ray 2.60 logs every `ray.train.report` at INFO on each worker ("Reporting training result
    ...", all metrics) through a logger named by its file path, which `LoggingConfig(log_level=)`
    does not reach; ft-ray's own step lines already say it."""
    import logging

    try:  # a private module: if a later Ray moves it, its lines show again and nothing else changes
        import ray.train.v2._internal.execution.context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _all_reduce_mean(values: dict[str, float], world_size: int, device) -> dict[str, float]:
    if world_size == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / world_size for k, v in zip(keys, t.tolist())}


class _Batches:
    """Endless micro-batches across epochs, counting the position and the time spent waiting."""

    def __init__(self, runtime, batch_size: int, position: Position):
        self.runtime, self.batch_size, self.pos = runtime, batch_size, position
        self.wait_s = 0.0
        self._it = self._epoch_iter(skip=position.batches_in_epoch)

    def _epoch_iter(self, skip: int):
        it = self.runtime.batches("train", self.batch_size)
        for _ in range(skip):  # resume inside an epoch: the data position is part of the checkpoint
            next(it)
        return it

    def next(self) -> torch.Tensor:
        t0 = time.perf_counter()
        batch = next(self._it, None)
        if batch is None:  # epoch done: a new pass (Ray Data reshuffles the shard order)
            self.pos.epoch += 1
            self.pos.batches_in_epoch = 0
            self._it = self._epoch_iter(skip=0)
            batch = next(self._it, None)
            if batch is None:
                raise RuntimeError("the training split yields no full batch: lower data.batch_size")
        self.pos.batches_in_epoch += 1
        self.wait_s += time.perf_counter() - t0
        return batch


def evaluate(model, cfg: Config, runtime, world_size: int, device) -> dict[str, float]:
    """Honest validation metrics averaged over ranks (every rank runs the same number of
    forwards, as FSDP requires). Ranks take interleaved batches of the unsplit validation set."""
    model.eval()
    rows = []
    it = runtime.batches("val", cfg.data.batch_size)
    for i, batch in enumerate(it):
        if i >= cfg.train.eval_batches * world_size:
            break
        if i % world_size == runtime.rank:
            rows.append(batch_metrics(model, batch.to(device), cfg.train.iwae_samples))
    if not rows:
        raise RuntimeError("the validation split yields no full batch for every worker: lower "
                           "data.batch_size or raise the validation size")
    n = min(len(rows), cfg.train.eval_batches)
    local = {k: sum(r[k] for r in rows[:n]) / n for k in rows[0]}
    model.train()
    return _all_reduce_mean(local, world_size, device)


def run_training(cfg: Config, runtime, run_dir: str | Path, tokenizer_path: str | None = None,
                 kill_at: str | None = None) -> dict:
    """Train to cfg.train.max_steps (resuming from the runtime's checkpoint); return the final
    metrics. `kill_at` ("<step>:<rank>:<marker file>") is a fault drill, see `_maybe_inject_failure`."""
    rank, world, device = runtime.rank, runtime.world_size, runtime.device
    tc, run_dir = cfg.train, Path(run_dir)
    precision = resolve_precision(tc.precision, device)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    model = build_model(cfg.model).to(device)
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    model = parallelize(model, world, device, precision, tc.activation_checkpointing, tc.compile)
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay,
                                (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps)
    scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, tc.max_steps, cfg.optim.min_lr)
    torch.manual_seed(tc.seed * 100_003 + rank * 7919)  # per-rank stream for Z sampling...
    pos = Position()
    with runtime.latest_checkpoint() as ckpt:
        if ckpt is not None:  # ...which the checkpoint restores, so a resumed run draws the same Z
            pos = Position(**load_checkpoint(ckpt, model, optimizer, scheduler, rank))
    if pos.step >= tc.max_steps:  # a finished run started again: report its result, train nothing
        return _finished(model, cfg, runtime, run_dir, tokenizer_path, precision, pos.step)
    _retarget_schedule(scheduler, pos.step, tc.max_steps, rank)
    tracker = make_tracker(tc.tracking, rank)  # a no-op on ranks > 0 and for `none`
    tracker.start(cfg, run_dir)  # returns at once: the store is opened in the background
    log = MetricsWriter(run_dir, enabled=rank == 0, resume_step=pos.step, tracker=tracker)
    if rank == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        print(f"[ft-ray] {cfg.model.arch}: {model.num_params() if world == 1 else 'sharded'} params, "
              f"world {world}, {precision}, {'resuming at step ' + str(pos.step) if pos.step else 'from scratch'}, "
              f"niceness {os.getpriority(os.PRIO_PROCESS, 0)}",
              flush=True)
    batches = _Batches(runtime, cfg.data.batch_size, pos)
    autocast = autocast_context(precision, world, device)
    peak = peak_flops(device)
    metrics: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    window_t0, window_steps, window_tokens, window_wait = time.perf_counter(), 0, 0, batches.wait_s

    while pos.step < tc.max_steps:
        sums: dict[str, float] = {}
        for _ in range(tc.grad_accum_steps):
            tokens = batches.next().to(device, non_blocking=True)
            with autocast:
                losses = model.loss(tokens)
            (losses["loss"] / tc.grad_accum_steps).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item() / tc.grad_accum_steps
            window_tokens += tokens[:, 1:].numel() * world
        grad_norm = _clip(model, tc.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        pos.step += 1
        window_steps += 1
        if kill_at:
            _maybe_inject_failure(kill_at, pos.step, rank)
        last = pos.step == tc.max_steps

        if pos.step % tc.log_every == 0 or last:
            elapsed = time.perf_counter() - window_t0
            metrics = _all_reduce_mean(sums, world, device)
            if "kl" in metrics:
                metrics["kl_bits"] = metrics["kl"] / math.log(2)
            metrics.update(lr=float(scheduler.get_last_lr()[0]), grad_norm=grad_norm,
                           tokens_per_s=window_tokens / elapsed, step_ms=1e3 * elapsed / window_steps,
                           data_wait_frac=(batches.wait_s - window_wait) / elapsed,
                           peak_mem_mib=peak_memory_mib(device), epoch=pos.epoch)
            if peak is not None:
                metrics["mfu"] = metrics["tokens_per_s"] * flops_per_token / (peak * world)
            log.write("train", pos.step, metrics)
            if rank == 0:
                print(f"[ft-ray] step {pos.step}/{tc.max_steps} " + " ".join(
                    f"{k} {v:.4g}" for k, v in metrics.items() if k in (
                        "loss", "ce", "kl_bits", "lr", "grad_norm", "tokens_per_s", "data_wait_frac")), flush=True)
            window_steps, window_tokens, window_wait = 0, 0, batches.wait_s

        if pos.step % tc.eval_every == 0 or last:
            # on a fork of the RNG: evaluating (which samples Z) leaves training's random stream
            # as it was, so eval settings may change on resume without changing the training
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                last_eval = evaluate(model, cfg, runtime, world, device)
                last_eval.update(_plan_eval(model, cfg, rank))
                last_eval.update(_downstream_eval(model, cfg, rank, tokenizer_path))
            log.write("eval", pos.step, last_eval)
            if rank == 0:
                values = " ".join(f"{k} {v:.4g}" for k, v in last_eval.items())
                print(f"[ft-ray] eval step {pos.step} {values}", flush=True)

        report = {"step": pos.step, **metrics, **reported(last_eval)}
        if pos.step % tc.checkpoint_every == 0 or last:
            with scratch_dir("ft-ray-ckpt-") as d:
                save_checkpoint(d, model, optimizer, scheduler, vars(pos), rank)
                runtime.report(report, checkpoint_dir=d)
        elif pos.step % tc.log_every == 0:
            runtime.report(report)
        if pos.step % tc.log_every == 0 or pos.step % tc.eval_every == 0 or pos.step % tc.checkpoint_every == 0:
            window_t0 = time.perf_counter()  # logging, evaluation and checkpoints are not throughput

    final = {"step": pos.step, **metrics, **reported(last_eval)}
    if tc.export_bundle:
        _export(model, cfg, run_dir, tokenizer_path, precision, final, rank)
    tracker.log_artifacts(run_artifacts(run_dir, tc.tracking_log_weights))
    log.close()
    training_s = tracker.blocking_s  # what tracking cost the loop, for the bench
    tracker.close()  # waits (bounded) for the last metrics and artifacts
    return {**final, "tracking_blocking_s": training_s, "tracking_close_s": tracker.close_s}


def _retarget_schedule(scheduler, step: int, max_steps: int, rank: int) -> None:
    """A run resumed with another train.max_steps: its LR decays from where it is now to min_lr at
    the new max_steps (no jump back up the curve of the longer horizon)."""
    schedule = scheduler.lr_lambdas[0]
    if schedule.total_steps == max_steps:
        return
    old = schedule.total_steps
    schedule.retarget(step, max_steps)
    if rank == 0:
        print(f"[ft-ray] train.max_steps {old} -> {max_steps}: the learning rate decays from "
              f"{schedule.lr(step):.3g} at step {step} to {schedule.min_lr:.3g} at step {max_steps}", flush=True)


def _export(model, cfg: Config, run_dir: Path, tokenizer_path, precision: str, metrics: dict, rank: int) -> None:
    state = full_state_dict(model)  # collective
    if rank == 0:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        write_bundle(run_dir / "bundle", state, cfg.model, metrics, tokenizer_path, dtype)
        print(f"[ft-ray] bundle written to {run_dir / 'bundle'}", flush=True)


def _finished(model, cfg: Config, runtime, run_dir: Path, tokenizer_path, precision: str, step: int) -> dict:
    """The run already reached max_steps: keep its bundle (or write it, if the run stopped between
    its last checkpoint and the export) and report its final metrics once."""
    metrics_file = run_dir / "bundle" / "metrics.json"
    final = json.loads(metrics_file.read_text()) if metrics_file.exists() else {"step": step}
    if cfg.train.export_bundle and final.get("step") != step:
        final = {"step": step}
        _export(model, cfg, run_dir, tokenizer_path, precision, final, runtime.rank)
    if runtime.rank == 0:
        print(f"[ft-ray] {run_dir} already finished at step {step}: nothing to train", flush=True)
    runtime.report(final)
    return final


def _maybe_inject_failure(spec: str, step: int, rank: int) -> None:
    """Fault drill: rank <rank> kills its own process (SIGKILL, no cleanup) when it reaches
    <step>, once: the marker file records that it happened."""
    at, who, marker = spec.split(":", 2)
    if step == int(at) and rank == int(who) and not os.path.exists(marker):
        Path(marker).write_text(f"killed rank {rank} at step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def _clip(model, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
        norm = norm.full_tensor()
    return float(norm)


def _rank0_copy(model, cfg: Config, rank: int):
    """The model as one process can run it, on rank 0 (None elsewhere): the model itself, or a full
    copy gathered from the FSDP shards (a collective: every rank must call this)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return model
    state = full_state_dict(model)  # collective
    if rank != 0:
        return None
    local = build_model(cfg.model)
    local.load_state_dict(state)
    return local


def _plan_eval(model, cfg: Config, rank: int) -> dict[str, float]:
    """The letter task's fresh- vs shared-plan groups, generated by rank 0 on a full copy."""
    if not (cfg.train.sample_groups and cfg.model.has_latent and synthetic_task_of(cfg.data) == "letters"):
        return {}
    local = _rank0_copy(model, cfg, rank)
    if local is None:
        return {}
    local.eval()
    out = letter_plan_eval(local, cfg.train.sample_groups, seed=0)
    model.train()
    return out


def _downstream_eval(model, cfg: Config, rank: int, tokenizer_path: str | None) -> dict[str, float]:
    """train.eval_tasks through lm-eval on rank 0 ({"eval/<task>/<metric>": value}; see
    ft_ray/eval/units.downstream_metrics), with the run's tokenizer."""
    tc = cfg.train
    if not tc.eval_tasks:
        return {}
    local = _rank0_copy(model, cfg, rank)
    if local is None:
        return {}
    from ft_ray.data import tokenizer as tk
    from ft_ray.eval.units import downstream_metrics

    tokenizer = tk.load_tokenizer(tokenizer_path) if tokenizer_path else tk.letter_tokenizer()
    out = downstream_metrics(local, tokenizer, tc.eval_tasks, tc.eval_task_limit, tc.eval_task_num_plans,
                             seed=tc.seed)
    model.train()
    return out


def reported(evaluation: dict[str, float]) -> dict[str, float]:
    """An evaluation's metrics as the run reports them to Ray and Tune: `val_<name>`, except the
    downstream ones, which keep their `eval/<task>/<metric>` names."""
    return {k if k.startswith("eval/") else f"val_{k}": v for k, v in evaluation.items()}
