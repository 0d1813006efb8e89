"""Llama-style building blocks shared by the baseline and the Free Transformer.

RMSNorm, rotary position embeddings, grouped-query attention with an optional KV cache, SwiGLU.
A `Block` takes separate query and key/value inputs so one class serves the ordinary decoder
blocks, the FT's injection block (queries from X, keys/values from X + R) and the FT's encoder
block (queries from a learned constant, keys/values from X, no causal mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ft_ray.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel: decoding runs this 2L+1 times per token
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # bf16/fp16: normalise in fp32 for stability, return in the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, head_dim/2) in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]). x: (B, h, T, hd); cos/sin: (T, hd/2), fp32."""
    d2 = x.shape[-1] // 2
    xf = x.float()  # a no-op for fp32 models
    x1, x2 = xf[..., :d2], xf[..., d2:]
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys/values for one attention layer: (B, n_kv, max_len, hd)."""

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, n_kv, T, hd) at positions pos..pos+T-1; return all keys/values so far."""
        end = pos + k.shape[2]
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_key_value_heads, cfg.head_dim
        self.dropout = cfg.dropout
        d = cfg.hidden_dim
        self.wq = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                causal: bool = True, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        """xq, xkv: (B, T, D), already normalised. cos/sin: (T, hd/2) for positions pos..pos+T-1."""
        B, T, _ = xq.shape
        q = self.wq(xq).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, T, hd)
        k = self.wk(xkv).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, kv, T, hd)
        v = self.wv(xkv).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(pos, k, v)  # (B, kv, pos+T, hd)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask, is_causal = None, False
        if causal and T > 1:
            if k.shape[2] == T:
                is_causal = True
            else:  # a chunk at offset pos attends to the whole prefix plus its own causal part
                i = torch.arange(T, device=q.device)[:, None] + pos
                mask = torch.arange(k.shape[2], device=q.device)[None, :] <= i  # (T, S)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0)  # (B, h, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_dim, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.hidden_dim, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block. The residual stream continues from the query input."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_dim, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_dim, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_input: torch.Tensor | None = None, causal: bool = True,
                cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        hq = self.attn_norm(x)
        hkv = hq if kv_input is None else self.attn_norm(kv_input)  # same pre-norm on both inputs
        x = x + self.drop(self.attn(hq, hkv, cos, sin, causal=causal, cache=cache, pos=pos))
        return x + self.drop(self.mlp(self.mlp_norm(x)))
