"""Ray Serve app: plan-conditioned generation over HTTP, OpenAI-compatible completions.

    serve run serve_apps.app:app models_dir=/path/to/models        # or: serve deploy serve_apps/config.yaml
    ft-ray serve --models DIR [--port 8000]

Routes: POST /v1/completions (OpenAI completions + a `plan` extension), GET /v1/models,
POST /generate (minimal form), GET /healthz (200 once the weights are loaded).

A model is a bundle directory `models_dir/<name>/` (model.safetensors, config.json,
tokenizer.json, metrics.json); a request names it by `model` and never carries a path. Several
bundles share a replica through `@serve.multiplexed`; concurrent non-streaming requests are
batched by `@serve.batch` into one `Engine.generate` call per model (batched KV-cache decoding),
whose output equals each request's own. Errors are JSON: {"error": {"message", "type", "param",
"code"}} with 400 (bad field), 404 (unknown model), 413 (body too large), 503 (overloaded).
"""


import asyncio  # noqa: I001 (no __future__ annotations here: FastAPI must see the real Request type)
import json
import re
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from ft_ray.serve import Engine, GenerationRequest, RequestError

MAX_BODY_BYTES = 1 << 20
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
OPENAI_EXTRA = frozenset({"model", "stream", "user"})

api = FastAPI(title="ft-ray", description=__doc__)


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {404: "not_found_error", 413: "request_too_large", 503: "overloaded"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def model_path(models_dir: Path, name) -> Path:
    """The bundle directory of a model name; names are plain, so no request escapes models_dir."""
    if not isinstance(name, str) or not MODEL_NAME.match(name) or name in (".", ".."):
        raise RequestError("model", "must be the name of a served model (letters, digits, '.', '_', '-'), "
                                    f"not a path: {name!r}")
    path = (models_dir / name).resolve()
    if path.parent != models_dir or not (path / "config.json").is_file():
        raise RequestError("model", f"unknown model {name!r}; GET /v1/models lists them", status=404)
    return path


def list_models(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir()
                  if MODEL_NAME.match(p.name) and (p / "config.json").is_file() and (p / "model.safetensors").is_file())


def choice_json(choice, index: int) -> dict:
    out = {"index": index, "text": choice.text, "logprobs": None, "finish_reason": choice.finish_reason,
           "seed": choice.seed}
    if choice.codes is not None:
        out["plan"] = {"prompt_codes": choice.codes.prompt, "codes": choice.codes.new, "seed": choice.codes.seed}
    return out


async def _next_in_thread(events):
    """next(events, None) on a worker thread. If the caller is cancelled meanwhile, the step in
    flight is awaited before the cancellation goes on, so the caller may then close `events`
    (closing a generator that another thread is running raises)."""
    step = asyncio.ensure_future(asyncio.to_thread(next, events, None))
    try:
        return await asyncio.shield(step)
    except asyncio.CancelledError:
        while not step.done():  # anyio (Starlette) repeats the cancellation until the task ends
            try:
                await asyncio.wait({step})
            except asyncio.CancelledError:
                pass
        raise


@serve.deployment(max_ongoing_requests=16, max_queued_requests=32, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class FTServer:
    def __init__(self, models_dir: str, preload: list[str] | None = None, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, loader=Engine.from_bundle):
        self.models_dir = Path(models_dir).resolve()
        if not self.models_dir.is_dir():
            raise FileNotFoundError(f"models_dir {self.models_dir} is not a directory")
        self.loader = loader
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.ready = False
        self.active_streams = 0  # streamed generations in progress (GET /healthz reports it)
        self._preload = preload if preload is not None else list_models(self.models_dir)[:4]

    async def _ensure_ready(self) -> None:
        if not self.ready:
            for name in self._preload:
                await self.engine(name)
            self.ready = True

    @serve.multiplexed(max_num_models_per_replica=4)
    async def _load(self, name: str) -> Engine:
        return await asyncio.to_thread(self.loader, model_path(self.models_dir, name), name=name)

    async def engine(self, name) -> Engine:
        model_path(self.models_dir, name)  # refuse bad names before the multiplexer sees them
        return await self._load(name)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, items: list[tuple[Engine, list[GenerationRequest]]]) -> list:
        """Concurrent requests, grouped per model into one batched engine call each."""
        groups: dict[int, list[int]] = {}
        for i, (engine, _) in enumerate(items):
            groups.setdefault(id(engine), []).append(i)
        out: list = [None] * len(items)
        for idxs in groups.values():
            engine = items[idxs[0]][0]
            flat = [r for i in idxs for r in items[i][1]]
            results = await asyncio.to_thread(engine.generate, flat)
            pos = 0
            for i in idxs:
                out[i] = results[pos:pos + len(items[i][1])]
                pos += len(items[i][1])
        return out

    # ------------------------------------------------------------------ request parsing
    async def _parse(self, request: Request) -> tuple[Engine, dict, list[GenerationRequest]]:
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise RequestError("body", f"larger than {MAX_BODY_BYTES} bytes", status=413)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError("body", f"larger than {MAX_BODY_BYTES} bytes", status=413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError("body", f"not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("body", "must be a JSON object")
        if "model" not in body:
            raise RequestError("model", "is required")
        engine = await self.engine(body["model"])
        prompts = body.get("prompt")
        if isinstance(prompts, list):
            if not prompts or len(prompts) > 16:
                raise RequestError("prompt", "a list of 1 to 16 strings")
            reqs = [engine.validate({**body, "prompt": p}, OPENAI_EXTRA) for p in prompts]
        else:
            reqs = [engine.validate(body, OPENAI_EXTRA)]
        if "stream" in body and not isinstance(body["stream"], bool):
            raise RequestError("stream", "must be true or false")
        return engine, body, reqs

    # ------------------------------------------------------------------ routes
    @api.get("/healthz")
    async def healthz(self):
        try:
            await self._ensure_ready()
        except Exception as e:  # a bundle that does not load keeps the replica unhealthy
            return error(503, f"models not loaded: {e}")
        return {"status": "ok", "models": self._preload, "active_streams": self.active_streams}

    async def check_health(self) -> None:
        """Serve's replica health check: a replica whose models cannot load is replaced."""
        await self._ensure_ready()

    @api.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "ft-ray"}
                                           for name in list_models(self.models_dir)]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            engine, body, reqs = await self._parse(request)
        except RequestError as e:
            return error(e.status, f"{e.field}: {e.message}", e.field)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream"):
            return StreamingResponse(self._sse(engine, reqs, rid, created), media_type="text/event-stream")
        results = await self._generate_batch((engine, reqs))
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p, result in enumerate(results):
            n = len(result.choices)
            choices += [choice_json(c, p * n + j) for j, c in enumerate(result.choices)]
            prompt_tokens += result.usage.prompt_tokens
            completion_tokens += result.usage.completion_tokens
        return {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                              "total_tokens": prompt_tokens + completion_tokens}}

    async def _sse(self, engine: Engine, reqs: list[GenerationRequest], rid: str, created: int):
        """Server-sent events, one per text delta, then [DONE]. A client that disconnects stops
        the generation: Serve cancels this generator, which lets the decode step in flight finish
        (one token) and closes the engine's iterator, so no further token is computed."""
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.active_streams += 1
        try:
            for p, req in enumerate(reqs):
                events = engine.stream(req)
                try:
                    while True:
                        event = await _next_in_thread(events)
                        if event is None:
                            break
                        chunk = {"index": p * req.n + event.index, "text": event.text, "logprobs": None,
                                 "finish_reason": event.finish_reason}
                        if event.choice is not None:
                            chunk.update(choice_json(event.choice, chunk["index"]), text=event.text)
                        if event.usage is not None:
                            usage["prompt_tokens"] += event.usage.prompt_tokens
                            usage["completion_tokens"] += event.usage.completion_tokens
                        payload = {"id": rid, "object": "text_completion", "created": created,
                                   "model": engine.name, "choices": [chunk]}
                        yield f"data: {json.dumps(payload)}\n\n"
                finally:
                    events.close()
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield f"data: {json.dumps({'id': rid, 'object': 'text_completion', 'created': created, 'model': engine.name, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.active_streams -= 1

    @api.post("/generate")
    async def generate(self, request: Request):
        """Minimal form: {"model", "prompt", ...same sampling fields} -> {"text", "plan", "seed"}."""
        try:
            engine, body, reqs = await self._parse(request)
            if body.get("stream") or len(reqs) != 1 or reqs[0].n != 1:
                raise RequestError("prompt", "/generate takes one prompt, n=1 and no streaming; use /v1/completions")
        except RequestError as e:
            return error(e.status, f"{e.field}: {e.message}", e.field)
        (result,) = await self._generate_batch((engine, reqs))
        c = result.choices[0]
        return {"text": c.text, "finish_reason": c.finish_reason, "seed": c.seed,
                "plan": None if c.codes is None else {"codes": c.codes.new, "prompt_codes": c.codes.prompt}}


def app(args: dict):
    """Application builder for `serve run serve_apps.app:app models_dir=...` and config files."""
    known = {"models_dir", "preload", "max_batch_size", "batch_wait_timeout_s"}
    unknown = set(args) - known
    if unknown or "models_dir" not in args:
        raise ValueError(f"serve_apps.app: args must be {sorted(known)} with models_dir required; got {sorted(args)}")
    kwargs = dict(args)
    if isinstance(kwargs.get("preload"), str):
        kwargs["preload"] = [s for s in kwargs["preload"].split(",") if s]
    for key, cast in (("max_batch_size", int), ("batch_wait_timeout_s", float)):
        if key in kwargs:
            kwargs[key] = cast(kwargs[key])
    return FTServer.bind(**kwargs)
