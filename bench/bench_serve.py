"""Serving benchmarks on a real local Ray Serve instance (loopback): continuous batching vs
max_num_seqs=1 on a mixed workload, a short request's latency under load, streams vs unstreamed,
TTFT/TPOT percentiles, HTTP overhead vs in-process.
First, in-process and without Ray, the engine's continuous batching: 16 concurrent requests vs one
at a time, a short request's latency when it arrives while long ones decode, and the Serve rows'
mixed load and streams run on the engine's loop thread with asyncio clients, no HTTP: what the
engine itself reaches on these cores, the ceiling of the Serve rows
(`python -m bench.bench_serve --engine` runs only these).
The load clients are bench/http_client.py's lean HTTP/1.1 client: they share the 2 cores with
the server, and httpx took ~4x its CPU reading streams.

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
from urllib.parse import urlsplit

import httpx
import torch

from bench.common import Row
from bench.http_client import Connection
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


MIXED_TOKENS = (8, 16, 32, 64, 128, 256)  # max_tokens of the mixed workload, cycled per request


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


def engine_loop_rows(models: Path, quick: bool) -> list[Row]:
    """The Serve rows' workloads in-process, without HTTP or Ray: the engine's loop thread and
    asyncio clients, as in the replica (one torch thread). What the engine itself reaches on these
    cores: the ceiling of the Serve rows."""
    import asyncio

    from ft_ray.serve import Engine
    from ft_ray.serve.scheduler import SchedulerConfig

    async def run(engine: Engine, bodies: list[tuple[dict, bool]]) -> float:
        """tokens/s of `bodies` sent by CLIENTS clients, each waiting for its request's end."""
        queue, tokens = list(bodies), 0

        async def client():
            nonlocal tokens
            while queue:
                body, stream = queue.pop(0)
                handle = engine.submit(engine.validate(body, {"model"}), stream=stream)  # as the app parses it
                if not stream:
                    result = await handle  # awaited first: `tokens += await ...` would read `tokens` before
                    tokens += result.usage.completion_tokens
                    continue
                async for events in handle.event_batches():
                    tokens += sum(e.usage.completion_tokens for e in events if e.usage is not None)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        return tokens / (time.perf_counter() - t0)

    async def main(engines: dict[int, Engine]) -> tuple[list[tuple], list[tuple]]:
        """Per round (alternating: load from elsewhere hits both arms alike), (ratio, tokens/s of
        each arm) for the mixed load and for the streams."""
        mixed, streams = [], []
        for e in engines.values():
            e.start()
            await run(e, [(_body(0, 8), False)])  # warm-up
        for k in range(1 if quick else 3):
            bodies = _mixed(k)
            c, o = await run(engines[CLIENTS], bodies), await run(engines[1], bodies)
            same = [_body(30_000 + 100 * k + i, STREAM_TOKENS) for i in range(CLIENTS)]
            s = await run(engines[CLIENTS], [(b, True) for b in same])
            u = await run(engines[CLIENTS], [(b, False) for b in same])
            mixed.append((c / o, c, o))
            streams.append((s / u, s, u))
        return mixed, streams

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engines = {n: Engine.from_bundle(models / "ft", name="ft",
                                     scheduler=SchedulerConfig(max_num_seqs=n, max_waiting=256))
               for n in (CLIENTS, 1)}
    try:
        mixed, streams = asyncio.run(main(engines))
    finally:
        for e in engines.values():
            e.close()
        torch.set_num_threads(threads)
    (ratio_m, c, o), (ratio_s, s, u) = _median_round(mixed), _median_round(streams)
    return [Row("engine in-process, the mixed load: continuous / max_num_seqs=1 (no HTTP: the Serve row's ceiling)",
                ratio_m, "x", "", f"{c:.0f} vs {o:.0f} tok/s{_spread(mixed)}"),
            Row(f"engine in-process: 16 streams / the same 16 unstreamed (max_tokens {STREAM_TOKENS}, no HTTP)",
                ratio_s, "x", "", f"{s:.0f} vs {u:.0f} tok/s{_spread(streams)}")]


