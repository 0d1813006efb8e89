"""`ft-ray eval` / `python -m jobs.eval`: lm-eval tasks over bundles and plan seeds, on Ray.

    ft-ray eval --models baseline=runs/b/bundle ft=runs/f/bundle --tasks ftray --num-plans 8 \\
        --seeds 0 1 2 --out results/eval [--limit 100]
    ray job submit --working-dir . -- python -m jobs.eval --models ... --out results/eval

One Ray task per (model, task, plan seed), one CPU each, spread over the cluster (RAY_ADDRESS, or
an embedded local cluster). A baseline has no plan: one seed per task, scored exactly. Each
finished unit's lm-eval results go to OUT/raw/<model>/<task>/seed<k>.json as it arrives, a failed
unit is retried (--max-retries), and a rerun into the same OUT skips finished units; an OUT holding
another evaluation (other settings, or other weights under a model's name) is refused. Then
OUT/results.json, results.md (per task and metric, each model's mean and 95% interval over plan
seeds) and results.png.

Tasks: the offline suite (ftray_arith_gen, ftray_arith_choice, ftray_arith_ppl, ftray_letters;
preset `ftray`) runs anywhere. Any other lm-eval task, and the preset `paper` (the paper's
downstream tasks), reads the Hugging Face hub: set HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 on a
cluster that reaches it (and --confirm-run-unsafe-code for humaneval_plus and mbpp, which execute
generated code). Bundles are read by the driver and shipped to the workers through Ray's object
store, so they need not be on a shared file system; OUT is written by the driver. Under `ray job
submit` the driver runs in an uploaded copy of the working directory (without runs/ or results/):
give --models and --out as absolute paths on the head node.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ft_ray.cluster import ensure_ray
from ft_ray.entrypoint import EXIT_BAD_INPUT, one_line_errors
from ft_ray.eval import EvalError
from ft_ray.eval.scoring import DEFAULT_NUM_PLANS
from ft_ray.eval.tasks import CODE_TASKS
from ft_ray.eval.units import (
    OFFLINE_VARS,
    EvalPlan,
    Settings,
    Unit,
    bundle_files,
    check_settings,
    claim_out_dir,
    evaluate_unit,
    finished,
    parse_limit,
    resolve_models,
    resolve_tasks,
    write_json_atomic,
)

DEFAULT_MAX_RETRIES = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="*", default=[], metavar="[NAME=]BUNDLE",
                   help="bundle directories; a bare path is named after its directory (its run's, "
                        "for .../<run>/bundle)")
    p.add_argument("--tasks", nargs="*", default=["ftray"], metavar="TASKS",
                   help="task names, comma- or space-separated, or presets: ftray (the offline "
                        "suite, default), paper (the paper's tasks; needs the hub)")
    p.add_argument("--num-plans", type=int, default=DEFAULT_NUM_PLANS, metavar="K",
                   help=f"plans per score for a Free Transformer (default {DEFAULT_NUM_PLANS})")
    p.add_argument("--seeds", type=int, nargs="*", default=[0], metavar="S",
                   help="plan seeds, one unit each per Free Transformer and task (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output directory (reruns resume)")
    p.add_argument("--limit", type=parse_limit, default=None, metavar="N",
                   help="documents per task (a fraction when < 1), as lm-eval's --limit")
    p.add_argument("--plan-mode", choices=("fresh", "shared"), default="fresh",
                   help="fresh: plans per context (default); shared: the same plans for every request")
    p.add_argument("--proposal", choices=("prior", "encoder"), default="prior",
                   help="the context's codes from the prior (default) or from the encoder on the context")
    p.add_argument("--max-retries", type=int, default=DEFAULT_MAX_RETRIES,
                   help=f"retries of a failed unit (default {DEFAULT_MAX_RETRIES})")
    p.add_argument("--cpus-per-unit", type=float, default=1.0, help="Ray CPUs per unit (default 1)")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="let lm-eval execute generated code (humaneval_plus, mbpp)")


def prepare(args: argparse.Namespace) -> EvalPlan:
    """Every input check, before any Ray work: EvalError naming the bad input."""
    settings = Settings(num_plans=args.num_plans, limit=args.limit, plan_mode=args.plan_mode,
                        proposal=args.proposal, confirm_run_unsafe_code=args.confirm_run_unsafe_code)
    check_settings(settings, args.seeds)
    if args.max_retries < 0:
        raise EvalError(f"--max-retries must be >= 0, got {args.max_retries}")
    if args.cpus_per_unit <= 0:
        raise EvalError(f"--cpus-per-unit must be > 0, got {args.cpus_per_unit}")
    tasks = resolve_tasks(args.tasks)
    code = [t for t in tasks if t in CODE_TASKS]
    if code and not settings.confirm_run_unsafe_code:
        raise EvalError(f"task(s) {', '.join(code)} execute generated code: add --confirm-run-unsafe-code "
                        "(on a machine where that is acceptable)")
    plan = EvalPlan(settings, resolve_models(args.models), tasks, list(args.seeds))
    claim_out_dir(args.out, plan)
    return plan


def worker_env(settings: Settings) -> dict[str, str]:
    """The workers' environment: the hub switches as the driver has them (offline unless turned
    off: lm-eval otherwise retries the hub for minutes), no progress bars (one per unit would
    flood the job's log), code execution only on consent."""
    env = {v: os.environ.get(v, "1") for v in OFFLINE_VARS}
    env.update(TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    if settings.confirm_run_unsafe_code:
        env["HF_ALLOW_CODE_EVAL"] = "1"
    return env


def run_units(out: Path, plan: EvalPlan, units: list[Unit], work: Callable = evaluate_unit,
              max_retries: int = DEFAULT_MAX_RETRIES, cpus_per_unit: float = 1.0) -> list[tuple[Unit, str]]:
    """Run `work(settings, unit, bundle files)` as one Ray task per unit, write each result as it
    arrives, print a progress line. Returns the units that failed after their retries, with why."""
    import ray

    from ft_ray.eval.summary import unit_headline

    remote = ray.remote(work).options(num_cpus=cpus_per_unit, max_retries=max_retries, retry_exceptions=True,
                                      runtime_env={"env_vars": worker_env(plan.settings)})
    models = {m.name: m for m in plan.models}
    files = {name: ray.put(bundle_files(models[name].path)) for name in dict.fromkeys(u.model for u in units)}
    pending = {remote.remote(plan.settings, u, files[u.model]): u for u in units}
    failed, start = [], time.monotonic()
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        unit = pending.pop(ref)
        done = len(units) - len(pending)
        try:
            results = ray.get(ref)
        except Exception as e:  # the unit's own error after max_retries, or its worker's death
            reason = str(getattr(e, "cause", None) or e).strip().splitlines()[-1]
            failed.append((unit, reason))
            print(f"[ft-ray] eval {done}/{len(units)} FAILED {unit}: {reason}", flush=True)
            continue
        model = models[unit.model]
        results["ft_ray"] = {"model": model.name, "bundle": str(model.path), "arch": model.arch,
                             "sha256": model.sha256, "task": unit.task, "plan_seed": unit.seed}
        write_json_atomic(out / unit.relpath, results)
        print(f"[ft-ray] eval {done}/{len(units)} {unit}: {unit_headline(results, unit)} "
              f"({time.monotonic() - start:.0f} s)", flush=True)
    return failed


def run(args: argparse.Namespace) -> int:
    from ft_ray.eval.summary import write_summary

    try:
        with one_line_errors():
            plan = prepare(args)
    except EvalError as e:
        print(f"ft-ray: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    units = plan.units()
    todo = [u for u in units if not finished(args.out, u)]
    print(f"[ft-ray] eval: {len(plan.models)} model(s) x {len(plan.tasks)} task(s), plan seeds "
          f"{' '.join(map(str, plan.seeds))}: {len(units)} units, {len(units) - len(todo)} already in "
          f"{args.out}, {len(todo)} to run", flush=True)
    failed = []
    if todo:
        import ray

        owner = ensure_ray()
        try:
            cpus = ray.cluster_resources().get("CPU", 0.0)
            if args.cpus_per_unit > cpus:  # Ray would wait for such a worker forever
                print(f"ft-ray: error: --cpus-per-unit {args.cpus_per_unit:g} exceeds the cluster's "
                      f"{cpus:g} CPUs", file=sys.stderr)
                return EXIT_BAD_INPUT
            failed = run_units(args.out, plan, todo, max_retries=args.max_retries,
                               cpus_per_unit=args.cpus_per_unit)
        finally:
            if owner:
                ray.shutdown()
    paths = write_summary(args.out, plan)
    print(f"[ft-ray] results: {paths['md']} (table), {paths['json']}, {paths['png']}; "
          f"per unit: {args.out / 'raw'}", flush=True)
    if failed:
        print(f"[ft-ray] eval: {len(failed)} unit(s) failed after {args.max_retries} retries: "
              + "; ".join(str(u) for u, _ in failed) + " (rerun the same command to retry them)",
              file=sys.stderr)
        return 1
    return 0

