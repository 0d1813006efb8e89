"""Run a sweep: each Tune trial is a function that runs a `TorchTrainer` (Ray Train V2's pattern)
and forwards its reports with `TuneReportCallback`; ASHA stops bad trials on evaluations.

    python -m jobs.sweep --space tune_spaces/smoke.yaml
    ray job submit --working-dir . -- python -m jobs.sweep --space tune_spaces/latent_free_bits.yaml

Outputs in storage_path/name: space.json (the resolved space; a re-run must match it),
trials/<trial>/ (each a training run, and one MLflow run in the experiment named after the sweep;
with `tracking: mlflow` the store is mlflow.db and mlartifacts/ here), results.csv, results.md,
nll_kl_vs_kappa.png, heatmap.png, best_bundle/ (only when every trial finished).

Exit status: 0 when every trial finished (or was stopped early by ASHA); 1 when a trial errored;
130 when the sweep was interrupted (Ctrl-C) with trials unfinished or not started; 2 for a bad
space. Re-running the same space resumes an incomplete sweep.
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
from pathlib import Path

from ft_ray.cluster import ensure_ray
from ft_ray.config import ConfigError
from ft_ray.entrypoint import one_line_errors
from ft_ray.train.tracking import prepare_experiment
from ft_ray.tune.space import (
    SweepSpec,
    check_space_record,
    load_space,
    own_trial_settings,
    trial_tracking,
    write_space_record,
)

COLLAPSE_KL_BITS = 0.01  # below this KL per token the latent carries nothing
TRIAL_DRIVER_CPU = 0.01  # the Tune function only waits for its TorchTrainer
FINISHED = ("ok", "stopped early (ASHA)")
UNFINISHED = ("interrupted", "not started")
EXIT_ERRORED, EXIT_INTERRUPTED = 1, 130  # 130: the shell's code for a process ended by SIGINT


class SweepIncomplete(RuntimeError):
    """The sweep ended with trials errored or unfinished; its results are written and say which."""

    def __init__(self, sweep_dir: Path, exit_code: int, reason: str):
        self.sweep_dir, self.exit_code = sweep_dir, exit_code
        super().__init__(f"{reason}; results in {sweep_dir} (re-run the same space to resume or retry)")


def _sampled_space(spec: SweepSpec) -> dict:
    from ray import tune

    make = {"choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    return {key: make[kind](values) for key, dist in spec.sampled().items() for kind, values in dist.items()}


def make_trial(spec: SweepSpec, sweep_dir: Path):
    """The Tune function: one training run named after the trial, reporting to Tune."""
    base_config, base_overrides = str(spec.base_config), list(spec.base_overrides)
    resources, tracking = spec.resources, spec.tracking

    def trial(params: dict) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from ft_ray.config import load_config
        from ft_ray.train.trainer import fit

        arm = {**params["arm"], **{k: v for k, v in params.items() if k != "arm"}}
        cfg = load_config(base_config, base_overrides, changes=arm)
        own_trial_settings(cfg, resources, f"trial-{tune.get_context().get_trial_id()}", sweep_dir / "trials",
                           tracking)
        fit(cfg, callbacks=[TuneReportCallback()])

    return trial


def concurrency(spec: SweepSpec) -> int:
    """Trials at once: what the cluster's CPUs allow after one whole CPU is left for Ray Data's
    tasks (which need a full CPU each) and 0.01 CPU per trial driver. Anything more would leave
    the data tasks pending forever: the small-machine starvation hang."""
    if spec.max_concurrent_trials:
        return int(spec.max_concurrent_trials)
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    per_trial = spec.resources.workers_per_trial * spec.resources.cpus_per_worker + TRIAL_DRIVER_CPU
    limit = math.floor((cpus - 1.0) / per_trial + 1e-9)
    if spec.resources.gpus_per_worker:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        limit = min(limit, math.floor(gpus / (spec.resources.workers_per_trial * spec.resources.gpus_per_worker)))
    if limit < 1:
        raise ConfigError("resources", f"a trial needs {per_trial:g} CPUs plus 1 for Ray Data, the cluster has "
                                       f"{cpus:g}: lower resources.cpus_per_worker or workers_per_trial",
                          str(spec.path))
    return limit


def _tuner(spec: SweepSpec, sweep_dir: Path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(make_trial(spec, sweep_dir), {"CPU": TRIAL_DRIVER_CPU})
    tuner_path = sweep_dir / "tuner"
    if tune.Tuner.can_restore(str(tuner_path)):
        print(f"[ft-ray] resuming the sweep in {tuner_path} (finished trials are kept)", flush=True)
        return tune.Tuner.restore(str(tuner_path), trainable=trainable, resume_errored=True)
    s = spec.scheduler
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=s["max_t"], grace_period=s["grace_period"],
                              reduction_factor=s["reduction_factor"]) if s else None
    return tune.Tuner(
        trainable,
        param_space={"arm": tune.grid_search(spec.grid_arms()), **_sampled_space(spec)},
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                    num_samples=spec.num_samples, max_concurrent_trials=concurrency(spec)),
        run_config=tune.RunConfig(name="tuner", storage_path=str(sweep_dir)),
    )


def saved_trials(tuner_path: Path) -> list:
    """The trials as Tune saved them when `fit()` returned. Not the ResultGrid's: after a Ctrl-C Tune
    saves its state (interrupted trials RUNNING, unstarted ones PENDING) and only then stops the
    running trials, which marks them TERMINATED in memory, like finished ones (Ray 2.60: tune.py
    `run`, then `TuneController._cleanup_trials` -> `_schedule_trial_stop`). The saved state is
    also what a re-run resumes from, so the statuses say what a re-run will do."""
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(str(tuner_path)).trials


def run_sweep(space_path: str | Path) -> Path:
    """Run (or resume) a sweep; its directory when every trial finished, else SweepIncomplete."""
    spec = load_space(space_path)
    sweep_dir = spec.sweep_dir
    recorded = check_space_record(spec, sweep_dir)  # before Ray starts: an edited space is refused
    started_before = (sweep_dir / "tuner").exists()  # before the Tuner below creates it
    sweep_dir.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    tuner = _tuner(spec, sweep_dir)
    if not recorded:
        if started_before:
            print(f"[ft-ray] {sweep_dir} has no stored space (started by an older ft-ray): its space cannot "
                  "be checked; storing this one", flush=True)
        write_space_record(spec, sweep_dir)
    # one experiment per sweep, created here once (an embedded store: its tables too) rather
    # than raced for by the first trials
    prepare_experiment(None if spec.tracking == "none" else trial_tracking(spec.tracking, sweep_dir), spec.name)
    tuner.fit()
    exit_code, reason = write_results(spec, sweep_dir, saved_trials(sweep_dir / "tuner"))
    if exit_code:
        raise SweepIncomplete(sweep_dir, exit_code, reason)
    return sweep_dir


def _params(config: dict) -> dict:
    return {**config.get("arm", {}), **{k: v for k, v in config.items() if k != "arm"}}


def _trial_status(trial) -> str:
    """From Tune's saved state, where TERMINATED means ended by itself or by ASHA. Loading the state
    turns RUNNING into PENDING (Trial.__setstate__); the start time, saved when a trial first
    runs, tells those apart from the trials that never ran."""
    if trial.status == "ERROR":
        return "error"
    if trial.status == "TERMINATED":
        return "ok"
    return "interrupted" if trial.run_metadata.start_time is not None else "not started"


def _error_line(trial) -> str:
    """The first line of the trial's error (the original exception's, not Ray's wrapper's)."""
    try:
        error = trial.get_pickled_error() or trial.get_error()
    except Exception as e:  # an error that cannot be loaded here is still an error
        error = e
    error = getattr(error, "cause", None) or error
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # a text traceback starts with "Traceback": its exception is the last line
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line.strip()[:200]


def _trial_row(spec: SweepSpec, trial) -> dict:
    m = trial.last_result or {}
    row = {**_params(trial.config), "trial": f"trial-{trial.trial_id}", "status": _trial_status(trial),
           "evaluations": m.get("training_iteration", 0), "step": m.get("step"), "val_nll": m.get("val_nll"),
           # the FT's CE with z from the encoder, which saw the answer: no bound on anything; empty for
           # the baseline, which has no posterior (its `ce` is the training CE: never a val column)
           "val_ce_post (leaky)": m.get("val_ce_post"),
           "kl_bits": m.get("val_kl_bits"), "z_gap": m.get("val_z_gap"), "tokens_per_s": m.get("tokens_per_s"),
           "metric": m.get(spec.metric)}
    if row["status"] == "ok" and spec.scheduler and row["evaluations"] < spec.scheduler["max_t"]:
        row["status"] = "stopped early (ASHA)"
    kl = row["kl_bits"]
    row["latent"] = ("-" if kl is None else "collapsed" if kl < COLLAPSE_KL_BITS
                     else "took over" if (m.get("val_valid_fresh", 1.0) < 0.5) else "used" if (row["z_gap"] or 0) > 0.01
                     else "ignored")
    if row["status"] == "error":
        row["error"] = _error_line(trial)
    return row


def _missing_rows(spec: SweepSpec, trials: list) -> list[dict]:
    """One `not started` row per expected trial (grid arm x num_samples) that Tune never created:
    it creates trials lazily, so an interrupted sweep has no trace of the ones it did not reach."""
    created = [t.config.get("arm") for t in trials]
    rows = []
    for arm in spec.grid_arms():
        for _ in range(spec.num_samples):
            if arm in created:
                created.remove(arm)
            else:
                rows.append({**arm, "trial": "", "status": "not started"})
    return rows


def _verdict(rows: list[dict]) -> tuple[int, str]:
    """(exit code, why the sweep is incomplete) from the rows' statuses; (0, "") when complete."""
    count = lambda statuses: sum(r["status"] in statuses for r in rows)  # noqa: E731
    unfinished, errored = count(UNFINISHED), count(("error",))
    errors = f"{errored} of {len(rows)} trials errored"
    if unfinished:  # an interrupt wins: the errored trials are retried with the rest on a re-run
        return EXIT_INTERRUPTED, (f"the sweep was interrupted: {unfinished} of {len(rows)} trials did not finish"
                                  + (f", {errors}" if errored else ""))
    return (EXIT_ERRORED, errors) if errored else (0, "")


