"""Prompt scoring inside the engine's decode loop: echo + logprobs, a few plans per step.

A scoring job is a prompt whose every token gets its logprob given the tokens before it, with the
estimator of ft_ray/eval/scoring.py (`PlanScorer`, the code the lm-eval model `ft-ray` runs), so a
served score equals the native one for the same plans. For a Free Transformer that is K forwards
of the prompt, one per prior plan; for a baseline one exact forward. The scheduler gives scoring
what a step's token budget leaves after decoding and prefill (at least one plan, so scoring always
progresses): a step never runs more than about one budget of prompt tokens for scoring, and running
generations get a token between every two slices of a long scoring job.

Jobs with the same K are batched (up to MAX_SCORE_BATCH prompts, one plan of the batch within the
token budget), first come first served; a cancelled job leaves its batch, a batch whose forward
fails fails its jobs alone.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from ft_ray.eval.scoring import DEFAULT_BATCH_SIZE, PlanScorer, ScoreItem
from ft_ray.serve.handle import End, RequestHandle, failed
from ft_ray.serve.requests import RequestError
from ft_ray.serve.results import EngineStats, PromptScore, RequestCancelled, TokenLogprob

MAX_SCORE_BATCH = DEFAULT_BATCH_SIZE  # prompts per scoring forward, as the lm-eval model batches
log = logging.getLogger(__name__)


@dataclass
class ScoreJob:
    """One prompt to score. `item.tokens` is what the model reads (BOS first); `echo_from` is 1
    when the engine added that BOS (the client's tokens start after it), 0 when the prompt began
    with BOS itself (its first token then has logprob None)."""

    item: ScoreItem
    echo_from: int
    num_top: int  # alternatives per token (the request's logprobs)
    plan_seed: int | None  # None for a baseline
    handle: RequestHandle
    ended: bool = False
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = len(self.item.tokens) - 1  # input positions of one plan

    @property
    def num_plans(self) -> int:
        return 1 if self.item.codes is None else self.item.codes.shape[0]

    def result(self, logprobs: list[float], top: list[list[tuple[int, float]]]) -> PromptScore:
        """The client's tokens with their logprobs; the chosen token is among the alternatives with
        exactly its own logprob (OpenAI returns up to N+1 of them; lm-eval's is_greedy compares
        the chosen token's logprob with the best alternative's for equality)."""
        ids = self.item.tokens
        out = [TokenLogprob(ids[0], None, [])] if self.echo_from == 0 else []
        for t, (lp, alts) in enumerate(zip(logprobs, top, strict=True)):
            token = ids[t + 1]
            best = {i: v for i, v in alts[:self.num_top]}
            best[token] = lp
            out.append(TokenLogprob(token, lp, sorted(best.items(), key=lambda kv: -kv[1])))
        plans = None if self.plan_seed is None else self.num_plans
        return PromptScore(out, plans, self.plan_seed)


class ScoreQueue:
    """The scoring jobs of one engine: `submit` from any thread, `step` in the loop's thread."""

    def __init__(self, model, max_waiting: int, max_batch_tokens: int, name: str, stats: EngineStats):
        self.model, self.max_waiting, self.max_batch_tokens = model, max_waiting, max_batch_tokens
        self.name, self.stats = name, stats
        self._waiting: deque[ScoreJob] = deque()
        self._lock = threading.Lock()
        self._batch: list[ScoreJob] = []  # the batch in progress
        self._scorer: PlanScorer | None = None

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._batch)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: ScoreJob, bounded: bool = True) -> None:
        if job.tokens == 0:  # BOS alone: nothing to score, nothing to run
            job.handle.finished_step = self.stats.steps
            job.handle.put(End(result=job.result([], [])))
            return
        with self._lock:
            if bounded and len(self._waiting) >= self.max_waiting:
                raise RequestError("request", f"model {self.name!r} is at capacity ({len(self._waiting)} "
                                   "prompts waiting to be scored); retry in a moment", status=503, retry_after=1.0)
            self._waiting.append(job)

    def fail_all(self, error: Exception) -> None:
        with self._lock:
            jobs, self._waiting = [*self._batch, *self._waiting], deque()
        self._batch, self._scorer = [], None
        for job in jobs:
            self._end(job, End(error=error))

    def step(self, budget: int, step: int) -> None:
        """Run as many plans of the batch in progress as `budget` tokens allow (at least one)."""
        self._reap(step)
        if not self._batch and not self._start():
            return
        scorer = self._scorer
        assert scorer is not None  # set with the batch (by _start)
        count = max(1, budget // scorer.num_tokens)
        try:
            for _ in range(min(count, scorer.num_plans - len(scorer.prefix))):
                scorer.add(len(scorer.prefix))
                self.stats.scored_tokens += scorer.num_tokens
            if not scorer.done:
                return
            scores = scorer.scores()
            top = scorer.top_logprobs(max(job.num_top for job in self._batch) or 1)
            results: list[PromptScore | End] = [job.result(s.token_logprobs, t)
                                                for job, s, t in zip(self._batch, scores, top, strict=True)]
        except Exception as e:  # this batch's forward or numbers failed: its jobs fail, nothing else
            log.exception("model %r: scoring a batch of %d prompts failed", self.name, len(self._batch))
            results = [failed(e)] * len(self._batch)
        batch, self._batch, self._scorer = self._batch, [], None
        for job, res in zip(batch, results, strict=True):
            self._end(job, res if isinstance(res, End) else End(result=res), step)

    def _start(self) -> bool:
        """Take the next batch: the oldest job, and jobs behind it with the same K while one plan
        of the batch (padded to its longest prompt) fits the token budget."""
        with self._lock:
            if not self._waiting:
                return False
            batch = [self._waiting.popleft()]
            num_plans, width = batch[0].num_plans, batch[0].tokens
            while self._waiting and len(batch) < MAX_SCORE_BATCH:
                job = self._waiting[0]
                wider = max(width, job.tokens)
                if job.num_plans != num_plans or wider * (len(batch) + 1) > self.max_batch_tokens:
                    break
                batch.append(self._waiting.popleft())
                width = wider
        self._batch, self._scorer = batch, PlanScorer(self.model, [job.item for job in batch])
        return True

    def _reap(self, step: int) -> None:
        with self._lock:
            gone = [job for job in self._waiting if job.handle.cancel_requested]
            if gone:
                self._waiting = deque(job for job in self._waiting if not job.handle.cancel_requested)
        for job in gone:
            self._end(job, End(error=RequestCancelled("the request was cancelled")), step)
        if self._batch and all(job.handle.cancel_requested for job in self._batch):
            for job in self._batch:  # nobody waits for this batch any more: drop it mid-way
                self._end(job, End(error=RequestCancelled("the request was cancelled")), step)
            self._batch, self._scorer = [], None

    def _end(self, job: ScoreJob, end: End, step: int | None = None) -> None:
        if job.ended:
            return
        job.ended = True
        if end.error is not None and not isinstance(end.error, RequestCancelled):
            self.stats.failed_requests += 1
        job.handle.finished_step = self.stats.steps if step is None else step
        job.handle.put(end)
