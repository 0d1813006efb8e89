# ruff: noqa: E402
"""The lm-evaluation-harness model `ft-ray`: a serving bundle scored honestly (scoring.py).

    import ft_ray.eval.lm  # registers "ft-ray"
    lm_eval.simple_evaluate(model="ft-ray", model_args="bundle=PATH,num_plans=8,plan_seed=0", ...)

model_args (`key=value,...`; lm-eval adds batch_size and device itself):
  bundle      the bundle directory (model.safetensors, config.json, tokenizer.json, metrics.json)
  num_plans   K (default 8): plans per conditional score, IWAE samples per rolling window
  plan_seed   S (default 0): every plan and sample derives from it; results are reproducible
  plan_mode   fresh (default): each context gets its own plans, seeded by S and the context's
              text (the choices of one question share them); shared: every request uses the
              same plans (seed S; repeat j of a generation uses row_seed(S, j))
  proposal    prior (default) or encoder: the context's codes from the encoder run on the
              context alone, importance-weighted (scoring.encoder_proposal)
  batch_size  rows per forward (default 16; "auto" means the default)
  device      torch device (default cpu)

Tokenisation follows lm-eval's HF model: trailing spaces of the context move to the
continuation, the pair is encoded whole and split at the context's token count, and BOS is
prepended as the serving engine does. Sequences longer than max_seq_len + 1 lose tokens on the
left (a warning counts them). A baseline bundle is scored exactly (K plays no part).
"""

from __future__ import annotations

import os

# before lm-eval imports datasets (see ft_ray/eval/__init__.py); the imports below come after it
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from tokenizers import Tokenizer

from ft_ray.data.tokenizer import bos_id, eos_id
from ft_ray.eval import EvalError
from ft_ray.eval.scoring import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_NUM_PLANS,
    check_num_plans,
    fit_window,
    is_latent,
    iwae_log_likelihood,
    make_items,
    rolling_windows,
    score,
)
from ft_ray.model import sample_shared_plan
from ft_ray.seeds import derive_seed, row_seed

log = logging.getLogger(__name__)
PLAN_MODES = ("fresh", "shared")
DEFAULT_MAX_GEN_TOKS = 256
GEN_CHUNK = 16  # tokens decoded between checks for EOS and stop strings
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p")


@dataclass
class GenJob:
    """One generate_until request, resolved: token ids, limits, stop strings, plan seed."""

    index: int  # position in the request list
    prompt: list[int]  # BOS + context ids, left-truncated to leave room for max_new
    max_new: int
    until: list[str]
    seed: int  # the plan's seed (prompt Z from the encoder, then new Z from the prior)
    temperature: float  # 0: greedy
    top_k: int | None
    top_p: float | None

    def batch_key(self) -> tuple:
        """Greedy jobs with one prompt length and one setting may share a batch; a sampled job
        runs alone (its token generator is its own, so its text never depends on the company)."""
        alone = None if self.temperature == 0 else self.index
        return (len(self.prompt), self.max_new, tuple(self.until), self.temperature, self.top_k,
                self.top_p, alone)