def write_results(spec: SweepSpec, sweep_dir: Path, trials: list) -> tuple[int, str]:
    """results.csv, results.md, plots and best_bundle/ from Tune's trials (see `saved_trials`);
    returns the exit code and, when not 0, why."""
    rows = [_trial_row(spec, t) for t in trials] + _missing_rows(spec, trials)
    exit_code, reason = _verdict(rows)
    _write_tables(spec, sweep_dir, rows, reason)
    _plots([r for r in rows if r["status"] in FINISHED], sweep_dir)
    _pick_best_bundle(spec, sweep_dir, rows, reason)
    print((sweep_dir / "results.md").read_text())
    print(f"[ft-ray] sweep results: {sweep_dir}")
    return exit_code, reason


def _write_tables(spec: SweepSpec, sweep_dir: Path, rows: list[dict], reason: str) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (sweep_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)  # noqa: E731
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    status = f"**incomplete**: {reason}; no best bundle" if reason else "complete"
    (sweep_dir / "results.md").write_text(f"# Sweep {spec.name}\n\nmetric: {spec.metric} ({spec.mode}); "
                                          f"{status}\n\n" + "\n".join(md) + "\n")


def _pick_best_bundle(spec: SweepSpec, sweep_dir: Path, rows: list[dict], reason: str) -> None:
    """best_bundle/ only from a complete sweep: the best of partial results is not the sweep's best,
    and a stale one from an earlier run would claim to be."""
    target = sweep_dir / "best_bundle"
    shutil.rmtree(target, ignore_errors=True)
    if reason:
        print(f"[ft-ray] no best bundle: {reason}")
        return
    finished = [r for r in rows
                if r.get("metric") is not None and (sweep_dir / "trials" / r["trial"] / "bundle").exists()]
    if not finished:
        print("[ft-ray] no best bundle: no finished trial exported one (train.export_bundle)")
        return
    best = (min if spec.mode == "min" else max)(finished, key=lambda r: r["metric"])
    shutil.copytree(sweep_dir / "trials" / best["trial"] / "bundle", target)
    print(f"[ft-ray] best trial {best['trial']} ({spec.metric} {best['metric']:.4f}); bundle in {target}")


