"""What the engine hands back: results, stream events, usage, counters, and the errors of a
request that was accepted but did not complete."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PlanCodes:
    """The Free Transformer codes a sample used: one per prompt position (BOS included) and one per
    new position (all max_tokens of them, even when the sample stopped early)."""

    prompt: list[int]
    new: list[int]
    seed: int  # the plan generator's seed (it drew the prompt's Z, and the new Z unless given)


@dataclass
class TokenLogprob:
    """A token's logprob and the most likely alternatives at its position, as (token id, logprob),
    most likely first. A prompt token with nothing before it has logprob None."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass
class PromptScore:
    """A prompt scored token by token (echo + logprobs): `tokens` are the prompt's tokens as the
    client gave them (without the BOS the engine adds), each scored given everything before it.
    For a Free Transformer, the log-mean-exp over `plan_samples` prior plans from `plan_seed`."""

    tokens: list[TokenLogprob]
    plan_samples: int | None = None  # K; None for a baseline (exact)
    plan_seed: int | None = None

    @property
    def logprob(self) -> float:
        """log p(prompt tokens after the first | the first), or | BOS when the engine added it."""
        return sum(t.logprob for t in self.tokens if t.logprob is not None)


@dataclass
class Choice:
    """One sample. `token_ids` are all generated tokens, EOS included when it ended the sample;
    `text` is their decoding without special tokens, cut before a stop string."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    seed: int  # this sample's seed: with n=1 and the same plan it reproduces the sample
    codes: PlanCodes | None  # None for a baseline model
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked


@dataclass
class Usage:
    prompt_tokens: int  # BOS + the prompt's tokens, counted once per request
    completion_tokens: int  # generated tokens over all n samples

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationResult:
    model: str
    choices: list[Choice]
    usage: Usage


@dataclass
class StreamEvent:
    """A text delta of choice `index`. The last event of a choice has its finish_reason and the
    whole `choice`; the last event of the stream also carries `usage`."""

    index: int
    text: str
    finish_reason: str | None = None
    choice: Choice | None = None
    usage: Usage | None = None


@dataclass
class EngineStats:
    """Counters since the engine started (for benchmarks and tests)."""

    steps: int = 0  # scheduler iterations (admit + prefill, decode, score, retire)
    prefill_tokens: int = 0  # prompt tokens run through the model (a shared prefill counts once)
    decode_steps: int = 0  # batched forward passes of one token per running row
    generated_tokens: int = 0
    scored_tokens: int = 0  # prompt tokens run through the model for scoring (K per token for an FT)
    failed_requests: int = 0  # accepted requests that ended with a GenerationError


class GenerationError(RuntimeError):
    """An accepted request that failed while generating (its sampling, its text, its forward).
    It fails alone: the other requests in the batch go on. `status` is the HTTP status to answer."""

    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status  # e.g. 503: the model was unloaded while the request ran

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": "server_error", "param": None, "code": self.status}}


class RequestCancelled(GenerationError):
    """The request was cancelled (`Engine.cancel`, a closed stream) before it finished."""

    status = 499  # nginx's "client closed request": nobody is waiting for the answer
