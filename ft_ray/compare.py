"""`ft-ray compare` / `python -m jobs.compare`: a baseline and Free Transformers at several kappa
on the same data, trained (or loaded when their bundle is complete), evaluated honestly, reported.

    python -m jobs.compare --config letters-ft --kappa 0.125 1 2 [--set train.max_steps=400]

Writes <out>/report.md with the table (honest NLL bound, ELBO/IWAE, leaky CE, KL, Z-usage gap,
tokens/s, parameters), a downstream table (the offline lm-eval tasks matching the data, over
plan seeds: mean and 95% interval, chance level), curves.png, kl_vs_kappa.png and, for the letter
task, samples.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ft_ray.cluster import ensure_ray
from ft_ray.config import Config, ConfigError, load_config
from ft_ray.data.pipeline import synthetic_task_of
from ft_ray.entrypoint import one_line_errors
from ft_ray.presets import resolve_preset
from ft_ray.report import (
    evaluate_bundle,
    markdown_table,
    plot_curves,
    plot_kl_vs_kappa,
    plot_letter_samples,
    read_csv,
)

# downstream tasks (ft_ray/eval/tasks) of the synthetic data a comparison trains on, unless
# train.eval_tasks or --eval-tasks name others
DOWNSTREAM_TASKS = {"letters": ["ftray_letters"], "arith": ["ftray_arith_choice", "ftray_arith_gen"]}
DOWNSTREAM_COLUMNS = [("model", "model", "s"), ("task", "task", "s"), ("metric", "metric", "s"),
                      ("value", "mean ± 95% over plan seeds", "s"), ("n", "plan seeds", "d"),
                      ("chance", "chance", ".2f")]
PLAN_EVAL_GROUPS = 24  # letter-task sample groups (8 samples each) per kind of plan and model
LETTER_NOTE = [f"Letter task ({PLAN_EVAL_GROUPS} groups of 8 samples per kind of plan): *pos. agree* is the share "
               "of a group's valid samples whose run starts at the group's most common position, with its 95% "
               "interval over groups; *its chance level* is what shared-plan groups of the same sizes would "
               "score with starts as independent as fresh ones. *start spread* is the standard deviation of "
               "the start within a group (positions): a plan that carries the position makes the shared "
               "spread small (the paper's Fig. 4).", ""]

COLUMNS = [("arm", "model", "s"), ("kappa", "kappa (bits)", "g"), ("nll", "NLL bound (nats/tok)", ".4f"),
           ("iwae", "IWAE-8", ".4f"), ("ce_post", "CE with encoder Z (leaky)", ".4f"),
           ("ce_random_z", "CE with random Z", ".4f"), ("z_gap", "Z-usage gap", ".4f"),
           ("kl_bits", "KL (bits/tok)", ".3f"), ("valid_fresh", "valid (fresh)", ".2f"),
           ("pos_agree_fresh", "pos. agree (fresh)", ".2f"), ("pos_agree_shared_pm", "pos. agree (shared) ± 95%", "s"),
           ("pos_agree_chance", "its chance level", ".2f"), ("start_spread_fresh", "start spread (fresh)", ".1f"),
           ("start_spread_shared", "start spread (shared)", ".1f"),
           ("tokens_per_s", "train tok/s", ".0f"), ("params", "params", ",.0f")]
LETTER_KEYS = {"valid_fresh", "pos_agree_fresh", "pos_agree_shared_pm", "pos_agree_chance", "start_spread_fresh",
               "start_spread_shared"}
NON_LETTER_COLUMNS = [c for c in COLUMNS if c[0] not in LETTER_KEYS]  # the plan test is the letter task's


def arms(cfg_path: Path, overrides: list[str], kappas: list[float]) -> dict[str, Config]:
    """The baseline and one FT per kappa, each its own run name, everything else shared."""
    base = load_config(cfg_path, overrides)
    out = {"baseline": load_config(cfg_path, overrides, changes={"model.arch": "baseline",
                                                                 "train.name": f"{base.train.name}-baseline"})}
    for k in kappas:
        out[f"FT kappa={k:g}"] = load_config(cfg_path, overrides, changes={
            "model.arch": "free_transformer", "model.free_bits": float(k),
            "train.name": f"{base.train.name}-kappa{k:g}"})
    return out


def validation_rows(cfg: Config) -> torch.Tensor:
    from ft_ray.data.pipeline import VAL_STREAM
    from ft_ray.data.synthetic import synthetic_rows

    if cfg.data.source == "synthetic":
        return torch.from_numpy(synthetic_rows(cfg.data.task, cfg.data.shuffle_seed, VAL_STREAM,
                                               np.arange(cfg.data.num_val_sequences)).astype(np.int64))
    from ft_ray.data.shards import read_split

    assert cfg.data.path is not None  # DataConfig.validate: shards need a path
    return torch.from_numpy(read_split(cfg.data.path, "val"))


def _finished_bundle(run_dir: Path, max_steps: int) -> bool:
    metrics = run_dir / "bundle" / "metrics.json"
    return metrics.exists() and json.loads(metrics.read_text()).get("step") == max_steps


def downstream_tasks(cfg: Config, requested: list[str] | None = None) -> list[str]:
    if requested is not None:
        return requested
    return list(cfg.train.eval_tasks) or DOWNSTREAM_TASKS.get(synthetic_task_of(cfg.data) or "", [])


def downstream_rows(models: dict[str, tuple[Any, Any]], tasks: list[str], seeds: list[int], limit: int,
                    num_plans: int) -> list[dict]:
    """Per model (label -> (model, tokenizer)), task and metric: the mean over plan seeds with its
    95% interval, as `ft-ray eval` reports it (a baseline is scored once: it has no plan)."""
    from ft_ray.eval.summary import ACCURACY_METRICS, interval95
    from ft_ray.eval.tasks import CHANCE_ACCURACY
    from ft_ray.eval.units import downstream_metrics

    rows = []
    for label, (model, tokenizer) in models.items():
        values: dict[str, list[float]] = {}
        for seed in seeds if model.has_latent else seeds[:1]:
            for key, value in downstream_metrics(model, tokenizer, tasks, limit, num_plans, seed=seed).items():
                values.setdefault(key, []).append(value)
        for key, vs in values.items():
            _, task, metric = key.split("/", 2)
            ci = interval95(vs)
            mean = statistics.fmean(vs)
            rows.append({"model": label, "task": task, "metric": metric, "mean": mean, "n": len(vs),
                         "ci95": ci, "value": f"{mean:.3f}" + (f" ± {(ci[1] - ci[0]) / 2:.3f}" if ci else ""),
                         "chance": CHANCE_ACCURACY.get(task) if metric in ACCURACY_METRICS else None})
    return rows


def run_compare(cfg_path: Path, overrides: list[str], kappas: list[float], out_dir: Path,
                retrain: bool = False, eval_tasks: list[str] | None = None, eval_seeds: int = 3,
                eval_limit: int = 100, eval_num_plans: int = 8) -> Path:
    """Train (or reuse) every arm, evaluate, write the report; `eval_tasks` (None: the data's
    default, see DOWNSTREAM_TASKS; [] for none) over `eval_seeds` plan seeds, `eval_limit`
    documents per task, K = `eval_num_plans`."""
    from ft_ray.bundle import load_bundle
    from ft_ray.eval.validation import letter_plan_eval
    from ft_ray.train.trainer import fit, resolve, run_dir_of

    configs = arms(cfg_path, overrides, kappas)
    # every arm's config, data and storage are checked (once) before anything trains
    resolved = {label: resolve(cfg) for label, cfg in configs.items()}
    from ft_ray.data import tokenizer as tk
    from ft_ray.eval.tasks import TASK_NAMES

    tasks = downstream_tasks(configs["baseline"], eval_tasks)
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown:  # before anything trains
        raise ConfigError("--eval-tasks", f"unknown task(s) {', '.join(unknown)}: expected tasks of the offline "
                                          f"suite ({', '.join(TASK_NAMES)})")
    if eval_seeds < 1 or eval_limit < 1:
        raise ConfigError("--eval-seeds/--eval-limit", f"must be >= 1, got {eval_seeds} and {eval_limit}")
    rows, models, run_dirs, kl_points, scored = [], {}, {}, [], {}
    letters = synthetic_task_of(configs["baseline"].data) == "letters"
    for label, cfg in configs.items():
        run_dir = run_dir_of(cfg)
        if retrain or not _finished_bundle(run_dir, cfg.train.max_steps):
            print(f"[ft-ray] compare: training {label} -> {run_dir}", flush=True)
            ensure_ray()
            fit(resolved[label])
        else:
            print(f"[ft-ray] compare: reusing the finished run {run_dir}", flush=True)
        model, _, _ = load_bundle(run_dir / "bundle")
        scored[label] = (model, tk.load_tokenizer(str(run_dir / "bundle" / "tokenizer.json")))
        kappa = cfg.model.free_bits if cfg.model.has_latent else None
        row: dict[str, Any] = {"arm": label, "kappa": kappa}
        row.update(evaluate_bundle(model, validation_rows(cfg), iwae_samples=8 if cfg.model.has_latent else 0))
        train = read_csv(run_dir / "train.csv")
        if len(train) > 1:
            row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in train[1:])
        if synthetic_task_of(cfg.data) == "letters":
            row.update(letter_plan_eval(model, num_groups=PLAN_EVAL_GROUPS, seed=1))
            if "pos_agree_shared" in row:
                row["pos_agree_shared_pm"] = f"{row['pos_agree_shared']:.2f} ± {row['pos_agree_shared_ci95']:.2f}"
        if cfg.model.has_latent:
            models[label] = model
            kl_points.append((cfg.model.free_bits, row["kl_bits"], row["z_gap"]))
        rows.append(row)
        run_dirs[label] = run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# ft-ray comparison", "",
             f"Config: `{cfg_path}` with {' '.join(overrides) or 'no overrides'}; runs in "
             f"`{Path(next(iter(run_dirs.values()))).parent}`.", "",
             "The NLL bound is honest: the exact NLL for the baseline, the ELBO (CE with the encoder's Z "
             "plus the KL) for a Free Transformer; IWAE-8 tightens it. The CE with the encoder's Z is "
             "*not* a likelihood (the encoder saw the future) and is shown only to measure Z usage: the "
             "Z-usage gap is CE with random Z minus CE with the encoder's Z (> 0: the decoder uses Z).", "",
             *(LETTER_NOTE if letters else []), markdown_table(rows, COLUMNS if letters else NON_LETTER_COLUMNS), "",
             f"![curves]({plot_curves(run_dirs, out_dir / 'curves.png').name})"]
    if len(kl_points) > 1:
        lines.append(f"![kl]({plot_kl_vs_kappa(kl_points, out_dir / 'kl_vs_kappa.png').name})")
    downstream = []
    if tasks:
        print(f"[ft-ray] compare: downstream tasks {', '.join(tasks)} over {eval_seeds} plan seeds", flush=True)
        downstream = downstream_rows(scored, tasks, list(range(eval_seeds)), eval_limit, eval_num_plans)
        lines += ["", "## Downstream (lm-evaluation-harness, offline tasks)", "",
                  f"{', '.join(tasks)} on at most {eval_limit} documents each, through the lm-eval model "
                  f"`ft-ray` (a Free Transformer scored with K = {eval_num_plans} prior plans, never the "
                  "encoder's Z; a baseline exactly, once). Mean over plan seeds with its 95% Student-t "
                  "interval; chance is a uniform guess.", "", markdown_table(downstream, DOWNSTREAM_COLUMNS)]
    if models and synthetic_task_of(configs["baseline"].data) == "letters":
        lines += ["", "Samples (the paper's Fig. 4): per model, rows with fresh plans, then rows sharing one plan.",
                  f"![samples]({plot_letter_samples(models, out_dir / 'samples.png').name})"]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2, default=float))
    (out_dir / "downstream.json").write_text(json.dumps(downstream, indent=2, default=float))
    print(markdown_table(rows, COLUMNS if letters else NON_LETTER_COLUMNS))
    print(f"[ft-ray] report: {report}")
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="preset name or YAML path of the FT run (the baseline derives from it)")
    p.add_argument("--kappa", type=float, nargs="+", default=[0.125, 1.0], help="free bits per token, one FT each")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="results/compare", help="report directory (default: results/compare)")
    p.add_argument("--retrain", action="store_true", help="train again even when a finished bundle exists")
    p.add_argument("--eval-tasks", default=None, metavar="T1,T2",
                   help="offline downstream tasks for the report (default: those of the data, e.g. "
                        "ftray_arith_choice,ftray_arith_gen for arith; 'none' for none)")
    p.add_argument("--eval-seeds", type=int, default=3, help="plan seeds per FT and task (default: 3)")
    p.add_argument("--eval-limit", type=int, default=100, help="documents per task (default: 100)")


def run(args: argparse.Namespace) -> int:
    with one_line_errors():
        tasks = None if args.eval_tasks is None else [t for t in args.eval_tasks.split(",") if t and t != "none"]
        run_compare(resolve_preset(args.config), args.overrides, args.kappa, Path(args.out), args.retrain,
                    eval_tasks=tasks, eval_seeds=args.eval_seeds, eval_limit=args.eval_limit)
    return 0

