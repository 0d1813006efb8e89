"""Ray Serve app: plan-conditioned generation over HTTP, OpenAI-compatible completions.

    serve run serve_apps.app:app models_dir=/path/to/models        # or: serve deploy serve_apps/config.yaml
    ft-ray serve --models DIR [--port 8000]

Routes: POST /v1/completions (OpenAI completions + a `plan` extension; `logprobs` and `echo` score
prompts, for a Free Transformer with ft_ray/eval/scoring.py's estimator), GET /v1/models and
/v1/models/{id}, POST /generate (minimal form), POST /tokenize, POST /detokenize, GET
/tokenizer_info (vLLM's shapes, what lm-eval's remote tokenizer reads: tokenizer_api.py), GET
/healthz (200 once a model is loaded; names the bundles that failed), GET /metrics (Prometheus text).

A model is a bundle directory `models_dir/<name>/` (model.safetensors, config.json,
tokenizer.json, metrics.json), copied or linked; a request names it by `model` and never carries
a path. Several bundles share a replica through `@serve.multiplexed`. Each loaded model has one
`Engine`, whose decode loop batches continuously: a request joins the running batch at the next
step and leaves it when its own rows finish, streamed or not; its output equals its output alone.
A bad request fails alone. Errors are OpenAI's JSON shape {"error": {"message", "type", "param",
"code"}} on every route: 400 (bad field), 401 (API key), 404, 405, 413 (body too large), 500,
503 (engine queue full, with Retry-After).
"""


import asyncio  # noqa: I001 (no __future__ annotations here: FastAPI must see the real Request type)
import importlib
import logging
import os
import re
import time
import uuid
import weakref
from pathlib import Path
from typing import cast

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve import Deployment
from starlette.exceptions import HTTPException as StarletteHTTPException

from ft_ray.serve.engine import Engine
from ft_ray.serve.http import (
    EDGE_FIELDS,
    check_openai_fields,
    choice_json,
    completion_choices,
    dumps,
    error_body,
    parse_json,
    prompts_of,
    read_body,
    retry_after_header,
    usage_json,
)
from ft_ray.serve.metrics import CONTENT_TYPE, ServingMetrics
from ft_ray.serve.requests import GenerationRequest, RequestError
from ft_ray.serve.results import GenerationError, RequestCancelled
from ft_ray.serve.scheduler import SchedulerConfig
from ft_ray.serve.tokenizer_api import check_fields, detokenize, tokenize, tokenizer_info

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
API_KEY_ENV = "FT_RAY_API_KEY"
OPEN_ROUTES = ("/healthz",)
log = logging.getLogger("ft_ray.serve")

api = FastAPI(title="ft-ray", description=__doc__)
_replica: dict = {}  # this replica process's API key and metrics (set by FTServer.__init__)


def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> Response:
    return Response(error_body(status, message, param), status, headers=headers, media_type="application/json")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's own 404/405 ({"detail": ...}) in OpenAI's shape."""
    return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return error(500, f"internal error: {type(exc).__name__}")


class AuthAndCount:
    """Bearer-token check on every route but /healthz (when a key is set), and requests counted by
    route and status for /metrics. A plain ASGI middleware: Starlette's `BaseHTTPMiddleware`
    (`@app.middleware("http")`) passes every chunk of a streamed body through a memory stream
    and a task switch of its own."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        path, key = request.url.path, _replica.get("api_key")  # the path includes the app's route prefix
        status = 500  # an exception the app raises is answered 500 by Starlette's outermost handler

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if key and not path.endswith(OPEN_ROUTES) and request.headers.get("authorization") != f"Bearer {key}":
                await error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")(
                    scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            metrics = _replica.get("metrics")
            if metrics is not None:
                metrics.requests.labels(path, str(status)).inc()


api.add_middleware(AuthAndCount)


def model_path(models_dir: Path, name) -> Path:
    """The bundle directory of a model name. Names are plain (no separators), so no request
    leaves models_dir; the entry itself may be a symlink to a bundle elsewhere."""
    if not isinstance(name, str) or not MODEL_NAME.match(name) or name in (".", ".."):
        raise RequestError("model", "must be the name of a served model (letters, digits, '.', '_', '-'), "
                                    f"not a path: {name!r}")
    path = models_dir / name
    if not (path / "config.json").is_file():
        raise RequestError("model", f"unknown model {name!r}; GET /v1/models lists them", status=404)
    return path


