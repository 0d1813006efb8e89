"""Scoring text honestly: log p(continuation | context) and rolling log-likelihoods.

A Free Transformer's likelihood marginalises the plan: p(x) = E_{Z ~ uniform prior} p(x | Z), one
code per position. The encoder never reads the tokens being scored (it saw the future in
training, so a score through it "prefers" whatever continuation it is shown).

Conditional scores (`score`): with K plans Z_k and log-weights w_k (0 for prior plans),
    log p(c | a) ~ LME_k [w_k + log p(a, c | Z_k)] - LME_k [w_k + log p(a | Z_k)],
LME the log-mean-exp over k, the SAME plans in both terms: consistent as K grows, not a bound.
One forward per plan serves both terms and every token: the decoder is causal for a fixed Z, and
Z_t enters only through the injection block's keys/values at position t, so the logits at input
position t (which predict token t+1) depend on Z_0..Z_t only. The prefix log-likelihood of the
first j targets, L(j) = sum_{t<j} log p(x_{t+1} | x_{<=t}, Z_{<=t}), is a cumulative sum of the
per-token log-probs and depends on no code it should not. Per-token logprobs are differences of
the running LME_k [w_k + L_k(j)]; they sum to the conditional score.
Plans: `prior_codes` (seeded, uniform), or `encoder_proposal`: the context's codes sampled from the
encoder run on the context alone, importance-weighted by w = log p(z) - log q(z | a).

Rolling log-likelihood (`iwae_log_likelihood`): the IWAE-K lower bound of section 3 of the spec,
LME_k [log p(x | z_k) + log p(z_k) - log q(z_k | x)], z_k from the encoder over x: a bound, which
tightens as K grows. A baseline's scores are exact (one forward; K plays no part).
`exact_log_likelihood` enumerates every plan, for tests and tiny models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ft_ray.model.latent import log_q, sample_codes
from ft_ray.seeds import derive_seed

DEFAULT_NUM_PLANS = 8  # K: plans per conditional score, samples per IWAE bound
DEFAULT_BATCH_SIZE = 16  # rows per forward
MAX_EXACT_PLANS = 1 << 16  # exact enumeration refuses more plans than this
PAD_ID = 0  # right padding; never read by a real position (causal decoder)


@dataclass
class ScoreItem:
    """One sequence to score: `tokens[0]` is given (BOS, or the first kept token after a
    truncation), the last `num_scored` tokens are scored given everything before them."""

    tokens: list[int]
    num_scored: int
    codes: torch.Tensor | None = None  # (K, len(tokens) - 1) codes per input position; None: baseline
    log_weight: torch.Tensor | None = None  # (K,) log p(z) - log q(z) per plan; None: prior plans


@dataclass
class Score:
    logprob: float  # log p(scored tokens | the tokens before them), nats
    token_logprobs: list[float]  # one per scored token; they sum to `logprob`
    is_greedy: bool  # every scored token is the argmax of the plan-averaged predictive


def is_latent(model) -> bool:
    """Whether scores must marginalise a plan (the Free Transformer) or are exact (baseline)."""
    return hasattr(model, "post_sampler")


def check_num_plans(num_plans: int) -> None:
    if isinstance(num_plans, bool) or not isinstance(num_plans, int) or num_plans < 1:
        raise ValueError(f"num_plans must be an integer >= 1, got {num_plans!r}")


# ------------------------------------------------------------------------------- plans
def prior_codes(num_plans: int, length: int, latent_bits: int, seed: int) -> torch.Tensor:
    """K plans from the uniform prior for positions 0..length-1: (K, length) int64. Drawn position
    by position, so a longer draw with the same seed starts with the shorter one: the choices of
    one context share the context's codes (common random numbers) whatever their lengths."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << latent_bits, (length, num_plans), generator=gen).T.contiguous()


@torch.no_grad()
def encoder_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """The encoder's posterior logits over exactly `tokens` (B, T): (B, T, H), fp32. Rows must be
    unpadded: the encoder is non-causal, padding would change every position's logits."""
    captured: dict[str, torch.Tensor] = {}

    def capture(x, cos, sin):
        captured["logits"] = model.encoder(x, cos, sin).float()
        return torch.zeros_like(x)  # the rest of the forward is discarded

    model.forward_tokens(tokens, capture, last_only=True)
    return captured["logits"]


