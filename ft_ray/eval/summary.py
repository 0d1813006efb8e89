"""The evaluation's summary: per task and metric, each model's mean over plan seeds with a 95%
interval (Student's t over seeds), written as results.json, results.md and results.png.

The interval is the spread that plan sampling adds (seeds of the same trained model); lm-eval's
own stderr, over documents, stays in the raw files. A baseline has no plan: one exact score, no
interval.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from ft_ray.eval.tasks import CHANCE_ACCURACY
from ft_ray.eval.units import EvalPlan, Unit, finished, write_json_atomic

# two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30: the normal's 1.96)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
       18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
       26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}
ACCURACY_METRICS = ("acc", "acc_norm")


def interval95(values: list[float]) -> tuple[float, float] | None:
    """Mean +- t * s / sqrt(n) over seeds; None for a single value."""
    n = len(values)
    if n < 2:
        return None
    mean, half = statistics.fmean(values), T95.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def metric_values(results: dict, task: str) -> dict[str, float]:
    """{metric: value} of one task from lm-eval's results dict: "acc,none" -> "acc", another
    filter kept as "exact_match (strict-match)". Metrics are the "metric,filter" keys; stderr
    entries and the rest (alias, sample_len) are left out."""
    out = {}
    for key, value in results["results"].get(task, {}).items():
        name, comma, filt = key.partition(",")
        if not comma or "_stderr" in name or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        out[name if filt in ("", "none") else f"{name} ({filt})"] = float(value)
    return out


def pool_training_seeds(results: dict) -> dict:
    """Models named `ARM@TAG` (e.g. `ft-k0.5@s0`, `ft-k0.5@s1`: one arm trained with several
    seeds) pooled per arm: per task and metric, the mean over the arm's models of their plan-seed
    means, with a 95% interval over those models (training seeds) when there are several.
    Returns {task: {metric: {arm: {"models", "mean", "ci95", "num_training_seeds"}}}}."""
    pooled: dict = {}
    for task, metrics in results.items():
        for metric, cells in metrics.items():
            arms: dict[str, list[str]] = {}
            for name in cells:
                if "@" in name:
                    arms.setdefault(name.split("@", 1)[0], []).append(name)
            for arm, names in arms.items():
                means = [cells[n]["mean"] for n in names]
                pooled.setdefault(task, {}).setdefault(metric, {})[arm] = {
                    "models": names, "mean": statistics.fmean(means), "ci95": interval95(means),
                    "num_training_seeds": len(names)}
    return pooled


def summarise(out: Path, plan: EvalPlan) -> dict:
    """Read every finished unit of `plan` from `out` into the summary (see results.json)."""
    table: dict[str, dict[str, dict[str, dict]]] = {}
    higher: dict[str, dict[str, bool]] = {}
    missing = []
    for unit in plan.units():
        if not finished(out, unit):
            missing.append(str(unit))
            continue
        raw = json.loads((out / unit.relpath).read_text())
        for metric, value in metric_values(raw, unit.task).items():
            cell = table.setdefault(unit.task, {}).setdefault(metric, {}).setdefault(unit.model, {"seeds": {}})
            cell["seeds"][str(unit.seed)] = value
        for key, better in raw.get("higher_is_better", {}).get(unit.task, {}).items():
            higher.setdefault(unit.task, {})[key] = bool(better)
    for metrics in table.values():
        for cells in metrics.values():
            for cell in cells.values():
                values = list(cell["seeds"].values())
                cell.update(mean=statistics.fmean(values), ci95=interval95(values), num_seeds=len(values))
    chance = {t: {m: CHANCE_ACCURACY[t] for m in ACCURACY_METRICS if m in table.get(t, {})}
              for t in plan.tasks if t in CHANCE_ACCURACY}
    return {"settings": {**dataclasses.asdict(plan.settings), "seeds": plan.seeds},
            "models": {m.name: {"path": str(m.path), "arch": m.arch} for m in plan.models},
            "tasks": plan.tasks, "results": table, "higher_is_better": higher, "chance": chance,
            "pooled": pool_training_seeds(table), "missing": missing}


def _cell(cell: dict | None) -> str:
    if cell is None:
        return ""
    if cell["ci95"] is None:
        return f"{cell['mean']:.4g} (n={cell['num_seeds']})"
    lo, hi = cell["ci95"]
    return f"{cell['mean']:.4g} [{lo:.4g}, {hi:.4g}] (n={cell['num_seeds']})"


def markdown(summary: dict) -> str:
    s, models = summary["settings"], list(summary["models"])
    docs = "all documents" if s["limit"] is None else f"limit {s['limit']} documents"
    lines = ["# ft-ray evaluation", "",
             f"K = {s['num_plans']} plans per score ({s['proposal']} proposal, {s['plan_mode']} plans), "
             f"plan seeds {' '.join(map(str, s['seeds']))}, {docs} per task.",
             "Each cell: the mean over plan seeds [95% interval, Student's t] (number of seeds). A "
             "baseline has no plan: one exact score. For a Free Transformer, rolling perplexities come "
             "from the IWAE-K bound (upper bounds).", "",
             "| task | metric | chance | " + " | ".join(models) + " |",
             "|---|---|---|" + "---|" * len(models)]
    for task, metrics in summary["results"].items():
        for metric, cells in metrics.items():
            better = summary["higher_is_better"].get(task, {}).get(metric.split(" (")[0])
            arrow = {True: " ↑", False: " ↓"}.get(better, "")
            chance = summary["chance"].get(task, {}).get(metric)
            lines.append(f"| {task} | {metric}{arrow} | {'' if chance is None else f'{chance:.3g}'} | "
                         + " | ".join(_cell(cells.get(m)) for m in models) + " |")
    pooled = summary.get("pooled") or {}
    arms = sorted({arm for metrics in pooled.values() for cells in metrics.values() for arm in cells})
    if arms:
        lines += ["", "Pooled over training seeds (models named ARM@TAG): the mean of the models' plan-seed "
                      "means [95% interval over training seeds] (number of training seeds).", "",
                  "| task | metric | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
        for task, metrics in pooled.items():
            for metric, cells in metrics.items():
                lines.append(f"| {task} | {metric} | " + " | ".join(
                    _cell({**cells[a], "num_seeds": cells[a]["num_training_seeds"]}) if a in cells else ""
                    for a in arms) + " |")
    if summary["missing"]:
        lines += ["", f"Not finished ({len(summary['missing'])}): " + "; ".join(summary["missing"])]
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> Path:
    """Per task, its first metric: each model's mean with its 95% interval, chance dashed."""
    from ft_ray.report import _plt

    plt = _plt()
    tasks = [t for t in summary["tasks"] if summary["results"].get(t)]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(3.2 * max(1, len(tasks)) + 1, 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric, cells = next(iter(summary["results"][task].items()))
        names = [m for m in summary["models"] if m in cells]
        means = [cells[m]["mean"] for m in names]
        err = [[cells[m]["mean"] - (cells[m]["ci95"] or (cells[m]["mean"],) * 2)[0] for m in names],
               [(cells[m]["ci95"] or (cells[m]["mean"],) * 2)[1] - cells[m]["mean"] for m in names]]
        colors = ["tab:gray" if summary["models"][m]["arch"] == "baseline" else f"C{i}" for i, m in enumerate(names)]
        ax.bar(range(len(names)), means, yerr=err, capsize=4, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        chance = summary["chance"].get(task, {}).get(metric)
        if chance is not None:
            ax.axhline(chance, ls="--", color="k", lw=1, label="chance")
            ax.legend(fontsize=8)
        if min(means) >= 0:  # accuracies, perplexities: from zero (and to one when all are zero)
            ax.set_ylim(0, None if max(means) > 0 else 1)
        ax.set_title(f"{task}\n{metric}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_summary(out: Path, plan: EvalPlan) -> dict[str, Path]:
    """results.json, results.md and results.png in `out`; returns their paths by kind."""
    summary = summarise(out, plan)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    write_json_atomic(paths["json"], summary)
    paths["md"].write_text(markdown(summary))
    plot(summary, paths["png"])
    return paths


def unit_headline(results: dict, unit: Unit) -> str:
    """`acc 0.41, acc_norm 0.38` for a progress line."""
    return ", ".join(f"{k} {v:.4g}" for k, v in metric_values(results, unit.task).items())
