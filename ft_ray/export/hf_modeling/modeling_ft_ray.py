"""A Llama-style baseline or a Free Transformer (Fleuret 2025) exported from ft-ray.

Self-contained (torch and transformers only), shipped verbatim by `ft-ray export hf` and loaded
with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. The numerics are
ft-ray's (RoPE tables, RMSNorm, GQA, SwiGLU, the injection) and so are the parameter names, so a
bundle's model.safetensors loads unchanged.

Where the Free Transformer's plan Z (one code in [0, 2^H) per position) comes from:
- `latent_codes` (B, S) given: those codes for columns 0..S-1 (later columns: the prior plan below).
- `generate(...)` without codes, as the paper generates: the prompt's Z is sampled from the
  encoder over the prompt, the new positions' Z drawn uniformly; row j draws both, in that order,
  from a generator seeded `row_seed(plan_seed, j)`, as ft-ray does: `plan_seed=s` gives the plan
  of ft-ray's `model.generate(..., plan=s)`, left padding or not. Beam search is not supported.
- any other forward (scoring: lm-eval's loglikelihood, perplexity): Z from the uniform prior,
  K = `num_plans` plans drawn by a generator seeded `plan_seed`, indexed by position, the same
  for every row. The encoder never reads the tokens being scored (its Z would have seen the
  future: a leaky, flattering score). With K > 1 the logits are those of the mixture of the K
  plans, each weighted by how well it explains the tokens so far, so the per-token log-probs sum
  to log (1/K) sum_k p(x | Z_k), an estimate of log p(x) that is consistent as K grows; K > 1
  runs without a KV cache.
`plan_seed` and `num_plans` are config fields and keyword arguments of `forward` and `generate`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_ft_ray import FtRayConfig

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (B, 1, T, hd) each, fp32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()  # bf16/fp16: normalise in fp32, return in the input dtype
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_tables(head_dim: int, max_len: int, base: float) -> Rope:
    """cos (cos, cos) and sin (-sin, sin) over the two halves of a head: (max_len, hd), fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos().float(), angles.sin().float()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + hd/2]) by the position's angle. x (B, h, T, hd)."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: FtRayConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size
        self.wq = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, xq, xkv, rope: Rope, mask, causal: bool, cache=None, layer_idx: int = 0):
        """xq, xkv (B, T, D), normalised; mask (B, 1, T, S) bool or None -> (B, T, D)."""
        B, T, _ = xq.shape
        q = self.wq(xq).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(xkv).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(xkv).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)  # (B, nkv, S, hd): the past, then these T
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None and T > 1)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class SwiGLU(nn.Module):
    def __init__(self, cfg: FtRayConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm block; queries and the residual from x, keys/values from `kv_input` (default x)."""

    def __init__(self, cfg: FtRayConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rope: Rope, mask, causal=True, kv_input=None, cache=None, layer_idx: int = 0):
        hq = self.attn_norm(x)
        hkv = hq if kv_input is None else self.attn_norm(kv_input)  # the same pre-norm on both inputs
        x = x + self.attn(hq, hkv, rope, mask, causal, cache, layer_idx)
        return x + self.mlp(self.mlp_norm(x))


class Encoder(nn.Module):
    """The FT's encoder: one non-causal block with constant queries zeta over the first half's
    output, then RMSNorm and a read-out to H logits per position. Used only on a prompt."""

    def __init__(self, cfg: FtRayConfig):
        super().__init__()
        self.zeta = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.block = Block(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.readout = nn.Linear(cfg.hidden_size, cfg.latent_bits, bias=False)

    def forward(self, x: torch.Tensor, rope: Rope, key_mask) -> torch.Tensor:
        """x (B, T, D) -> posterior logits (B, T, H); key_mask (B, 1, 1, T) hides padding."""
        h = self.block(self.zeta.expand_as(x), rope, key_mask, causal=False, kv_input=x)
        return self.readout(self.norm(h))


def row_seed(seed: int, index: int) -> int:
    """ft-ray's seed of plan row `index` for a plan seeded `seed` (the seed itself for row 0)."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_codes(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One code per position from independent bits, P(bit h) = sigmoid(logit h): (..., H) -> (...)."""
    p = torch.sigmoid(logits.detach().float())
    bits = torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float32) < p
    weights = torch.ones(p.shape[-1], dtype=torch.int64, device=p.device) << torch.arange(
        p.shape[-1], dtype=torch.int64, device=p.device)
    return (bits.to(torch.int64) * weights).sum(-1)  # sum_h 2^h b_h, in integers