def load_eval_bundle(path: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer) from a bundle directory; EvalError naming the path."""
    from ft_ray.bundle import load_bundle

    path = Path(path)
    try:
        model, _, _ = load_bundle(path, device)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError("no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # safetensors, JSON and tokenizers errors alike
        raise EvalError(f"cannot load bundle {path}: {e}") from e
    return model, tokenizer


@register_model("ft-ray")
class FtRayLM(LM):
    def __init__(self, bundle: str | None = None, num_plans: int = DEFAULT_NUM_PLANS, plan_seed: int = 0,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, plan_mode: str = "fresh",
                 proposal: str = "prior", device: str | None = None, max_batch_size: int | None = None,
                 model=None, tokenizer: Tokenizer | None = None):
        """From `bundle`, or from an in-memory `model` and `tokenizer` (tests, Ray workers).
        `max_batch_size` is accepted because lm-eval passes it; batches are `batch_size` rows."""
        super().__init__()
        check_num_plans(num_plans)
        if plan_mode not in PLAN_MODES:
            raise EvalError(f"plan_mode must be one of {', '.join(PLAN_MODES)}, got {plan_mode!r}")
        if proposal not in ("prior", "encoder"):
            raise EvalError(f"proposal must be 'prior' or 'encoder', got {proposal!r}")
        if (bundle is None) == (model is None):
            raise EvalError("give either bundle=PATH or an in-memory model and tokenizer")
        if bundle is not None:
            model, tokenizer = load_eval_bundle(bundle, device or "cpu")
        if model is None or tokenizer is None:
            raise EvalError("an in-memory model needs its tokenizer (tokenizer=...)")
        self.model, self.tokenizer = model.eval(), tokenizer
        tokenizer.encode_special_tokens = True  # a literal "<eos>" in a document is text
        self.eos_id, bos = eos_id(tokenizer), bos_id(tokenizer)
        self.bos_id = self.eos_id if bos is None else bos  # as the serving engine
        self.num_plans, self.plan_seed, self.plan_mode, self.proposal = num_plans, plan_seed, plan_mode, proposal
        self.batch_size = _batch_size(batch_size)
        self.max_length = model.cfg.max_seq_len
        self._device = model.embed.weight.device

    # ------------------------------------------------------------------ tokens
    def tok_encode(self, text: str) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        except Exception:  # tokenizers raises a bare Exception on a character it lacks
            missing = [c for c in dict.fromkeys(text) if not _encodable(self.tokenizer, c)]
            raise EvalError(f"text with characters the model cannot encode ({', '.join(map(repr, missing))}): "
                            f"{text[:60]!r}") from None

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(BOS + context ids, continuation ids), split as lm-eval's HF model splits them."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.tok_encode(context) if context else []
        whole = self.tok_encode(context + continuation)
        return [self.bos_id, *ctx], whole[len(ctx):]

    def _seed(self, key: str) -> int:
        return self.plan_seed if self.plan_mode == "shared" else derive_seed(self.plan_seed, key)

    # ------------------------------------------------------------------ lm-eval API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs, seeds, cut = [], [], 0
        for req in requests:
            context, continuation = req.args
            ctx, cont, truncated = fit_window(*self.encode_pair(context, continuation), self.max_length)
            pairs.append((ctx, cont))
            seeds.append(self._seed(f"context:{context}"))
            cut += truncated
        _warn_truncated(cut, len(requests), self.max_length)
        items = make_items(self.model, pairs, seeds, self.num_plans, self.proposal)
        results = [(s.logprob, s.is_greedy) for s in score(self.model, items, self.batch_size)]
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum over disjoint windows of the IWAE-K lower bound (exact for a baseline)."""
        windows, owner, seeds = [], [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for j, w in enumerate(rolling_windows(self.tok_encode(text), self.bos_id, self.max_length)):
                windows.append(w)
                owner.append(i)
                seeds.append(derive_seed(self.plan_seed, f"rolling:{j}:{text}"))
        bounds = iwae_log_likelihood(self.model, windows, self.num_plans, seeds, self.batch_size)
        totals = [0.0] * len(requests)
        for i, b in zip(owner, bounds):
            totals[i] += b
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The prompt's Z from the encoder over the prompt, new Z from the prior (as the paper);
        greedy unless do_sample. Repeats of one request get plans j = 0, 1, ... (see plan_mode)."""
        jobs, seen, cut = [], Counter[str](), 0
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            job, truncated = self._job(i, context, gen_kwargs, seen)
            jobs.append(job)
            cut += truncated
        _warn_truncated(cut, len(requests), self.max_length)
        out = [""] * len(requests)
        for group in self._batches(jobs):
            for job, text in zip(group, self._generate(group)):
                out[job.index] = text
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    # ------------------------------------------------------------------ generation
    def _job(self, index: int, context: str, gen_kwargs: dict, seen: Counter) -> tuple[GenJob, bool]:
        """(the resolved job, whether its prompt was truncated). `seen` counts identical requests
        (lm-eval's repeats) so that repeat j gets plan j."""
        kw = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
        until = [s for s in kw.pop("until") if s]
        max_new = max(1, min(int(kw.pop("max_gen_toks")), self.max_length - 1))
        do_sample, temperature = kw.pop("do_sample", False), float(kw.pop("temperature", 0.0))
        top_k, top_p = kw.pop("top_k", None), kw.pop("top_p", None)
        if kw:
            log.warning("ft-ray ignores generation settings %s", sorted(kw))
        prompt = [self.bos_id, *self.tok_encode(context)]
        budget = self.max_length - max_new
        key = (context, repr(sorted(gen_kwargs.items())))
        repeat = seen[key]
        seen[key] += 1
        seed = row_seed(self.plan_seed, repeat) if self.plan_mode == "shared" else \
            derive_seed(self.plan_seed, f"generate:{repeat}:{context}")
        job = GenJob(index, prompt[-budget:], max_new, until, seed,
                     temperature if do_sample else 0.0, top_k, top_p)  # normalize_gen_kwargs' rule
        return job, len(prompt) > budget

    def _batches(self, jobs: list[GenJob]) -> list[list[GenJob]]:
        groups: dict[tuple, list[GenJob]] = {}
        for job in jobs:
            groups.setdefault(job.batch_key(), []).append(job)
        return [g[i:i + self.batch_size] for g in groups.values() for i in range(0, len(g), self.batch_size)]

    @torch.no_grad()
    def _generate(self, jobs: list[GenJob]) -> list[str]:
        """Decode up to max_new tokens in chunks of GEN_CHUNK, stopping once every row has hit EOS
        or a stop string. The FT's whole plan (prompt + new codes) is drawn first, so chunked
        decoding gives what one call would."""
        first = jobs[0]  # every job of the batch has its settings
        prompts = torch.tensor([j.prompt for j in jobs], device=self.device)  # (B, T0)
        T0, total = prompts.shape[1], prompts.shape[1] + first.max_new
        codes = None
        if is_latent(self.model):  # (B, T0 + N): the prompt's Z from the encoder, the new Z from the prior
            codes = torch.stack([sample_shared_plan(self.model, prompts[b], first.max_new,
                                                    torch.Generator(self.device).manual_seed(j.seed))
                                 for b, j in enumerate(jobs)])
        gen = torch.Generator(self.device).manual_seed(derive_seed(first.seed, "sample"))
        seq, texts = prompts, ("",) * len(jobs)
        while seq.shape[1] < total:
            step = min(GEN_CHUNK, total - seq.shape[1])
            plan = None if codes is None else codes[:, :seq.shape[1] + step]
            seq = self.model.generate(seq, step, temperature=first.temperature, top_k=first.top_k,
                                      top_p=first.top_p, plan=plan, generator=gen)
            texts, done = zip(*(self._finish(row[T0:], j.until) for row, j in zip(seq.tolist(), jobs)))
            if all(done):
                break
        return list(texts)

    def _finish(self, new_ids: list[int], until: list[str]) -> tuple[str, bool]:
        """(the text up to EOS or the first stop string, whether either was reached)."""
        stopped = self.eos_id in new_ids
        if stopped:
            new_ids = new_ids[:new_ids.index(self.eos_id)]
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in until if s in text]
        return (text[:min(cuts)], True) if cuts else (text, stopped)


def _batch_size(value) -> int:
    """lm-eval passes ints, digit strings or "auto" ("auto:N"); auto means the default."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise EvalError(f"batch_size must be >= 1, got {value!r}")
    return size


def _encodable(tokenizer: Tokenizer, char: str) -> bool:
    try:
        tokenizer.encode(char, add_special_tokens=False)
        return True
    except Exception:
        return False


def _warn_truncated(num_cut: int, num_requests: int, max_seq_len: int) -> None:
    if num_cut:
        log.warning("%d of %d requests exceed max_seq_len=%d and were truncated from the left",
                    num_cut, num_requests, max_seq_len)
