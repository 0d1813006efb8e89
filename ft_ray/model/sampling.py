"""Next-token sampling: temperature (0 = greedy), top-k, top-p (nucleus), per row.

`sample_rows` samples a batch whose rows have their own settings and their own uniform draw u
(one per sampled row, from the row's own generator), by inverse CDF: the token whose cumulative
probability interval holds u. Every operation is row-wise, so a row's token does not depend on
its batch-mates: the serving engine samples all its rows at once and still matches each request
run alone, and `model.generate` (`sample_next`: one setting, one generator) draws the same tokens.

Valid settings never produce NaN. Each row's maximum is subtracted before dividing by the
temperature, so (logits - max) / T <= 0 with the top token at exactly 0: a tiny temperature or
huge logits cannot overflow (logits / 1e-6 alone reaches inf in float32), and the softmax's sum
is >= 1. Top-p always keeps the most likely token, however small p (1e-300 is 0 in float32). A
row with +inf logits picks among its +inf tokens. Only a row without any valid token (NaN, or all
-inf) is reported bad, for the caller to fail that row alone.
"""

from __future__ import annotations

import math
import typing

import torch

BAD_ROW = "the logits have no valid token (NaN, or every logit -inf)"


def _normalised(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (B, V), float32 or wider, with each row's maximum at 0 (a row with +inf logits keeps
    only those, tied at 0), and the rows without a valid token (B,) bool, or None if there are none."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    top = logits.amax(-1, keepdim=True)  # (B, 1); NaN when the row has one
    if math.isfinite(top.sum().item()):  # the common path: one sync (NaN and inf propagate)
        return logits - top, None
    bad = (torch.isnan(top) | (top == float("-inf")))[:, 0]  # (B,)
    plus_inf = top == float("inf")  # +inf - +inf would be NaN: keep the +inf tokens, tied
    logits = torch.where(plus_inf, torch.where(logits == float("inf"), 0.0, float("-inf")), logits)
    logits = torch.where(bad[:, None], 0.0, logits)  # any finite values: the caller drops these rows
    top = torch.where(plus_inf | bad[:, None], 0.0, top)
    return logits - top, (bad if bad.any() else None)


def _filter_rows(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits (B, V) outside each row's top-k (0: off) and top-p nucleus (>= 1: off) with -inf.
    The most likely token always stays."""
    V = logits.shape[-1]
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=True, stable=True)  # ties: lower id first
    ranks = torch.arange(V, device=logits.device)
    keep = (top_k[:, None] <= 0) | (ranks < top_k[:, None])  # (B, V)
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above
    keep &= (top_p[:, None] >= 1) | (before < top_p[:, None])
    keep[:, 0] = True  # top_p may round to 0 (1e-300 in float32)
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits.masked_fill(~keep, float("-inf")))


def _inverse_cdf(scaled: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the token whose cumulative-probability interval holds u: scaled logits (B, V),
    u (B,) float64 in [0, 1) -> (B,) int64."""
    cdf = torch.softmax(scaled, dim=-1).double().cumsum(-1)  # (B, V); the top token's term is 1
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # first cdf > u * total
    return drawn.clamp_(max=scaled.shape[-1] - 1)  # u * total rounding up to total: p ~ 2^-53


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor | float, top_k: torch.Tensor | int,
                top_p: torch.Tensor | float, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (B, V); per row temperature (0: greedy), top_k (0: off) and top_p (1: off), each a
    (B,) tensor or one number for every row (fewer ops); u (B,) float64 in [0, 1) (unused by
    greedy rows). Returns tokens (B,) int64 and the bad rows (B,) bool, or None when every row
    had a valid token."""
    logits, bad = _normalised(logits)  # (B, V), max 0
    if not isinstance(temperature, torch.Tensor):  # one setting: the same arithmetic, fewer ops
        if temperature <= 0:
            return logits.argmax(-1), bad
        k, p = typing.cast(int, top_k), typing.cast(float, top_p)  # one number each, as temperature
        return _inverse_cdf(filter_logits(logits / temperature, k, p), u), bad
    greedy = temperature <= 0
    if bool(greedy.all()):
        return logits.argmax(-1), bad
    scaled = logits / torch.where(greedy, 1.0, temperature).to(logits.dtype)[:, None]
    top_k, top_p = typing.cast(torch.Tensor, top_k), typing.cast(torch.Tensor, top_p)  # (B,) each, as temperature
    if bool(((top_k > 0) | (top_p < 1)).any()):
        scaled = _filter_rows(scaled, top_k, top_p)
    return torch.where(greedy, logits.argmax(-1), _inverse_cdf(scaled, u)), bad


def draw_uniform(generator: torch.Generator | None, count: int = 1, device="cpu") -> torch.Tensor:
    """(count,) float64 in [0, 1): a sampled row's draw from its generator."""
    return torch.rand(count, generator=generator, dtype=torch.float64, device=device)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask logits (B, V) outside the top-k and the top-p nucleus with -inf (one setting for all rows)."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    if not ((top_k is not None and 0 < top_k < logits.shape[-1]) or (top_p is not None and top_p < 1.0)):
        return logits  # nothing to filter (top_k 0 or >= V, top_p None or 1)
    B = logits.shape[0]
    k = torch.full((B,), top_k or 0, dtype=torch.int64, device=logits.device)
    p = torch.full((B,), 1.0 if top_p is None else top_p, dtype=torch.float64, device=logits.device)
    return _filter_rows(logits, k, p)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,) int64, one setting and one generator for every row (rows
    draw from it in order; greedy draws nothing). ValueError when a row has no valid token."""
    B, device = logits.shape[0], logits.device
    u = draw_uniform(generator, B, device) if temperature > 0 else None
    tokens, bad = sample_rows(logits, float(temperature), top_k or 0, 1.0 if top_p is None else top_p,
                              u)  # type: ignore[arg-type]  # None only for greedy, which draws nothing
    if bad is not None:
        raise ValueError(BAD_ROW)
    return tokens
