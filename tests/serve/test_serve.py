"""The Serve app on a real local Ray Serve instance (loopback only): OpenAI client, plans,
batching under concurrency equal to unbatched references, bad input, overload, replica loss."""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import time

import httpx
import pytest
import torch

from ft_ray.bundle import write_bundle
from ft_ray.cluster import free_port
from ft_ray.config import ModelConfig
from ft_ray.data.tokenizer import byte_tokenizer
from ft_ray.model import BaselineTransformer, FreeTransformer

pytestmark = pytest.mark.timeout(300)



@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = root.parent / "tokenizer.json"
    byte_tokenizer().save(str(tok))
    for name, arch in (("ft", "free_transformer"), ("base", "baseline")):
        cfg = ModelConfig(arch=arch, vocab_size=259, hidden_dim=32, num_layers=2, num_heads=2, max_seq_len=96,
                          latent_bits=4)
        torch.manual_seed(0)
        model = FreeTransformer(cfg) if arch == "free_transformer" else BaselineTransformer(cfg)
        write_bundle(root / name, model.state_dict(), cfg, {"step": 0}, tok)
    return root


@pytest.fixture(scope="module")
def server(ray_cluster, models_dir):
    from ray import serve

    from serve_apps.app import app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app({"models_dir": str(models_dir)}), name="ft-ray", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    yield client
    client.close()
    serve.shutdown()


@pytest.fixture(scope="module")
def engines(models_dir):
    from ft_ray.serve import Engine

    return {name: Engine.from_bundle(models_dir / name, name=name) for name in ("ft", "base")}


def test_health_and_models(server):
    assert server.get("/healthz").json()["status"] == "ok"
    assert [m["id"] for m in server.get("/v1/models").json()["data"]] == ["base", "ft"]


