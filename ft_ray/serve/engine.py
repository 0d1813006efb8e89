"""The generation engine over one loaded bundle: continuous batching of many requests.

Requests arrive at any time and share one decode loop (scheduler.py): every step admits waiting
requests, decodes one token for every running row in one forward, and retires finished rows at
once. A request gives the same output in any company, arriving at any step, as alone (up to the
float rounding of batched matmuls): each of its n rows (samples) has its own generators, plan and
cache slot (sequence.py).

Two ways in:
- async (the Serve deployment): `engine.start()` once, then `handle = engine.submit(req,
  stream=...)` inside the event loop; `await handle` -> GenerationResult, `async for ev in handle`
  -> StreamEvents; `engine.cancel(handle)` when the client goes away. A loop thread runs the steps.
- sync (in-process callers, tests): `engine.generate(requests)` and `engine.stream(request)`;
  without a loop thread they run the steps themselves, in the caller's thread.
Prompt scoring (echo + logprobs) goes in the same loop, between decode steps (prompt_scoring.py):
`engine.submit_score(req)` -> handle ending with a PromptScore; sync: `engine.score(requests)`.

Seeds, all deterministic (a request without a seed gets a fresh random one, reported back):
  sample j's seed       s_j = row_seed(seed, j)  (seed itself for j = 0)        (token generator)
  sample j's plan seed  with plan.seed p: row_seed(p, j) (p when shared);
                        without: derive_seed(s_j, "plan") (shared: that of sample 0)
and the plan's draws follow model/plan.py's one order (the prompt's Z from the encoder, then the
new Z from the prior), so `model.generate(prompt, plan=p)` gives the same codes as the engine.
Every choice reports s_j and its codes (prompt + new, and the plan seed): re-running with `seed=s_j,
n=1` and `plan={"codes": prompt + new}` (or, when the plan seed is unchanged, `{"codes": new}`)
reproduces its text exactly.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ft_ray.config import ModelConfig
from ft_ray.data.tokenizer import bos_id, eos_id, vocab_size
from ft_ray.eval.scoring import ScoreItem, prompt_item
from ft_ray.model import BaselineTransformer, FreeTransformer
from ft_ray.seeds import derive_seed, row_seed
from ft_ray.serve.handle import End, RequestHandle
from ft_ray.serve.prompt_scoring import ScoreJob
from ft_ray.serve.requests import (
    DEFAULT_PLAN_SAMPLES,
    MAX_N,
    EngineInfo,
    GenerationRequest,
    PlanSpec,
    RequestError,
    check_request,
    validate_request,
)
from ft_ray.serve.results import (  # noqa: F401 (re-exported: ft_ray.serve imports them from here)
    Choice,
    EngineStats,
    GenerationError,
    GenerationResult,
    PlanCodes,
    PromptScore,
    RequestCancelled,
    StreamEvent,
    TokenLogprob,
    Usage,
)
from ft_ray.serve.scheduler import Scheduler, SchedulerConfig
from ft_ray.serve.sequence import Sequence

log = logging.getLogger(__name__)


class Engine:
    """Generation over one model + tokenizer. The prompt is encoded without the tokenizer's own
    special tokens and prefixed with BOS (EOS when the tokenizer has no BOS); decoding skips
    special tokens. `scheduler` sets the cache slots, slot length, token budget and queue bound."""

    def __init__(self, model: BaselineTransformer, tokenizer: Tokenizer, cfg: ModelConfig, name: str,
                 scheduler: SchedulerConfig | None = None):
        if vocab_size(tokenizer) > cfg.vocab_size:
            raise ValueError(f"tokenizer has ids up to {vocab_size(tokenizer) - 1}, beyond the model's "
                             f"vocab_size={cfg.vocab_size}")
        self.model, self.tokenizer, self.cfg, self.name = model.eval(), tokenizer, cfg, name
        tokenizer.encode_special_tokens = True  # a literal "<eos>" in a prompt is text, not the token
        self.eos_id = eos_id(tokenizer)
        bos = bos_id(tokenizer)
        self.bos_id = self.eos_id if bos is None else bos
        self.is_ft = isinstance(model, FreeTransformer)  # the one place that asks
        self.device = model.embed.weight.device
        self.stats = EngineStats()
        self.metrics: dict = {}  # the bundle's metrics.json, when loaded from a bundle
        sched = scheduler or SchedulerConfig()
        slot_len = min(cfg.max_seq_len, sched.max_len or cfg.max_seq_len)
        model._rope(0, cfg.max_seq_len)  # build the RoPE tables now, not inside the first request
        self._scheduler = Scheduler(model, self.is_ft, sched, slot_len, name, self.stats)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        # what sequences call to decode: bound to the tokenizer, not to the engine, so the loop
        # thread never holds the engine (a dropped engine is finalized in its owner's thread)
        self._decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
        self._info = EngineInfo(name=name, arch=cfg.arch, vocab_size=cfg.vocab_size, max_seq_len=slot_len,
                                latent_bits=cfg.latent_bits if self.is_ft else None,
                                params=model.num_params(), max_n=min(MAX_N, sched.max_num_seqs))

    @classmethod
    def from_bundle(cls, path: str | Path, device: str | torch.device = "cpu", name: str | None = None,
                    scheduler: SchedulerConfig | None = None) -> Engine:
        """Load a bundle directory (model.safetensors, config.json, tokenizer.json, metrics.json);
        nothing is unpickled. The name defaults to the directory's name."""
        from ft_ray.bundle import load_bundle

        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{path}: bundle has no tokenizer.json; the engine needs one")
        model, cfg, metrics = load_bundle(path, device)
        engine = cls(model, Tokenizer.from_file(str(tokenizer_file)), cfg, name or path.name, scheduler)
        engine.metrics = metrics
        return engine

    def info(self) -> EngineInfo:
        return self._info

    @property
    def num_running(self) -> int:
        """Rows holding a cache slot now (for /healthz and load reports)."""
        return self._scheduler.num_running

    @property
    def num_waiting(self) -> int:
        """Requests queued for slots now."""
        return self._scheduler.num_waiting

    @property
    def kv_cache_bytes(self) -> int:
        """Memory of the preallocated cache: every slot of every layer, keys and values."""
        return sum(c.k.nbytes + c.v.nbytes for c in self._scheduler.caches)

    def encode(self, prompt: str | list[int]) -> list[int]:
        """BOS + the prompt's token ids (a prompt given as ids is checked against the vocabulary,
        and gets no second BOS when it starts with one, as lm-eval sends an empty context)."""
        if isinstance(prompt, list):
            for i, t in enumerate(prompt):
                if not 0 <= t < self.cfg.vocab_size:
                    raise RequestError(f"prompt[{i}]", f"token id {t} is outside the vocabulary "
                                                       f"[0, {self.cfg.vocab_size})")
            return list(prompt) if prompt[:1] == [self.bos_id] else [self.bos_id, *prompt]
        try:
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        except Exception as e:  # tokenizers raises a bare Exception, e.g. on a character it lacks
            missing = self._unencodable(prompt)
            if missing:
                raise RequestError("prompt", "characters the model cannot encode: "
                                             + ", ".join(repr(c) for c in missing)) from None
            raise RequestError("prompt", f"cannot be tokenised by model {self.name!r}: {e}") from None
        return [self.bos_id, *ids]

    def _unencodable(self, prompt: str, limit: int = 16) -> list[str]:
        """The prompt's distinct characters that the tokenizer fails on alone, in order (at most `limit`)."""
        missing = []
        for c in dict.fromkeys(prompt):
            try:
                self.tokenizer.encode(c, add_special_tokens=False)
            except Exception:
                missing.append(c)
                if len(missing) == limit:
                    break
        return missing

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token as OpenAI's logprobs show it (special tokens by name)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def special_token_id(self, text: str) -> int | None:
        """The id of the special token spelled `text` ("<eos>"), else None."""
        for token_id, added in self.tokenizer.get_added_tokens_decoder().items():
            if added.special and added.content == text:
                return token_id
        return None

    def validate(self, body, allowed_extra: frozenset[str] | set[str] = frozenset()) -> GenerationRequest:
        """A JSON body -> a checked request, or RequestError naming the field (see requests.py)."""
        return validate_request(body, self._info, self.encode, allowed_extra)

    # ------------------------------------------------------------------------------ async API
    def start(self) -> None:
        """Run the decode loop in a thread of its own (idempotent; `submit` from an event loop
        calls it)."""
        if self._closed:
            raise RuntimeError(f"engine {self.name!r} is closed")
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        # the thread holds the scheduler, not the engine, so a dropped engine is collected (and closed)
        self._thread = threading.Thread(target=_run_loop, args=(self._scheduler, self._stop),
                                        name=f"ft-ray-engine-{self.name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the loop thread for good (idempotent); requests still waiting or running fail
        with GenerationError. The synchronous API keeps working (it runs its own steps)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._scheduler.wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._thread = None
        self._scheduler.fail_all(GenerationError(f"model {self.name!r} was unloaded; retry", status=503))

    def __del__(self) -> None:  # Serve's multiplexer calls it when it evicts the model
        try:
            self.close()
        except Exception:  # a half-built engine, or interpreter shutdown (module globals gone)
            pass

    def submit(self, request: GenerationRequest, stream: bool = False) -> RequestHandle:
        """Queue a request; returns its handle at once. RequestError (400) for a request that can
        never run here, (503, `retry_after`) when the queue is full or the engine closed. Inside an
        event loop the handle is awaitable / async-iterable (see handle.py) and the loop thread is
        started if needed; outside one, the caller reads `handle.get` and runs `step()` itself."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self._closed:
            raise RequestError("model", f"model {self.name!r} was unloaded; retry", status=503, retry_after=1.0)
        seq = self._prepare(request)
        if loop is not None:
            self.start()
        return self._submit(seq, stream, loop, bounded=True)

    def submit_score(self, request: GenerationRequest) -> RequestHandle:
        """Queue the scoring of a request's prompt (echo + logprobs; see prompt_scoring.py); the
        handle ends with a PromptScore. Errors as `submit`."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self._closed:
            raise RequestError("model", f"model {self.name!r} was unloaded; retry", status=503, retry_after=1.0)
        job = self._prepare_score(request, RequestHandle(request, False, loop))
        if loop is not None:
            self.start()
        self._scheduler.scoring.submit(job, bounded=loop is not None)
        self._scheduler.wake.set()
        return job.handle

    def cancel(self, handle: RequestHandle) -> None:
        """Stop a request (e.g. its client disconnected); its slots are freed at the next step."""
        handle.cancel_requested = True
        self._scheduler.wake.set()

    def step(self) -> bool:
        """One scheduler iteration in the calling thread; returns whether work remains."""
        return self._scheduler.step()

    # ------------------------------------------------------------------------------ sync API
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate all requests (results in the same order); bad ones are refused before any
        compute. They join whatever else the loop is running; in-process callers are not bounded
        by the queue limit."""
        prepared = [self._prepare(req) for req in requests]
        handles = [self._submit(seq, False, None, bounded=False) for seq in prepared]
        results = []
        for handle in handles:
            result = self._wait(handle)
            assert isinstance(result, GenerationResult)  # a generation's handle (not a score's)
            results.append(result)
        return results

    def score(self, requests: list[GenerationRequest]) -> list[PromptScore]:
        """Score the prompts of `requests` (echo + logprobs), in-process; results in order."""
        handles = [self.submit_score(req) for req in requests]
        out = []
        for handle in handles:
            score = self._wait(handle)
            assert isinstance(score, PromptScore)  # a score's handle (from submit_score)
            out.append(score)
        return out

    def stream(self, request: GenerationRequest) -> Iterator[StreamEvent]:
        """Events of one request as tokens are produced. The request is checked now (a bad one
        raises here, before any event); closing the iterator cancels the generation."""
        return self._stream(self._prepare(request))

    def _stream(self, seq: Sequence) -> Iterator[StreamEvent]:
        handle = self._submit(seq, True, None, bounded=False)  # at the first next()
        try:
            for item in self._items(handle):
                if isinstance(item, End):
                    item.unwrap()  # raises the request's error, if any
                    return
                yield item
        finally:
            if not handle.done:  # closed early: stop decoding at once
                self.cancel(handle)
                if not self._threaded:
                    self._scheduler.reap(blocking=False)  # or the next step does

    @property
    def _threaded(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _wait(self, handle: RequestHandle) -> GenerationResult | PromptScore:
        """A sync handle's result (its stream events skipped), or its error raised."""
        *_, end = self._items(handle)
        assert isinstance(end, End)  # _items stops at the End
        return end.unwrap()

    def _items(self, handle: RequestHandle) -> Iterator[StreamEvent | End]:
        """A sync handle's items, up to its End. Without a loop thread, the steps run here."""
        while True:
            try:
                item = handle.get(timeout=0.1 if self._threaded else 0)
            except queue.Empty:
                if not self._threaded and not self.step() and not handle.done:
                    raise RuntimeError("the scheduler ran out of work before the request ended") from None
                continue
            yield item
            if isinstance(item, End):
                return

    # ------------------------------------------------------------------------------ internals
    def _submit(self, seq: Sequence, stream: bool, loop, bounded: bool) -> RequestHandle:
        seq.handle = RequestHandle(seq.request, stream, loop)
        self._scheduler.submit(seq, bounded)
        return seq.handle

    def _prepare(self, req: GenerationRequest) -> Sequence:
        if not isinstance(req, GenerationRequest):
            raise TypeError(f"expected a GenerationRequest, got {type(req).__name__}")
        if req.max_tokens == 0:
            raise RequestError("max_tokens", "must be >= 1 to generate (0 only scores the prompt: submit_score)")
        ids = self.encode(req.prompt)
        check_request(req, self._info, len(ids))
        seed = secrets.randbits(63) if req.seed is None else req.seed
        row_seeds = [row_seed(seed, j) for j in range(req.n)]
        plan_seeds = []
        if self.is_ft:
            plan = req.plan or PlanSpec()
            count = 1 if plan.shared else req.n
            if plan.seed is not None:
                plan_seeds = [row_seed(plan.seed, j) for j in range(count)]
            else:
                plan_seeds = [derive_seed(row_seeds[j], "plan") for j in range(count)]
        return Sequence(req, ids, seed, row_seeds, plan_seeds, self._decode, self.eos_id, self.device)


    def _prepare_score(self, req: GenerationRequest, handle: RequestHandle) -> ScoreJob:
        """The scoring job of a request's prompt: K prior plans from plan.seed, else the request's
        seed, else a fresh seed (reported back); a baseline is exact."""
        if not isinstance(req, GenerationRequest) or not req.scores_prompt:
            raise TypeError("expected a GenerationRequest with echo=True and logprobs set")
        num_top = req.logprobs
        assert num_top is not None  # scores_prompt: echo and logprobs set
        ids = self.encode(req.prompt)
        check_request(req, self._info, len(ids))
        echo_from = len(ids) - len(req.prompt) if isinstance(req.prompt, list) else 1  # 1: BOS added here
        if len(ids) < 2:  # nothing after BOS: no token to score
            return ScoreJob(ScoreItem(ids, 0), echo_from, num_top, None, handle)
        seed = num_plans = None
        if self.is_ft:
            plan = req.plan or PlanSpec()
            num_plans = plan.samples or DEFAULT_PLAN_SAMPLES
            seed = plan.seed if plan.seed is not None else req.seed
            seed = secrets.randbits(63) if seed is None else seed
        item = prompt_item(self.model, ids, num_plans or 1, 0 if seed is None else seed)
        return ScoreJob(item, echo_from, num_top, seed, handle)


def _run_loop(scheduler: Scheduler, stop: threading.Event) -> None:
    """The loop thread: step while there is work, sleep until `submit`/`cancel` wakes it."""
    with torch.inference_mode():
        while not stop.is_set():
            try:
                more = scheduler.step()
            except Exception as e:  # a bug in the loop itself: fail what runs, keep serving
                log.exception("engine step failed")
                scheduler.fail_all(GenerationError(f"engine step failed: {type(e).__name__}: {e}"))
                more = False
            if not more:
                scheduler.wake.wait()
                scheduler.wake.clear()
