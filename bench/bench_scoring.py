"""Scoring throughput: lm-eval loglikelihood requests/s, native (the lm-eval model `ft-ray`
in-process) vs through `ft-ray serve` (echo + logprobs over HTTP, the payload lm-eval's
`local-completions` sends), for a baseline and a Free Transformer at K=1 and K=8 plans.

Requests: the multiple-choice arithmetic task (4 continuations per problem, ~30-45 tokens each).
Native runs with one torch thread, as a 1-CPU replica does, batching 16 requests per forward.
Over HTTP: one client at a time (lm-eval's default, num_concurrent=1), 8 concurrent clients
(the engine batches concurrent scoring jobs with the same K), and one client sending 16 prompts
per request (lm-eval's batch_size=16). `python -m bench.bench_scoring [--quick]`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.bench_serve import _start, _stop
from bench.common import Row
from ft_ray.cluster import free_port

CONCURRENT = 8
BATCH = 16  # prompts per request with lm-eval's batch_size=16 (the server's limit per request)
SEED = 1234  # lm-eval's request seed


def _bundles(root: Path) -> Path:
    from ft_ray.bundle import write_bundle
    from ft_ray.config import ModelConfig
    from ft_ray.data.tokenizer import byte_tokenizer
    from ft_ray.model import build_model

    tok = root / "tokenizer.json"
    byte_tokenizer().save(str(tok))
    for arch in ("baseline", "free_transformer"):
        cfg = ModelConfig(arch=arch, vocab_size=259, hidden_dim=128, num_layers=4, num_heads=4, max_seq_len=320,
                          latent_bits=8)
        torch.manual_seed(0)
        write_bundle(root / "models" / arch, build_model(cfg).state_dict(), cfg, {}, tok)
    return root / "models"


def _requests(root: Path, num: int) -> list[tuple[str, str]]:
    from ft_ray.eval.tasks import write_task_data

    suite = write_task_data(root / "suite", seed=0)
    pairs = []
    for line in (suite / "data" / "arith_choice.jsonl").read_text().splitlines():
        doc = json.loads(line)
        pairs += [(doc["prompt"], c) for c in doc["choices"]]
        if len(pairs) >= num:
            return pairs[:num]
    return pairs


def _native(models: Path, arch: str, plans: int, pairs) -> tuple[float, list]:
    from ft_ray.eval.lm import FtRayLM

    lm = FtRayLM(bundle=str(models / arch), num_plans=plans, plan_seed=SEED, plan_mode="shared")
    reqs = [type("Req", (), {"args": p})() for p in pairs]
    lm.loglikelihood(reqs[:4])  # warm-up
    t0 = time.perf_counter()
    lm.loglikelihood(reqs)
    return len(reqs) / (time.perf_counter() - t0), lm


def _http(url: str, bodies: list[dict], clients: int) -> float:
    async def main():
        queue = list(bodies)
        async with httpx.AsyncClient(timeout=600) as http:
            async def client():
                while queue:
                    r = await http.post(url, json=queue.pop())
                    r.raise_for_status()
            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            return time.perf_counter() - t0

    return len(bodies) / asyncio.run(main())


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def run(quick: bool = False) -> list[Row]:
    tmp = Path(tempfile.mkdtemp(prefix="ft-ray-bench-scoring-"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = _bundles(tmp)
        pairs = _requests(tmp, 32 if quick else 96)
        arms = [("baseline", 1), ("free_transformer", 1), ("free_transformer", 8)]
        native, bodies = {}, {}
        for arch, plans in arms:
            native[arch, plans], lm = _native(models, arch, plans, pairs)
            bodies[arch, plans] = []
            for context, continuation in pairs:
                ctx, cont = lm.encode_pair(context, continuation)
                body = {"model": arch, "prompt": [ctx[1:] + cont], "max_tokens": 1, "temperature": 0,
                        "logprobs": 1, "echo": True, "seed": SEED}
                if arch != "baseline":
                    body["plan"] = {"samples": plans, "seed": SEED}
                bodies[arch, plans].append(body)
        port = free_port()
        _start(port)
        try:
            from ray import serve

            from serve_apps.app import app

            serve.run(app({"models_dir": str(models)}), name="ft-ray", route_prefix="/")
            url = f"http://127.0.0.1:{port}/v1/completions"
            rows = []
            for arch, plans in arms:
                _http(url, bodies[arch, plans][:4], 1)  # warm-up (loads the model)
                one = _http(url, bodies[arch, plans], 1)
                many = _http(url, bodies[arch, plans], CONCURRENT)
                batched = [{**chunk[0], "prompt": [b["prompt"][0] for b in chunk]}
                           for chunk in _chunks(bodies[arch, plans], BATCH)]
                per_batch = _http(url, batched, 1) * BATCH
                label = "baseline" if arch == "baseline" else f"FT, K={plans}"
                rows += [Row(f"loglikelihood requests/s, {label}: native ft-ray model", native[arch, plans], "req/s"),
                         Row(f"loglikelihood requests/s, {label}: HTTP, 1 client", one, "req/s", "",
                             f"{one / native[arch, plans]:.2f}x native"),
                         Row(f"loglikelihood requests/s, {label}: HTTP, {CONCURRENT} clients", many, "req/s", "",
                             f"{many / native[arch, plans]:.2f}x native"),
                         Row(f"loglikelihood requests/s, {label}: HTTP, 1 client, {BATCH} prompts per request",
                             per_batch, "req/s", "", f"{per_batch / native[arch, plans]:.2f}x native "
                             f"(lm-eval batch_size={BATCH})")]
            return rows
        finally:
            _stop()
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps([r.__dict__ for r in run(quick="--quick" in sys.argv)], indent=2))
