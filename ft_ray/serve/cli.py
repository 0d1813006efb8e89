"""`ft-ray serve --models DIR [--port 8000]`: start (or join) Ray, deploy the Serve app, block."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", required=True, help="directory of bundles, one sub-directory per model name")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--max-batch-size", type=int, default=8)


def deploy(models_dir: Path, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8,
           timeout_s: float = 120.0) -> str:
    """Deploy the Serve app over the bundles of `models_dir` on the connected Ray cluster and wait
    until /healthz answers 200 (the weights are loaded). Returns the base URL."""
    from ray import serve

    from serve_apps.app import app

    serve.start(http_options={"host": host, "port": port})
    serve.run(app({"models_dir": str(models_dir), "max_batch_size": max_batch_size}), name="ft-ray",
              route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            get_json(f"{url}/healthz")
            return url
        except (urllib.error.URLError, ConnectionError) as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Serve app at {url} not healthy after {timeout_s:.0f} s: {e}") from None
            time.sleep(0.5)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def get_json(url: str, timeout_s: float = 60.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict, timeout_s: float = 300.0) -> dict:
    """POST a JSON body; a 4xx/5xx answer raises with the server's JSON error message."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url} -> {e.code}: {e.read().decode(errors='replace')}") from None


def run(args: argparse.Namespace) -> int:
    from ray import serve

    from ft_ray.launch import ensure_ray
    from serve_apps.app import list_models

    models = Path(args.models)
    if not models.is_dir():
        print(f"ft-ray: error: --models: {models} is not a directory", file=sys.stderr)
        return 2
    names = list_models(models.resolve())
    if not names:
        print(f"ft-ray: error: --models: no bundle (config.json + model.safetensors) under {models}", file=sys.stderr)
        return 2
    ensure_ray()
    url = deploy(models.resolve(), args.host, args.port, args.max_batch_size)
    print(f"[ft-ray] serving {', '.join(names)} at {url}/v1/completions (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
