"""Continuous batching: one iteration-level scheduler per engine (one model on one replica).

Each `step()`:
1. frees the rows of cancelled requests;
2. decodes one token for every running row, in ONE forward (`model.forward_tokens` with per-row
   positions and cache slots), and samples the rows as one batch with per-row settings, each
   from a draw of its own generator (model/sampling.py: a row's token is the same in any batch);
3. admits waiting requests, first come first served, as cache slots free up (a request takes n
   slots at once), then prefills admitted units (model/plan.py's plan for an FT) within the
   token budget; each prefilled row samples its first token;
4. runs prompt scoring (echo + logprobs, prompt_scoring.py) with what the token budget leaves,
   at least one plan of one batch;
5. retires rows as they finish: a finished row frees its slot at once, and a request whose rows
   are all done gets its result (or its stream's end) in the same step.
Streamed and non-streamed requests share the batch. A failure in one request (its sampling, its
text, its prefill) ends that request alone with a `GenerationError`; the others go on.

Memory is allocated once, at construction: per layer a (max_num_seqs, n_kv, max_len, hd) key and
value cache, plus an FT's (max_num_seqs, max_len) codes; a free-slot list hands out slots, lowest
first. When a row retires below other rows, the row in the highest slot moves into the hole (its
cache prefix copied once), so rows holding slots stay in 0..n-1 and each decode step reads the
cache through views instead of gathering it (measured: the gather cost ~6% of a step).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import threading
from collections import deque
from dataclasses import dataclass

import torch

from ft_ray.model.layers import CacheRows
from ft_ray.model.sampling import BAD_ROW, sample_rows
from ft_ray.serve.handle import End, failed
from ft_ray.serve.prompt_scoring import ScoreQueue
from ft_ray.serve.requests import RequestError
from ft_ray.serve.results import EngineStats, RequestCancelled, TokenLogprob
from ft_ray.serve.sequence import Row, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine's decode loop. KV memory = 2 * layers * max_num_seqs * n_kv * max_len
    * head_dim * bytes per value, allocated once."""

    max_num_seqs: int = 16  # cache slots: rows decoding at once (a request's n samples take n)
    max_len: int | None = None  # positions per slot (BOS + prompt + max_tokens); None: max_seq_len
    # tokens one step may run through the model: one per decoding row plus the prompt tokens of
    # the units it prefills (bounds a step's latency); at least max_len, so any prompt can start;
    # None: 2048, or the slot length when that is longer
    max_num_batched_tokens: int | None = None
    max_waiting: int = 64  # requests waiting for slots; one more is refused with 503

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if name == "max_num_batched_tokens" and self.max_num_batched_tokens is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 2):
            raise ValueError(f"SchedulerConfig.max_len must be an integer >= 2 or None, got {self.max_len!r}")


