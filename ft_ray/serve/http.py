"""The HTTP edge of serving: reading bodies, OpenAI's wire format in and out, JSON errors.

vLLM's split: the body is parsed here once into engine requests (`GenerationRequest`), OpenAI's
field names stay at this edge, and every refusal is a `RequestError` that names the field and
becomes OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`. Nothing here
imports Ray or FastAPI's app object, so it is tested without a server.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

from ft_ray.serve.requests import RequestError
from ft_ray.serve.results import Choice
from ft_ray.serve.text import text_offsets

MAX_BODY_BYTES = 1 << 20
MAX_PROMPTS = 16
# OpenAI fields clients send with their defaults; anything else in them is refused, not ignored
OPENAI_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "best_of": (1, None), "suffix": (None,),
    "presence_penalty": (0, None), "frequency_penalty": (0, None), "logit_bias": (None,),
}
EDGE_FIELDS = frozenset({"model", "stream", "stream_options", "user", *OPENAI_DEFAULTS})
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "request_too_large", 499: "cancelled", 500: "internal_error", 503: "overloaded"}


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """OpenAI's error shape as bytes. ASCII-escaped: a lone surrogate from a client's JSON (e.g. a
    key "\\ud800" quoted back in the message) must not make the error itself fail to encode."""
    kind = ERROR_TYPES.get(status, "invalid_request_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}},
                      ensure_ascii=True).encode()


def dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=True)


async def read_body(chunks: AsyncIterator[bytes], content_length: str | None) -> bytes:
    """The body, cut off with 413 as soon as it passes MAX_BODY_BYTES (a chunked body without
    Content-Length is never read in full first)."""
    too_large = RequestError("body", f"larger than {MAX_BODY_BYTES} bytes", status=413)
    if content_length and content_length.isdigit() and int(content_length) > MAX_BODY_BYTES:
        raise too_large
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        parts.append(chunk)
    return b"".join(parts)


def parse_json(raw: bytes) -> dict:
    """A JSON object, or RequestError(400) for anything malformed: syntax, nesting too deep for
    the parser, integers with more digits than Python converts, non-object roots."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError("body", f"not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError("body", "JSON nested too deeply") from None
    except ValueError as e:  # int() of an integer literal past sys.get_int_max_str_digits()
        raise RequestError("body", f"not usable JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    for key in body:
        _check_text(key, "body")
    return body


def _check_text(text: str, field: str) -> None:
    """Strings with lone surrogates cannot be encoded, tokenised or echoed: refuse them by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "backslashreplace")[:40]
        raise RequestError(field, f"contains a lone surrogate ({shown!r})") from None


def check_openai_fields(body: dict) -> None:
    """OpenAI fields ft-ray accepts only at their defaults (clients send them anyway)."""
    for key, allowed in OPENAI_DEFAULTS.items():
        if key in body and body[key] not in allowed and not (key == "logit_bias" and body[key] == {}):
            shown = ", ".join("null" if a is None else json.dumps(a) for a in allowed)
            raise RequestError(key, f"only {shown} is supported, got {dumps(body[key])}")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise RequestError("stream", "must be true or false")
    for key in ("logprobs", "echo"):
        if body.get("stream") and body.get(key) not in (None, False):
            raise RequestError(key, "is not supported with stream=true (send the request unstreamed)")
    options = body.get("stream_options")
    if options is not None:
        if not body.get("stream"):
            raise RequestError("stream_options", "only allowed when stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or \
                not isinstance(options.get("include_usage", False), bool):
            raise RequestError("stream_options", 'expected {"include_usage": true|false}')


def prompts_of(body: dict) -> list:
    """OpenAI's prompt forms -> a list of prompts: a string, a list of strings, a list of token
    ids (one prompt), or a list of lists of token ids."""
    if "prompt" not in body:
        raise RequestError("prompt", "is required")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        _check_text(prompt, "prompt")
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError("prompt", "must be a string, a list of strings, a list of token ids or a list of lists")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise RequestError("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}")
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            _check_text(p, f"prompt[{i}]")
        elif not (isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)):
            raise RequestError(f"prompt[{i}]", "must be a string or a non-empty list of token ids")
    return list(prompt)


def choice_json(choice, index: int) -> dict:
    out = {"index": index, "text": choice.text, "logprobs": None, "finish_reason": choice.finish_reason,
           "seed": choice.seed}
    if choice.codes is not None:
        out["plan"] = {"prompt_codes": choice.codes.prompt, "codes": choice.codes.new, "seed": choice.codes.seed}
    return out


def logprobs_json(entries: list, token_text: Callable[[int], str], offsets: list[int]) -> dict:
    """OpenAI's legacy completions `logprobs` object from TokenLogprobs: token strings, their
    logprobs (null for a first token with nothing before it), the alternatives as {token: logprob}
    (the chosen token included, so up to N+1 of them, as OpenAI returns) and character offsets."""
    tops: list[dict[str, float] | None] = []
    for e in entries:
        if e.logprob is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for token_id, lp in e.top:  # most likely first: two ids with one text keep the likelier
            top.setdefault(token_text(token_id), lp)
        tops.append(top)
    return {"tokens": [token_text(e.token_id) for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops, "text_offset": offsets}


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def retry_after_header(error: RequestError) -> dict[str, str]:
    seconds = getattr(error, "retry_after", None)
    return {} if seconds is None else {"Retry-After": str(max(1, math.ceil(seconds)))}


def completion_choices(engine, reqs: list, results: list, scores: list) -> tuple[list[dict], int, int]:
    """The `choices` of a completion and its (prompt, completion) token counts. Per prompt: its
    GenerationResult (None when max_tokens is 0) and PromptScore (None unless echo + logprobs).
    With echo the text starts with the prompt; logprobs cover the echoed prompt, then the
    generated tokens (all of them, including one that ended the text at a stop string)."""
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for p, (req, result, score) in enumerate(zip(reqs, results, scores, strict=True)):
        echo = "" if not req.echo else req.prompt if isinstance(req.prompt, str) else engine.decode(req.prompt)
        echoed = [] if score is None else score.tokens
        if result is None:  # pure scoring: one choice per sample, all the same
            prompt_tokens += len(engine.encode(req.prompt))
            samples = [Choice(j, "", [], "length", req.seed, None, []) for j in range(req.n)]
        else:
            prompt_tokens += result.usage.prompt_tokens
            completion_tokens += result.usage.completion_tokens
            samples = result.choices
        for c in samples:
            out = choice_json(c, p * req.n + c.index)
            out["text"] = echo + c.text
            if req.logprobs is not None:
                ids = [e.token_id for e in echoed]
                offsets = text_offsets(engine.decode, ids) + text_offsets(engine.decode, c.token_ids, len(echo))
                out["logprobs"] = logprobs_json([*echoed, *(c.logprobs or [])], engine.token_text, offsets)
            if score is not None and score.plan_samples is not None:
                out["score_plan"] = {"samples": score.plan_samples, "seed": score.plan_seed}
            choices.append(out)
    return choices, prompt_tokens, completion_tokens