def _plots(rows: list[dict], out: Path) -> None:
    from ft_ray.report import _plt, save_figure

    for stale in ("nll_kl_vs_kappa.png", "heatmap.png"):  # an earlier run's plots would outlive its rows
        (out / stale).unlink(missing_ok=True)
    ft = [r for r in rows if r.get("model.arch", "free_transformer") != "baseline"
          and r.get("model.free_bits") is not None and r["val_nll"] is not None]
    if not ft:
        return
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for h in sorted({r.get("model.latent_bits") for r in ft}, key=lambda v: (v is None, v)):
        pts = sorted((r["model.free_bits"], r["val_nll"], r["kl_bits"] or 0.0)
                     for r in ft if r.get("model.latent_bits") == h)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"H={h}")
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=f"H={h}")
    for r in rows:
        if r.get("model.arch") == "baseline" and r["val_nll"] is not None:
            axes[0].axhline(r["val_nll"], color="black", linestyle=":", label="baseline")
    axes[0].set(xscale="log", xlabel="kappa (bits/token)", ylabel="honest val NLL bound (nats/token)")
    axes[1].set(xscale="log", xlabel="kappa (bits/token)", ylabel="KL (bits/token)")
    save_figure(fig, axes, out / "nll_kl_vs_kappa.png")
    hs = sorted({h for r in ft if (h := r.get("model.latent_bits")) is not None})
    ks = sorted({r["model.free_bits"] for r in ft})
    if len(hs) > 1 and len(ks) > 1:
        import numpy as np

        grid = np.full((len(hs), len(ks)), np.nan)
        for r in ft:
            if r.get("model.latent_bits") in hs:
                grid[hs.index(r["model.latent_bits"]), ks.index(r["model.free_bits"])] = r["val_nll"]
        fig, ax = plt.subplots(figsize=(6, 4))
        im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(len(ks)), [f"{k:g}" for k in ks])
        ax.set_yticks(range(len(hs)), [str(h) for h in hs])
        ax.set(xlabel="kappa (bits/token)", ylabel="H (latent bits)", title="honest val NLL bound")
        fig.colorbar(im)
        fig.tight_layout()
        fig.savefig(out / "heatmap.png", dpi=110)
        plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True, help="a sweep space YAML (tune_spaces/*.yaml)")


def run(args: argparse.Namespace) -> int:
    with one_line_errors():
        try:
            run_sweep(args.space)
        except SweepIncomplete as e:
            print(f"ft-ray: {e}", file=sys.stderr)
            return e.exit_code
    return 0

