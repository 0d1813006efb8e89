"""Generation requests: their typed form and the validation that turns bad input into a 4xx.

Every refusal is a `RequestError` naming the offending field (`"temperature"`, `"plan.codes[3]"`),
so the HTTP layer can answer 400/413 with a message instead of failing inside the model (and
503 with `retry_after` when the engine's queue is full, see serve/scheduler.py).
Checks come in two layers:
- `GenerationRequest.__post_init__`: types and ranges that need no model (a request built in
  Python is checked exactly like one parsed from JSON);
- `check_request`: what depends on the loaded model (context length, plan codes' range and length,
  a plan on a baseline), given the prompt's token count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

MAX_N = 16  # samples per request; larger fan-outs belong in several requests
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_SEED = (1 << 63) - 1
MIN_TEMPERATURE = 1e-6  # below it (and above 0), logits / temperature can overflow: use 0 for greedy
MAX_PROMPT_CHARS_PER_TOKEN = 16  # refuse (413) prompts far too long to tokenise before tokenising
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default limit; OpenAI's legacy API allowed 5)
MAX_PLAN_SAMPLES = 64  # plans per prompt score: K forwards of the prompt, run a few per engine step
DEFAULT_PLAN_SAMPLES = 8  # K when a request scores a Free Transformer's prompt without plan.samples


class RequestError(ValueError):
    """A refused request: `field` names the offending input, `status` is the HTTP status to answer;
    `retry_after` (seconds) is set when the request was fine but the engine is full (503)."""

    def __init__(self, field: str, message: str, status: int = 400, retry_after: float | None = None):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status, self.retry_after = field, message, status, retry_after

    def to_dict(self) -> dict:
        """An OpenAI-style error body."""
        return {"error": {"message": str(self), "type": "invalid_request_error",
                          "param": self.field, "code": self.status}}


@dataclass(frozen=True)
class EngineInfo:
    """What a client (and validation) needs to know about the loaded model."""

    name: str
    arch: str  # "baseline" or "free_transformer"
    vocab_size: int
    max_seq_len: int  # prompt (with BOS) + generated tokens must fit: the model's context, or less (slots)
    latent_bits: int | None  # H for a Free Transformer, None for a baseline
    params: int
    max_n: int = MAX_N  # samples per request this engine can hold at once (its cache slots)


@dataclass
class PlanSpec:
    """The Free Transformer's plan for one request.

    seed:   seeds the generator that draws Z (the prompt's Z from the encoder, then the new Z from
            the uniform prior); None -> derived from the request seed.
    codes:  explicit codes, each in [0, 2^H): either for the new positions (length max_tokens), or
            for the whole sequence (prompt tokens incl. BOS + max_tokens, e.g. a result's
            `codes.prompt + codes.new`); the prompt's Z is still drawn when only new codes are given.
    shared: the request's n samples share one whole plan, drawn once.
    samples: K, the plans of prompt scoring (echo + logprobs): log p(prompt) is estimated as the
            log-mean-exp over K plans from the uniform prior, drawn from `seed` (or the request's
            seed), never from the encoder (it reads the tokens being scored); default
            DEFAULT_PLAN_SAMPLES. ft_ray/eval/scoring.py's estimator, the one lm-eval's `ft-ray` uses.
    """

    seed: int | None = None
    codes: list[int] | None = None
    shared: bool = False
    samples: int | None = None

    def __post_init__(self) -> None:
        _check_int(self.seed, "plan.seed", 0, MAX_SEED, optional=True)
        _check_int(self.samples, "plan.samples", 1, MAX_PLAN_SAMPLES, optional=True)
        if not isinstance(self.shared, bool):
            raise RequestError("plan.shared", f"must be a boolean, got {_type(self.shared)}")
        if self.codes is not None:
            if not isinstance(self.codes, (list, tuple)):
                raise RequestError("plan.codes", f"must be a list of integers, got {_type(self.codes)}")
            for i, c in enumerate(self.codes):
                if isinstance(c, bool) or not isinstance(c, int):
                    raise RequestError(f"plan.codes[{i}]", f"must be an integer, got {_type(c)}")
            self.codes = list(self.codes)

    @classmethod
    def parse(cls, value: Any) -> PlanSpec | None:
        if value is None or isinstance(value, PlanSpec):
            return value
        if not isinstance(value, Mapping):
            raise RequestError("plan", f"must be an object like {{\"seed\": 1}} or {{\"codes\": [...]}}, "
                                       f"got {_type(value)}")
        names = {f.name for f in fields(cls)}
        for key in value:
            if key not in names:
                raise RequestError(f"plan.{key}", f"unknown field (expected {', '.join(sorted(names))})")
        return cls(**value)


@dataclass
class GenerationRequest:
    """One completion request. The prompt is text; an empty prompt is allowed and means "start from
    BOS alone" (unconditional samples, e.g. to look at the FT's prior plans).

    temperature 0 is greedy decoding (positive values below MIN_TEMPERATURE are refused); top_k /
    top_p None disable those filters. Generation of a sample stops at EOS, when its text contains
    one of `stop` (the text is cut before it), or after `max_tokens`. `seed` None draws a fresh
    seed, reported back in the result. `n` samples per request; `plan` only for Free Transformer
    models (a dict is parsed into a `PlanSpec`).

    Scoring (OpenAI's legacy completions fields): `logprobs` N returns each generated token's
    logprob and the N most likely alternatives (of the distribution before temperature and
    filters; for an FT, given the sample's plan). `echo` puts the prompt before the completion,
    and with `logprobs` scores the prompt: each prompt token given the tokens before it (BOS
    included: only a prompt that starts with BOS itself has a first logprob of null); for an FT
    with K plans from the prior (`plan.samples`). `max_tokens` 0 is allowed with echo (pure scoring).
    """

    prompt: str | list[int]  # text, or token ids (without BOS, which the engine adds)
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    plan: PlanSpec | None = None
    logprobs: int | None = None
    echo: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.prompt, (list, tuple)):  # token ids (OpenAI's list-of-integers prompt)
            for i, t in enumerate(self.prompt):
                if isinstance(t, bool) or not isinstance(t, int):
                    raise RequestError(f"prompt[{i}]", f"must be a token id (an integer), got {_type(t)}")
            self.prompt = list(self.prompt)
        elif not isinstance(self.prompt, str):
            raise RequestError("prompt", f"must be a string or a list of token ids, got {_type(self.prompt)}")
        if not isinstance(self.echo, bool):
            raise RequestError("echo", f"must be true or false, got {_type(self.echo)}")
        _check_int(self.logprobs, "logprobs", 0, MAX_LOGPROBS, optional=True)
        _check_int(self.max_tokens, "max_tokens", 0, None)
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens", "must be >= 1 (0 only with echo: the prompt alone)")
        self.temperature = _check_float(self.temperature, "temperature")
        if self.temperature != 0 and not self.temperature >= MIN_TEMPERATURE:
            raise RequestError("temperature", f"must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, "
                                              f"got {self.temperature}")
        _check_int(self.top_k, "top_k", 1, None, optional=True)
        if self.top_p is not None:
            self.top_p = _check_float(self.top_p, "top_p")
            if not 0 < self.top_p <= 1:
                raise RequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        self.stop = _check_stop(self.stop)
        _check_int(self.seed, "seed", 0, MAX_SEED, optional=True)
        _check_int(self.n, "n", 1, MAX_N)
        self.plan = PlanSpec.parse(self.plan)
        if self.plan is not None and self.plan.samples is not None and not self.scores_prompt:
            raise RequestError("plan.samples", "sets the plans of prompt scoring: needs echo=true and logprobs")

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompt's tokens get logprobs (echo + logprobs)."""
        return self.echo and self.logprobs is not None


def check_request(req: GenerationRequest, info: EngineInfo, num_prompt_tokens: int) -> None:
    """The checks that depend on the model: `num_prompt_tokens` counts BOS + the prompt's tokens."""
    context = info.max_seq_len
    if req.max_tokens == 0:  # scoring alone: the model reads every prompt token but the last
        if num_prompt_tokens - 1 > context:
            raise RequestError("prompt", f"is {num_prompt_tokens} tokens (with BOS); scoring reads at most "
                                         f"the context of {context} tokens (+1 scored last)")
    elif num_prompt_tokens >= context:
        raise RequestError("prompt", f"is {num_prompt_tokens} tokens (with BOS); the context of "
                                     f"{context} tokens leaves no room to generate")
    if req.max_tokens and num_prompt_tokens + req.max_tokens > context:
        raise RequestError("max_tokens", f"{req.max_tokens} new tokens after a {num_prompt_tokens}-token "
                                         f"prompt exceed the context of {context} tokens (at most "
                                         f"{context - num_prompt_tokens})")
    if req.n > info.max_n:
        raise RequestError("n", f"{req.n} samples exceed the {info.max_n} that model {info.name!r} decodes "
                                f"at once (its max_num_seqs); send several requests")
    plan = req.plan
    if plan is None:
        return
    if info.latent_bits is None:
        raise RequestError("plan", f"model {info.name!r} is a baseline transformer: it has no latent plan")
    if plan.codes is not None:
        if req.max_tokens == 0:
            raise RequestError("plan.codes", "nothing is generated (max_tokens 0): prompt scoring draws "
                                             "its plans from plan.seed")
        lengths = (req.max_tokens, num_prompt_tokens + req.max_tokens)
        if len(plan.codes) not in lengths:
            raise RequestError("plan.codes", f"needs one code per new position ({lengths[0]} = max_tokens) "
                                             f"or per position ({lengths[1]} = prompt tokens + max_tokens), "
                                             f"got {len(plan.codes)}")
        top = 1 << info.latent_bits
        for i, c in enumerate(plan.codes):
            if not 0 <= c < top:
                raise RequestError(f"plan.codes[{i}]", f"must be in [0, 2^{info.latent_bits} = {top}), got {c}")


def validate_request(body: Any, info: EngineInfo, encode: Callable[[str | list[int]], list[int]],
                     allowed_extra: frozenset[str] | set[str] = frozenset()) -> GenerationRequest:
    """Parse a JSON body (already decoded) into a checked `GenerationRequest`.

    `encode` gives a prompt's token ids with BOS (`Engine.encode`). Keys in `allowed_extra` (e.g.
    "model", "stream", handled by the HTTP layer) are ignored; any other unknown key is refused.
    """
    if not isinstance(body, Mapping):
        raise RequestError("body", f"must be a JSON object, got {_type(body)}")
    names = {f.name for f in fields(GenerationRequest)}
    for key in body:
        if key not in names and key not in allowed_extra:
            raise RequestError(str(key), "unknown field")
    if "prompt" not in body:
        raise RequestError("prompt", "is required")
    kwargs = {k: v for k, v in body.items() if k in names}
    for key in ("max_tokens", "temperature", "stop", "n", "echo"):  # explicit null means "the default"
        if key in kwargs and kwargs[key] is None:
            del kwargs[key]
    req = GenerationRequest(**kwargs)
    if len(req.prompt) > MAX_PROMPT_CHARS_PER_TOKEN * info.max_seq_len:  # before paying to tokenise it
        raise RequestError("prompt", f"is {len(req.prompt)} characters or ids, far beyond the context of "
                                     f"{info.max_seq_len} tokens", status=413)
    check_request(req, info, len(encode(req.prompt)))
    return req


# ---------------------------------------------------------------------------------------- helpers
def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_int(value: Any, name: str, low: int, high: int | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):  # bool is an int in Python, not in JSON
        raise RequestError(name, f"must be an integer, got {_type(value)}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(name, f"must be {bound}, got {value}")


def _check_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(name, f"must be a number, got {_type(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float range
        value = math.inf
    if not math.isfinite(value):  # NaN and inf pass every comparison check otherwise
        raise RequestError(name, f"must be a finite number, got {value}")
    return value


def _check_stop(stop: Any) -> list[str]:
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise RequestError("stop", f"must be a string or a list of strings, got {_type(stop)}")
    if len(stop) > MAX_STOPS:
        raise RequestError("stop", f"at most {MAX_STOPS} stop strings, got {len(stop)}")
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise RequestError(f"stop[{i}]", f"must be a string, got {_type(s)}")
        if not s or len(s) > MAX_STOP_CHARS:
            raise RequestError(f"stop[{i}]", f"must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}")
    return list(stop)