def encoder_proposal(model, context: list[int], num_plans: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K samples of the context's codes from the encoder run on the context alone, and their
    importance log-weights log p(z) - log q(z | context): ((K, n) int64, (K,) float64)."""
    device = model.embed.weight.device
    logits = encoder_logits(model, torch.tensor([context], device=device))[0].cpu()  # (n, H)
    gen = torch.Generator().manual_seed(derive_seed(seed, "proposal"))
    q = logits.expand(num_plans, -1, -1)  # (K, n, H)
    codes = sample_codes(q, gen)  # (K, n)
    log_prior = -len(context) * model.cfg.latent_bits * math.log(2.0)
    return codes, log_prior - log_q(q, codes).sum(-1).double()


def make_items(model, pairs: list[tuple[list[int], list[int]]], seeds: list[int],
               num_plans: int = DEFAULT_NUM_PLANS, proposal: str = "prior") -> list[ScoreItem]:
    """(context ids, continuation ids) pairs -> ScoreItems with their plans. Each pair's plans come
    from its seed (pairs with one context and one seed share the context's plans). The context
    holds at least one token (BOS); context + continuation at most max_seq_len + 1."""
    check_num_plans(num_plans)
    if proposal not in ("prior", "encoder"):
        raise ValueError(f"proposal must be 'prior' or 'encoder', got {proposal!r}")
    items = []
    for (ctx, cont), seed in zip(pairs, seeds, strict=True):
        if not ctx or len(ctx) + len(cont) - 1 > model.cfg.max_seq_len:
            raise ValueError(f"a context of {len(ctx)} tokens (>= 1 needed) and a continuation of "
                             f"{len(cont)} do not fit max_seq_len={model.cfg.max_seq_len} (+1)")
        item = ScoreItem(list(ctx) + list(cont), len(cont))
        if is_latent(model):
            length, bits = len(item.tokens) - 1, model.cfg.latent_bits
            item.codes = prior_codes(num_plans, length, bits, seed)
            if proposal == "encoder":  # the context's positions, 0..len(ctx)-1, from q(z | context)
                ctx_codes, item.log_weight = encoder_proposal(model, ctx, num_plans, seed)
                item.codes[:, :len(ctx)] = ctx_codes[:, :length]
        items.append(item)
    return items


# ------------------------------------------------------------------------------- windows
def fit_window(context: list[int], continuation: list[int], max_seq_len: int) -> tuple[list[int], list[int], bool]:
    """Cut (context, continuation) from the left to at most max_seq_len + 1 tokens, as
    lm-eval's HF model does: (context, continuation, whether anything was cut). The context keeps
    at least one token; a continuation longer than max_seq_len keeps its last max_seq_len tokens."""
    limit = max_seq_len + 1
    if len(context) + len(continuation) <= limit:
        return context, continuation, False
    kept = (context + continuation)[-limit:]
    num_scored = min(len(continuation), max_seq_len)
    return kept[:limit - num_scored], kept[limit - num_scored:], True


def rolling_windows(ids: list[int], first: int, max_seq_len: int) -> list[list[int]]:
    """Disjoint windows that score every id once: [first] + ids[:L], then each next window starts
    with the previous window's last token and scores up to L more (L = max_seq_len). Only the
    window's first token is given, so each window's score is a plain log p(window[1:] | window[0])
    (lm-eval's rolling windows with context_len=1, except that the last window is not topped up)."""
    windows, prev = [], first
    for start in range(0, len(ids), max_seq_len):
        chunk = ids[start:start + max_seq_len]
        windows.append([prev, *chunk])
        prev = chunk[-1]
    return windows


# ------------------------------------------------------------------------------- estimators
def _batch(items: list[ScoreItem], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens (B, T+1) and the number of targets per row (B,)."""
    width = max(len(it.tokens) for it in items)
    tokens = torch.full((len(items), width), PAD_ID, dtype=torch.long)
    for b, it in enumerate(items):
        tokens[b, :len(it.tokens)] = torch.tensor(it.tokens)
    lengths = torch.tensor([len(it.tokens) - 1 for it in items])
    return tokens.to(device), lengths.to(device)


def _plan(items: list[ScoreItem], k: int, width: int, device) -> torch.Tensor | None:
    """Plan k of every row, padded with code 0: (B, width) int64, or None for a baseline."""
    if items[0].codes is None:
        return None
    z = torch.zeros((len(items), width), dtype=torch.long)
    for b, it in enumerate(items):
        assert it.codes is not None  # one model's items: all have plans when the first has
        z[b, :it.codes.shape[1]] = it.codes[k]
    return z.to(device)


class PlanScorer:
    """The estimator of the module docstring for one batch of items, run plan by plan: `add(k)`
    runs plan k of every item (one forward), `scores()` once all plans ran. `score` runs all
    plans at once; the serving engine runs a few per scheduler step, so a long scoring job never
    holds up generation for long. Both give the same numbers: the same operations in the same
    order. Items must have the same number of plans."""

    def __init__(self, model, items: list[ScoreItem]):
        self.model, self.items = model, items
        self.device = model.embed.weight.device
        tokens, self.lengths = _batch(items, self.device)
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
        self.num_plans = 1 if items[0].codes is None else items[0].codes.shape[0]
        T = self.inputs.shape[1]
        self.valid = torch.arange(T, device=self.device)[None] < self.lengths[:, None]  # (B, T)
        self.prefix: list[torch.Tensor] = []  # per plan run so far: (B, T+1) w + L(j)
        self.mix: torch.Tensor | None = None  # (B, T, V) plan-averaged predictive, unnormalised

    @property
    def num_tokens(self) -> int:
        """Input positions one plan runs through the model (the batch's padded width)."""
        return self.inputs.numel()

    @property
    def done(self) -> bool:
        return len(self.prefix) == self.num_plans

    @torch.no_grad()
    def add(self, k: int) -> None:
        """Run plan k (plans must come in order 0, 1, ...)."""
        if k != len(self.prefix):
            raise ValueError(f"plan {k} out of order: {len(self.prefix)} plans ran so far")
        items, device = self.items, self.device
        z = _plan(items, k, self.inputs.shape[1], device)
        logp = F.log_softmax(self.model(self.inputs, z=z).logits.float(), dim=-1)  # (B, T, V)
        lp = logp.gather(-1, self.targets[..., None]).squeeze(-1).masked_fill(~self.valid, 0.0)  # (B, T)
        w = torch.tensor([0.0 if it.log_weight is None else float(it.log_weight[k]) for it in items],
                         dtype=torch.float64, device=device)
        run = torch.cat([w[:, None], w[:, None] + lp.double().cumsum(-1)], dim=1)  # (B, T+1): w + L(j)
        self.prefix.append(run)
        # the plan-averaged predictive, unnormalised: weights relative to plan 0 keep fp32 exact enough
        cand = (run[:, :-1] - self.prefix[0][:, :-1]).float()[..., None] + logp  # (B, T, V)
        self.mix = cand if self.mix is None else torch.logaddexp(self.mix, cand)

    def _lme(self) -> torch.Tensor:
        if not self.done:
            raise ValueError(f"{len(self.prefix)} of {self.num_plans} plans ran")
        return torch.logsumexp(torch.stack(self.prefix), dim=0) - math.log(self.num_plans)  # (B, T+1)

    def scores(self) -> list[Score]:
        lme = self._lme()  # running LME
        assert self.mix is not None  # set by plan 0; _lme checked that every plan ran
        steps = (lme[:, 1:] - lme[:, :-1]).cpu()  # (B, T) per-token logprobs
        greedy = (self.mix.argmax(-1) == self.targets).cpu()  # (B, T)
        out = []
        for b, it in enumerate(self.items):
            end = len(it.tokens) - 1
            start = end - it.num_scored
            out.append(Score(float(lme[b, end] - lme[b, start]), steps[b, start:end].tolist(),
                             bool(greedy[b, start:end].all())))
        return out

    def top_logprobs(self, num: int) -> list[list[list[tuple[int, float]]]]:
        """Per item, per scored token: the `num` most likely tokens at its position under the
        plan-averaged predictive, as (token id, logprob), most likely first."""
        self._lme()  # all plans ran
        assert self.mix is not None  # set by plan 0
        mix = self.mix - torch.logsumexp(self.mix, dim=-1, keepdim=True)  # (B, T, V) normalised
        top_values, top_ids = mix.topk(min(num, mix.shape[-1]), dim=-1)  # (B, T, num)
        values, ids = top_values.cpu().tolist(), top_ids.cpu().tolist()
        out = []
        for b, it in enumerate(self.items):
            end = len(it.tokens) - 1
            out.append([list(zip(ids[b][t], values[b][t])) for t in range(end - it.num_scored, end)])
        return out


def _score_batch(model, items: list[ScoreItem]) -> list[Score]:
    scorer = PlanScorer(model, items)
    for k in range(scorer.num_plans):
        scorer.add(k)
    return scorer.scores()


def prompt_item(model, tokens: list[int], num_plans: int, seed: int) -> ScoreItem:
    """Every token of `tokens` after the first scored given those before it, with K prior plans
    from `seed` (a baseline: exact, no plans). The same plans as `make_items` draws for a
    (context, continuation) split of `tokens` with that seed, so the continuation's per-token
    logprobs sum to the figure `score` gives for the split (what `ft-ray serve` returns for a
    prompt with echo + logprobs, and the lm-eval model `ft-ray` with plan_mode=shared)."""
    return make_items(model, [(tokens[:1], tokens[1:])], [seed], num_plans)[0]


def score(model, items: list[ScoreItem], batch_size: int = DEFAULT_BATCH_SIZE) -> list[Score]:
    """Score every item (see the module docstring), longest first in batches of `batch_size`
    (padding on the right is never read: the decoder is causal); results in the items' order."""
    plan_counts = {None if it.codes is None else it.codes.shape[0] for it in items}
    if len(plan_counts) > 1:  # a batch runs one forward per plan index k
        raise ValueError(f"items must all have the same number of plans, got {sorted(map(str, plan_counts))}")
    order = sorted(range(len(items)), key=lambda i: -len(items[i].tokens))
    out: dict[int, Score] = {}  # item index -> its score
    todo = [i for i in order if items[i].num_scored > 0]
    for i in order:
        if items[i].num_scored == 0:
            out[i] = Score(0.0, [], True)  # nothing to score: log 1
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        for i, s in zip(chunk, _score_batch(model, [items[i] for i in chunk])):
            out[i] = s
    return [out[i] for i in range(len(items))]


@torch.no_grad()
def token_logprobs(model, tokens: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    """tokens (B, T+1), codes z (B, T) or None -> log p(tokens[:, t+1] | tokens[:, :t+1], z) (B, T)."""
    logits = model(tokens[:, :-1], z=z).logits.float()  # (B, T, V)
    return F.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def iwae_log_likelihood(model, windows: list[list[int]], num_samples: int = DEFAULT_NUM_PLANS,
                        seeds: list[int] | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> list[float]:
    """Per window (first token given, the rest scored): the IWAE-K lower bound on
    log p(window[1:] | window[0]) for a Free Transformer, the exact value for a baseline. Windows
    are batched by equal length (the encoder is non-causal: no padding); window i draws its
    samples from its own seed, so results do not depend on the batching."""
    check_num_plans(num_samples)
    seeds = list(range(len(windows))) if seeds is None else seeds
    device = model.embed.weight.device
    out = [0.0] * len(windows)
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        if len(w) >= 2:  # a lone token scores nothing: log 1
            by_len.setdefault(len(w), []).append(i)
    for idx_all in by_len.values():
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start:start + batch_size]
            tokens = torch.tensor([windows[i] for i in idx], device=device)  # (B, T+1)
            bounds = _iwae_batch(model, tokens, num_samples, [seeds[i] for i in idx])
            for i, v in zip(idx, bounds):
                out[i] = v
    return out


def _iwae_batch(model, tokens: torch.Tensor, num_samples: int, seeds: list[int]) -> list[float]:
    if not is_latent(model):
        return token_logprobs(model, tokens).double().sum(-1).tolist()
    inputs = tokens[:, :-1]
    B, T = inputs.shape
    q = encoder_logits(model, inputs).cpu()  # (B, T, H): the proposal may read x, it is a bound
    gens = [torch.Generator().manual_seed(derive_seed(s, "iwae")) for s in seeds]
    log_prior = -T * model.cfg.latent_bits * math.log(2.0)  # log p(z) of the whole window
    log_w = []
    for _ in range(num_samples):
        z = torch.stack([sample_codes(q[b], g) for b, g in enumerate(gens)])  # (B, T)
        log_px = token_logprobs(model, tokens, z.to(tokens.device)).double().sum(-1).cpu()  # (B,)
        log_w.append(log_px + log_prior - log_q(q, z).double().sum(-1))
    bound = torch.logsumexp(torch.stack(log_w), dim=0) - math.log(num_samples)  # (B,)
    return bound.tolist()


@torch.no_grad()
def exact_log_likelihood(model, tokens: list[int], num_scored: int | None = None,
                         max_plans: int = MAX_EXACT_PLANS) -> float:
    """log p(last `num_scored` tokens | the tokens before them) (default: all but the first), with
    the plan marginalised by enumerating all (2^H)^T plans of the T input positions."""
    T = len(tokens) - 1
    num_scored = T if num_scored is None else num_scored
    if T == 0 or num_scored == 0:
        return 0.0  # nothing to predict: log 1
    x = torch.tensor([tokens], device=model.embed.weight.device)  # (1, T+1)
    if not is_latent(model):
        return float(token_logprobs(model, x)[0, T - num_scored:].double().sum())
    num_codes = 1 << model.cfg.latent_bits
    num_plans = num_codes ** T
    if num_plans > max_plans:
        raise ValueError(f"{num_plans} plans ((2^{model.cfg.latent_bits})^{T}) exceed max_plans={max_plans}")
    idx = torch.arange(num_plans)[:, None]  # plan p has code (p // C^t) % C at position t
    plans = (idx // num_codes ** torch.arange(T)) % num_codes  # (P, T)
    lps = [token_logprobs(model, x.expand(len(z), -1), z.to(x.device)).double()
           for z in plans.split(1024)]
    lp = torch.cat(lps).cpu()  # (P, T)
    full = torch.logsumexp(lp.sum(-1), 0)  # every code uniform: the mean over plans is exact
    ctx = torch.logsumexp(lp[:, :T - num_scored].sum(-1), 0)  # p(context | Z) ignores later codes
    return float(full - ctx)
