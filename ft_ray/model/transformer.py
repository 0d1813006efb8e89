"""The Llama-style baseline decoder, and the machinery the Free Transformer reuses.

`forward_tokens` is the one forward of both models, for every caller: training (no cache),
`generate` (prefill and one-token steps into a preallocated KV cache, rows advancing together)
and the serving engine (rows in cache slots at per-row positions). It accepts a `latent_fn`:
given the residual X entering the injection block, it returns R, and that block then takes its
keys/values from X + R: the only place Z enters. The baseline never passes one, so it is exactly
a plain decoder; the Free Transformer supplies it (encoder + mapper in training, a `Plan` in a
prefill, fixed codes in a decode step). The FT only decides the plan (see plan.py).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ft_ray.config import ModelConfig
from ft_ray.model.layers import (
    Block,
    CacheRows,
    DecodeWeights,
    KVCache,
    RMSNorm,
    pack_block,
    rope_tables,
)
from ft_ray.model.sampling import sample_next

LatentFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    z: torch.Tensor | None = None  # (B, T) int64 codes used (FT only)
    z_logits: torch.Tensor | None = None  # (B, T, H) posterior logits (FT, when Z came from the encoder)
    kl: torch.Tensor | None = None  # (B, T) KL(Q || uniform) per token, nats


class BaselineTransformer(nn.Module):
    has_latent = False  # a latent plan Z (the Free Transformer's); cfg.has_latent says the same

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self._build(cfg)
        self.reset_parameters()

    def _build(self, cfg: ModelConfig) -> None:
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_dim, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # fp32 RoPE tables per device, kept out of buffers so `.to(bf16)` never rounds them
        self._rope_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._decode_cache: tuple[tuple, list[DecodeWeights]] | None = None  # see decode_weights
        self._param_dicts: list[dict] | None = None

    # ------------------------------------------------------------------ initialisation, sizes
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)  # residual projections, GPT-2 style
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms keep their ones; the FT initialises its own vectors
            is_out = name.endswith(("attn.wo.weight", "mlp.w2.weight"))
            nn.init.normal_(p, mean=0.0, std=out_std if is_out else std)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 N + 12 L D T for attention."""
        t = seq_len or self.cfg.max_seq_len
        n = self.num_params(exclude_embeddings=True) + (self.cfg.vocab_size * self.cfg.hidden_dim
                                                         if self.cfg.tie_embeddings else 0)
        return 6.0 * n + 12.0 * self.cfg.num_layers * self.cfg.hidden_dim * t

    # ------------------------------------------------------------------ forward
    def _rope(self, pos: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if pos + length > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + length} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        device = self.embed.weight.device
        if device not in self._rope_cache:
            with torch.inference_mode(False):  # ordinary tensors even when generation builds them
                cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
                self._rope_cache[device] = (cos.to(device), sin.to(device))  # (max_len, hd) each
        cos, sin = self._rope_cache[device]
        return cos[pos:pos + length], sin[pos:pos + length]

    def decode_weights(self) -> list[DecodeWeights] | None:
        """Per-block `DecodeWeights` for one-token decoding on CPU; None on other devices, whose
        matrix products read the `nn.Linear` layout at full speed. Kept between calls (an extra
        copy of the blocks' weights) and rebuilt when any block parameter was replaced or
        modified in place (optimizer steps, `load_state_dict`, `.to()`)."""
        if self.embed.weight.device.type != "cpu":
            return None
        if self._param_dicts is None:  # the blocks' own parameter dicts: assignments land in them
            self._param_dicts = [m._parameters for m in self.blocks.modules() if m._parameters]
        # the engine checks this every step: plain dict walks, not parameters()' name building
        key = tuple((p.data_ptr(), p.dtype, p._version) for d in self._param_dicts for p in d.values()
                    if p is not None)  # a Linear without bias registers None
        if self._decode_cache is None or self._decode_cache[0] != key:
            self._decode_cache = None  # free the stale copy before building the new one
            self._decode_cache = (key, [pack_block(typing.cast(Block, b)) for b in self.blocks])
        return self._decode_cache[1]

    def _rope_at(self, rows: CacheRows | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for a forward: (T, hd) when every row starts at one position, (B, 1, T, hd)
        gathered per row for per-row positions."""
        if rows is None or rows.positions is None:
            return self._rope(0 if rows is None else rows.pos, length)
        cos, sin = self._rope(0, self.cfg.max_seq_len)
        if rows.length > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {rows.length} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        return cos[rows.positions][:, None], sin[rows.positions][:, None]

    def forward_tokens(self, tokens: torch.Tensor, latent_fn: LatentFn | None = None,
                       caches: list[KVCache] | None = None, rows: CacheRows | None = None,
                       packed: list[DecodeWeights] | None = None, last_only: bool = False) -> torch.Tensor:
        """The one forward: tokens (B, T) -> logits (B, T, V), or (B, 1, V) with `last_only`.

        Without `caches`: positions 0..T-1, causal (training, evaluation, full recompute). With
        `caches` (one `KVCache` per block) and `rows`: row b reads and writes slot rows.slots[b]
        at its own positions. `latent_fn(x, cos, sin) -> R` feeds the injection block. `packed`:
        the blocks' `decode_weights()` (same numbers up to rounding, faster one-token steps on CPU).
        """
        x = self.embed(tokens)  # (B, T, D)
        cos, sin = self._rope_at(rows, tokens.shape[1])
        for i, block in enumerate(self.blocks):
            kv_input = None
            if latent_fn is not None and i == self.cfg.inject_layer:
                kv_input = x + latent_fn(x, cos, sin)  # queries from X, keys/values from X + R
            x = block(x, cos, sin, kv_input=kv_input, cache=caches[i] if caches else None, rows=rows,
                      packed=packed[i] if packed else None)
        if last_only:
            x = x[:, -1:]  # a prefill that only samples: the LM head on the last position alone
        return self.lm_head(self.norm(x))

    def forward(self, tokens: torch.Tensor, z: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> ModelOutput:
        if z is not None:
            raise ValueError("the baseline has no latent: z must be None")
        return ModelOutput(logits=self.forward_tokens(tokens))

    # ------------------------------------------------------------------ objectives
    @staticmethod
    def _split(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be (B, T+1) with T >= 1, got shape {tuple(tokens.shape)}")
        return tokens[:, :-1], tokens[:, 1:]

    @staticmethod
    def _ce(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)

    def loss(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """tokens (B, T+1); next-token cross-entropy in nats."""
        inputs, targets = self._split(tokens)
        ce = self._ce(self(inputs).logits, targets)
        return {"loss": ce, "ce": ce}

    @torch.no_grad()
    def nll(self, tokens: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        """Exact negative log-likelihood per token, nats (no latent to bound)."""
        inputs, targets = self._split(tokens)
        return self._ce(self(inputs).logits, targets)

    # ------------------------------------------------------------------ generation
    def make_caches(self, num_slots: int, max_len: int) -> list[KVCache]:
        """One `KVCache` per block: (num_slots, n_kv, max_len, hd) keys and values each."""
        p = self.embed.weight
        assert self.cfg.num_key_value_heads is not None  # resolved by ModelConfig.__post_init__
        return [KVCache(num_slots, self.cfg.num_key_value_heads, max_len, self.cfg.head_dim, p.dtype, p.device)
                for _ in self.blocks]

    def _plan(self, prompt: torch.Tensor, max_new_tokens: int, plan, generator, shared_plan: bool):
        """The baseline has no plan; the FT returns a `Plan` (see plan.py)."""
        if plan is not None or shared_plan:
            raise ValueError("the baseline has no latent plan: plan must be None and shared_plan False")
        return None

    def codes_fn(self, codes: torch.Tensor | None) -> LatentFn | None:
        """The latent_fn that injects fixed codes (B, T) (None for the baseline)."""
        return None

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, plan=None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 return_plan: bool = False, shared_plan: bool = False):
        """Sample `max_new_tokens` after `prompt` (B, T0). Returns (B, T0+N), or (tokens, z).

        For the FT, `plan` fixes Z (plan.py gives the one draw order, shared with the engine):
        None draws it with `generator`; an int seeds a generator per row (row j: `row_seed(seed, j)`)
        that draws the prompt's Z from the encoder, then the new Z from the uniform prior; a
        LongTensor gives codes for the new positions ((N,) or (B, N)) or for the whole sequence
        ((T0+N,) or (B, T0+N)). `shared_plan=True` gives every row one whole plan, drawn once: the
        rows must then share one prompt. `z` is (B, T0+N) for the FT and None for the baseline.

        Decoding runs under `torch.inference_mode` (no autograd bookkeeping per op: batch-1 decode
        is dominated by per-op overhead and weight reads); the results are returned as ordinary
        tensors, so they can be fed to a training forward or modified in place.
        """
        with torch.inference_mode():
            seq, codes = self._generate(prompt, max_new_tokens, temperature, top_k, top_p, plan,
                                        generator, use_cache, shared_plan)
        seq = seq.clone()
        codes = None if codes is None else codes.clone()
        return (seq, codes) if return_plan else seq

    def _generate(self, prompt, max_new_tokens, temperature, top_k, top_p, plan, generator,
                  use_cache, shared_plan) -> tuple[torch.Tensor, torch.Tensor | None]:
        if prompt.dim() == 1:
            prompt = prompt.unsqueeze(0)
        B, T0 = prompt.shape
        if T0 < 1 or max_new_tokens < 0:
            raise ValueError("need a non-empty prompt and max_new_tokens >= 0")
        if T0 + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len={self.cfg.max_seq_len}")
        plan_state = self._plan(prompt, max_new_tokens, plan, generator, shared_plan)
        caches = self.make_caches(B, T0 + max_new_tokens) if use_cache else None
        packed = self.decode_weights() if use_cache and max_new_tokens > 1 else None
        slots, device = range(B), prompt.device
        rows = CacheRows(slots, T0, 0, device) if use_cache else None
        latent_fn = plan_state.latent_fn if plan_state is not None else None
        logits = self.forward_tokens(prompt, latent_fn, caches, rows, last_only=True)[:, -1]  # (B, V)
        codes = plan_state.codes if plan_state is not None else None  # (B, T0+N), complete after prefill
        seq = prompt
        for i in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            seq = torch.cat([seq, tok[:, None]], dim=1)
            if i == max_new_tokens - 1:
                break
            if use_cache:
                step_codes = None if codes is None else codes[:, T0 + i:T0 + i + 1]
                logits = self.forward_tokens(tok[:, None], self.codes_fn(step_codes), caches,
                                             CacheRows(slots, 1, T0 + i, device), packed)[:, -1]
            else:  # full recompute with the same codes
                cur = None if codes is None else codes[:, :seq.shape[1]]
                logits = self.forward_tokens(seq, self.codes_fn(cur), last_only=True)[:, -1]
        return seq, codes
