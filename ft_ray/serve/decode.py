"""Batched KV-cache decoding for rows that sit at different positions.

Rows of a serving batch have different prompt lengths, so left-padding them to one length would
shift RoPE positions and change the numbers. Instead every row keeps its own position:
- prefill runs per request through the model's own blocks, writing into that request's rows of a
  shared `BatchKVCache` (`rows_view` quacks like `layers.KVCache`);
- `decode_step` feeds one token per row: each row's k/v is written at the row's own position,
  RoPE uses the row's own cos/sin, and an explicit mask hides cache slots beyond each row's length.
The step reuses the model's modules (embed, attn_norm, wq/wk/wv/wo, mlp, norm, lm_head,
post_sampler) and mirrors `Block`/`Attention`; `tests/test_engine.py` checks it against
`model.generate`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ft_ray.model.layers import Attention, DecodeWeights, apply_rope
from ft_ray.model.transformer import BaselineTransformer

LatentFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _RowsView:
    """Rows `rows` of one layer of a `BatchKVCache`, with `layers.KVCache`'s `update`."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rows: slice):
        self.k, self.v, self.rows = k, v, rows

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = pos + k.shape[2]
        self.k[self.rows, :, pos:end] = k
        self.v[self.rows, :, pos:end] = v
        return self.k[self.rows, :, :end], self.v[self.rows, :, :end]


class BatchKVCache:
    """Keys/values of every layer for B rows, (B, n_kv, max_len, hd) each; row b holds its own
    sequence at positions 0..len_b-1."""

    def __init__(self, model: BaselineTransformer, batch: int, max_len: int):
        cfg, p = model.cfg, model.embed.weight
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in model.blocks]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in model.blocks]

    def rows_view(self, rows: slice) -> list[_RowsView]:
        return [_RowsView(k, v, rows) for k, v in zip(self.k, self.v, strict=True)]

    def copy_row(self, src: int, dst: slice, length: int) -> None:
        """Copy row `src`'s first `length` positions into rows `dst` (a prefill shared by n samples)."""
        for t in (*self.k, *self.v):
            t[dst, :, :length] = t[src:src + 1, :, :length]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (finished rows stop costing memory and compute)."""
        self.k = [k.index_select(0, keep) for k in self.k]
        self.v = [v.index_select(0, keep) for v in self.v]


def prefill(model: BaselineTransformer, tokens: torch.Tensor, latent_fn: LatentFn | None,
            caches: list[_RowsView]) -> torch.Tensor:
    """tokens (B, T0) at positions 0..T0-1 -> logits (B, V) of the last position.

    `BaselineTransformer._forward_tokens` with the LM head applied to the last position only.
    """
    x = model.embed(tokens)  # (B, T0, D)
    cos, sin = model._rope(0, tokens.shape[1])
    for i, block in enumerate(model.blocks):
        kv_input = None
        if latent_fn is not None and i == model.cfg.inject_layer:
            kv_input = x + latent_fn(x, cos, sin)  # queries from X, keys/values from X + R
        x = block(x, cos, sin, kv_input=kv_input, cache=caches[i], pos=0)
    return model.lm_head(model.norm(x[:, -1]))


def decode_step(model: BaselineTransformer, cache: BatchKVCache, tokens: torch.Tensor,
                positions: torch.Tensor, codes: torch.Tensor | None,
                packed: list[DecodeWeights] | None = None) -> torch.Tensor:
    """Feed tokens (B,) at per-row positions (B,); codes (B,) are the FT's Z at those positions
    (None for the baseline); `packed` is `model.decode_weights()`, as in `model.generate`.
    Returns next-token logits (B, V)."""
    cos_all, sin_all = model._rope(0, model.cfg.max_seq_len)  # (max_len, hd)
    cos = cos_all[positions][:, None, None, :]  # (B, 1, 1, hd): broadcasts over heads
    sin = sin_all[positions][:, None, None, :]
    length = int(positions.max()) + 1  # attend over the longest row's prefix only
    visible = torch.arange(length, device=positions.device)[None, :] <= positions[:, None]  # (B, S)
    mask = visible[:, None, None, :]  # (B, 1, 1, S)
    x = model.embed(tokens)[:, None, :]  # (B, 1, D)
    for i, block in enumerate(model.blocks):
        hq = block.attn_norm(x)
        hkv = hq
        if codes is not None and i == model.cfg.inject_layer:  # Z enters through this block's K/V only
            hkv = block.attn_norm(x + model.post_sampler.weight[codes][:, None, :])
        w = packed[i] if packed else None
        x = x + _attend(block.attn, hq, hkv, cos, sin, cache.k[i], cache.v[i], positions, mask, w)
        x = x + block.mlp(block.mlp_norm(x), w)
    return model.lm_head(model.norm(x[:, 0]))


def _attend(attn: Attention, hq: torch.Tensor, hkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
            mask: torch.Tensor, packed: DecodeWeights | None) -> torch.Tensor:
    """`Attention.forward` for one token per row at per-row positions; hq, hkv (B, 1, D)."""
    B = hq.shape[0]
    q, k, v = attn.project(hq, hkv, packed)  # (B, h, 1, hd), (B, kv, 1, hd) x 2
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rows = torch.arange(B, device=positions.device)
    k_cache[rows, :, positions] = k[:, :, 0]  # each row writes at its own position
    v_cache[rows, :, positions] = v[:, :, 0]
    length = mask.shape[-1]
    keys, values = k_cache[:, :, :length], v_cache[:, :, :length]  # (B, kv, S, hd)
    rep = attn.num_heads // attn.num_kv_heads
    if rep > 1:
        keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, h, 1, hd)
    return attn.output(y, packed)