def list_models(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir()
                  if MODEL_NAME.match(p.name) and (p / "config.json").is_file() and (p / "model.safetensors").is_file())


def model_card(models_dir: Path, name: str) -> dict:
    return {"id": name, "object": "model", "created": int((models_dir / name / "config.json").stat().st_mtime),
            "owned_by": "ft-ray"}


@serve.deployment(max_ongoing_requests=128, max_queued_requests=64, graceful_shutdown_timeout_s=30,
                  ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class FTServer:
    def __init__(self, models_dir: str, preload: list[str] | None = None, max_num_seqs: int = 16,
                 max_num_batched_tokens: int | None = None, max_waiting: int = 64, api_key: str | None = None,
                 loader=Engine.from_bundle, stream_interval: int = 1):
        self.models_dir = Path(models_dir).absolute()
        if not self.models_dir.is_dir():
            raise FileNotFoundError(f"models_dir {self.models_dir} is not a directory")
        self.loader = loader
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.stream_interval = stream_interval  # events per SSE write after the first (vLLM's name)
        self.scheduler = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                         max_waiting=max_waiting)
        self.metrics = ServingMetrics()
        # Serve ships this class by value (its globals are a copy) while the middleware is imported
        # by name: the state they share lives in the imported module
        importlib.import_module(__name__)._replica.update(
            api_key=api_key or os.environ.get(API_KEY_ENV) or None, metrics=self.metrics)
        self.engines: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # loaded now, for /metrics
        self.failed: dict[str, str] = {}  # bundles that did not load, and why
        self.ready = False
        self.active_streams = 0  # streamed generations in progress (GET /healthz reports it)
        self._shared_tokenizer: dict = {}  # whether the served bundles share one tokenizer.json
        self._preload = preload if preload is not None else list_models(self.models_dir)[:4]

    async def _ensure_ready(self) -> None:
        """Load the preloaded bundles once; one that fails is reported by name, the others serve."""
        if self.ready:
            return
        for name in self._preload:
            try:
                await self.engine(name)
            except RequestError:
                raise
            except Exception as e:
                self.failed[name] = f"{type(e).__name__}: {e}"
                log.error("model %r failed to load: %s", name, self.failed[name])
        self.ready = True

    @serve.multiplexed(max_num_models_per_replica=4)
    async def _load(self, name: str) -> Engine:
        engine = await asyncio.to_thread(self.loader, model_path(self.models_dir, name), name=name,
                                         scheduler=self.scheduler)
        self.engines[name] = engine
        self.failed.pop(name, None)
        return engine

    async def engine(self, name) -> Engine:
        model_path(self.models_dir, name)  # refuse bad names before the multiplexer sees them
        if name in self.failed:
            raise RequestError("model", f"model {name!r} failed to load ({self.failed[name]})", status=503)
        return await self._load(name)

    # ------------------------------------------------------------------ request parsing
    async def _parse(self, request: Request) -> tuple[Engine, dict, list[GenerationRequest]]:
        body = parse_json(await read_body(request.stream(), request.headers.get("content-length")))
        if "model" not in body:
            raise RequestError("model", "is required")
        check_openai_fields(body)
        prompts = prompts_of(body)
        engine = await self.engine(body["model"])
        fields = {k: v for k, v in body.items() if k != "prompt"}
        return engine, body, [engine.validate({**fields, "prompt": p}, EDGE_FIELDS) for p in prompts]

    # ------------------------------------------------------------------ routes
    @api.get("/healthz")
    async def healthz(self):
        await self._ensure_ready()
        loaded = [n for n in self._preload if n not in self.failed]
        body = {"status": "ok" if not self.failed else "degraded", "models": loaded, "failed": self.failed,
                "active_streams": self.active_streams}
        if self._preload and not loaded:
            return Response(dumps({**body, "status": "unavailable"}), 503, media_type="application/json")
        return body

    async def check_health(self) -> None:
        """Serve's replica health check: a replica that cannot load any of its models is replaced."""
        await self._ensure_ready()
        if self._preload and all(n in self.failed for n in self._preload):
            raise RuntimeError(f"no model loaded: {self.failed}")

    @api.get("/metrics")
    async def metrics_text(self):
        return Response(self.metrics.render(dict(self.engines)), media_type=CONTENT_TYPE)

    @api.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [model_card(self.models_dir, n) for n in list_models(self.models_dir)]}

    @api.get("/v1/models/{name}")
    async def model(self, name: str):
        if name not in list_models(self.models_dir):
            return error(404, f"unknown model {name!r}; GET /v1/models lists them", "model")
        return model_card(self.models_dir, name)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            engine, body, reqs = await self._parse(request)
            rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                handles = self._submit(engine, reqs, stream=True)
                return StreamingResponse(self._sse(engine, reqs, handles, rid, created, include_usage),
                                         media_type="text/event-stream")
            results, scores = await self._complete(engine, reqs)
            choices, prompt_tokens, completion_tokens = completion_choices(engine, reqs, results, scores)
        except RequestError as e:
            return error(e.status, f"{e.field}: {e.message}", e.field, retry_after_header(e))
        except GenerationError as e:
            return error(e.status, e.message)
        return Response(dumps({"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                               "choices": choices, "usage": usage_json(prompt_tokens, completion_tokens)}),
                        media_type="application/json")

    def _submit(self, engine: Engine, reqs: list[GenerationRequest], stream: bool) -> list:
        """Every prompt into the engine's queue at once (they decode together); all or none."""
        handles = []
        try:
            for req in reqs:
                handles.append(engine.submit(req, stream=stream))
        except BaseException:
            for h in handles:
                engine.cancel(h)
            raise
        return handles

    async def _complete(self, engine: Engine, reqs: list[GenerationRequest]) -> tuple[list, list]:
        """Per prompt, its generation (None with max_tokens 0) and its prompt score (None unless
        echo + logprobs): both queued at once, the scoring between decode steps."""
        t0 = time.perf_counter()
        todo = [r for r in reqs if r.max_tokens > 0]
        handles = self._submit(engine, todo, stream=False)
        scoring = []
        try:
            for req in reqs:
                scoring.append(engine.submit_score(req) if req.scores_prompt else None)
            done = iter(await asyncio.gather(*handles))
            scores = await asyncio.gather(*(asyncio.sleep(0) if h is None else h for h in scoring))
        finally:  # a failed prompt or a gone client: the others stop too
            for h in [*handles, *scoring]:
                if h is not None and not h.done:
                    engine.cancel(h)
        results = [next(done) if r.max_tokens > 0 else None for r in reqs]
        tokens = sum(r.usage.completion_tokens for r in results if r is not None)
        self.metrics.request_done(engine.name, time.perf_counter() - t0, tokens)
        return results, list(scores)

    async def _generate(self, engine: Engine, reqs: list[GenerationRequest]) -> list:
        t0 = time.perf_counter()
        handles = self._submit(engine, reqs, stream=False)
        try:
            results = await asyncio.gather(*handles)
        finally:  # a failed prompt or a gone client: the others stop too
            for h in handles:
                if not h.done:
                    engine.cancel(h)
        tokens = sum(r.usage.completion_tokens for r in results)
        self.metrics.request_done(engine.name, time.perf_counter() - t0, tokens)
        return results

    async def _sse(self, engine: Engine, reqs, handles, rid: str, created: int, include_usage: bool):
        """Server-sent events, one per text delta, then (when asked) a usage chunk and [DONE]. A
        failed generation ends with an error event and [DONE]. A client that disconnects cancels
        the generator: its requests leave the batch at the next decode step."""
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        head = {"id": rid, "object": "text_completion", "created": created, "model": engine.name}  # in every chunk
        self.active_streams += 1
        t0, first = time.perf_counter(), None
        try:
            for p, (req, handle) in enumerate(zip(reqs, handles, strict=True)):
                async for events in handle.event_batches(self.stream_interval):  # one write per batch
                    first = first if first is not None else time.perf_counter() - t0
                    messages = []
                    for event in events:
                        chunk = {"index": p * req.n + event.index, "text": event.text, "logprobs": None,
                                 "finish_reason": event.finish_reason}
                        if event.choice is not None:
                            chunk.update(choice_json(event.choice, chunk["index"]), text=event.text)
                        if event.usage is not None:
                            usage["prompt_tokens"] += event.usage.prompt_tokens
                            usage["completion_tokens"] += event.usage.completion_tokens
                        messages.append(f"data: {dumps({**head, 'choices': [chunk]})}\n\n")
                    yield "".join(messages)
            if include_usage:
                yield f"data: {dumps({**head, 'choices': [], 'usage': usage_json(**usage)})}\n\n"
            self.metrics.request_done(engine.name, time.perf_counter() - t0, usage["completion_tokens"], first)
            yield "data: [DONE]\n\n"
        except RequestCancelled:
            raise
        except GenerationError as e:
            yield f"data: {error_body(e.status, e.message).decode()}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.active_streams -= 1
            for h in handles:
                if not h.done:
                    engine.cancel(h)

    @api.post("/generate")
    async def generate(self, request: Request):
        """Minimal form: {"model", "prompt", ...same sampling fields} -> {"text", "plan", "seed"}."""
        try:
            engine, body, reqs = await self._parse(request)
            if body.get("stream") or len(reqs) != 1 or reqs[0].n != 1 or reqs[0].echo or reqs[0].logprobs is not None:
                raise RequestError("prompt", "/generate takes one prompt, n=1, no streaming, echo or logprobs; "
                                             "use /v1/completions")
            (result,) = await self._generate(engine, reqs)
        except RequestError as e:
            return error(e.status, f"{e.field}: {e.message}", e.field, retry_after_header(e))
        except GenerationError as e:
            return error(e.status, e.message)
        c = result.choices[0]
        return Response(dumps({"text": c.text, "finish_reason": c.finish_reason, "seed": c.seed,
                               "plan": None if c.codes is None else {"codes": c.codes.new,
                                                                     "prompt_codes": c.codes.prompt}}),
                        media_type="application/json")

    # ------------------------------------------------------------------ tokenizer (tokenizer_api.py)
    async def _tokenizer_engine(self, name) -> Engine:
        """The named model's engine; without a name, any served model's when they all share one
        tokenizer (lm-eval's remote tokenizer never names the model)."""
        if name is not None:
            return await self.engine(name)
        await self._ensure_ready()
        names = [n for n in list_models(self.models_dir) if n not in self.failed]
        if not names:
            raise RequestError("model", "no model is being served", status=404)
        if self._shared_tokenizer.get("names") != names:  # read the files once per set of bundles
            files = {(self.models_dir / n / "tokenizer.json").read_bytes() for n in names}
            self._shared_tokenizer = {"names": names, "shared": len(files) == 1}
        if not self._shared_tokenizer["shared"]:
            raise RequestError("model", f"is required: the served models ({', '.join(names)}) have "
                                        "different tokenizers")
        return await self.engine(names[0])

    async def _tokenizer_call(self, request: Request, route: str):
        try:
            body = parse_json(await read_body(request.stream(), request.headers.get("content-length")))
            check_fields(route, body)
            engine = await self._tokenizer_engine(body.get("model"))
            out = (tokenize if route == "/tokenize" else detokenize)(engine, body)
        except RequestError as e:
            return error(e.status, f"{e.field}: {e.message}", e.field)
        return Response(dumps(out), media_type="application/json")

    @api.post("/tokenize")
    async def tokenize_route(self, request: Request):
        return await self._tokenizer_call(request, "/tokenize")

    @api.post("/detokenize")
    async def detokenize_route(self, request: Request):
        return await self._tokenizer_call(request, "/detokenize")

    @api.get("/tokenizer_info")
    async def tokenizer_info_route(self, model: str | None = None):
        try:
            engine = await self._tokenizer_engine(model)
        except RequestError as e:
            return error(e.status, f"{e.field}: {e.message}", e.field)
        return tokenizer_info(engine)


APP_ARGS = {"models_dir": str, "preload": list, "max_num_seqs": int, "max_num_batched_tokens": int,
            "max_waiting": int, "api_key": str, "stream_interval": int}


def app(args: dict):
    """Application builder for `serve run serve_apps.app:app models_dir=...` and config files."""
    unknown = set(args) - set(APP_ARGS)
    if unknown or "models_dir" not in args:
        raise ValueError(f"serve_apps.app: args must be {sorted(APP_ARGS)} with models_dir required; "
                         f"got {sorted(args)}")
    kwargs = dict(args)
    if isinstance(kwargs.get("preload"), str):
        kwargs["preload"] = [s for s in kwargs["preload"].split(",") if s]
    for key in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "stream_interval"):
        if key in kwargs:
            kwargs[key] = int(kwargs[key])
    # a Deployment at run time (@serve.deployment), but mypy ignores class decorators
    return cast(Deployment, FTServer).bind(**kwargs)
