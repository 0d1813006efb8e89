"""The Free Transformer (Fleuret, 2025): the baseline decoder plus a latent plan Z.

What it adds to `BaselineTransformer`, and nothing else:
- `encoder`: one non-causal block of its own whose queries are a learned constant zeta, keys/values
  norm(X) with X the first half's output, RoPE at the real positions, then RMSNorm and a read-out
  to H logits per position;
- `post_sampler`: the table W (2^H, D); R_t = W[Z_t];
- the injection: block `inject_layer` takes keys/values from X + R (see `_forward_tokens`).
Parameter names of the baseline are kept, so a baseline loads the shared part of an FT state dict.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ft_ray.config import ModelConfig
from ft_ray.model.latent import (
    free_bits_penalty,
    kl_to_uniform,
    log_q,
    sample_and_embed,
    sample_codes,
    uniform_codes,
)
from ft_ray.model.layers import Block, RMSNorm
from ft_ray.model.transformer import BaselineTransformer, LatentFn, ModelOutput


class Encoder(nn.Module):
    """Non-causal block with constant queries zeta, then RMSNorm and a read-out to H logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.zeta = nn.Parameter(torch.zeros(cfg.hidden_dim))
        self.block = Block(cfg)
        self.norm = RMSNorm(cfg.hidden_dim, cfg.rms_norm_eps)
        self.readout = nn.Linear(cfg.hidden_dim, cfg.latent_bits, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, D): the first half's output -> posterior logits (B, T, H)."""
        queries = self.zeta.expand_as(x)  # the same learned vector at every position
        h = self.block(queries, cos, sin, kv_input=x, causal=False)
        return self.readout(self.norm(h))


class Plan:
    """The codes of one generation: the prompt's Z (sampled from the encoder during prefill, unless
    given) followed by the new positions' Z (drawn once from the uniform prior, or given)."""

    def __init__(self, model: FreeTransformer, prompt_codes: torch.Tensor | None,
                 new_codes: torch.Tensor, generator: torch.Generator | None, shared: bool):
        self.model, self.prompt_codes, self.new_codes = model, prompt_codes, new_codes
        self.generator, self.shared = generator, shared

    def prefill_fn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.prompt_codes is None:
            logits = self.model.encoder(x, cos, sin)  # (B, T0, H)
            if self.shared:  # one plan for all rows: sample row 0's posterior once
                self.prompt_codes = sample_codes(logits[:1], self.generator).expand(x.shape[0], -1)
            else:
                self.prompt_codes = sample_codes(logits, self.generator)  # never thresholded
        return self.model.post_sampler.weight[self.prompt_codes]

    @property
    def codes(self) -> torch.Tensor:
        return torch.cat([self.prompt_codes, self.new_codes], dim=1)  # (B, T0+N)


