"""Llama-style building blocks shared by the baseline and the Free Transformer.

RMSNorm, rotary position embeddings, grouped-query attention with an optional KV cache, SwiGLU.
A `Block` takes separate query and key/value inputs so one class serves the ordinary decoder
blocks, the FT's injection block (queries from X, keys/values from X + R) and the FT's encoder
block (queries from a learned constant, keys/values from X, no causal mask).
"""

from __future__ import annotations

from typing import NamedTuple

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
    """cos/sin tables (max_len, head_dim) in fp32, laid out for `apply_rope`: cos is
    (cos, cos) and sin is (-sin, sin) over the two halves of a head."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos().float(), angles.sin().float()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + d/2]) by the position's angle: (x1 cos - x2 sin,
    x2 cos + x1 sin). x: (B, h, T, hd); cos/sin: (T, hd) from `rope_tables`, fp32. Four ops
    (decoding runs this twice a block per token): x * cos + rotate_half(x) * sin."""
    xf = x.float()  # a no-op for fp32 models
    out = xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin
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
        self.k.narrow(2, pos, k.shape[2]).copy_(k)  # narrow: fewer ops than slicing, once per layer and token
        self.v.narrow(2, pos, v.shape[2]).copy_(v)
        return self.k.narrow(2, 0, end), self.v.narrow(2, 0, end)


class DecodeWeights(NamedTuple):
    """One block's projection weights laid out (in, out) for the matrix-vector products of
    one-token decoding on CPU, where MKL reads an (out, in) `nn.Linear` weight at about half the
    speed once the weights no longer fit in cache (D=256, L=8: 2.8 vs 1.5 ms of products a token).
    q/k/v and gate/up are fused so each is one product. Built by `pack_block`; the model keeps its
    ordinary parameters, so training, checkpoints and state dicts never see this layout."""

    wqkv: torch.Tensor  # (D, (h + 2 kv) * hd): q, k, v projections side by side
    wo: torch.Tensor  # (h * hd, D)
    w13: torch.Tensor  # (D, 2 I): gate, then up
    w2: torch.Tensor  # (I, D)


def pack_block(block: Block) -> DecodeWeights:
    """`DecodeWeights` of `block`: detached copies, ordinary tensors even under inference mode."""
    a, m = block.attn, block.mlp
    with torch.inference_mode(False), torch.no_grad():
        return DecodeWeights(
            wqkv=torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]).t().contiguous(),
            wo=a.wo.weight.t().contiguous(),
            w13=torch.cat([m.w1.weight, m.w3.weight]).t().contiguous(),
            w2=m.w2.weight.t().contiguous())


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

    def project(self, xq: torch.Tensor, xkv: torch.Tensor, packed: DecodeWeights | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xq, xkv (B, T, D) -> q (B, h, T, hd), k and v (B, kv, T, hd), before RoPE."""
        B, T, _ = xq.shape
        if packed is None:
            q, k, v = self.wq(xq), self.wk(xkv), self.wv(xkv)
        else:
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            if xkv is xq:  # one product for q, k and v
                q, k, v = (xq @ packed.wqkv).split([nq, nkv, nkv], dim=-1)
            else:  # the FT's injection block: queries from X, keys/values from X + R
                q = xq @ packed.wqkv[:, :nq]
                k, v = (xkv @ packed.wqkv[:, nq:]).split([nkv, nkv], dim=-1)
        return (q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2),
                k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2),
                v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2))

    def output(self, y: torch.Tensor, packed: DecodeWeights | None = None) -> torch.Tensor:
        """y (B, h, T, hd) -> (B, T, D)."""
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.wo(y) if packed is None else y @ packed.wo

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                causal: bool = True, cache: KVCache | None = None, pos: int = 0,
                packed: DecodeWeights | None = None) -> torch.Tensor:
        """xq, xkv: (B, T, D), already normalised. cos/sin: (T, hd) for positions pos..pos+T-1."""
        T = xq.shape[1]
        q, k, v = self.project(xq, xkv, packed)
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
        return self.output(y, packed)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_dim, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.hidden_dim, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_dim, bias=False)  # down

    def forward(self, x: torch.Tensor, packed: DecodeWeights | None = None) -> torch.Tensor:
        if packed is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = (x @ packed.w13).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ packed.w2


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
                cache: KVCache | None = None, pos: int = 0,
                packed: DecodeWeights | None = None) -> torch.Tensor:
        hq = self.attn_norm(x)
        hkv = hq if kv_input is None else self.attn_norm(kv_input)  # same pre-norm on both inputs
        x = x + self.drop(self.attn(hq, hkv, cos, sin, causal=causal, cache=cache, pos=pos, packed=packed))
        return x + self.drop(self.mlp(self.mlp_norm(x), packed))
