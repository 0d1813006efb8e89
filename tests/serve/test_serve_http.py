"""The HTTP edge without a server: body limits, malformed JSON, OpenAI's fields and prompt forms."""

from __future__ import annotations

import asyncio
import json

import pytest

from ft_ray.serve.http import (
    MAX_BODY_BYTES,
    check_openai_fields,
    error_body,
    parse_json,
    prompts_of,
    read_body,
)
from ft_ray.serve.requests import RequestError


async def _chunks(*parts: bytes):
    for p in parts:
        yield p


def _read(parts, length=None) -> bytes:
    return asyncio.run(read_body(_chunks(*parts), length))


def test_body_is_cut_at_the_limit_while_it_is_read():
    assert _read([b"ab", b"cd"]) == b"abcd"
    consumed = []

    async def endless():
        while True:
            consumed.append(1)
            yield b"x" * 65536

    with pytest.raises(RequestError) as err:
        asyncio.run(read_body(endless(), None))
    assert err.value.status == 413 and len(consumed) == MAX_BODY_BYTES // 65536 + 1  # stopped at once
    with pytest.raises(RequestError):
        _read([b"{}"], str(MAX_BODY_BYTES + 1))  # a declared length is refused before reading


@pytest.mark.parametrize("raw, message", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"a": ' + b"7" * 5000 + b"}", "not usable JSON"),
    (b'{"\\ud800": 1}', "lone surrogate"),
    (b'{"a": ', "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"3", "must be a JSON object"),
])
def test_malformed_json_is_a_400_naming_the_body(raw, message):
    with pytest.raises(RequestError) as err:
        parse_json(raw)
    assert err.value.field == "body" and err.value.status == 400 and message in err.value.message
    json.loads(error_body(400, str(err.value), "body"))  # the error itself always encodes


def test_error_body_escapes_lone_surrogates():
    body = json.loads(error_body(400, "bad key '\ud800'", "body"))
    assert body["error"]["code"] == 400 and body["error"]["type"] == "invalid_request_error"


def test_openai_fields_at_their_defaults_only():
    check_openai_fields({"logprobs": None, "echo": False, "best_of": 1, "suffix": None, "logit_bias": {},
                         "presence_penalty": 0, "frequency_penalty": 0.0, "stream": True,
                         "stream_options": {"include_usage": True}})
    check_openai_fields({"logprobs": 2, "echo": True})  # scoring: checked with the request
    for body, field in (({"logprobs": 1, "stream": True}, "logprobs"), ({"echo": True, "stream": True}, "echo"),
                        ({"best_of": 3}, "best_of"),
                        ({"suffix": "x"}, "suffix"), ({"stream": 1}, "stream"),
                        ({"stream_options": {"include_usage": True}}, "stream_options"),
                        ({"stream": True, "stream_options": {"usage": 1}}, "stream_options")):
        with pytest.raises(RequestError) as err:
            check_openai_fields(body)
        assert err.value.field == field


def test_prompt_forms():
    assert prompts_of({"prompt": "a"}) == ["a"]
    assert prompts_of({"prompt": ["a", "b"]}) == ["a", "b"]
    assert prompts_of({"prompt": [1, 2, 3]}) == [[1, 2, 3]]
    assert prompts_of({"prompt": [[1], [2, 3]]}) == [[1], [2, 3]]
    for prompt, field in (([], "prompt"), (["a", 3.5], "prompt[1]"), ([[1], []], "prompt[1]"),
                          (["a"] * 17, "prompt"), ("\udfff", "prompt"), (None, "prompt")):
        with pytest.raises(RequestError) as err:
            prompts_of({"prompt": prompt})
        assert err.value.field == field
