"""The tokenizer routes, in the shapes vLLM serves and lm-eval's `tokenizer_backend=remote` reads.

    POST /tokenize      {"prompt": str, "add_special_tokens": bool = true, "model"?}
                        -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize    {"tokens": [int], "model"?} -> {"prompt": str}
    GET  /tokenizer_info[?model=NAME] -> {"tokenizer_class", "bos_token", "eos_token", "pad_token",
                        "unk_token", "chat_template", "model_max_length", "vocab_size"}

`add_special_tokens` puts BOS first, as the model reads a prompt. Special-token text inside a
prompt is plain text, as in /v1/completions; only a prompt that is exactly one special token's
text ("<eos>") gives that token's id: lm-eval looks up the BOS/EOS ids that way. `model` may be
left out when the served bundles share one tokenizer (lm-eval never sends it).
"""

from __future__ import annotations

from typing import Any

from ft_ray.data.tokenizer import BOS_NAMES, EOS_NAMES, PAD_NAMES
from ft_ray.serve.requests import RequestError

TOKENIZER_FIELDS = {"/tokenize": {"model", "prompt", "add_special_tokens"}, "/detokenize": {"model", "tokens"}}


def check_fields(route: str, body: dict) -> None:
    for key in body:
        if key not in TOKENIZER_FIELDS[route]:
            raise RequestError(str(key), f"unknown field (expected {', '.join(sorted(TOKENIZER_FIELDS[route]))})")


def tokenize(engine, body: dict[str, Any]) -> dict:
    prompt, special = body.get("prompt"), body.get("add_special_tokens", True)
    if not isinstance(prompt, str):
        raise RequestError("prompt", f"must be a string, got {type(prompt).__name__}")
    if not isinstance(special, bool):
        raise RequestError("add_special_tokens", "must be true or false")
    token_id = engine.special_token_id(prompt)
    ids = engine.encode(prompt) if token_id is None else [engine.bos_id, token_id]
    ids = ids if special else ids[1:]
    return {"count": len(ids), "max_model_len": engine.info().max_seq_len, "tokens": ids,
            "token_strs": [engine.token_text(i) for i in ids]}


def detokenize(engine, body: dict[str, Any]) -> dict:
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise RequestError("tokens", "must be a list of token ids")
    vocab = engine.info().vocab_size
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise RequestError(f"tokens[{i}]", f"must be a token id in [0, {vocab}), got {t!r}")
    return {"prompt": engine.decode(tokens)}


def tokenizer_info(engine) -> dict:
    def named(names: tuple[str, ...]) -> str | None:
        return next((n for n in names if engine.special_token_id(n) is not None), None)

    return {"tokenizer_class": "tokenizers.Tokenizer", "bos_token": named(BOS_NAMES), "eos_token": named(EOS_NAMES),
            "pad_token": named(PAD_NAMES), "unk_token": None, "chat_template": None,
            "model_max_length": engine.info().max_seq_len, "vocab_size": engine.info().vocab_size}
