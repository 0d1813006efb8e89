"""Serving benchmarks on a real local Ray Serve instance (loopback): dynamic batching vs
max_batch_size=1 at 16 concurrent clients, latency percentiles, HTTP overhead vs in-process.
First, in-process and without Ray, the engine's continuous batching: 16 concurrent requests vs one
at a time, and a short request's latency when it arrives while long ones decode
(`python -m bench.bench_serve --engine` runs only these).

Targets (issue 6): batched / unbatched throughput >= 3x; Serve HTTP overhead p50 <= 10 ms.

The HTTP overhead is measured once per ingress, each on a fresh cluster in its own process
(Serve reads these settings when its processes start; `ft-ray serve --ingress` picks them too):
- `proxy`: Ray Serve's default Python HTTP proxy (proxy actor -> replica over Ray);
- `haproxy`: Ray's high-throughput ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`,
  `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`): HAProxy on the Serve port forwards straight to the
  replica's own HTTP server. `ray[serve]` bundles the binary on Linux; the row says so when
  none is found.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.common import Row
from ft_ray.launch import free_port
from ft_ray.serve.cli import INGRESS_ENV, haproxy_binary

CLIENTS, PER_CLIENT, MAX_TOKENS = 16, 4, 64


def _bundle(root: Path) -> Path:
    from ft_ray.config import ModelConfig
    from ft_ray.data.tokenizer import byte_tokenizer
    from ft_ray.model import FreeTransformer
    from ft_ray.train.checkpoint import write_bundle

    tok = root / "tokenizer.json"
    byte_tokenizer().save(str(tok))
    cfg = ModelConfig(vocab_size=259, hidden_dim=128, num_layers=4, num_heads=4, max_seq_len=256, latent_bits=8)
    torch.manual_seed(0)
    write_bundle(root / "models" / "ft", FreeTransformer(cfg).state_dict(), cfg, {}, tok)
    return root / "models"


def _load(url: str, per_client: int = PER_CLIENT) -> tuple[float, list[float], int]:
    """16 concurrent clients x 4 requests each (one asyncio loop, so the load generator itself
    takes little of the 2 cores); returns (wall seconds, latencies, generated tokens)."""
    import asyncio

    async def client(http: httpx.AsyncClient, c: int):
        out = []
        for i in range(per_client):
            body = {"model": "ft", "prompt": f"client {c} request {i}", "max_tokens": MAX_TOKENS,
                    "temperature": 0.8, "seed": c * 100 + i, "plan": {"seed": i}}
            t0 = time.perf_counter()
            r = await http.post(url, json=body)
            r.raise_for_status()
            out.append((time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]))
        return out

    async def main():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=CLIENTS)) as http:
            return await asyncio.gather(*(client(http, c) for c in range(CLIENTS)))

    t0 = time.perf_counter()
    results = [x for chunk in asyncio.run(main()) for x in chunk]
    return time.perf_counter() - t0, [lat for lat, _ in results], sum(n for _, n in results)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _start(port: int) -> None:
    import ray
    from ray import serve

    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def _stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def engine_rows(models: Path, quick: bool) -> list[Row]:
    """The engine in-process, one torch thread (as in the 1-CPU replica): CLIENTS requests of
    MAX_TOKENS tokens together vs one at a time; then an 8-token request submitted while CLIENTS-1
    long ones decode, timed to its result (continuous batching returns it without waiting for them)."""
    from ft_ray.serve import Engine, GenerationRequest

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine.from_bundle(models / "ft", name="ft")
        reqs = [GenerationRequest(f"client {c} request 0", max_tokens=MAX_TOKENS, temperature=0.8, seed=c,
                                  plan={"seed": c}) for c in range(CLIENTS)]
        engine.generate(reqs[:2])  # warm-up

        def tokens_per_s(batches: list[list[GenerationRequest]]) -> float:
            t0 = time.perf_counter()
            n = sum(r.usage.completion_tokens for batch in batches for r in engine.generate(batch))
            return n / (time.perf_counter() - t0)

        rounds = 1 if quick else 3
        together = statistics.median(tokens_per_s([reqs]) for _ in range(rounds))
        alone = statistics.median(tokens_per_s([[r] for r in reqs]) for _ in range(rounds))
        long = [engine.submit(r) for r in reqs[1:]]
        for _ in range(8):
            engine.step()
        short = engine.submit(GenerationRequest("a short one", max_tokens=8, temperature=0.8, seed=99))
        first_step, t0 = engine.stats.steps + 1, time.perf_counter()
        while not short.done:
            engine.step()
        short_ms = (time.perf_counter() - t0) * 1e3
        while not all(h.done for h in long):
            engine.step()
        left = max(h.finished_step for h in long) - short.finished_step
    finally:
        torch.set_num_threads(threads)
    return [Row(f"engine in-process: {CLIENTS} concurrent requests / one at a time", together / alone, "x", "",
                f"{together:.0f} vs {alone:.0f} tok/s ({MAX_TOKENS} tokens each, one torch thread)"),
            Row(f"engine: an 8-token request arriving while {CLIENTS - 1} long ones decode", short_ms, "ms", "",
                f"returned at step {short.finished_step - first_step + 1} of its own; the long ones "
                f"decoded {left} more steps")]


def batching_rows(models: Path, quick: bool) -> list[Row]:
    from ray import serve

    from serve_apps.app import FTServer

    port = free_port()
    _start(port)
    try:
        measured = {}
        for label, batch in (("batched", 16), ("unbatched", 1)):
            dep = FTServer.options(max_ongoing_requests=32, max_queued_requests=64)
            serve.run(dep.bind(str(models), max_batch_size=batch, batch_wait_timeout_s=0.02), name=label,
                      route_prefix=f"/{label}")
            url = f"http://127.0.0.1:{port}/{label}/v1/completions"
            _load(url, per_client=1 if quick else PER_CLIENT)  # warm-up
            measured[label] = _load(url)
            serve.delete(label)
    finally:
        _stop()
    (tb, lb, nb), (tu, lu, nu) = measured["batched"], measured["unbatched"]
    return [Row("Serve req/s, dynamic batching / max_batch_size=1 (16 clients)", (len(lb) / tb) / (len(lu) / tu),
                "x", ">= 3", f"{len(lb) / tb:.1f} vs {len(lu) / tu:.1f} req/s"),
            Row("Serve tokens/s with batching (one replica, decode)", nb / tb, "tok/s", "",
                f"unbatched {nu / tu:.0f} tok/s"),
            Row("latency p50 / p99 with batching", _pct(lb, 0.5) * 1e3, "ms", "", f"p99 {_pct(lb, 0.99) * 1e3:.0f} ms"),
            Row("latency p50 / p99 unbatched", _pct(lu, 0.5) * 1e3, "ms", "", f"p99 {_pct(lu, 0.99) * 1e3:.0f} ms")]


def measure_overhead(models: Path, repeats: int) -> dict:
    """The same single requests, one at a time, over HTTP and in-process, alternating so that
    load from elsewhere affects both alike. Runs in the process whose environment picked the
    ingress (see `INGRESS_ENV`)."""
    from ray import serve

    from ft_ray.serve import Engine
    from serve_apps.app import FTServer

    port = free_port()
    _start(port)
    try:
        serve.run(FTServer.bind(str(models), max_batch_size=1), name="one", route_prefix="/one")
        engine = Engine.from_bundle(models / "ft", name="ft")
        torch.set_num_threads(1)  # as in the 1-CPU replica
        http_lat, local_lat, models_lat = [], [], []
        with httpx.Client(timeout=60) as http:
            for i in range(repeats + 5):
                body = {"model": "ft", "prompt": f"overhead {i}", "max_tokens": 8, "temperature": 0, "seed": i}
                t0 = time.perf_counter()
                http.post(f"http://127.0.0.1:{port}/one/v1/completions", json=body).raise_for_status()
                http_lat.append(time.perf_counter() - t0)
                req = engine.validate(body, {"model"})
                t0 = time.perf_counter()
                engine.generate([req])
                local_lat.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                http.get(f"http://127.0.0.1:{port}/one/v1/models").raise_for_status()
                models_lat.append(time.perf_counter() - t0)
    finally:
        _stop()
    return {k: statistics.median(v[5:]) for k, v in
            (("http", http_lat), ("local", local_lat), ("models", models_lat))}


def overhead_rows(models: Path, quick: bool) -> list[Row]:
    rows = []
    for mode, env in INGRESS_ENV.items():
        if mode == "haproxy" and haproxy_binary() is None:
            rows.append(Row("Serve HTTP overhead, HAProxy ingress: not measured", float("nan"), "ms", "",
                            "no HAProxy binary (see ft_ray.serve.cli.haproxy_binary)"))
            continue
        out = subprocess.run([sys.executable, "-m", "bench.bench_serve", "--overhead", str(models),
                              str(20 if quick else 60)], env={**os.environ, **env}, capture_output=True,
                             text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent)
        if out.returncode != 0:
            raise RuntimeError(f"overhead benchmark ({mode}) failed:\n{out.stderr[-3000:]}")
        t = json.loads(out.stdout.strip().splitlines()[-1])
        label = {"proxy": "default proxy", "haproxy": "HAProxy ingress"}[mode]
        rows.append(Row(f"Serve HTTP overhead vs in-process engine, p50, {label}", (t["http"] - t["local"]) * 1e3,
                        "ms", "<= 10", f"HTTP {t['http'] * 1e3:.1f} ms, in-process {t['local'] * 1e3:.1f} ms "
                        f"(8 tokens); GET /v1/models {t['models'] * 1e3:.1f} ms"))
    return rows


def run(quick: bool = False) -> list[Row]:
    tmp = Path(tempfile.mkdtemp(prefix="ft-ray-bench-serve-"))
    try:
        models = _bundle(tmp)
        return engine_rows(models, quick) + batching_rows(models, quick) + overhead_rows(models, quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--overhead"]:
        print(json.dumps(measure_overhead(Path(sys.argv[2]), int(sys.argv[3]))))
    elif sys.argv[1:2] == ["--engine"]:
        tmp = Path(tempfile.mkdtemp(prefix="ft-ray-bench-engine-"))
        try:
            print(json.dumps([r.__dict__ for r in engine_rows(_bundle(tmp), quick="--quick" in sys.argv)], indent=2))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(json.dumps([r.__dict__ for r in run(quick="--quick" in sys.argv)], indent=2))
