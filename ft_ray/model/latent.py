"""The Free Transformer's Binary Mapper (eqs. 6-8), its post-sampler table, and the KL to the prior.

Forward: H independent Bernoulli bits per token, code = sum_h 2^h b_h (integer arithmetic), and
R = W[code], a row gather. Backward (the surrogate Y + G - detach(G), R = (Y + G - sg(G)) W):
- W receives the one-hot value: the scatter of dL/dR into the sampled rows;
- the logits receive the gradient through the dense G over all 2^H codes,
    G_d = prod_h p_h^{b_h(d)} (1 - p_h)^{1 - b_h(d)},  dG_d/dL_h = G_d (b_h(d) - p_h),
  so with c_d = <W_d, dL/dR>:  dL/dL_h = sum_d c_d G_d b_h(d) - p_h sum_d c_d G_d.
  log G_d = sum_h logsigmoid(-L_h) + <b(d), L>, so a chunk of codes costs two small matmuls plus
  the (tokens x chunk x D) product for c; no (tokens x 2^H) tensor exists beyond one chunk.
p, G, the KL and all these sums run in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def code_bits(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Bits of integer codes: (...,) int64 -> (..., H) int64, bit h = (code >> h) & 1."""
    shifts = torch.arange(num_bits, device=codes.device, dtype=torch.int64)
    return (codes.unsqueeze(-1) >> shifts) & 1


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """(..., H) {0,1} -> (...,) int64 codes, sum_h 2^h b_h, in integer arithmetic."""
    weights = torch.ones(bits.shape[-1], dtype=torch.int64, device=bits.device) << torch.arange(
        bits.shape[-1], dtype=torch.int64, device=bits.device)
    return (bits.to(torch.int64) * weights).sum(-1)


def sample_codes(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one code per position from the factorised posterior: (..., H) -> (...,) int64."""
    p = torch.sigmoid(logits.detach().float())
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float32)
    return bits_to_codes(u < p)


def uniform_codes(shape: tuple[int, ...], num_bits: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Codes from the uniform prior over [0, 2^H), independent across positions."""
    return torch.randint(0, 1 << num_bits, shape, generator=generator, device=device, dtype=torch.int64)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(Q || uniform over 2^H codes) in nats for a factorised Q: (..., H) -> (...).

    KL = sum_h [ln 2 - Hb(p_h)], with log p and log(1-p) taken as logsigmoid so it stays finite
    for large |logits| in any dtype.
    """
    lf = logits.float()
    p = torch.sigmoid(lf)
    entropy = -(p * F.logsigmoid(lf) + (1 - p) * F.logsigmoid(-lf))  # binary entropy per bit
    return (math.log(2.0) - entropy).sum(-1)


def log_q(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """log Q(code) under the factorised posterior, in fp32: (..., H), (...) -> (...)."""
    lf = logits.float()
    bits = code_bits(codes, lf.shape[-1]).to(lf.dtype)
    return (bits * F.logsigmoid(lf) + (1 - bits) * F.logsigmoid(-lf)).sum(-1)


class _SampleAndEmbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, weight, codes, chunk_elems):
        ctx.save_for_backward(logits, weight, codes)
        ctx.chunk_elems = chunk_elems
        return weight[codes]  # (..., D) row gather: the one-hot forward value

    @staticmethod
    def backward(ctx, grad_r):
        logits, weight, codes = ctx.saved_tensors
        num_codes, dim = weight.shape
        num_bits = logits.shape[-1]
        g = grad_r.reshape(-1, dim)  # (N, D)
        grad_logits = grad_weight = None
        if ctx.needs_input_grad[1]:
            # the one-hot forward value: scatter dL/dR into the sampled rows
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
            grad_weight.index_add_(0, codes.reshape(-1), g.float())
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            lf = logits.reshape(-1, num_bits).float()  # (N, H)
            p = torch.sigmoid(lf)
            base = F.logsigmoid(-lf).sum(-1, keepdim=True)  # (N, 1): log G of code 0
            gf = g.float()
            n = gf.shape[0]
            chunk = max(1, min(num_codes, ctx.chunk_elems // max(n, 1)))
            s1 = torch.zeros_like(lf)  # sum_d c_d G_d b_h(d)   (N, H)
            s0 = torch.zeros_like(base)  # sum_d c_d G_d        (N, 1)
            for start in range(0, num_codes, chunk):
                d = torch.arange(start, min(start + chunk, num_codes), device=lf.device)
                bits = code_bits(d, num_bits).float()  # (C, H)
                cg = torch.addmm(base, lf, bits.T).exp_()  # (N, C) G_d: probabilities of these codes
                cg.mul_(gf @ weight[start:start + len(d)].float().T)  # c_d G_d, in place: 2 (N, C) buffers
                s1.addmm_(cg, bits)
                s0 += cg.sum(-1, keepdim=True)
            grad_logits = (s1 - p * s0).reshape(logits.shape).to(logits.dtype)
        return grad_logits, grad_weight, None, None


def sample_and_embed(logits: torch.Tensor, weight: torch.Tensor,
                     generator: torch.Generator | None = None,
                     chunk_elems: int = 1 << 21) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample codes from `logits` (..., H) and embed them with the table `weight` (2^H, D).

    Returns (r (..., D), codes (...) int64). The forward value is the gathered row W[code];
    gradients follow eq. 8 (see the module docstring).
    """
    num_bits = logits.shape[-1]
    if weight.shape[0] != 1 << num_bits:
        raise ValueError(f"weight has {weight.shape[0]} rows, expected 2^H = {1 << num_bits}")
    codes = sample_codes(logits, generator)
    return _SampleAndEmbed.apply(logits, weight, codes, chunk_elems), codes


def free_bits_penalty(kl: torch.Tensor, kappa_nats: float) -> torch.Tensor:
    """mean_t max(0, KL_t - kappa): the free-bits term, per token before averaging."""
    return torch.clamp(kl - kappa_nats, min=0).mean()
