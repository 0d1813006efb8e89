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
    x2 cos + x1 sin). x: (B, h, T, hd); cos/sin: (T, hd) from `rope_tables`, or (B, 1, T, hd) rows
    of it for per-row positions, fp32. Four ops
    (decoding runs this twice a block per token): x * cos + rotate_half(x) * sin."""
    xf = x.float()  # a no-op for fp32 models
    out = xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin
    return out.to(x.dtype)


class CacheRows:
    """Where the B rows of one cached forward sit in the KV caches, and what each row may see.

    Row b owns cache slot `slots[b]` and feeds T tokens at positions p_b .. p_b + T - 1. `pos` is
    one int when the rows advance together (`model.generate`), or one start per row (the engine:
    requests of different lengths share a decode step). Keys are read over the first `length`
    positions; a per-row mask hides what lies beyond each row's own position. Slots that form a
    range are read and written through views; any other set through an index (one copy).
    """

    def __init__(self, slots: range | list[int], num_tokens: int, pos: int | list[int],
                 device: torch.device | str):
        """`slots` (B,), ascending; `num_tokens` T fed per row; `pos` one start or one per row."""
        B, T = len(slots), num_tokens
        first = slots[0]
        self.first = first if list(slots) == list(range(first, first + B)) else None
        self.slots = None if self.first is not None else torch.tensor(list(slots), device=device)
        self.num_tokens = T
        if not isinstance(pos, int) and len(set(pos)) == 1:
            pos = pos[0]  # every row at the same position: the cheaper shared-offset path
        self.mask: torch.Tensor | None = None
        if isinstance(pos, int):
            self.pos, self.positions, self.length = pos, None, pos + T
            self.is_causal = pos == 0 and T > 1  # a prefill: the usual causal kernel
            if pos > 0 and T > 1:  # a chunk at an offset: the whole prefix plus its own causal part
                i = torch.arange(T, device=device)[:, None] + pos
                self.mask = torch.arange(self.length, device=device)[None, :] <= i  # (T, S)
        else:
            self.pos = None  # type: ignore[assignment]  # read only where positions is None
            self.positions = torch.tensor(pos, device=device)[:, None] + torch.arange(T, device=device)  # (B, T)
            self.length, self.is_causal = max(pos) + T, False
            visible = torch.arange(self.length, device=device) <= self.positions[..., None]  # (B, T, S)
            self.mask = visible[:, None]  # (B, 1, T, S): broadcasts over heads
            self._rows = torch.arange(B, device=device)[:, None]  # (B, 1)

    def write_read(self, cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Write `new` (B, n_kv, T, hd) into `cache` (slots, n_kv, max_len, hd) at each row's slot
        and positions; return the rows' entries (B, n_kv, S, hd) for S = `length` positions."""
        T = self.num_tokens
        if self.first is not None:
            rows = cache.narrow(0, self.first, new.shape[0])  # a view: writes land in the cache
            if self.positions is None:
                rows.narrow(2, self.pos, T).copy_(new)  # narrow: fewer ops than slicing, per layer and token
            else:
                rows[self._rows, :, self.positions] = new.transpose(1, 2)  # (B, T, n_kv, hd)
            return rows.narrow(2, 0, self.length)
        if self.positions is None:
            cache[self.slots, :, self.pos:self.pos + T] = new
        else:
            cache[self.slots[:, None], :, self.positions] = new.transpose(1, 2)  # type: ignore[index]
        return cache.narrow(2, 0, self.length).index_select(0, self.slots)  # type: ignore[arg-type]


class KVCache(nn.Module):
    """Preallocated keys/values for one attention layer: (num_slots, n_kv, max_len, hd). A row of a
    cached forward writes into its own slot (see `CacheRows`); nothing is reallocated per call."""

    k: torch.Tensor  # buffers, registered in __init__
    v: torch.Tensor

    def __init__(self, num_slots: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, rows: CacheRows, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, n_kv, T, hd) for `rows`; return their keys/values so far (B, n_kv, S, hd)."""
        return rows.write_read(self.k, k), rows.write_read(self.v, v)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (a row changing slots)."""
        for t in (self.k, self.v):
            t[dst, :, :length] = t[src, :, :length]

    def copy_prefix(self, src: int, dst: list[int], length: int) -> None:
        """Copy slot `src`'s first `length` positions into slots `dst` (one prefill, n samples)."""
        index = torch.tensor(dst, device=self.k.device)
        for t in (self.k, self.v):
            t[index, :, :length] = t[src:src + 1, :, :length]


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
        assert cfg.num_key_value_heads is not None  # resolved by ModelConfig.__post_init__
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
                causal: bool = True, cache: KVCache | None = None, rows: CacheRows | None = None,
                packed: DecodeWeights | None = None) -> torch.Tensor:
        """xq, xkv: (B, T, D), already normalised. cos/sin: (T, hd), or (B, 1, T, hd) for per-row
        positions. With `cache`, `rows` says where the rows' keys/values go and what they see."""
        T = xq.shape[1]
        q, k, v = self.project(xq, xkv, packed)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, is_causal = None, causal and T > 1  # without a cache: the whole sequence, causal
        if cache is not None:
            assert rows is not None  # a cached forward always says where its rows go
            k, v = cache.update(rows, k, v)  # (B, kv, S, hd)
            mask, is_causal = rows.mask, rows.is_causal
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0)  # (B, h, T, hd)
        return self.output(y, packed)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.intermediate_size is not None  # resolved by ModelConfig.__post_init__
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
                cache: KVCache | None = None, rows: CacheRows | None = None,
                packed: DecodeWeights | None = None) -> torch.Tensor:
        hq = self.attn_norm(x)
        hkv = hq if kv_input is None else self.attn_norm(kv_input)  # same pre-norm on both inputs
        x = x + self._drop(self.attn(hq, hkv, cos, sin, causal=causal, cache=cache, rows=rows, packed=packed))
        return x + self._drop(self.mlp(self.mlp_norm(x), packed))

    def _drop(self, y: torch.Tensor) -> torch.Tensor:
        # dropout is the identity in eval mode or at p = 0: skip the module call (~4 us, twice a
        # block, on every decode step); in training with p > 0 the very same call as before
        return self.drop(y) if self.training and self.drop.p > 0 else y