class FreeTransformer(BaselineTransformer):
    def _build(self, cfg: ModelConfig) -> None:
        super()._build(cfg)
        self.encoder = Encoder(cfg)
        self.post_sampler = nn.Embedding(1 << cfg.latent_bits, cfg.hidden_dim)  # W

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.normal_(self.encoder.zeta, std=self.cfg.init_std)
        if self.cfg.latent_init == "zero" or self.cfg.latent_init_std == 0:
            nn.init.zeros_(self.post_sampler.weight)
        else:
            nn.init.normal_(self.post_sampler.weight, std=self.cfg.latent_init_std)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = super().num_params(exclude_embeddings)
        return n - self.post_sampler.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Adds the mapper's backward: c = W g over all 2^H codes (2 * 2^H * D) and the two
        (2^H x H) products for log G and sum c G b (4 * 2^H * H); the forward gather is free."""
        t = seq_len or self.cfg.max_seq_len
        codes, d, h = 1 << self.cfg.latent_bits, self.cfg.hidden_dim, self.cfg.latent_bits
        return super().flops_per_token(seq_len) + 12.0 * d * t + 2.0 * codes * d + 4.0 * codes * h

    # ------------------------------------------------------------------ forward
    def _codes_fn(self, codes: torch.Tensor | None) -> LatentFn | None:
        if codes is None:
            return None
        return lambda x, cos, sin: self.post_sampler.weight[codes]

    def forward(self, tokens: torch.Tensor, z: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> ModelOutput:
        """tokens (B, T). Without `z`, Z is sampled from the encoder's posterior (training and
        evaluation); with `z` (B, T) int64 codes, the decoder runs on them."""
        if z is not None:
            self._check_codes(z, tokens.shape)
            return ModelOutput(logits=self._forward_tokens(tokens, self._codes_fn(z)), z=z)
        out: dict[str, torch.Tensor] = {}

        def encode_and_sample(x, cos, sin):
            out["z_logits"] = self.encoder(x, cos, sin)  # (B, T, H)
            r, out["z"] = sample_and_embed(out["z_logits"], self.post_sampler.weight, generator,
                                           self.cfg.mapper_chunk_elems)
            return r

        logits = self._forward_tokens(tokens, encode_and_sample)
        return ModelOutput(logits=logits, z=out["z"], z_logits=out["z_logits"],
                           kl=kl_to_uniform(out["z_logits"]))

    def _check_codes(self, z: torch.Tensor, shape) -> None:
        if z.dtype != torch.int64 or tuple(z.shape) != tuple(shape):
            raise ValueError(f"z must be int64 codes of shape {tuple(shape)}, got {z.dtype} {tuple(z.shape)}")
        if z.numel() and (int(z.min()) < 0 or int(z.max()) >= 1 << self.cfg.latent_bits):
            raise ValueError(f"z codes must be in [0, 2^{self.cfg.latent_bits})")

    # ------------------------------------------------------------------ objectives
    def loss(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """CE with the encoder's Z + mean_t max(0, KL_t - kappa). No beta weight."""
        inputs, targets = self._split(tokens)
        out = self(inputs)
        ce = self._ce(out.logits, targets)
        penalty = free_bits_penalty(out.kl, self.cfg.free_nats)
        return {"loss": ce + penalty, "ce": ce, "kl": out.kl.mean(), "kl_penalty": penalty}

    @torch.no_grad()
    def nll(self, tokens: torch.Tensor, num_samples: int = 1,
            generator: torch.Generator | None = None) -> torch.Tensor:
        """Honest upper bound on the per-token NLL, nats. K = 1: the ELBO (CE with posterior Z plus
        the KL, no hinge); K > 1: the importance-weighted bound, which tightens as K grows."""
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        inputs, targets = self._split(tokens)
        B, T = inputs.shape
        if num_samples == 1:
            out = self(inputs, generator=generator)
            return self._ce(out.logits, targets) + out.kl.mean()
        log_w = []
        log_prior = -T * self.cfg.latent_bits * math.log(2.0)  # log p(z) of the whole sequence
        for _ in range(num_samples):
            out = self(inputs, generator=generator)
            log_px = -self._ce(out.logits, targets, reduction="none").view(B, T).sum(-1)  # (B,)
            log_w.append(log_px + log_prior - log_q(out.z_logits, out.z).sum(-1))
        bound = torch.logsumexp(torch.stack(log_w), dim=0) - math.log(num_samples)  # (B,)
        return -bound.sum() / (B * T)

    # ------------------------------------------------------------------ generation plan
    def _plan(self, prompt: torch.Tensor, max_new_tokens: int, plan, generator, shared_plan: bool) -> Plan:
        B, T0 = prompt.shape
        n, device, h = max_new_tokens, prompt.device, self.cfg.latent_bits
        if isinstance(plan, bool) or not (plan is None or isinstance(plan, (int, torch.Tensor))):
            raise ValueError(f"plan must be None, an int seed or a LongTensor of codes, got {type(plan).__name__}")
        if isinstance(plan, int):
            generator = torch.Generator(device=device).manual_seed(plan)
        prompt_codes = new_codes = None
        if isinstance(plan, torch.Tensor):
            if plan.dtype.is_floating_point or plan.dtype == torch.bool:
                raise ValueError(f"plan codes must be integers, got {plan.dtype}")
            codes = plan.to(device)
            if codes.dim() == 1:
                codes = codes.unsqueeze(0).expand(B, -1)
            if codes.dim() != 2 or codes.shape[0] != B or codes.shape[1] not in (n, T0 + n):
                raise ValueError(f"plan codes must have shape (N,), (B, N), (T0+N,) or (B, T0+N) with "
                                 f"B={B}, T0={T0}, N={n}; got {tuple(plan.shape)}")
            self._check_codes(codes.long(), codes.shape)
            codes = codes.long()
            if codes.shape[1] == T0 + n:
                prompt_codes, new_codes = codes[:, :T0], codes[:, T0:]
            else:
                new_codes = codes
        if new_codes is None:
            rows = 1 if shared_plan else B
            new_codes = uniform_codes((rows, n), h, generator, device).expand(B, -1)
        return Plan(self, prompt_codes, new_codes, generator, shared_plan)


def sample_shared_plan(model: FreeTransformer, prompt: torch.Tensor, max_new_tokens: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """One whole plan (T0+N,) for `prompt` (T0,) or (1, T0): the prompt's Z drawn once from the
    encoder, the new Z drawn once from the prior. Pass it as `plan=` to share it across samples."""
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    plan = model._plan(prompt[:1], max_new_tokens, None, generator, shared_plan=True)
    with torch.no_grad():
        x = model.embed(prompt[:1])
        cos, sin = model._rope(0, prompt.shape[1])
        for block in model.blocks[:model.cfg.inject_layer]:
            x = block(x, cos, sin)
        plan.prefill_fn(x, cos, sin)
    return plan.codes[0]