def test_openai_client_with_and_without_streaming(server, engines):
    from openai import OpenAI

    client = OpenAI(base_url=_url(server, "v1"), api_key="unused", max_retries=0)
    done = client.completions.create(model="ft", prompt="The plan", max_tokens=12, seed=5, temperature=0.8,
                                     extra_body={"plan": {"seed": 9}})
    assert done.usage.completion_tokens == 12 and done.choices[0].finish_reason == "length"
    assert len(done.choices[0].plan["codes"]) == 12  # the plan used comes back
    chunks = list(client.completions.create(model="ft", prompt="The plan", max_tokens=12, seed=5, temperature=0.8,
                                            stream=True, extra_body={"plan": {"seed": 9}}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert all(c.usage is None for c in chunks)  # OpenAI sends usage only when asked
    chunks = list(client.completions.create(model="ft", prompt="The plan", max_tokens=12, seed=5, temperature=0.8,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"plan": {"seed": 9}}))
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def _url(server, path: str) -> str:
    return f"{str(server.base_url).rstrip('/')}/{path}"


def _post(server, body: dict) -> dict:
    r = server.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_plans_reproduce_share_and_are_honoured(server):
    body = {"model": "ft", "prompt": "xy", "max_tokens": 10, "seed": 3, "plan": {"seed": 4}, "n": 3}
    a, b = _post(server, body), _post(server, body)
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    fresh = [c["plan"]["codes"] for c in a["choices"]]
    assert len({tuple(c) for c in fresh}) == 3  # fresh plans differ between samples
    shared = _post(server, {**body, "plan": {"seed": 4, "shared": True}})
    assert len({tuple(c["plan"]["codes"]) for c in shared["choices"]}) == 1
    codes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    given = _post(server, {"model": "ft", "prompt": "xy", "max_tokens": 10, "seed": 3, "plan": {"codes": codes}})
    assert given["choices"][0]["plan"]["codes"] == codes
    first = a["choices"][0]
    again = _post(server, {"model": "ft", "prompt": "xy", "max_tokens": 10, "seed": first["seed"],
                           "plan": {"codes": first["plan"]["prompt_codes"] + first["plan"]["codes"]}})
    assert again["choices"][0]["text"] == first["text"]  # the returned codes reproduce the sample


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "a"}, 400, "model"),
    ({"model": "nope", "prompt": "a"}, 404, "model"),
    ({"model": "../ft", "prompt": "a"}, 400, "model"),
    ({"model": "/etc", "prompt": "a"}, 400, "model"),
    ({"model": "ft"}, 400, "prompt"),
    ({"model": "ft", "prompt": 3}, 400, "prompt"),
    ({"model": "ft", "prompt": "a" * 200}, 400, "prompt"),  # longer than the 96-token context
    ({"model": "ft", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "ft", "prompt": "a", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "ft", "prompt": "a" * 50, "max_tokens": 60}, 400, "max_tokens"),  # prompt + output > context
    ({"model": "ft", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"model": "ft", "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"model": "ft", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"model": "ft", "prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ({"model": "ft", "prompt": "a", "max_tokens": 3, "plan": {"codes": [0, 1, 99]}}, 400, "plan.codes"),
    ({"model": "ft", "prompt": "a", "max_tokens": 3, "plan": {"codes": [0, 1]}}, 400, "plan.codes"),
    ({"model": "base", "prompt": "a", "plan": {"seed": 1}}, 400, "plan"),
    ({"model": "ft", "prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"model": "ft", "prompt": "a", "bogus": 1}, 400, "bogus"),
])
def test_bad_input_is_a_4xx_naming_the_field(server, body, status, param):
    r = server.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] is not None and err["param"].startswith(param) and err["code"] == status


def test_malformed_nan_and_oversized_bodies(server):
    r = server.post("/v1/completions", content=b'{"model": "ft", "prompt": ',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = server.post("/v1/completions", content=b'{"model": "ft", "prompt": "a", "temperature": NaN}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = server.post("/v1/completions", content=json.dumps({"model": "ft", "prompt": "a" * (2 << 20)}).encode())
    assert r.status_code == 413


def test_32_concurrent_clients_match_unbatched_references(server, engines):
    bodies = [{"model": "ft" if i % 3 else "base", "prompt": "ab" * (1 + i % 5), "max_tokens": 6 + i % 7,
               "temperature": [0, 0.7, 1.0][i % 3], "seed": i, **({"plan": {"seed": 100 + i}} if i % 3 else {})}
              for i in range(64)]
    with cf.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda b: httpx.post(_url(server, "v1/completions"), json=b, timeout=120), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    for body, r in zip(bodies, responses):
        engine = engines[body["model"]]
        (ref,) = engine.generate([engine.validate(body, {"model"})])
        got = r.json()["choices"][0]
        assert got["text"] == ref.choices[0].text
        if body["model"] == "ft":
            assert got["plan"]["codes"] == ref.choices[0].codes.new


def test_overload_gets_503_fast(server, models_dir):
    from ray import serve

    from serve_apps.app import FTServer

    small = FTServer.options(name="Small").bind(str(models_dir), max_num_seqs=1, max_waiting=1)
    serve.run(small, name="small", route_prefix="/small")
    body = {"model": "ft", "prompt": "a", "max_tokens": 90, "temperature": 0}

    def call(_):
        t0 = time.perf_counter()
        r = httpx.post(_url(server, "small/v1/completions"), json=body, timeout=120)
        if r.status_code == 503:  # the engine's queue is full: OpenAI's JSON error and a retry hint
            assert r.json()["error"]["code"] == 503 and int(r.headers["retry-after"]) >= 1
        return r.status_code, time.perf_counter() - t0

    try:
        with cf.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(call, range(12)))
    finally:
        serve.delete("small")
    codes = [c for c, _ in results]
    assert codes.count(200) >= 2 and codes.count(503) >= 1, codes
    assert set(codes) <= {200, 503}
    assert max(t for c, t in results if c == 503) < 5.0  # refused at once, not after queueing


def test_replica_killed_under_load_is_replaced(server):
    import threading

    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA") and "FTServer" in a["name"] and "ft-ray" in a["name"]]
    assert len(replicas) == 1, replicas
    body = {"model": "base", "prompt": "ok", "max_tokens": 4, "temperature": 0}
    log: list[tuple[float, int]] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                r = httpx.post(_url(server, "v1/completions"), json=body, timeout=30)
                log.append((time.monotonic(), r.status_code))
            except httpx.HTTPError:
                log.append((time.monotonic(), -1))
            time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    deadline = killed_at + 90
    while time.monotonic() < deadline:  # wait for a new replica to answer again
        recent = [code for t, code in log if t > killed_at + 1]
        if recent[-5:] == [200] * 5:
            break
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    before = [code for t, code in log if t < killed_at]
    assert before and set(before) == {200}
    # requests in flight at the kill may fail; once the replacement serves, service continues
    after = [httpx.post(_url(server, "v1/completions"), json=body, timeout=30).status_code for _ in range(5)]
    assert after == [200] * 5
    new = [a for a in ray.util.list_named_actors(all_namespaces=True)
           if a["name"].startswith("SERVE_REPLICA") and "FTServer" in a["name"] and "ft-ray" in a["name"]]
    assert new and new[0]["name"] != replicas[0]["name"]


def test_client_disconnect_stops_its_streamed_generation(server, tmp_path):
    """A client that closes its stream after three events: the replica stops decoding at once
    (its count of active streams drops to 0), far sooner than the whole generation would take."""
    from ray import serve

    from ft_ray.serve import Engine
    from serve_apps.app import FTServer

    tok = tmp_path / "tokenizer.json"
    byte_tokenizer().save(str(tok))
    cfg = ModelConfig(arch="baseline", vocab_size=259, hidden_dim=64, num_layers=4, num_heads=2, max_seq_len=4096)
    torch.manual_seed(0)
    write_bundle(tmp_path / "models" / "long", BaselineTransformer(cfg).state_dict(), cfg, {"step": 0}, tok)
    body = {"model": "long", "prompt": "a", "max_tokens": 4000, "temperature": 0}  # greedy: no EOS here
    engine = Engine.from_bundle(tmp_path / "models" / "long", name="long")
    t0 = time.perf_counter()
    (full,) = engine.generate([engine.validate(body, {"model"})])
    full_s = time.perf_counter() - t0
    assert full.usage.completion_tokens == 4000

    serve.run(FTServer.options(name="Long").bind(str(tmp_path / "models")), name="long", route_prefix="/long")
    try:
        events = 0
        with httpx.stream("POST", _url(server, "long/v1/completions"), json={**body, "stream": True},
                          timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                events += line.startswith("data: {")
                if events == 3:
                    break  # leaving the block closes the connection mid-stream
        assert events == 3  # the stream was cut, not read to its end
        closed = time.monotonic()
        while True:
            health = httpx.get(_url(server, "long/healthz"), timeout=30).json()
            if health["active_streams"] == 0 or time.monotonic() > closed + 60:
                break
            time.sleep(0.05)
        stopped_after = time.monotonic() - closed
        assert health["active_streams"] == 0
        assert stopped_after < 0.5 * full_s, (stopped_after, full_s)  # streaming is slower than in-process
        short = httpx.post(_url(server, "long/v1/completions"), json={**body, "max_tokens": 3}, timeout=60)
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3  # still serving
    finally:
        serve.delete("long")


def test_serve_command_refuses_an_ingress_it_cannot_set_up(models_dir, tmp_path, monkeypatch, capsys):
    """`ft-ray serve --ingress haproxy` exits 2 with the reason before any cluster starts: an
    unusable HAProxy binary, or a running cluster (RAY_ADDRESS) whose Serve processes it cannot
    reconfigure. Without an override it finds the binary that ray[serve] bundles."""
    from ft_ray.cli import main
    from ft_ray.serve.cli import haproxy_binary

    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    bundled = haproxy_binary()
    assert bundled and subprocess.run([bundled, "-v"], capture_output=True, text=True).stdout.startswith("HAProxy")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "missing"))
    assert main(["serve", "--models", str(models_dir), "--ingress", "haproxy"]) == 2
    assert "no usable HAProxy binary" in capsys.readouterr().err
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", bundled)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert main(["serve", "--models", str(models_dir), "--ingress", "haproxy"]) == 2
    err = capsys.readouterr().err
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in err and "ray start" in err


# ----------------------------------------------------------------------------------------------
# serving v2: isolation, malformed input, OpenAI fidelity, operations (each with valid requests
# in flight at the same time)
# ----------------------------------------------------------------------------------------------


def _in_flight(server, count: int = 6):
    """Valid requests (half streamed) running in the background; `.result()` checks they all
    succeeded."""
    pool = cf.ThreadPoolExecutor(count)

    def call(i):
        body = {"model": "ft", "prompt": f"valid {i}", "max_tokens": 40, "temperature": 0.9, "seed": i}
        if i % 2:
            with httpx.stream("POST", _url(server, "v1/completions"), json={**body, "stream": True}, timeout=120) as r:
                lines = [line for line in r.iter_lines() if line]
            return r.status_code, lines[-1] == "data: [DONE]" and not any('"error"' in x for x in lines)
        r = httpx.post(_url(server, "v1/completions"), json=body, timeout=120)
        return r.status_code, r.json()["usage"]["completion_tokens"] == 40

    futures = [pool.submit(call, i) for i in range(count)]

    class Running:
        def result(self):
            out = [f.result() for f in futures]
            pool.shutdown()
            assert out == [(200, True)] * count, out

    return Running()


def test_bad_numerics_fail_no_batch_mate(server, engines):
    running = _in_flight(server)
    tiny = {"model": "ft", "prompt": "K>", "max_tokens": 20, "top_p": 1e-300, "seed": 1}
    r = server.post("/v1/completions", json=tiny)
    assert r.status_code == 200, r.text  # top_p keeps at least the most likely token: greedy
    greedy = _post(server, {**tiny, "top_p": None, "temperature": 0})
    assert r.json()["choices"][0]["text"] == greedy["choices"][0]["text"]
    with httpx.stream("POST", _url(server, "v1/completions"), json={**tiny, "stream": True}, timeout=60) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and not any('"error"' in x for x in lines)
    r = server.post("/v1/completions", json={**tiny, "top_p": None, "temperature": 1e-6})
    assert r.status_code == 200
    running.result()


@pytest.mark.parametrize("content, status, param", [
    (b'{"model": "ft", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "body"),
    (b'{"model": "ft", "prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", 400, "body"),
    (b'{"model": "ft", "prompt": "a", "plan": {"seed": ' + b"1" * 5000 + b"}}", 400, "body"),
    (b'{"model": "ft", "prompt": "a", "\\ud800": 1}', 400, "body"),
    (b'{"model": "ft", "prompt": "\\udfff"}', 400, "prompt"),
    (b'[1, 2]', 400, "body"),
])
def test_malformed_bodies_are_400_naming_the_field(server, content, status, param):
    running = _in_flight(server, 2)
    r = server.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == status
    running.result()


def test_every_error_is_openai_json(server):
    for r, status in ((server.get("/no/such/route"), 404), (server.get("/v1/completions"), 405),
                      (server.get("/v1/models/nope"), 404)):
        assert r.status_code == status
        err = r.json()["error"]
        assert err["code"] == status and err["message"] and set(err) == {"message", "type", "param", "code"}

    def chunks():
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MB, no Content-Length: cut at 1 MB while reading

    r = server.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413


def test_openai_defaults_and_token_id_prompts(server, engines):
    defaults = {"logprobs": None, "echo": False, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0,
                "suffix": None, "user": "me"}
    body = {"model": "ft", "prompt": "ab", "max_tokens": 6, "seed": 2, "temperature": 0.7}
    plain = _post(server, body)
    assert _post(server, {**body, **defaults})["choices"][0]["text"] == plain["choices"][0]["text"]
    for key, value in (("best_of", 2), ("presence_penalty", 0.5)):  # logprobs, echo: test_serve_scoring.py
        r = server.post("/v1/completions", json={**body, key: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == key
    r = server.post("/v1/completions", json={**body, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"  # only with stream
    ids = engines["ft"].encode("ab")[1:]  # without BOS, which the server adds
    assert _post(server, {**body, "prompt": ids})["choices"][0]["text"] == plain["choices"][0]["text"]
    both = _post(server, {**body, "prompt": [ids, ids[:1]]})
    assert len(both["choices"]) == 2 and both["choices"][0]["text"] == plain["choices"][0]["text"]
    r = server.post("/v1/completions", json={**body, "prompt": [5, 9999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]"
    models = server.get("/v1/models").json()["data"]
    assert all(isinstance(m["created"], int) and m["created"] > 1_600_000_000 for m in models)
    assert server.get("/v1/models/ft").json() == next(m for m in models if m["id"] == "ft")


def _requests_counted(server, route: str, status: int) -> float:
    prefix = f'ftray_requests_total{{route="{route}",status="{status}"}} '
    return sum(float(line[len(prefix):]) for line in server.get("/metrics").text.splitlines()
               if line.startswith(prefix))


def test_metrics_endpoint_is_prometheus_text(server):
    before = {(route, status): _requests_counted(server, route, status)
              for route, status in (("/v1/completions", 200), ("/v1/completions", 400), ("/v1/nowhere", 404))}
    _post(server, {"model": "base", "prompt": "m", "max_tokens": 3})
    with server.stream("POST", "/v1/completions", json={"model": "base", "prompt": "m", "max_tokens": 3,
                                                         "stream": True}) as r:
        assert r.status_code == 200 and r.read().endswith(b"data: [DONE]\n\n")
    assert server.post("/v1/completions", json={"model": "base", "prompt": "m", "max_tokens": -1}).status_code == 400
    assert server.get("/v1/nowhere").status_code == 404
    # every request counted once by route and status, a stream as well
    for (route, status), n in before.items():
        assert _requests_counted(server, route, status) == n + (2 if status == 200 else 1), (route, status)
    text = server.get("/metrics").text
    assert "ftray_generation_tokens_total" in text
    assert "ftray_num_requests_running" in text and "ftray_time_per_output_token_seconds_bucket" in text


def test_api_key_failed_and_linked_bundles(server, models_dir, tmp_path):
    """A replica with an API key serving a directory where one bundle is truncated and another is
    a symlink: the broken one is reported by name while the others serve; every route but
    /healthz needs the bearer token."""
    import shutil

    from ray import serve

    from serve_apps.app import FTServer

    root = tmp_path / "models"
    root.mkdir()
    (root / "linked").symlink_to(models_dir / "ft", target_is_directory=True)
    shutil.copytree(models_dir / "base", root / "broken")
    weights = root / "broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    serve.run(FTServer.options(name="Keyed").bind(str(root), api_key="s3cret"), name="keyed", route_prefix="/keyed")
    try:
        health = server.get("/keyed/healthz")
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "degraded" and health.json()["models"] == ["linked"]
        assert "broken" in health.json()["failed"]
        body = {"model": "linked", "prompt": "hi", "max_tokens": 3}
        for route in ("/keyed/v1/completions", "/keyed/v1/models", "/keyed/metrics", "/keyed/nope"):
            r = server.post(route, json=body) if route.endswith("completions") else server.get(route)
            assert r.status_code == 401 and r.json()["error"]["code"] == 401, route
        auth = {"authorization": "Bearer s3cret"}
        r = server.post("/keyed/v1/completions", json=body, headers=auth)
        assert r.status_code == 200 and r.json()["model"] == "linked"
        r = server.post("/keyed/v1/completions", json={**body, "model": "broken"}, headers=auth)
        assert r.status_code == 503 and "broken" in r.json()["error"]["message"]
    finally:
        serve.delete("keyed")


def test_serve_command_refuses_a_port_in_use(models_dir, capsys, monkeypatch):
    import socket

    from ft_ray.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--models", str(models_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ft-ray: error: --port {port}: 127.0.0.1:{port} is already in use"