def plan_mixture(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask) -> torch.Tensor:
    """logits (K, B, T, V) under K plans -> (B, T, V): the next-token log-probs of the mixture of
    the plans, each weighted by the likelihood of the tokens up to t (never of later tokens)."""
    K = logits.shape[0]
    logp = logits.float().log_softmax(-1)  # (K, B, T, V)
    nxt = input_ids[:, 1:].unsqueeze(0).unsqueeze(-1).expand(K, -1, -1, 1)
    step = logp[:, :, :-1].gather(-1, nxt).squeeze(-1)  # (K, B, T-1): log p(x_t+1 | x_<=t, Z_k)
    if attention_mask is not None:  # padding neither predicts nor is predicted
        keep = attention_mask[:, -input_ids.shape[1]:].to(step.dtype)
        step = step * keep[:, 1:] * keep[:, :-1]
    seen = F.pad(step.cumsum(-1), (1, 0))  # (K, B, T): log p(x_1..x_t | x_0, Z_k)
    return torch.logsumexp(seen.log_softmax(0).unsqueeze(-1) + logp, dim=0)


@dataclass
class FtRayCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, T, V)
    cache: object | None = None  # the KV cache (transformers >= 5.2x reads `cache`)
    past_key_values: object | None = None  # the same cache, under its older name
    latent_codes: torch.Tensor | None = None  # (B, S) the FT's plan, when it was drawn or given


class FtRayPreTrainedModel(PreTrainedModel):
    config_class = FtRayConfig
    base_model_prefix = "ft_ray"
    _no_split_modules = ["Block", "Encoder"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Encoder):
            nn.init.normal_(module.zeta, std=std)