def _mixed(round_: int = 0) -> list[tuple[dict, bool]]:
    """The mixed workload: CLIENTS x 2 requests, max_tokens cycling through MIXED_TOKENS, every
    other one streamed."""
    return [(_body(1000 * round_ + i, MIXED_TOKENS[i % len(MIXED_TOKENS)]), i % 2 == 1) for i in range(2 * CLIENTS)]


async def _request(conn: Connection, url: str, body: dict, stream: bool) -> tuple[float, float | None, int]:
    """One completion: (latency s, time to first token s (streams only), generated tokens)."""
    t0 = time.perf_counter()
    if stream:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    reply = await conn.post(urlsplit(url).path, body, first_marker=b'"text"' if stream else None)
    return time.perf_counter() - t0, reply.first_s, reply.usage()["completion_tokens"]


def _connection(url: str) -> Connection:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    return Connection(parts.hostname, parts.port)


def _run_clients(url: str, bodies: list[tuple[dict, bool]], clients: int = CLIENTS):
    """`bodies` sent by `clients` concurrent clients, each with its own keep-alive connection (one
    asyncio loop, the lean client of http_client.py); returns (wall s, results)."""
    import asyncio

    async def main():
        queue = list(enumerate(bodies))
        out: list = [None] * len(bodies)

        async def client():
            conn = _connection(url)
            try:
                while queue:
                    i, (body, stream) = queue.pop(0)
                    out[i] = await _request(conn, url, body, stream)
            finally:
                await conn.close()

        await asyncio.gather(*(client() for _ in range(clients)))
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
    an idle server; 16 streams vs the same 16 requests unstreamed (and with stream_interval); TTFT
    and TPOT percentiles. The three servers are deployed side by side (half a CPU each: only one is
    loaded at a time) and measured in alternating rounds, medians reported: measured one after
    another, each after deleting the previous one, the stream_interval row came out below the
    default one under HAProxy; side by side it is above it, as under the default proxy."""
    from ray import serve

    from ft_ray.serve.app import FTServer

    port = free_port()
    _start(port)
    servers = {"continuous": (CLIENTS, 1), "one": (1, 1), "interval": (CLIENTS, STREAM_INTERVAL)}
    urls = {label: f"http://127.0.0.1:{port}/{label}/v1/completions" for label in servers}
    rounds: dict[str, list] = {"mixed": [], "streams": [], "interval": []}
    pooled_streams = []  # the streamed requests of every continuous mixed round: TTFT, TPOT
    try:
        for label, (seqs, interval) in servers.items():
            app = FTServer.options(ray_actor_options={"num_cpus": 0.5}).bind(
                str(models), max_num_seqs=seqs, max_waiting=256, stream_interval=interval)
            serve.run(app, name=label, route_prefix=f"/{label}")
            _run_clients(urls[label], [(_body(0, 8), False)], clients=1)  # warm-up
        latency = _latency_row(urls["continuous"])
        for k in range(1 if quick else 3):
            mixed = _mixed(k)
            (tc, rc), (to, ro) = _run_clients(urls["continuous"], mixed), _run_clients(urls["one"], mixed)
            tok_c, tok_o = sum(n for *_, n in rc) / tc, sum(n for *_, n in ro) / to
            rounds["mixed"].append((tok_c / tok_o, tok_c, tok_o))
            pooled_streams += [r for r, (_, stream) in zip(rc, mixed, strict=True) if stream]
            rounds["streams"].append(_stream_pair(urls["continuous"], k))
            rounds["interval"].append(_stream_pair(urls["interval"], k))
    finally:
        _stop()
    ttft = [first for _, first, _ in pooled_streams if first is not None]
    tpot = [(lat - first) / max(1, n - 1) for lat, first, n in pooled_streams if first is not None and n > 1]
    ratio, tok_c, tok_o = _median_round(rounds["mixed"])
    return [Row("Serve tokens/s, continuous batching / max_num_seqs=1 (16 clients, max_tokens 8-256, half "
                "streaming)", ratio, "x", ">= 4",
                f"{tok_c:.0f} vs {tok_o:.0f} tok/s{_spread(rounds['mixed'])}"),
            latency,
            _stream_row(rounds["streams"]),
            _stream_row(rounds["interval"], f", stream_interval={STREAM_INTERVAL}"),
            Row("time to first token p50 / p99 (streams of the mixed load)", _pct(ttft, 0.5) * 1e3, "ms", "",
                f"p99 {_pct(ttft, 0.99) * 1e3:.0f} ms"),
            Row("time per output token p50 / p99 (streams of the mixed load)", _pct(tpot, 0.5) * 1e3, "ms", "",
                f"p99 {_pct(tpot, 0.99) * 1e3:.1f} ms; decode {tok_c:.0f} tok/s per replica")]


def _median_round(rounds: list[tuple]) -> tuple:
    """The round whose ratio (its first item) is the median (the lower one of an even count)."""
    return sorted(rounds)[(len(rounds) - 1) // 2]


def _spread(rounds: list[tuple]) -> str:
    return f"; median of {len(rounds)} rounds: " + ", ".join(f"{r[0]:.2f}" for r in rounds) if len(rounds) > 1 else ""


def _latency_row(url: str) -> Row:
    import asyncio

    short = _body(10_000, 8)
    idle = statistics.median(_run_clients(url, [(short, False)] * 3, clients=1)[1][i][0] for i in range(3))

    async def loaded():
        conns = [_connection(url) for _ in range(CLIENTS)]
        try:
            longs = [asyncio.create_task(_request(conn, url, _body(20_000 + i, 256), False))
                     for i, conn in enumerate(conns[1:])]
            await asyncio.sleep(1.0)  # the long ones are decoding
            lat, _, _ = await _request(conns[0], url, short, False)
            await asyncio.gather(*longs)
            return lat
        finally:
            for conn in conns:
                await conn.close()

    busy = asyncio.run(loaded())
    return Row(f"an 8-token request while {CLIENTS - 1} long ones decode / on an idle server", busy / idle, "x",
               "<= 5", f"{busy * 1e3:.0f} vs {idle * 1e3:.0f} ms")


def _stream_pair(url: str, round_: int) -> tuple[float, float, float, float, float, float, float]:
    """16 streams, then the same 16 requests unstreamed: (ratio of tokens/s, the two tokens/s, the
    two walls, the load clients' CPU time for each)."""
    same = [_body(30_000 + 100 * round_ + i, STREAM_TOKENS) for i in range(CLIENTS)]
    c0 = time.process_time()  # the load clients' CPU (this process), taken from the same 2 cores
    ts, rs = _run_clients(url, [(b, True) for b in same])
    c1 = time.process_time()
    tu, ru = _run_clients(url, [(b, False) for b in same])
    c2 = time.process_time()
    stream_tps, plain_tps = sum(n for *_, n in rs) / ts, sum(n for *_, n in ru) / tu
    return stream_tps / plain_tps, stream_tps, plain_tps, ts, tu, c1 - c0, c2 - c1


def _stream_row(rounds: list[tuple], setting: str = "") -> Row:
    ratio, stream_tps, plain_tps, ts, tu, cpu_s, cpu_u = _median_round(rounds)
    return Row(f"16 concurrent streams / the same 16 requests unstreamed (max_tokens {STREAM_TOKENS}), "
               f"tokens/s{setting}", ratio, "x", ">= 0.9",
               f"{stream_tps:.0f} vs {plain_tps:.0f} tok/s; {ts:.2f} vs {tu:.2f} s wall, the clients' own CPU "
               f"time {cpu_s:.2f} vs {cpu_u:.2f} s{_spread(rounds)}")


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
        return (engine_rows(models, quick) + engine_loop_rows(models, quick) + ingress_rows(models, quick)
                + overhead_rows(models, quick))
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
            models, quick = _bundle(tmp), "--quick" in sys.argv
            print(json.dumps([r.__dict__ for r in engine_rows(models, quick) + engine_loop_rows(models, quick)],
                             indent=2))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(json.dumps([r.__dict__ for r in run(quick="--quick" in sys.argv)], indent=2))
