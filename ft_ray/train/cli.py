"""`ft-ray train` / `python -m jobs.train`: train one model on Ray Train.

    python -m jobs.train --config jobs/configs/<name>.yaml [--set a.b=c ...]
    ray job submit --working-dir . -- python -m jobs.train --config smoke

Without RAY_ADDRESS an embedded local cluster sized to the machine is started; with it, the job
joins that cluster. Outputs go to train.storage_path/train.name (checkpoints, CSV and TensorBoard
metrics, the resolved config, and the serving bundle in bundle/).
"""

from __future__ import annotations

import argparse
import json
import sys

from ft_ray.cluster import ensure_ray
from ft_ray.config import load_config
from ft_ray.entrypoint import one_line_errors
from ft_ray.presets import resolve_preset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a preset name (jobs/configs/<name>.yaml) or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.latent_bits=8 (repeatable)")


def run(args: argparse.Namespace) -> int:
    from ft_ray.train.trainer import fit, resolve, run_dir_of

    with one_line_errors():
        cfg = load_config(resolve_preset(args.config), args.overrides)
        run = resolve(cfg)  # config, data, storage and resume checks before Ray starts
    ensure_ray()
    try:
        with one_line_errors():
            result = fit(run)
    except Exception as e:  # Ray raises when the run fails (after max_failures restarts)
        print(f"[ft-ray] training failed: {e}", file=sys.stderr)
        return 1
    if getattr(result, "error", None) is not None:
        print(f"[ft-ray] training failed: {result.error}", file=sys.stderr)
        return 1
    run_dir = run_dir_of(cfg)
    final = result.return_value or {}
    print(f"[ft-ray] done: {json.dumps({k: round(v, 4) for k, v in final.items() if isinstance(v, float)})}")
    print(f"[ft-ray] outputs: {run_dir} (metrics train.csv/eval.csv, tb/, checkpoints, bundle/)")
    return 0