class FtRayForCausalLM(FtRayPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}

    def __init__(self, config: FtRayConfig):
        super().__init__(config)
        self.is_free_transformer = config.arch == "free_transformer"
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.is_free_transformer:
            self.encoder = Encoder(config)
            self.post_sampler = nn.Embedding(1 << config.latent_bits, config.hidden_size)  # W
        self._rope_cache: dict[torch.device, Rope] = {}  # fp32 tables per device, never cast
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:  # type: ignore[override]  # an embedding only
        self.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    # ------------------------------------------------------------------ positions, masks, plans
    def _rope(self, positions: torch.Tensor) -> Rope:
        """positions (B, T) -> cos, sin (B, 1, T, hd)."""
        device = positions.device
        if device not in self._rope_cache:
            with torch.inference_mode(False):  # ordinary tensors even when built under inference mode
                cos, sin = rope_tables(self.config.head_dim, self.config.max_position_embeddings, self.config.rope_base)
                self._rope_cache[device] = (cos.to(device), sin.to(device))
        cos, sin = self._rope_cache[device]
        return cos[positions][:, None], sin[positions][:, None]

    def _layout(self, input_ids, attention_mask, position_ids, past: int):
        """Positions (B, T), the attention mask (B, 1, T, S) or None, whether SDPA's causal kernel
        applies, and the encoder's key mask. A 2D `attention_mask` covers all S = past + T columns."""
        B, T = input_ids.shape
        S, device = past + T, input_ids.device
        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None:  # left padding: each row counts its own positions from 0
            position_ids = ((attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:] if padded
                            else torch.arange(past, S, device=device).expand(B, T))
        if T and int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"position {int(position_ids.max())} is beyond "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        if not padded and (past == 0 or T == 1):
            return position_ids, None, past == 0, None
        keys = attention_mask[:, -S:].bool() if padded else torch.ones(B, S, dtype=torch.bool, device=device)
        i = torch.arange(T, device=device)[:, None] + past
        j = torch.arange(S, device=device)[None, :]
        mask = ((j <= i) & keys[:, None, :]) | (j == i)  # (B, T, S); a padding query sees itself
        return position_ids, mask[:, None], False, keys[:, None, None, -T:]

    def _prior(self, num_plans: int, seed: int, device) -> torch.Tensor:
        """K plans from the uniform prior, one code per position: (K, max_position_embeddings)."""
        g = torch.Generator(device=device).manual_seed(seed)
        shape = (num_plans, self.config.max_position_embeddings)
        return torch.randint(0, 1 << self.config.latent_bits, shape, generator=g, device=device)

    def _plan(self, x, positions, rope, key_mask, past, latent_codes, encode_prompt, plan_seed, num_plans):
        """Codes of the fed positions (K, B, T), and the plan to carry (B, S') or None."""
        B, T = positions.shape
        H = self.config.latent_bits
        if latent_codes is not None:
            codes = latent_codes.to(device=x.device, dtype=torch.long)
            if codes.dim() != 2 or codes.shape[0] != B or codes.shape[1] < past:
                raise ValueError(f"latent_codes must be (B={B}, S >= {past}) codes, got {tuple(latent_codes.shape)}")
            if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << H):
                raise ValueError(f"latent_codes must be in [0, 2^{H})")
            missing = past + T - codes.shape[1]
            if missing > 0:  # columns beyond the given codes: the prior plan, by position
                codes = torch.cat([codes, self._prior(1, plan_seed, x.device)[0][positions[:, T - missing:]]], 1)
            return codes[None, :, past:past + T], codes
        if encode_prompt:  # generation's prefill: ft-ray's plan order, one generator per row
            if past:
                raise ValueError("the prompt's Z comes from the encoder at the prefill: no cache allowed")
            logits = self.encoder(x, rope, key_mask)  # (B, T, H)
            codes = torch.zeros(B, self.config.max_position_embeddings, dtype=torch.long, device=x.device)
            for j in range(B):
                g = torch.Generator(device=x.device).manual_seed(row_seed(plan_seed, j))
                real = key_mask[j, 0, 0] if key_mask is not None else slice(None)  # left padding: code 0
                codes[j, :T][real] = sample_codes(logits[j, real], g)  # sampled, never thresholded
                codes[j, T:] = torch.randint(0, 1 << H, (codes.shape[1] - T,), generator=g, device=x.device)
            return codes[None, :, :T], codes
        return self._prior(num_plans, plan_seed, x.device)[:, positions], None  # (K, B, T)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, use_cache: bool | None = None, labels=None, latent_codes=None,
                plan_seed: int | None = None, num_plans: int | None = None, encode_prompt: bool = False,
                **kwargs) -> FtRayCausalLMOutput:
        """input_ids (B, T) -> logits (B, T, V). The FT's Z: see the module docstring."""
        cfg = self.config
        cache = cache if cache is not None else past_key_values
        plan_seed = cfg.plan_seed if plan_seed is None else plan_seed
        num_plans = cfg.num_plans if num_plans is None else num_plans
        if num_plans < 1:
            raise ValueError(f"num_plans must be >= 1, got {num_plans}")
        mixture = self.is_free_transformer and num_plans > 1 and latent_codes is None and not encode_prompt
        use_cache = (cfg.use_cache if use_cache is None else use_cache) and not mixture
        if mixture and cache is not None and cache.get_seq_length() > 0:
            raise ValueError("num_plans > 1 scores whole sequences: no KV cache")
        cache = (cache if cache is not None else DynamicCache()) if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        B, T = input_ids.shape
        positions, mask, causal, key_mask = self._layout(input_ids, attention_mask, position_ids, past)
        rope = self._rope(positions)
        x = self.embed(input_ids)  # (B, T, D)
        codes = None
        for i, block in enumerate(self.blocks):
            kv_input = None
            if self.is_free_transformer and i == cfg.inject_layer:
                z, codes = self._plan(x, positions, rope, key_mask, past, latent_codes, encode_prompt,
                                      plan_seed, num_plans)  # z (K, B, T)
                K = z.shape[0]
                if K > 1:  # the first half is shared; the rest runs once per plan, rows (K*B)
                    x = x.repeat(K, 1, 1)
                    rope = (rope[0].repeat(K, 1, 1, 1), rope[1].repeat(K, 1, 1, 1))
                    mask = None if mask is None else mask.repeat(K, 1, 1, 1)
                kv_input = x + self.post_sampler.weight[z.reshape(K * B, T)]  # keys/values from X + W[Z]
            x = block(x, rope, mask, causal, kv_input, cache, i)
        logits = self.lm_head(self.norm(x))  # (K*B, T, V)
        if mixture:
            logits = plan_mixture(logits.view(-1, B, T, logits.shape[-1]), input_ids, attention_mask)
        loss = None
        if labels is not None:  # next-token cross-entropy under the plan used (never the encoder's)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device))
        return FtRayCausalLMOutput(loss=loss, logits=logits, cache=cache, past_key_values=cache, latent_codes=codes)

    # ------------------------------------------------------------------ generation
    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        inputs["encode_prompt"] = True  # without codes, the prompt's Z comes from the encoder
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if getattr(outputs, "latent_codes", None) is not None:  # the plan, drawn once, for every step
            model_kwargs["latent_codes"] = outputs.latent_codes
        return model_kwargs
