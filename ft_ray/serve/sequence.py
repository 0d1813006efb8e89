"""One request inside the engine: its rows (samples), how they are prefilled, and their plan.

A row owns everything that makes its output its own, so a request gives the same output in any
batch, arriving at any step, as alone (up to the float rounding of batched matmuls):
- a token generator seeded from (request seed, sample index), and its temperature/top_k/top_p;
- for a Free Transformer, its plan: a `Plan` (model/plan.py, the one draw order shared with
  `model.generate`) from the plan generator of its prefill unit;
- its own KV-cache slot, where its positions are its own.
Rows that share everything up to their first token (a baseline's n samples, a shared plan) form one
prefill unit: prefilled once, the cache copied to the other slots. Otherwise each row is a unit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from ft_ray.model.plan import Plan, seeded_generators
from ft_ray.model.sampling import BAD_ROW, draw_uniform, sample_rows
from ft_ray.serve.handle import RequestHandle
from ft_ray.serve.requests import GenerationRequest
from ft_ray.serve.results import (
    Choice,
    GenerationResult,
    PlanCodes,
    StreamEvent,
    TokenLogprob,
    Usage,
)
from ft_ray.serve.text import IncrementalDecoder, find_stop, streamable_length


class Row:
    """One sample being generated: its generator, settings, tokens, text and cache slot."""

    def __init__(self, seq: Sequence, index: int, seed: int, device: torch.device):
        self.seq, self.index, self.seed = seq, index, seed
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.token_ids: list[int] = []
        self.text = ""  # its tokens' text (decoded a window at a time while it grows)
        self._decoder = IncrementalDecoder(seq.decode)
        self.sent = 0  # characters of `text` already streamed
        self.finish_reason: str | None = None
        self.codes: PlanCodes | None = None
        self.slot: int | None = None  # its KV-cache slot while it holds one
        self.prefilled = False
        self.logprobs: list[TokenLogprob] | None = [] if seq.request.logprobs is not None else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def live_slot(self) -> int:
        """Its cache slot, for a row that must hold one (it is being prefilled or decoded)."""
        assert self.slot is not None, f"row {self.index} holds no cache slot"
        return self.slot

    @property
    def position(self) -> int:
        """Position of its last token: the one the next decode step feeds."""
        return len(self.seq.prompt_ids) + len(self.token_ids) - 1

    def draw(self) -> torch.Tensor:
        """(1,) float64: the uniform draw for its next token, from its own generator (greedy: 0,
        drawing nothing)."""
        if self.seq.request.temperature > 0:
            return draw_uniform(self.generator)
        return torch.zeros(1, dtype=torch.float64)

    def settings(self) -> tuple[float, int, float]:
        """(temperature, top_k, top_p) as `sample_rows` takes them: 0 = off for top_k, 1 for top_p."""
        req = self.seq.request
        return req.temperature, req.top_k or 0, 1.0 if req.top_p is None else req.top_p

    def sample(self, logits: torch.Tensor, u: torch.Tensor) -> int:
        """logits (V,), its draw `u` (1,) -> its next token, alone (the scheduler samples rows in a
        batch; this is the fallback, with the same numbers). ValueError without a valid token."""
        tokens, bad = sample_rows(logits[None], *self.settings(), u)
        if bad is not None:
            raise ValueError(BAD_ROW)
        return int(tokens[0])

    def push(self, token: int, logprob: TokenLogprob | None = None) -> str:
        """Append a generated token (and its logprob, when asked); return the text delta that is
        now safe to stream."""
        req = self.seq.request
        self.token_ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        whole: list[int] | None = None  # set at the end, or when a stop string shows
        reason: str | None = None
        if token == self.seq.eos:
            reason, whole = "stop", self.token_ids[:-1]
        elif len(self.token_ids) >= req.max_tokens:
            reason, whole = "length", self.token_ids
        else:
            # the text so far held no stop string: a new one must end in what this token adds
            start = max(0, len(self.text) - max(map(len, req.stop), default=1) + 1)
            self.text = self._decoder.extend(self.token_ids)
            if find_stop(self.text, req.stop, start) is not None:
                whole = self.token_ids
        if whole is not None:  # decode the whole list once, as it ends: an incomplete last character shows
            text = self.seq.decode(whole)
            cut = find_stop(text, req.stop)
            if cut is not None:
                self.text, reason = text[:cut], "stop"
            elif reason is not None:
                self.text = text
        self.finish_reason = reason
        end = len(self.text) if self.finished else streamable_length(self.text, req.stop)
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta

    def choice(self) -> Choice:
        assert self.finish_reason is not None  # a choice is reported once its row has finished
        return Choice(self.index, self.text, list(self.token_ids), self.finish_reason, self.seed, self.codes,
                      None if self.logprobs is None else list(self.logprobs))


class Sequence:
    """A checked request: prompt ids, seed, rows, prefill units and (FT) one plan seed per unit."""

    handle: RequestHandle  # set by Engine._submit, before the scheduler ever sees the sequence

    def __init__(self, request: GenerationRequest, prompt_ids: list[int], seed: int, row_seeds: list[int],
                 plan_seeds: list[int], decode: Callable[[list[int]], str], eos: int, device: torch.device):
        self.request, self.prompt_ids, self.seed = request, prompt_ids, seed
        self.decode, self.eos, self.device = decode, eos, device
        self.rows = [Row(self, j, s, device) for j, s in enumerate(row_seeds)]
        self.plan_seeds = plan_seeds  # FT: one per unit; a baseline: none
        shared = len(plan_seeds) <= 1  # a baseline, a shared plan, or n = 1
        self.units = [self.rows] if shared else [[row] for row in self.rows]
        self.pending = deque(range(len(self.units)))  # units not prefilled yet
        self.ended = False

    @property
    def done(self) -> bool:
        return all(row.finished for row in self.rows)

    def plan(self, model, units: list[int]) -> Plan | None:
        """The `Plan` of prefill units `units` (None for a baseline): their plan generators, and
        the request's explicit codes, if any."""
        if not self.plan_seeds:
            return None
        num_prompt, num_new = len(self.prompt_ids), self.request.max_tokens
        given = self.request.plan.codes if self.request.plan is not None else None
        prompt_codes = new_codes = None
        if given is not None:
            codes = torch.tensor(given, device=self.device)[None]  # (1, N) or (1, T0+N)
            new_codes = codes[:, -num_new:]
            if codes.shape[1] == num_prompt + num_new:
                prompt_codes = codes[:, :num_prompt]
        seeds = [self.plan_seeds[u] for u in units]
        # typed as Plan takes them (where None would mean torch's global generator)
        generators: list[torch.Generator | None] = list(seeded_generators(seeds, self.device))
        return Plan(model, len(units), num_new, generators, prompt_codes, new_codes)

    def set_codes(self, unit: int, codes: torch.Tensor) -> None:
        """Record a unit's plan codes (T0+N,) on its rows."""
        num_prompt = len(self.prompt_ids)
        plan = PlanCodes(codes[:num_prompt].tolist(), codes[num_prompt:].tolist(), self.plan_seeds[unit])
        for row in self.units[unit]:
            row.codes = plan

    def usage(self) -> Usage:
        return Usage(len(self.prompt_ids), sum(len(row.token_ids) for row in self.rows))

    def result(self, name: str) -> GenerationResult:
        return GenerationResult(name, [row.choice() for row in self.rows], self.usage())

    def events(self, updates: list[tuple[Row, str]]) -> list[StreamEvent]:
        """This step's stream events: a delta per row that has one, a final event per row that
        finished; the request's last event carries its usage."""
        events = [StreamEvent(row.index, delta, row.finish_reason, row.choice() if row.finished else None)
                  for row, delta in updates if delta or row.finished]
        if self.done and events:
            events[-1].usage = self.usage()
        return events
