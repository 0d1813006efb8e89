"""`ft-ray serve --ingress haproxy` end to end: the command starts its own local cluster in Ray's
high-throughput mode (HAProxy on the port, forwarding to the replica's own HTTP server), and the
API behaves as behind the default proxy: completions equal the in-process engine's, streams end
with [DONE], bad input is a 4xx naming the field, SIGTERM lets a stream in flight finish, then shuts it all down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from ft_ray.bundle import write_bundle
from ft_ray.cluster import free_port
from ft_ray.config import ModelConfig
from ft_ray.data.tokenizer import byte_tokenizer, eos_id
from ft_ray.model import FreeTransformer

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("haproxy-models")
    tok = root.parent / "tokenizer.json"
    byte_tokenizer().save(str(tok))
    cfg = ModelConfig(vocab_size=259, hidden_dim=32, num_layers=2, num_heads=2, max_seq_len=96, latent_bits=4)
    torch.manual_seed(0)
    write_bundle(root / "ft", FreeTransformer(cfg).state_dict(), cfg, {"step": 0}, tok)
    # for the SIGTERM drill: a few seconds of decoding, greedy to max_tokens (EOS's logit row is 0
    # while the best other token's is positive)
    slow = ModelConfig(vocab_size=259, hidden_dim=192, num_layers=6, num_heads=4, max_seq_len=1200, latent_bits=4)
    torch.manual_seed(1)
    model = FreeTransformer(slow)
    with torch.no_grad():
        model.lm_head.weight[eos_id(byte_tokenizer())] = 0
    write_bundle(root / "slow", model.state_dict(), slow, {"step": 0}, tok)
    return root


@pytest.fixture(scope="module")
def served(models_dir, tmp_path_factory):
    """(base URL, process) of `ft-ray serve --ingress haproxy` on a free port, in its own session."""
    port = free_port()
    log = tmp_path_factory.mktemp("haproxy-log") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own cluster
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ft_ray.cli", "serve", "--models", str(models_dir),
                                 "--port", str(port), "--ingress", "haproxy"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "[ft-ray] serving" not in log.read_text():
            assert proc.poll() is None, f"ft-ray serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not serving after 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_completions_behind_haproxy_equal_the_engine(served, models_dir):
    from openai import OpenAI

    from ft_ray.serve import Engine

    url, _ = served
    assert httpx.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    body = dict(model="ft", prompt="The plan", max_tokens=12, seed=5, temperature=0.8)
    done = client.completions.create(**body, extra_body={"plan": {"seed": 9}})
    engine = Engine.from_bundle(models_dir / "ft", name="ft")
    (ref,) = engine.generate([engine.validate({**body, "plan": {"seed": 9}}, {"model"})])
    assert done.choices[0].text == ref.choices[0].text and done.choices[0].plan["codes"] == ref.choices[0].codes.new
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True},
                                            extra_body={"plan": {"seed": 9}}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12


@pytest.mark.parametrize("content, status, param", [
    (b"{bad", 400, "body"),
    (b'{"model": "nope", "prompt": "a"}', 404, "model"),
    (b'{"model": "../ft", "prompt": "a"}', 400, "model"),
    (b'{"model": "ft", "prompt": "a", "top_p": 0}', 400, "top_p"),
    (b'{"model": "ft", "prompt": "' + b"a" * (1 << 20) + b'"}', 413, "body"),
])
def test_bad_input_behind_haproxy_is_a_4xx_naming_the_field(served, content, status, param):
    url, _ = served
    r = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_sigterm_drains_the_stream_in_flight_then_stops_the_server_and_its_cluster(served):
    url, proc = served
    body = {"model": "slow", "prompt": "drain", "max_tokens": 1000, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    events, usage, done, signalled_after = [], None, False, None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                if event["choices"]:
                    events.append(event["choices"][0])
                usage = event.get("usage") or usage
                if len(events) == 5 and signalled_after is None:  # the stream is under way
                    proc.send_signal(signal.SIGTERM)
                    signalled_after = len(events)
    assert done and usage["completion_tokens"] == 1000, (done, usage)  # finished in full after SIGTERM
    assert events[-1]["finish_reason"] == "length" and len(events) > signalled_after  # events came after it
    proc.wait(timeout=90)
    assert proc.returncode == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=5)
    deadline = time.monotonic() + 30  # Ray's own processes exit shortly after their driver
    while True:
        left = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(proc.pid)], capture_output=True,
                              text=True).stdout.strip()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"processes of the server's session still running:\n{left}"
