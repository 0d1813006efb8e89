"""Run a sweep: each Tune trial is a function that runs a `TorchTrainer` (Ray Train V2's pattern)
and forwards its reports with `TuneReportCallback`; ASHA stops bad trials on evaluations.

    python -m jobs.sweep --space tune_spaces/smoke.yaml
    ray job submit --working-dir . -- python -m jobs.sweep --space tune_spaces/latent_free_bits.yaml

Outputs in storage_path/name: trials/<trial>/ (each a training run), results.csv, results.md,
nll_kl_vs_kappa.png, heatmap.png, best_bundle/.
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
from pathlib import Path

from ft_ray.config import ConfigError
from ft_ray.launch import command_main, ensure_ray, one_line_errors
from ft_ray.tune.space import SweepSpec, _overrides, load_space

COLLAPSE_KL_BITS = 0.01  # below this KL per token the latent carries nothing
TRIAL_DRIVER_CPU = 0.01  # the Tune function only waits for its TorchTrainer


def _sampled_space(spec: SweepSpec) -> dict:
    from ray import tune

    make = {"choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    return {key: make[kind](values) for key, dist in spec.sampled().items() for kind, values in dist.items()}


def make_trial(spec: SweepSpec, sweep_dir: Path):
    """The Tune function: one training run named after the trial, reporting to Tune."""
    base_config, base_overrides = str(spec.base_config), list(spec.base_overrides)
    resources = spec.resources

    def trial(params: dict) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from ft_ray.config import load_config
        from ft_ray.train.trainer import fit

        arm = {**params["arm"], **{k: v for k, v in params.items() if k != "arm"}}
        cfg = load_config(base_config, [*base_overrides, *_overrides(arm)])
        tc = cfg.train
        # every report is an evaluation: ASHA's iterations are evaluations
        tc.log_every = tc.checkpoint_every = tc.eval_every
        tc.name = f"trial-{tune.get_context().get_trial_id()}"
        tc.storage_path = str(sweep_dir / "trials")
        tc.num_workers, tc.cpus_per_worker = resources.workers_per_trial, resources.cpus_per_worker
        tc.use_gpu = resources.gpus_per_worker > 0
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
                                       f"{cpus:g}: lower resources.cpus_per_worker or workers_per_trial", str(spec.path))
    return limit


def run_sweep(space_path: str | Path) -> Path:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    spec = load_space(space_path)
    sweep_dir = (Path(spec.storage_path).expanduser().resolve() / spec.name)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    trainable = tune.with_resources(make_trial(spec, sweep_dir), {"CPU": TRIAL_DRIVER_CPU})
    scheduler = None
    if spec.scheduler:
        s = spec.scheduler
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=s.get("max_t", 100),
                                  grace_period=s.get("grace_period", 1), reduction_factor=s.get("reduction_factor", 2))
    tuner_path = sweep_dir / "tuner"
    if tune.Tuner.can_restore(str(tuner_path)):
        print(f"[ft-ray] resuming the sweep in {tuner_path} (finished trials are kept)", flush=True)
        tuner = tune.Tuner.restore(str(tuner_path), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"arm": tune.grid_search(spec.grid_arms()), **_sampled_space(spec)},
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                        num_samples=spec.num_samples,
                                        max_concurrent_trials=concurrency(spec)),
            run_config=tune.RunConfig(name="tuner", storage_path=str(sweep_dir)),
        )
    grid = tuner.fit()
    return write_results(spec, sweep_dir, grid)


def _trial_row(spec: SweepSpec, result) -> dict:
    params = {**result.config["arm"], **{k: v for k, v in result.config.items() if k != "arm"}}
    m = result.metrics or {}
    row = {**params, "trial": f"trial-{m['trial_id']}" if m.get("trial_id") else "",
           "status": "error" if result.error else "ok",
           "evaluations": m.get("training_iteration", 0), "step": m.get("step"),
           "val_nll": m.get("val_nll"), "val_ce": m.get("val_ce_post", m.get("ce")),
           "kl_bits": m.get("val_kl_bits"), "z_gap": m.get("val_z_gap"), "tokens_per_s": m.get("tokens_per_s"),
           "metric": m.get(spec.metric)}
    if spec.scheduler and row["evaluations"] < spec.scheduler.get("max_t", 0) and not result.error:
        row["status"] = "stopped early (ASHA)"
    kl = row["kl_bits"]
    row["latent"] = ("-" if kl is None else "collapsed" if kl < COLLAPSE_KL_BITS
                     else "took over" if (m.get("val_valid_fresh", 1.0) < 0.5) else "used" if (row["z_gap"] or 0) > 0.01
                     else "ignored")
    return row


def write_results(spec: SweepSpec, sweep_dir: Path, grid) -> Path:
    rows = [_trial_row(spec, grid[i]) for i in range(len(grid))]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (sweep_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)  # noqa: E731
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    (sweep_dir / "results.md").write_text(f"# Sweep {spec.name}\n\nmetric: {spec.metric} ({spec.mode})\n\n" + "\n".join(md) + "\n")
    _plots(rows, sweep_dir)
    finished = [r for r in rows if r["metric"] is not None and (sweep_dir / "trials" / r["trial"] / "bundle").exists()]
    if finished:
        best = (min if spec.mode == "min" else max)(finished, key=lambda r: r["metric"])
        target = sweep_dir / "best_bundle"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(sweep_dir / "trials" / best["trial"] / "bundle", target)
        print(f"[ft-ray] best trial {best['trial']} ({spec.metric} {best['metric']:.4f}); bundle in {target}")
    print((sweep_dir / "results.md").read_text())
    print(f"[ft-ray] sweep results: {sweep_dir}")
    return sweep_dir


def _plots(rows: list[dict], out: Path) -> None:
    from ft_ray.report import _plt, save_figure

    ft = [r for r in rows if r.get("model.arch", "free_transformer") != "baseline"
          and r.get("model.free_bits") is not None and r["val_nll"] is not None]
    if not ft:
        return
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for h in sorted({r.get("model.latent_bits") for r in ft}, key=lambda v: (v is None, v)):
        pts = sorted((r["model.free_bits"], r["val_nll"], r["kl_bits"] or 0.0) for r in ft if r.get("model.latent_bits") == h)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"H={h}")
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=f"H={h}")
    for r in rows:
        if r.get("model.arch") == "baseline" and r["val_nll"] is not None:
            axes[0].axhline(r["val_nll"], color="black", linestyle=":", label="baseline")
    axes[0].set(xscale="log", xlabel="kappa (bits/token)", ylabel="honest val NLL bound (nats/token)")
    axes[1].set(xscale="log", xlabel="kappa (bits/token)", ylabel="KL (bits/token)")
    save_figure(fig, axes, out / "nll_kl_vs_kappa.png")
    hs = sorted({r.get("model.latent_bits") for r in ft if r.get("model.latent_bits") is not None})
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
        run_sweep(args.space)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
