"""The generation engine over one loaded bundle: batched KV-cache decoding of many requests at once.

`Engine.generate` takes requests with different prompts and settings; each request expands into n
rows (its samples). A row owns everything that makes its output its own, so a request gives the
same output in any batch as alone (up to the float rounding of batched matmuls):
- a token generator seeded from (request seed, sample index), and its temperature/top_k/top_p;
- for a Free Transformer, a plan generator and its codes: the prompt's Z sampled from the encoder
  during prefill (first draw), then the new positions' Z drawn once from the uniform prior (second
  draw), unless given; `shared` gives the request's n rows one plan, drawn once;
- its own position in a shared batched KV cache (see decode.py).

Seeds, all deterministic (a request without a seed gets a fresh random one, reported back):
  sample j's seed       s_j = seed if j == 0 else derive_seed(seed, j)          (token generator)
  sample j's plan seed  with plan.seed p: p if j == 0 or shared else derive_seed(p, j);
                        without: derive_seed(s_j, "plan") (shared: that of sample 0)
Every choice reports s_j and its codes (prompt + new, and the plan seed): re-running with `seed=s_j,
n=1` and `plan={"codes": prompt + new}` (or, when the plan seed is unchanged, `{"codes": new}`)
reproduces its text exactly.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ft_ray.config import ModelConfig
from ft_ray.data.tokenizer import bos_id, eos_id, vocab_size
from ft_ray.model import BaselineTransformer, FreeTransformer
from ft_ray.model.latent import sample_codes, uniform_codes
from ft_ray.model.sampling import sample_next
from ft_ray.serve.decode import BatchKVCache, decode_step, prefill
from ft_ray.serve.requests import (
    EngineInfo,
    GenerationRequest,
    PlanSpec,
    RequestError,
    check_request,
    validate_request,
)
from ft_ray.serve.text import find_stop, streamable_length


def derive_seed(seed: int, key: int | str) -> int:
    """A 63-bit seed derived from (seed, key); the same in every process (unlike hash())."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_seed(seed: int, index: int) -> int:
    return seed if index == 0 else derive_seed(seed, index)


# ---------------------------------------------------------------------------------------- results
@dataclass
class PlanCodes:
    """The Free Transformer codes a sample used: one per prompt position (BOS included) and one per
    new position (all max_tokens of them, even when the sample stopped early)."""

    prompt: list[int]
    new: list[int]
    seed: int  # the plan generator's seed (it drew the prompt's Z, and the new Z unless given)


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

    prefill_tokens: int = 0
    decode_steps: int = 0  # batched forward passes of one token per row
    generated_tokens: int = 0


# ---------------------------------------------------------------------------------------- rows
class _Row:
    """One sample being generated: its generator, settings, tokens and text."""

    def __init__(self, index: int, seed: int, req: GenerationRequest, decode: Callable[[list[int]], str],
                 eos: int, device: torch.device):
        self.index, self.seed, self.req = index, seed, req
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.decode, self.eos = decode, eos
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already streamed
        self.finish_reason: str | None = None
        self.codes: PlanCodes | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def sample(self, logits: torch.Tensor) -> int:
        """logits (V,) -> the next token id, from this row's own generator."""
        req = self.req
        return int(sample_next(logits[None], req.temperature, req.top_k, req.top_p, self.generator)[0])

    def push(self, token: int) -> str:
        """Append a generated token; return the text delta that is now safe to stream."""
        self.token_ids.append(token)
        if token == self.eos:
            self.finish_reason = "stop"
        else:
            text = self.decode(self.token_ids)
            cut = find_stop(text, self.req.stop)
            if cut is not None:
                text, self.finish_reason = text[:cut], "stop"
            elif len(self.token_ids) >= self.req.max_tokens:
                self.finish_reason = "length"
            self.text = text
        end = len(self.text) if self.finished else streamable_length(self.text, self.req.stop)
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta

    def choice(self) -> Choice:
        return Choice(self.index, self.text, list(self.token_ids), self.finish_reason, self.seed, self.codes)


@dataclass
class _Prepared:
    """A checked request: its prompt ids, seed, rows and plan seeds (one if shared, none for a baseline)."""

    request: GenerationRequest
    prompt_ids: list[int]
    seed: int
    rows: list[_Row]
    plan_seeds: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(row.finished for row in self.rows)

    def usage(self) -> Usage:
        return Usage(len(self.prompt_ids), sum(len(row.token_ids) for row in self.rows))

    def result(self, name: str) -> GenerationResult:
        return GenerationResult(name, [row.choice() for row in self.rows], self.usage())


