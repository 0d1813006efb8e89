"""Serving benchmarks on a real local Ray Serve instance (loopback): continuous batching vs
max_num_seqs=1 on a mixed workload, a short request's latency under load, streams vs unstreamed,
TTFT/TPOT percentiles, HTTP overhead vs in-process.
First, in-process and without Ray, the engine's continuous batching: 16 concurrent requests vs one
at a time, and a short request's latency when it arrives while long ones decode
(`python -m bench.bench_serve --engine` runs only these).

Targets: continuous / max_num_seqs=1 tokens/s >= 4x; short request under load / idle <= 5;
streams / unstreamed >= 0.9; Serve HTTP overhead p50 <= 10 ms.

The Serve rows (batching, streams, TTFT/TPOT) and the HTTP overhead are measured once per
ingress, side by side, each on a fresh cluster in its own process
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
from ft_ray.cluster import free_port
from ft_ray.serve.cli import INGRESS_ENV, haproxy_binary

CLIENTS, MAX_TOKENS = 16, 64
STREAM_TOKENS = 256  # per request of the streams row: ~1 s of decoding, so start-up noise weighs little
STREAM_INTERVAL = 4  # the streams row again with this stream_interval (events per SSE write)


def _bundle(root: Path) -> Path:
    from ft_ray.bundle import write_bundle
    from ft_ray.config import ModelConfig
    from ft_ray.data.tokenizer import byte_tokenizer
    from ft_ray.model import FreeTransformer

    tok = root / "tokenizer.json"
    byte_tokenizer().save(str(tok))
    cfg = ModelConfig(vocab_size=259, hidden_dim=128, num_layers=4, num_heads=4, max_seq_len=320, latent_bits=8)
    torch.manual_seed(0)
    write_bundle(root / "models" / "ft", FreeTransformer(cfg).state_dict(), cfg, {}, tok)
    return root / "models"


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _start(port: int) -> None:
    import ray
    from ray import serve

    from ft_ray.cluster import set_cluster_env

    set_cluster_env(joining=False)  # the embedded cluster `ft-ray serve` starts
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


MIXED_TOKENS = (8, 16, 32, 64, 128, 256)  # max_tokens of the mixed workload, cycled per request


async def _request(http, url: str, body: dict, stream: bool) -> tuple[float, float | None, int]:
    """One completion: (latency s, time to first token s (streams only), generated tokens)."""
    t0 = time.perf_counter()
    if not stream:
        r = await http.post(url, json=body)
        r.raise_for_status()
        return time.perf_counter() - t0, None, r.json()["usage"]["completion_tokens"]
    # the client reads raw bytes and parses only the usage chunk at the end: a Python client that
    # decoded every event would take, on these 2 cores, CPU the server's decode loop needs
    first, tail = None, b""
    async with http.stream("POST", url, json={**body, "stream": True,
                                              "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for chunk in r.aiter_raw():
            tail = (tail + chunk)[-4096:]
            if first is None and b'"text"' in tail:  # `tail`: the marker may straddle two chunks
                first = time.perf_counter() - t0
    usage = tail[tail.rindex(b'data: {'):].split(b"\n\n")[0][6:]
    tokens = json.loads(usage)["usage"]["completion_tokens"]
    return time.perf_counter() - t0, first, tokens


def _run_clients(url: str, bodies: list[tuple[dict, bool]], clients: int = CLIENTS):
    """`bodies` sent by `clients` concurrent clients (one asyncio loop); returns (wall s, results)."""
    import asyncio

    async def main():
        queue = list(enumerate(bodies))
        out: list = [None] * len(bodies)

        async def client(http):
            while queue:
                i, (body, stream) = queue.pop(0)
                out[i] = await _request(http, url, body, stream)

        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
            await asyncio.gather(*(client(http) for _ in range(clients)))
        return out

    t0 = time.perf_counter()
    results = asyncio.run(main())
    return time.perf_counter() - t0, results


def _body(i: int, max_tokens: int) -> dict:
    return {"model": "ft", "prompt": f"request {i}", "max_tokens": max_tokens, "temperature": 0.8, "seed": i,
            "plan": {"seed": i}}


def batching_rows(models: Path, quick: bool) -> list[Row]:
    """Continuous batching vs the same server with max_num_seqs=1 on a mixed workload (16 clients,
    max_tokens 8-256, half streaming); a short request's latency while 15 long ones decode vs on
    an idle server; 16 streams vs the same 16 requests unstreamed; TTFT and TPOT percentiles."""
    from ray import serve

    from ft_ray.serve.app import FTServer

    per_client = 1 if quick else 2
    mixed = [(_body(i, MIXED_TOKENS[i % len(MIXED_TOKENS)]), i % 2 == 1) for i in range(CLIENTS * per_client)]
    port = free_port()
    _start(port)
    try:
        measured, extra = {}, []
        servers = (("continuous", CLIENTS, 1), ("one", 1, 1), ("interval", CLIENTS, STREAM_INTERVAL))
        for label, seqs, interval in servers:
            serve.run(FTServer.bind(str(models), max_num_seqs=seqs, max_waiting=256, stream_interval=interval),
                      name=label, route_prefix=f"/{label}")
            url = f"http://127.0.0.1:{port}/{label}/v1/completions"
            _run_clients(url, [(_body(0, 8), False)], clients=1)  # warm-up
            if label == "interval":  # only what the interval changes: the streams
                extra.append(_stream_row(url, f", stream_interval={interval}"))
            else:
                measured[label] = _run_clients(url, mixed)
            if label == "continuous":
                extra += [_latency_row(url), _stream_row(url)]
            serve.delete(label)
    finally:
        _stop()
    (tc, rc), (to, ro) = measured["continuous"], measured["one"]
    tok_c, tok_o = sum(n for *_, n in rc) / tc, sum(n for *_, n in ro) / to
    streams = [r for r, (_, stream) in zip(rc, mixed) if stream]
    ttft = [first for _, first, _ in streams if first is not None]
    tpot = [(lat - first) / max(1, n - 1) for lat, first, n in streams if first is not None and n > 1]
    return [Row("Serve tokens/s, continuous batching / max_num_seqs=1 (16 clients, max_tokens 8-256, half "
                "streaming)", tok_c / tok_o, "x", ">= 4", f"{tok_c:.0f} vs {tok_o:.0f} tok/s"),
            *extra,
            Row("time to first token p50 / p99 (streams of the mixed load)", _pct(ttft, 0.5) * 1e3, "ms", "",
                f"p99 {_pct(ttft, 0.99) * 1e3:.0f} ms"),
            Row("time per output token p50 / p99 (streams of the mixed load)", _pct(tpot, 0.5) * 1e3, "ms", "",
                f"p99 {_pct(tpot, 0.99) * 1e3:.1f} ms; decode {tok_c:.0f} tok/s per replica")]


def _latency_row(url: str) -> Row:
    import asyncio

    short = _body(10_000, 8)
    idle = statistics.median(_run_clients(url, [(short, False)] * 3, clients=1)[1][i][0] for i in range(3))

    async def loaded():
        async with httpx.AsyncClient(timeout=600) as http:
            longs = [asyncio.create_task(_request(http, url, _body(20_000 + i, 256), False))
                     for i in range(CLIENTS - 1)]
            await asyncio.sleep(1.0)  # the long ones are decoding
            lat, _, _ = await _request(http, url, short, False)
            await asyncio.gather(*longs)
            return lat

    busy = asyncio.run(loaded())
    return Row(f"an 8-token request while {CLIENTS - 1} long ones decode / on an idle server", busy / idle, "x",
               "<= 5", f"{busy * 1e3:.0f} vs {idle * 1e3:.0f} ms")


def _stream_row(url: str, setting: str = "") -> Row:
    same = [_body(30_000 + i, STREAM_TOKENS) for i in range(CLIENTS)]
    c0 = time.process_time()  # the load clients' CPU (this process), taken from the same 2 cores
    ts, rs = _run_clients(url, [(b, True) for b in same])
    c1 = time.process_time()
    tu, ru = _run_clients(url, [(b, False) for b in same])
    c2 = time.process_time()
    stream_tps, plain_tps = sum(n for *_, n in rs) / ts, sum(n for *_, n in ru) / tu
    return Row(f"16 concurrent streams / the same 16 requests unstreamed ({STREAM_TOKENS} tokens), tokens/s{setting}",
               stream_tps / plain_tps,
               "x", ">= 0.9", f"{stream_tps:.0f} vs {plain_tps:.0f} tok/s; {ts:.2f} vs {tu:.2f} s wall, the "
                              f"clients' own CPU time {c1 - c0:.2f} vs {c2 - c1:.2f} s")


def measure_overhead(models: Path, repeats: int) -> dict:
    """The same single requests, one at a time, over HTTP and in-process, alternating so that
    load from elsewhere affects both alike. Runs in the process whose environment picked the
    ingress (see `INGRESS_ENV`)."""
    from ray import serve

    from ft_ray.serve import Engine
    from ft_ray.serve.app import FTServer

    port = free_port()
    _start(port)
    try:
        serve.run(FTServer.bind(str(models), max_num_seqs=1), name="one", route_prefix="/one")
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
    rows: list[Row] = []
    for mode in _ingresses("Serve HTTP overhead", "ms", rows):
        t = _in_subprocess(mode, ["--overhead", str(models), str(20 if quick else 60)])
        label = INGRESS_LABEL[mode]
        rows.append(Row(f"Serve HTTP overhead vs in-process engine, p50, {label}", (t["http"] - t["local"]) * 1e3,
                        "ms", "<= 10", f"HTTP {t['http'] * 1e3:.1f} ms, in-process {t['local'] * 1e3:.1f} ms "
                        f"(8 tokens); GET /v1/models {t['models'] * 1e3:.1f} ms"))
    return rows


def _in_subprocess(mode: str, args: list[str]):
    """Run this module with `args` in a fresh process whose environment picks the ingress `mode`
    (Serve reads it when its processes start); return the JSON its last line printed."""
    out = subprocess.run([sys.executable, "-m", "bench.bench_serve", *args],
                         env={**os.environ, **INGRESS_ENV[mode]}, capture_output=True, text=True, timeout=1800,
                         cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        raise RuntimeError(f"serving benchmark {args[0]} ({mode}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


INGRESS_LABEL = {"proxy": "default proxy", "haproxy": "HAProxy ingress"}


def _ingresses(what: str, unit: str, rows: list[Row]) -> list[str]:
    """The ingress modes this machine can measure; a 'not measured' row in `rows` for the others."""
    modes = []
    for mode in INGRESS_ENV:
        if mode == "haproxy" and haproxy_binary() is None:
            rows.append(Row(f"{what}, HAProxy ingress: not measured", float("nan"), unit, "",
                            "no HAProxy binary (see ft_ray.serve.cli.haproxy_binary)"))
        else:
            modes.append(mode)
    return modes


def ingress_rows(models: Path, quick: bool) -> list[Row]:
    """The batching rows under each ingress, side by side: with the default proxy every SSE write
    is a Ray streaming-generator item relayed by the proxy actor; with HAProxy it leaves the
    replica's own HTTP server."""
    rows: list[Row] = []
    for mode in _ingresses("Serve batching rows", "", rows):
        for r in _in_subprocess(mode, ["--batching", str(models)] + (["--quick"] if quick else [])):
            rows.append(Row(**{**r, "name": f"{r['name']} [{INGRESS_LABEL[mode]}]"}))
    return rows


def run(quick: bool = False) -> list[Row]:
    tmp = Path(tempfile.mkdtemp(prefix="ft-ray-bench-serve-"))
    try:
        models = _bundle(tmp)
        return engine_rows(models, quick) + ingress_rows(models, quick) + overhead_rows(models, quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--overhead"]:
        print(json.dumps(measure_overhead(Path(sys.argv[2]), int(sys.argv[3]))))
    elif sys.argv[1:2] == ["--batching"]:
        print(json.dumps([r.__dict__ for r in batching_rows(Path(sys.argv[2]), quick="--quick" in sys.argv)]))
    elif sys.argv[1:2] == ["--engine"]:
        tmp = Path(tempfile.mkdtemp(prefix="ft-ray-bench-engine-"))
        try:
            print(json.dumps([r.__dict__ for r in engine_rows(_bundle(tmp), quick="--quick" in sys.argv)], indent=2))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(json.dumps([r.__dict__ for r in run(quick="--quick" in sys.argv)], indent=2))