class Scheduler:
    """The decode loop's state. `submit` and `cancel` may be called from any thread; `step` runs
    in one thread at a time (the engine's loop thread, or a synchronous caller)."""

    def __init__(self, model, is_ft: bool, cfg: SchedulerConfig, slot_len: int, name: str, stats: EngineStats):
        budget = cfg.max_num_batched_tokens
        if budget is None:
            budget = max(2048, slot_len)
            cfg = dataclasses.replace(cfg, max_num_batched_tokens=budget)
        if budget < slot_len:
            raise ValueError(f"max_num_batched_tokens={budget} must be >= the slot "
                             f"length {slot_len}, or a long prompt could never be prefilled")
        self.token_budget = budget  # cfg.max_num_batched_tokens, resolved
        self.model, self.cfg, self.slot_len, self.name, self.stats = model, cfg, slot_len, name, stats
        self.device = model.embed.weight.device
        self.caches = model.make_caches(cfg.max_num_seqs, slot_len)  # allocated once, reused by every request
        self.slot_codes = (torch.zeros(cfg.max_num_seqs, slot_len, dtype=torch.int64, device=self.device)
                           if is_ft else None)  # an FT's Z per slot and position
        self._free = list(range(cfg.max_num_seqs))  # a heap: lowest slot first
        self._waiting: deque[Sequence] = deque()  # submitted, waiting for slots (guarded by _inbox)
        self._admitted: list[Sequence] = []  # holding slots, in admission order (step thread only)
        self._inbox, self._stepping = threading.Lock(), threading.Lock()
        self.wake = threading.Event()  # set when there is new work for a waiting loop thread
        self.scoring = ScoreQueue(model, cfg.max_waiting, budget, name, stats)

    # ------------------------------------------------------------------ any thread
    def submit(self, seq: Sequence, bounded: bool = True) -> None:
        """Queue `seq` (its handle set); RequestError 503 when `bounded` and the queue is full."""
        with self._inbox:
            if bounded and len(self._waiting) >= self.cfg.max_waiting:
                raise RequestError("request", f"model {self.name!r} is at capacity ({len(self._waiting)} "
                                   f"requests waiting for a slot); retry in a moment",
                                   status=503, retry_after=1.0)
            self._waiting.append(seq)
        self.wake.set()

    def cancel(self, seq: Sequence) -> None:
        seq.handle.cancel_requested = True  # read by the next step, which frees its slots
        self.wake.set()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return sum(1 for seq in self._admitted for row in seq.rows if row.slot is not None)

    # ------------------------------------------------------------------ the step thread
    def step(self) -> bool:
        """One iteration (see the module docstring). Returns whether work remains."""
        with self._stepping, torch.inference_mode():
            self.stats.steps += 1
            self._reap()
            decoding = sorted((row for seq in self._admitted for row in seq.rows
                               if row.prefilled and row.slot is not None), key=lambda r: r.live_slot)
            if decoding:
                self._decode(decoding)
            self._admit()
            left = self._prefill(self.token_budget - len(decoding))
            self._compact()
            if self.scoring.has_work:
                self.scoring.step(left, self.stats.steps)
            return bool(self._admitted or self._waiting or self.scoring.has_work)

    def reap(self, blocking: bool = True) -> None:
        """Free cancelled requests' slots now (a synchronous caller that stops reading). With
        blocking=False, only if no step is running (a generator finalized inside a step must not
        wait for the lock its own thread holds); the next step reaps otherwise."""
        if self._stepping.acquire(blocking=blocking):
            try:
                self._reap()
            finally:
                self._stepping.release()

    def fail_all(self, error: Exception) -> None:
        """End every request, waiting or running, with `error` (the engine is closing)."""
        with self._stepping:
            with self._inbox:
                waiting, self._waiting = list(self._waiting), deque()
            for seq in [*self._admitted, *waiting]:
                self._end(seq, End(error=error))
            self.scoring.fail_all(error)

    def _reap(self) -> None:
        with self._inbox:
            cancelled = [s for s in self._waiting if s.handle.cancel_requested]
            if cancelled:
                self._waiting = deque(s for s in self._waiting if not s.handle.cancel_requested)
        cancelled += [s for s in self._admitted if s.handle.cancel_requested]
        for seq in cancelled:
            self._end(seq, End(error=RequestCancelled("the request was cancelled")))

    def _decode(self, rows: list[Row]) -> None:
        """One token for each running row, in one forward at per-row positions and slots."""
        slots, positions = [r.live_slot for r in rows], [r.position for r in rows]
        tokens = torch.tensor([[r.token_ids[-1]] for r in rows], device=self.device)  # (B, 1)
        latent = None
        if self.slot_codes is not None:  # each row's own Z at its position
            index = torch.tensor(slots, device=self.device), torch.tensor(positions, device=self.device)
            latent = self.model.codes_fn(self.slot_codes[index][:, None])  # codes (B, 1)
        try:
            logits = self.model.forward_tokens(tokens, latent, self.caches, CacheRows(slots, 1, positions, self.device),
                                               self.model.decode_weights(), last_only=True)[:, 0]  # (B, V)
        except Exception as e:  # the shared forward itself failed: every request in it fails
            for seq in {id(r.seq): r.seq for r in rows}.values():
                self._end(seq, failed(e))
            return
        self.stats.decode_steps += 1
        self._accept(rows, logits)

    def _admit(self) -> None:
        """Waiting requests take slots in arrival order; the first that does not fit waits (and
        so do those behind it: a large n is not overtaken forever)."""
        with self._inbox:
            while self._waiting and len(self._free) >= len(self._waiting[0].rows):
                seq = self._waiting.popleft()
                for row in seq.rows:
                    row.slot = heapq.heappop(self._free)
                self._admitted.append(seq)

    def _prefill(self, budget: int) -> int:
        """Prefill admitted units, oldest request first, while their prompt tokens fit `budget`;
        returns the budget left."""
        for seq in list(self._admitted):
            if not seq.pending:
                continue
            count = min(len(seq.pending), max(budget, 0) // len(seq.prompt_ids))
            if count == 0:
                break  # first come, first served: no later prompt overtakes this one
            units = [seq.pending.popleft() for _ in range(count)]
            budget -= count * len(seq.prompt_ids)
            try:
                logits = self._prefill_units(seq, units)  # (count, V)
            except Exception as e:
                self._end(seq, failed(e))
                continue
            rows = [row for u in units for row in seq.units[u]]
            self._accept(rows, logits[[i for i, u in enumerate(units) for _ in seq.units[u]]])  # (rows, V)
        return budget

    def _prefill_units(self, seq: Sequence, units: list[int], all_positions: bool = False) -> torch.Tensor:
        """Run the prompt of `units` (one row each, in the slot of the unit's first row) through the
        model; copy the cache to the unit's other rows; record an FT's codes. Returns next-token
        logits (units, V), or with `all_positions` (units, T0, V): the per-position logits that
        prompt scoring (echo + logprobs) needs; for an FT, score with prompt codes from the prior,
        never the encoder's (it reads the tokens being scored)."""
        num_prompt = len(seq.prompt_ids)
        slots = [seq.units[u][0].live_slot for u in units]
        tokens = torch.tensor(seq.prompt_ids, device=self.device)[None].expand(len(units), -1)  # (k, T0)
        plan = seq.plan(self.model, units)
        logits = self.model.forward_tokens(tokens, plan.latent_fn if plan else None, self.caches,
                                           CacheRows(slots, num_prompt, 0, self.device), last_only=not all_positions)
        self.stats.prefill_tokens += len(units) * num_prompt
        codes = plan.codes if plan else None  # (k, T0+N), complete after the prefill
        for i, u in enumerate(units):
            rows = seq.units[u]
            if len(rows) > 1:
                for cache in self.caches:
                    cache.copy_prefix(rows[0].slot, [r.slot for r in rows[1:]], num_prompt)
            if codes is not None:
                assert self.slot_codes is not None  # codes come from a plan: an FT, which has slot codes
                seq.set_codes(u, codes[i])
                for row in rows:
                    self.slot_codes[row.slot, :codes.shape[1]] = codes[i]
            for row in rows:
                row.prefilled = True
        return logits if all_positions else logits[:, -1]

    def _compact(self) -> None:
        """Move rows down into free slots below them, highest first: slots held = 0..n-1."""
        held = {row.slot: row for seq in self._admitted for row in seq.rows if row.slot is not None}
        while held and self._free and self._free[0] < max(held):
            hole, top = heapq.heappop(self._free), max(held)
            row = held.pop(top)
            written = row.position if row.prefilled else 0  # positions its cache holds so far
            for cache in self.caches:
                cache.move(top, hole, written)
            if self.slot_codes is not None:
                self.slot_codes[hole] = self.slot_codes[top]
            row.slot, held[hole] = hole, row
            heapq.heappush(self._free, top)

    # ------------------------------------------------------------------ tokens in, results out
    def _accept(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample and append one token per row (logits (B, V), one row each); a row that fails
        fails its request alone. Then hand each touched request its stream events, or its result."""
        touched: dict[int, tuple[Sequence, list[tuple[Row, str]]]] = {}
        tokens = self._sample(rows, logits)
        for row, token, logprob in zip(rows, tokens, self._logprobs(rows, logits, tokens), strict=True):
            seq = row.seq
            if seq.ended:
                continue
            try:
                if isinstance(token, Exception):
                    raise token
                if isinstance(logprob, Exception):
                    raise logprob
                delta = row.push(token, logprob)
            except Exception as e:
                self._end(seq, failed(e))
                continue
            self.stats.generated_tokens += 1
            if row.finished:
                self._release(row)
            touched.setdefault(id(seq), (seq, []))[1].append((row, delta))
        for seq, updates in touched.values():
            if seq.ended:
                continue
            try:
                if seq.handle.stream:
                    for event in seq.events(updates):
                        seq.handle.put(event)
                if seq.done:
                    self._end(seq, End(result=seq.result(self.name)))
            except Exception as e:
                self._end(seq, failed(e))

    def _logprobs(self, rows: list[Row], logits: torch.Tensor,
                  tokens: list[int | Exception]) -> list[TokenLogprob | Exception | None]:
        """The sampled tokens' logprobs and top alternatives, for the rows whose request asked
        (`logprobs` N): of the model's distribution (temperature 1, no filters), as vLLM returns them."""
        want: list[tuple[int, int, int]] = []  # (row index, its token, its N) of the rows that asked
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if row.seq.request.logprobs is not None and isinstance(token, int):
                want.append((i, token, row.seq.request.logprobs))
        out: list[TokenLogprob | Exception | None] = [None] * len(rows)
        if not want:
            return out
        try:
            lp = torch.log_softmax(logits[[i for i, _, _ in want]].float(), dim=-1)  # (W, V)
            num_top = min(max(n for _, _, n in want), lp.shape[-1])
            values, ids = lp.topk(max(num_top, 1), dim=-1)  # (W, num_top)
            chosen = lp[torch.arange(len(want)), torch.tensor([token for _, token, _ in want])].tolist()
            for j, (i, token, n) in enumerate(want):
                best = dict(zip(ids[j, :n].tolist(), values[j, :n].tolist()))
                best[token] = chosen[j]  # the chosen token is always there, with its own logprob
                out[i] = TokenLogprob(token, chosen[j], sorted(best.items(), key=lambda kv: -kv[1]))
        except Exception as e:  # fails the requests that asked for logprobs, not their batch-mates
            for i, _, _ in want:
                out[i] = e
        return out

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> list[int | Exception]:
        """Every row's next token (or why it has none), sampled as one batch with per-row settings
        and draws. Each row draws first, from its own generator; if the batched sampling itself
        fails, each row is sampled alone with the same draw, so the others still get their tokens."""
        draws: list[torch.Tensor | Exception] = []
        for row in rows:
            try:
                draws.append(row.draw())
            except Exception as e:
                draws.append(e)
        ok = {i: d for i, d in enumerate(draws) if isinstance(d, torch.Tensor)}  # row index -> its draw
        # the rows that could not draw keep their error; every other row is set below
        out: list[int | Exception] = [d if isinstance(d, Exception) else RuntimeError("row not sampled")
                                      for d in draws]
        try:
            settings = {rows[i].settings() for i in ok}
            t: float | torch.Tensor  # one number for every row, or one per row
            k: int | torch.Tensor
            p: float | torch.Tensor
            if len(settings) == 1:  # one setting for all (e.g. one request): numbers, fewer ops
                t, k, p = settings.pop()
            else:
                columns = zip(*(rows[i].settings() for i in ok), strict=True)
                t, k, p = (torch.tensor(c, dtype=dt, device=self.device)
                           for c, dt in zip(columns, (torch.float64, torch.int64, torch.float64), strict=True))
            batch = logits if len(ok) == len(rows) else logits[torch.tensor(list(ok), device=self.device)]
            tokens, bad = sample_rows(batch, t, k, p, torch.cat(list(ok.values())))
            for j, (i, token) in enumerate(zip(ok, tokens.tolist(), strict=True)):
                out[i] = ValueError(BAD_ROW) if bad is not None and bool(bad[j]) else token
            return out
        except Exception:
            log.exception("batched sampling failed; sampling each row alone")
        for i, u in ok.items():
            try:
                out[i] = rows[i].sample(logits[i], u)
            except Exception as e:
                out[i] = e
        return out

    def _release(self, row: Row) -> None:
        if row.slot is not None:
            heapq.heappush(self._free, row.slot)
            row.slot = None

    def _end(self, seq: Sequence, end: End) -> None:
        """Retire `seq`: free its slots, and give its handle the result or the error."""
        if seq.ended:
            return
        seq.ended = True
        for row in seq.rows:
            self._release(row)
        if seq in self._admitted:
            self._admitted.remove(seq)
        if end.error is not None and not isinstance(end.error, RequestCancelled):
            self.stats.failed_requests += 1
            log.warning("model %r: request failed alone: %s", self.name, end.error, exc_info=end.error.__cause__)
        seq.handle.finished_step = self.stats.steps
        seq.handle.put(end)