# ---------------------------------------------------------------------------------------- engine
class Engine:
    """Generation over one model + tokenizer. The prompt is encoded without the tokenizer's own
    special tokens and prefixed with BOS (EOS when the tokenizer has no BOS); decoding skips
    special tokens."""

    def __init__(self, model: BaselineTransformer, tokenizer: Tokenizer, cfg: ModelConfig, name: str):
        if vocab_size(tokenizer) > cfg.vocab_size:
            raise ValueError(f"tokenizer has ids up to {vocab_size(tokenizer) - 1}, beyond the model's "
                             f"vocab_size={cfg.vocab_size}")
        self.model, self.tokenizer, self.cfg, self.name = model.eval(), tokenizer, cfg, name
        tokenizer.encode_special_tokens = True  # a literal "<eos>" in a prompt is text, not the token
        self.eos_id = eos_id(tokenizer)
        bos = bos_id(tokenizer)
        self.bos_id = self.eos_id if bos is None else bos
        self.is_ft = isinstance(model, FreeTransformer)
        self.device = model.embed.weight.device
        self.stats = EngineStats()
        self.metrics: dict = {}  # the bundle's metrics.json, when loaded from a bundle
        model._rope(0, cfg.max_seq_len)  # build the RoPE tables now, not inside the first request
        self._info = EngineInfo(name=name, arch=cfg.arch, vocab_size=cfg.vocab_size,
                                max_seq_len=cfg.max_seq_len,
                                latent_bits=cfg.latent_bits if self.is_ft else None,
                                params=model.num_params())

    @classmethod
    def from_bundle(cls, path: str | Path, device: str | torch.device = "cpu",
                    name: str | None = None) -> Engine:
        """Load a bundle directory (model.safetensors, config.json, tokenizer.json, metrics.json);
        nothing is unpickled. The name defaults to the directory's name."""
        from ft_ray.train.checkpoint import load_bundle

        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{path}: bundle has no tokenizer.json; the engine needs one")
        model, cfg, metrics = load_bundle(path, device)
        engine = cls(model, Tokenizer.from_file(str(tokenizer_file)), cfg, name or path.name)
        engine.metrics = metrics
        return engine

    def info(self) -> EngineInfo:
        return self._info

    def encode(self, prompt: str) -> list[int]:
        """BOS + the prompt's token ids."""
        try:
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        except Exception as e:  # tokenizers raises a bare Exception, e.g. on a character it lacks
            raise RequestError("prompt", f"cannot be tokenised by model {self.name!r}: {e}") from None
        return [self.bos_id, *ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def validate(self, body, allowed_extra: frozenset[str] | set[str] = frozenset()) -> GenerationRequest:
        """A JSON body -> a checked request, or RequestError naming the field (see requests.py)."""
        return validate_request(body, self._info, self.encode, allowed_extra)

    # ------------------------------------------------------------------------------ public calls
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate all requests together in one batch; results in the same order."""
        prepared = [self._prepare(req) for req in requests]  # refuse bad ones before any compute
        if prepared:
            for _ in self._run(prepared):
                pass
        return [p.result(self.name) for p in prepared]

    def stream(self, request: GenerationRequest) -> Iterator[StreamEvent]:
        """Events of one request as tokens are produced. The request is checked now (a bad one
        raises here, before any event); closing the iterator stops the generation."""
        return self._stream(self._prepare(request))

    # ------------------------------------------------------------------------------ internals
    def _stream(self, prepared: _Prepared) -> Iterator[StreamEvent]:
        steps = self._run([prepared])
        try:
            for updates in steps:
                events = [StreamEvent(row.index, delta, row.finish_reason,
                                      row.choice() if row.finished else None)
                          for row, delta in updates if delta or row.finished]
                if prepared.done and events:
                    events[-1].usage = prepared.usage()
                yield from events
        finally:
            steps.close()  # a closed stream stops decoding at once

    def _prepare(self, req: GenerationRequest) -> _Prepared:
        if not isinstance(req, GenerationRequest):
            raise TypeError(f"expected a GenerationRequest, got {type(req).__name__}")
        ids = self.encode(req.prompt)
        check_request(req, self._info, len(ids))
        seed = secrets.randbits(63) if req.seed is None else req.seed
        rows = [_Row(j, sample_seed(seed, j), req, self.decode, self.eos_id, self.device)
                for j in range(req.n)]
        prepared = _Prepared(req, ids, seed, rows)
        if self.is_ft:
            plan = req.plan or PlanSpec()
            count = 1 if plan.shared else req.n
            if plan.seed is not None:
                prepared.plan_seeds = [sample_seed(plan.seed, j) for j in range(count)]
            else:
                prepared.plan_seeds = [derive_seed(rows[j].seed, "plan") for j in range(count)]
        return prepared

    @torch.inference_mode()
    def _run(self, prepared: list[_Prepared]) -> Iterator[list[tuple[_Row, str]]]:
        """Prefill every request, then decode all unfinished rows one token per step. Yields, per
        step, (row, text delta) for every row that got a token."""
        rows = [row for p in prepared for row in p.rows]
        max_len = max(len(p.prompt_ids) + p.request.max_tokens for p in prepared)
        cache = BatchKVCache(self.model, len(rows), max_len)
        codes = torch.zeros(len(rows), max_len, dtype=torch.int64, device=self.device) if self.is_ft else None
        logits, start = [], 0
        for p in prepared:
            logits.append(self._prefill(p, cache, start, codes))
            start += len(p.rows)
        step_logits = torch.cat(logits)  # (B, V)
        positions = torch.tensor([len(p.prompt_ids) for p in prepared for _ in p.rows], device=self.device)
        packed = self.model.decode_weights()
        while True:
            tokens = [row.sample(step_logits[b]) for b, row in enumerate(rows)]
            self.stats.generated_tokens += len(tokens)
            yield [(row, row.push(tok)) for row, tok in zip(rows, tokens, strict=True)]
            keep = [b for b, row in enumerate(rows) if not row.finished]
            if not keep:
                return
            if len(keep) < len(rows):  # drop finished rows from the batch
                index = torch.tensor(keep, device=self.device)
                cache.select(index)
                positions = positions[index]
                codes = None if codes is None else codes[index]
                rows, tokens = [rows[b] for b in keep], [tokens[b] for b in keep]
            step_codes = None if codes is None else codes.gather(1, positions[:, None])[:, 0]  # (B,)
            step_logits = decode_step(self.model, cache, torch.tensor(tokens, device=self.device),
                                      positions, step_codes, packed)
            positions = positions + 1
            self.stats.decode_steps += 1

    def _prefill(self, p: _Prepared, cache: BatchKVCache, start: int,
                 codes: torch.Tensor | None) -> torch.Tensor:
        """Prefill request `p` into rows start..start+n-1; return next-token logits (n, V).

        Rows that share everything (a baseline's n samples, a shared plan) are prefilled once and
        copied; otherwise each row samples its own prompt Z from the encoder.
        """
        n, num_prompt, num_new = len(p.rows), len(p.prompt_ids), p.request.max_tokens
        width = len(p.plan_seeds) if self.is_ft else 1  # rows prefilled separately
        tokens = torch.tensor(p.prompt_ids, device=self.device)[None].expand(width, -1)  # (m, T0)
        plan_gens = [torch.Generator(device=self.device).manual_seed(s) for s in p.plan_seeds]
        given = p.request.plan.codes if p.request.plan is not None else None
        prompt_z: list[torch.Tensor] = []

        def prompt_latent(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            if given is not None and len(given) == num_prompt + num_new:
                z = torch.tensor(given[:num_prompt], device=self.device)[None].expand(width, -1)
            else:  # sampled from the posterior (never thresholded), each plan from its own generator
                z_logits = self.model.encoder(x, cos, sin)  # (m, T0, H)
                z = torch.cat([sample_codes(z_logits[j:j + 1], g) for j, g in enumerate(plan_gens)])
            prompt_z.append(z)
            return self.model.post_sampler.weight[z]

        views = cache.rows_view(slice(start, start + width))
        logits = prefill(self.model, tokens, prompt_latent if self.is_ft else None, views)  # (m, V)
        self.stats.prefill_tokens += width * num_prompt
        if width < n:
            cache.copy_row(start, slice(start + 1, start + n), num_prompt)
            logits = logits.expand(n, -1)
        if codes is not None:
            if given is not None:
                new_z = torch.tensor(given[-num_new:], device=self.device)[None].expand(width, -1)
            else:  # drawn once, for all new positions, after the prompt's Z
                bits = self.cfg.latent_bits
                new_z = torch.cat([uniform_codes((1, num_new), bits, g, self.device) for g in plan_gens])
            plan = torch.cat([prompt_z[0], new_z], dim=1).expand(n, -1)  # (n, T0+N)
            codes[start:start + n, :num_prompt + num_new] = plan
            for j, row in enumerate(p.rows):
                row.codes = PlanCodes(plan[j, :num_prompt].tolist(), plan[j, num_prompt:].tolist(),
                                      p.plan_seeds[j % width])
        return logits
