"""`ft-ray serve --models DIR [--port 8000]`: start (or join) Ray, deploy the Serve app, block."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", required=True, help="directory of bundles, one sub-directory per model name")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--max-batch-size", type=int, default=8)


def run(args: argparse.Namespace) -> int:
    from ray import serve

    from ft_ray.launch import ensure_ray

    models = Path(args.models)
    if not models.is_dir():
        print(f"ft-ray: error: --models: {models} is not a directory", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # serve_apps/ lives beside ft_ray/
    from serve_apps.app import app, list_models

    names = list_models(models.resolve())
    if not names:
        print(f"ft-ray: error: --models: no bundle (config.json + model.safetensors) under {models}", file=sys.stderr)
        return 2
    ensure_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app({"models_dir": str(models), "max_batch_size": args.max_batch_size}), name="ft-ray",
              route_prefix="/", blocking=False)
    print(f"[ft-ray] serving {', '.join(names)} at http://{args.host}:{args.port}/v1/completions (Ctrl-C stops)",
          flush=True)
    try:
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
