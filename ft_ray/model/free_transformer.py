"""The Free Transformer (Fleuret, 2025): the baseline decoder plus a latent plan Z.

What it adds to `BaselineTransformer`, and nothing else:
- `encoder`: one non-causal block of its own whose queries are a learned constant zeta, keys/values
  norm(X) with X the first half's output, RoPE at the real positions, then RMSNorm and a read-out
  to H logits per position;
- `post_sampler`: the table W (2^H, D); R_t = W[Z_t];
- the injection: block `inject_layer` takes keys/values from X + R (see `forward_tokens`);
- the generation plan (plan.py): which Z each position gets.
Parameter names of the baseline are kept, so a baseline loads the shared part of an FT state dict.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ft_ray.config import ModelConfig
from ft_ray.model.latent import free_bits_penalty, kl_to_uniform, log_q, sample_and_embed
from ft_ray.model.layers import Block, RMSNorm
from ft_ray.model.plan import Plan, make_plan
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


class FreeTransformer(BaselineTransformer):
    has_latent = True

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
    def codes_fn(self, codes: torch.Tensor | None) -> LatentFn | None:
        """The latent_fn that injects fixed codes (B, T): R = W[codes], a row gather."""
        if codes is None:
            return None
        return lambda x, cos, sin: self.post_sampler.weight[codes]

    def forward(self, tokens: torch.Tensor, z: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> ModelOutput:
        """tokens (B, T). Without `z`, Z is sampled from the encoder's posterior (training and
        evaluation); with `z` (B, T) int64 codes, the decoder runs on them."""
        if z is not None:
            self.check_codes(z, tokens.shape)
            return ModelOutput(logits=self.forward_tokens(tokens, self.codes_fn(z)), z=z)
        out: dict[str, torch.Tensor] = {}

        def encode_and_sample(x, cos, sin):
            out["z_logits"] = self.encoder(x, cos, sin)  # (B, T, H)
            r, out["z"] = sample_and_embed(out["z_logits"], self.post_sampler.weight, generator,
                                           self.cfg.mapper_chunk_elems)
            return r

        logits = self.forward_tokens(tokens, encode_and_sample)
        return ModelOutput(logits=logits, z=out["z"], z_logits=out["z_logits"],
                           kl=kl_to_uniform(out["z_logits"]))

    def check_codes(self, z: torch.Tensor, shape) -> None:
        """ValueError unless `z` is int64 codes of `shape` in [0, 2^H)."""
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
        return make_plan(self, prompt, max_new_tokens, plan, generator, shared_plan)


def sample_shared_plan(model: FreeTransformer, prompt: torch.Tensor, max_new_tokens: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """One whole plan (T0+N,) for `prompt` (T0,) or (1, T0), drawn in the plan's one order (the
    prompt's Z from the encoder, then the new Z from the prior). Pass it as `plan=` to share it
    across samples."""
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    plan = Plan(model, 1, max_new_tokens, [generator])
    with torch.inference_mode():
        model.forward_tokens(prompt[:1], plan.latent_fn, last_only=True)
    return plan.codes[0].clone()
