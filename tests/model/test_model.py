"""The baseline and the Free Transformer: spec section 6 checks 1-3, 9 and 11, the honest bounds,
the loss, gradients, low precision and the generation plan API."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import ft_ray.model.transformer as transformer_module
from ft_ray.config import ModelConfig
from ft_ray.model import BaselineTransformer, FreeTransformer, build_model, sample_shared_plan
from ft_ray.model.latent import (
    free_bits_penalty,
    kl_to_uniform,
    log_q,
    sample_and_embed,
    sample_codes,
    uniform_codes,
)
from ft_ray.model.layers import CacheRows, KVCache
from ft_ray.model.sampling import filter_logits, sample_next
from ft_ray.seeds import derive_seed, row_seed


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=48, hidden_dim=32, num_layers=4, num_heads=4, latent_bits=4,
                max_seq_len=64, init_std=0.1)
    base.update(kw)
    return ModelConfig(**base)


def tiny_ft(seed: int = 0, **kw) -> FreeTransformer:
    torch.manual_seed(seed)
    return FreeTransformer(tiny_cfg(**kw)).eval()


def tiny_baseline(seed: int = 0, **kw) -> BaselineTransformer:
    torch.manual_seed(seed)
    return BaselineTransformer(tiny_cfg(arch="baseline", **kw)).eval()


def block_outputs(model, fn):
    """Run fn() and return the output of every decoder block (list of tensors)."""
    outs: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.detach().clone()))
               for i, b in enumerate(model.blocks)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return [outs[i] for i in range(len(model.blocks))]


# ----------------------------------------------------------------------------------------------
# the seed API example
# ----------------------------------------------------------------------------------------------


def test_seed_api_example():
    torch.manual_seed(0)
    model = FreeTransformer(ModelConfig(vocab_size=1000, hidden_dim=128, num_layers=6,
                                        num_heads=4, latent_bits=8)).eval()
    tokens = torch.randint(0, 1000, (2, 128))
    with torch.no_grad():
        out = model(tokens)
    assert out.logits.shape == (2, 128, 1000)
    assert out.z.shape == (2, 128) and out.z.dtype == torch.int64
    assert out.z.min() >= 0 and out.z.max() < 256
    assert out.z_logits.shape == (2, 128, 8)
    assert out.kl.shape == (2, 128)
    assert torch.isfinite(out.kl).all() and (out.kl >= -1e-6).all()
    gen = model.generate(tokens[:, :10], max_new_tokens=20)
    assert gen.shape == (2, 30)
    assert torch.equal(gen[:, :10], tokens[:, :10])
    assert gen.dtype == torch.int64 and gen.min() >= 0 and gen.max() < 1000


def test_build_model_picks_the_class():
    assert type(build_model(tiny_cfg())) is FreeTransformer
    assert type(build_model(tiny_cfg(arch="baseline"))) is BaselineTransformer
    for arch, latent in (("free_transformer", True), ("baseline", False)):  # one answer, two places
        assert build_model(tiny_cfg(arch=arch)).has_latent is tiny_cfg(arch=arch).has_latent is latent


def test_forward_z_validation():
    ft = tiny_ft()
    tokens = torch.randint(0, 48, (2, 6))
    ok = torch.zeros(2, 6, dtype=torch.int64)
    assert ft(tokens, z=ok).z_logits is None  # with given codes the encoder does not run
    for bad in (ok.int(), ok[:, :5], ok.float(), ok + 16, ok - 1):
        with pytest.raises(ValueError):
            ft(tokens, z=bad)
    with pytest.raises(ValueError):
        tiny_baseline()(tokens, z=ok)


# ----------------------------------------------------------------------------------------------
# check 1: zero post-sampler + shared weights copied -> the baseline's logits
# ----------------------------------------------------------------------------------------------


def test_zero_post_sampler_ft_equals_baseline():
    base = tiny_baseline(seed=1)
    ft = tiny_ft(seed=2, latent_init="zero")
    missing, unexpected = ft.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == []
    assert set(missing) == {k for k in ft.state_dict() if k.startswith(("encoder.", "post_sampler."))}
    assert (ft.post_sampler.weight == 0).all()
    tokens = torch.randint(0, 48, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(tokens).logits
        out = ft(tokens)  # Z from the encoder, R = W[Z] = 0
        fixed = ft(tokens, z=torch.randint(0, 16, (3, 20)))
    torch.testing.assert_close(out.logits, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fixed.logits, ref, rtol=1e-6, atol=1e-6)
    # generation too (greedy), with any plan
    g_ft = ft.generate(tokens[:, :5], 8, temperature=0, plan=3)
    g_base = base.generate(tokens[:, :5], 8, temperature=0)
    assert torch.equal(g_ft, g_base)
    # the check can fail: a non-zero table changes the logits
    with torch.no_grad():
        ft.post_sampler.weight.normal_()
        assert (ft(tokens, z=fixed.z).logits - ref).abs().max() > 1e-3


def test_state_dict_relation():
    ft = tiny_ft(seed=3)
    base = tiny_baseline(seed=4)
    ft_sd, base_sd = ft.state_dict(), base.state_dict()
    for k, v in base_sd.items():
        assert k in ft_sd, k
        assert ft_sd[k].shape == v.shape, k
    extra = set(ft_sd) - set(base_sd)
    assert extra and all(k.startswith(("encoder.", "post_sampler.")) for k in extra)
    base.load_state_dict({k: ft_sd[k] for k in base_sd}, strict=True)
    tokens = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ft.post_sampler.weight.zero_()
        torch.testing.assert_close(ft(tokens).logits, base(tokens).logits, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# check 2: only the injection block sees R, only through K/V; its residual carries X
# ----------------------------------------------------------------------------------------------


def _two_tables(ft):
    w1 = ft.post_sampler.weight.detach().clone()
    w2 = w1 + torch.randn(w1.shape, generator=torch.Generator().manual_seed(5))
    return w1, w2


@pytest.mark.parametrize("inject_layer", [1, 2, 3])
def test_only_the_injection_block_sees_r(inject_layer):
    ft = tiny_ft(seed=5, inject_layer=inject_layer)
    tokens = torch.randint(0, 48, (2, 10), generator=torch.Generator().manual_seed(2))
    z = torch.randint(0, 16, (2, 10), generator=torch.Generator().manual_seed(3))
    w1, w2 = _two_tables(ft)
    outs = []
    for w in (w1, w2):
        with torch.no_grad():
            ft.post_sampler.weight.copy_(w)
            outs.append(block_outputs(ft, lambda: ft(tokens, z=z)))
    for i in range(inject_layer):  # blocks before the injection: untouched by W
        assert torch.equal(outs[0][i], outs[1][i]), i
    for i in range(inject_layer, ft.cfg.num_layers):  # the injection block and after: changed
        assert (outs[0][i] - outs[1][i]).abs().max() > 1e-4, i


def test_kv_input_only_at_the_injection_block():
    ft = tiny_ft(seed=6)
    seen = {}

    def pre_hook(i):
        def hook(module, args, kwargs):
            seen[i] = kwargs.get("kv_input")
        return hook

    handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
               for i, b in enumerate(ft.blocks)]
    tokens = torch.randint(0, 48, (2, 8))
    with torch.no_grad():
        for z in (None, torch.randint(0, 16, (2, 8))):
            seen.clear()
            ft(tokens, z=z)
            for i in range(ft.cfg.num_layers):
                assert (seen[i] is not None) == (i == ft.cfg.inject_layer), (i, z is None)
    for h in handles:
        h.remove()
    # the baseline never passes a kv_input
    base = tiny_baseline()
    handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
               for i, b in enumerate(base.blocks)]
    seen.clear()
    with torch.no_grad():
        base(tokens)
    assert all(v is None for v in seen.values()) and len(seen) == base.cfg.num_layers
    for h in handles:
        h.remove()


def test_r_reaches_only_keys_and_values():
    ft = tiny_ft(seed=7)
    attn = ft.blocks[ft.cfg.inject_layer].attn
    inputs = {}
    handles = [getattr(attn, n).register_forward_hook(
        lambda m, a, o, n=n: inputs.__setitem__(n, a[0].detach().clone())) for n in ("wq", "wk", "wv")]
    tokens = torch.randint(0, 48, (2, 10), generator=torch.Generator().manual_seed(4))
    z = torch.randint(0, 16, (2, 10), generator=torch.Generator().manual_seed(5))
    w1, w2 = _two_tables(ft)
    seen = []
    for w in (w1, w2):
        with torch.no_grad():
            ft.post_sampler.weight.copy_(w)
            ft(tokens, z=z)
        seen.append(dict(inputs))
    for h in handles:
        h.remove()
    assert torch.equal(seen[0]["wq"], seen[1]["wq"])  # queries from norm(X): no R
    assert (seen[0]["wk"] - seen[1]["wk"]).abs().max() > 1e-3  # keys/values from norm(X + R)
    assert (seen[0]["wv"] - seen[1]["wv"]).abs().max() > 1e-3
    # the pre-norm is applied to X + R: the K/V input is norm(X + R) exactly
    x = block_outputs(ft, lambda: ft(tokens, z=z))[ft.cfg.inject_layer - 1]
    norm = ft.blocks[ft.cfg.inject_layer].attn_norm
    with torch.no_grad():
        torch.testing.assert_close(seen[1]["wk"], norm(x + w2[z]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(seen[1]["wq"], norm(x), rtol=1e-6, atol=1e-6)
    # with the injection block's wk and wv zeroed, W cannot reach the logits at all
    with torch.no_grad():
        attn.wk.weight.zero_()
        attn.wv.weight.zero_()
        logits = []
        for w in (w1, w2):
            ft.post_sampler.weight.copy_(w)
            logits.append(ft(tokens, z=z).logits)
    assert torch.equal(logits[0], logits[1])


def test_injection_residual_continues_from_x():
    ft = tiny_ft(seed=8)
    j = ft.cfg.inject_layer
    with torch.no_grad():  # the injection block adds nothing: its output must be X, not X + R
        ft.blocks[j].attn.wo.weight.zero_()
        ft.blocks[j].mlp.w2.weight.zero_()
    tokens = torch.randint(0, 48, (2, 10))
    z = torch.randint(0, 16, (2, 10))
    with torch.no_grad():
        outs = block_outputs(ft, lambda: ft(tokens, z=z))
        outs_enc = block_outputs(ft, lambda: ft(tokens))
    assert (ft.post_sampler.weight[z].abs().sum(-1) > 0).all()
    assert torch.equal(outs[j], outs[j - 1])
    assert torch.equal(outs_enc[j], outs_enc[j - 1])


# ----------------------------------------------------------------------------------------------
# check 3: encoder non-causal and position-aware; decoder causal for a fixed Z
# ----------------------------------------------------------------------------------------------


def test_encoder_is_non_causal():
    ft = tiny_ft(seed=9)
    tokens = torch.randint(0, 48, (1, 16), generator=torch.Generator().manual_seed(6))
    changed = tokens.clone()
    changed[0, 11] = (changed[0, 11] + 1) % 48
    with torch.no_grad():
        a, b = ft(tokens).z_logits, ft(changed).z_logits
    diff = (a - b).abs().amax(-1)[0]  # (T,)
    assert (diff[:11] > 1e-5).all(), diff  # every earlier position sees the later token


def test_encoder_is_position_aware():
    ft = tiny_ft(seed=10)
    tokens = torch.randint(0, 48, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        zl = ft(tokens).z_logits[0]  # (T, H)
        # every pair of positions has different posterior logits
        pair_diff = (zl[:, None] - zl[None]).abs().amax(-1)
        off_diag = pair_diff[~torch.eye(16, dtype=torch.bool)]
        assert off_diag.min() > 1e-5
        # the test discriminates: the encoder without RoPE gives every position the same logits
        x = ft.embed(tokens)
        cos, sin = ft._rope(0, 16)
        for block in ft.blocks[:ft.cfg.inject_layer]:
            x = block(x, cos, sin)
        torch.testing.assert_close(ft.encoder(x, cos, sin), ft(tokens).z_logits)
        flat = ft.encoder(x, torch.ones_like(cos), torch.zeros_like(sin))[0]
        assert (flat - flat[:1]).abs().max() < 1e-5


def test_decoder_is_causal_for_fixed_z():
    ft = tiny_ft(seed=11)
    tokens = torch.randint(0, 48, (2, 16), generator=torch.Generator().manual_seed(8))
    z = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(9))
    t = 9
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 5) % 48
    with torch.no_grad():
        a, b = ft(tokens, z=z).logits, ft(changed, z=z).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert ((a[:, t:] - b[:, t:]).abs().amax(-1) > 1e-5).all()
    # and Z_s only affects positions >= s
    z2 = z.clone()
    z2[:, t] = (z2[:, t] + 1) % 16
    with torch.no_grad():
        c = ft(tokens, z=z2).logits
    torch.testing.assert_close(a[:, :t], c[:, :t], rtol=0, atol=1e-6)
    assert ((a[:, t] - c[:, t]).abs().amax(-1) > 1e-5).all()


# ----------------------------------------------------------------------------------------------
# check 9: the plan; cached decoding = full recompute
# ----------------------------------------------------------------------------------------------


def test_prompt_z_is_sampled_from_the_encoder():
    ft = tiny_ft(seed=12)
    with torch.no_grad():
        ft.encoder.readout.weight.normal_(std=1.0)  # posteriors far from 1/2, and varied
    prompt = torch.randint(0, 48, (1, 6), generator=torch.Generator().manual_seed(10))
    rows = 3000
    with torch.no_grad():
        zl = ft(prompt).z_logits[0]  # (T0, H): the prefill's posterior
    p = torch.sigmoid(zl.double())
    assert ((p > 0.1) & (p < 0.9)).any()  # some bits are really random
    _, z = ft.generate(prompt.expand(rows, -1), 1, temperature=0, return_plan=True,
                       generator=torch.Generator().manual_seed(11))
    bits = ((z[:, :6, None] >> torch.arange(4)) & 1).double()  # (rows, T0, H)
    freq = bits.mean(0)
    tol = 5 * torch.sqrt(p * (1 - p) / rows) + 2e-3
    assert ((freq - p).abs() <= tol).all(), (freq, p)
    # not a threshold: prompt codes vary across rows where the posterior is uncertain
    assert (z[:, :6] != z[:1, :6]).any()


def test_plan_draw_order_prompt_from_encoder_then_new_from_uniform():
    # pins plan.py's one draw order: per row, from the generator seeded row_seed(seed, j), the
    # prompt's codes sampled from the encoder's logits first, then the new codes (uniform prior)
    ft = tiny_ft(seed=13)
    prompt = torch.randint(0, 48, (3, 5), generator=torch.Generator().manual_seed(12))
    _, z = ft.generate(prompt, 7, temperature=0, plan=1234, return_plan=True)
    with torch.no_grad():
        z_logits = ft(prompt).z_logits  # (3, 5, H)
    for j in range(3):
        g = torch.Generator().manual_seed(row_seed(1234, j))
        assert row_seed(1234, j) == (1234 if j == 0 else derive_seed(1234, j))
        assert torch.equal(z[j, :5], sample_codes(z_logits[j:j + 1], g)[0])
        assert torch.equal(z[j, 5:], uniform_codes((1, 7), 4, g)[0])
    # with one generator for every row (plan=None), the rows draw as one batched draw would
    _, z = ft.generate(prompt, 7, temperature=0, return_plan=True, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(z[:, :5], sample_codes(z_logits, g))
    assert torch.equal(z[:, 5:], uniform_codes((3, 7), 4, g))


@pytest.fixture
def record_logits(monkeypatch):
    """Record the logits generate() samples from at every step."""
    seen: list[torch.Tensor] = []

    def recorder(logits, *args, **kwargs):
        seen.append(logits.detach().clone())
        return sample_next(logits, *args, **kwargs)

    monkeypatch.setattr(transformer_module, "sample_next", recorder)
    return seen


GEN_CASES = [
    ("ft", dict(), 1),
    ("ft", dict(num_key_value_heads=2), 3),
    ("ft", dict(num_key_value_heads=1, inject_layer=1), 2),
    ("baseline", dict(), 2),
    ("baseline", dict(num_key_value_heads=2), 3),
]


@pytest.mark.parametrize("kind,kw,batch", GEN_CASES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_equals_full_recompute(kind, kw, batch, temperature, record_logits):
    model = tiny_ft(seed=14, **kw) if kind == "ft" else tiny_baseline(seed=14, **kw)
    prompt = torch.randint(0, 48, (batch, 6), generator=torch.Generator().manual_seed(13))
    n = 10
    plan = 99 if kind == "ft" else None
    runs = {}
    for use_cache in (True, False):
        record_logits.clear()
        seq, z = model.generate(prompt, n, temperature=temperature, plan=plan, use_cache=use_cache,
                                generator=torch.Generator().manual_seed(15), return_plan=True)
        runs[use_cache] = (seq, z, torch.stack(record_logits, 1))  # logits (B, N, V)
    (seq_c, z_c, lg_c), (seq_r, z_r, lg_r) = runs[True], runs[False]
    assert torch.equal(seq_c, seq_r)
    assert seq_c.shape == (batch, 6 + n) and torch.equal(seq_c[:, :6], prompt)
    torch.testing.assert_close(lg_c, lg_r, rtol=1e-5, atol=1e-5)
    if kind == "baseline":
        assert z_c is None and z_r is None
        ref = model(seq_c[:, :-1]).logits[:, 5:]
    else:
        assert torch.equal(z_c, z_r) and z_c.shape == (batch, 6 + n) and z_c.dtype == torch.int64
        # the returned z is what was used: a full forward on it gives the step logits
        ref = model(seq_c[:, :-1], z=z_c[:, :-1]).logits[:, 5:]
    torch.testing.assert_close(lg_c, ref, rtol=1e-5, atol=1e-5)
    if temperature == 0:
        assert torch.equal(seq_c[:, 6:], ref.argmax(-1))


def test_chunked_cache_decoding_equals_full_forward():
    # a multi-token chunk at an offset uses the explicit mask path of the attention
    for model in (tiny_ft(seed=15, num_key_value_heads=2), tiny_baseline(seed=15)):
        tokens = torch.randint(0, 48, (2, 14), generator=torch.Generator().manual_seed(14))
        z = torch.randint(0, 16, (2, 14), generator=torch.Generator().manual_seed(15))
        is_ft = isinstance(model, FreeTransformer)
        with torch.no_grad():
            full = model(tokens, z=z).logits if is_ft else model(tokens).logits
            caches = model.make_caches(2, 14)
            parts, pos = [], 0
            for size in (5, 4, 1, 4):
                codes = z[:, pos:pos + size] if is_ft else None
                parts.append(model.forward_tokens(tokens[:, pos:pos + size], model.codes_fn(codes),
                                                  caches, CacheRows(range(2), size, pos, "cpu")))
                pos += size
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_decode_weights_give_the_same_blocks_and_follow_parameter_changes():
    # generate's one-token steps on CPU use (in, out) copies of the block weights, q/k/v and
    # gate/up fused: the same numbers as the nn.Linear path, for ordinary and injection blocks
    model = tiny_ft(seed=21, num_key_value_heads=2)
    packed = model.decode_weights()
    assert model.decode_weights() is packed  # kept while the weights are unchanged
    g = torch.Generator().manual_seed(21)
    x, r = torch.randn(3, 5, 32, generator=g), torch.randn(3, 5, 32, generator=g)
    cos, sin = model._rope(2, 5)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for kv_input in (None, x + r):
                caches = [KVCache(3, 2, 7, 8, torch.float32, 'cpu') for _ in range(2)]  # kv heads 2, hd 8
                rows = CacheRows(range(3), 5, 2, "cpu")
                got = block(x, cos, sin, kv_input=kv_input, cache=caches[0], rows=rows, packed=packed[i])
                ref = block(x, cos, sin, kv_input=kv_input, cache=caches[1], rows=rows)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(caches[0].k, caches[1].k, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(caches[0].v, caches[1].v, rtol=1e-5, atol=1e-6)
    # an optimizer step changes the weights in place: the packed copy is rebuilt from them
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model.loss(torch.randint(0, 48, (2, 9), generator=g))["loss"].backward()
    opt.step()
    fresh = model.decode_weights()
    a = model.blocks[1].attn
    assert fresh is not packed and not torch.equal(fresh[1].wqkv, packed[1].wqkv)
    assert torch.equal(fresh[1].wqkv, torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]).t())
    assert torch.equal(fresh[1].w2, model.blocks[1].mlp.w2.weight.t())
    # and so does load_state_dict; cached generation still equals a full recompute
    model.load_state_dict(tiny_ft(seed=22, num_key_value_heads=2).state_dict())
    assert not torch.equal(model.decode_weights()[0].wo, fresh[0].wo)
    prompt = torch.randint(0, 48, (2, 4), generator=g)
    runs = [model.generate(prompt, 8, temperature=0, plan=3, use_cache=c) for c in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_new_z_never_redrawn_and_consistent_with_greedy_tokens():
    ft = tiny_ft(seed=16)
    prompt = torch.randint(0, 48, (2, 4), generator=torch.Generator().manual_seed(16))
    seq, z = ft.generate(prompt, 12, temperature=0, plan=7, return_plan=True)
    with torch.no_grad():
        logits = ft(seq[:, :-1], z=z[:, :-1]).logits
    assert torch.equal(seq[:, 4:], logits[:, 3:].argmax(-1))
    # a different Z at one new position changes what follows it, so the check has teeth
    z2 = z.clone()
    z2[:, 6] = (z2[:, 6] + 5) % 16
    seq2, _ = ft.generate(prompt, 12, temperature=0, plan=z2, return_plan=True)
    assert torch.equal(seq2[:, :7], seq[:, :7])
    with torch.no_grad():
        assert not torch.equal(ft(seq[:, :-1], z=z2[:, :-1]).logits[:, 6:],
                               ft(seq[:, :-1], z=z[:, :-1]).logits[:, 6:])


def test_plan_seed_determinism():
    ft = tiny_ft(seed=17, latent_bits=8)
    prompt = torch.randint(0, 48, (2, 5), generator=torch.Generator().manual_seed(17))
    a = ft.generate(prompt, 10, temperature=0, plan=5, return_plan=True)
    b = ft.generate(prompt, 10, temperature=0, plan=5, return_plan=True)
    c = ft.generate(prompt, 10, temperature=0, plan=6, return_plan=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1][:, 5:], c[1][:, 5:])
    assert (a[1][:, 5:] != c[1][:, 5:]).float().mean() > 0.9
    # without a plan, rows draw their own Z (not one shared plan)
    _, z = ft.generate(prompt[:1].expand(4, -1), 10, temperature=0, return_plan=True,
                       generator=torch.Generator().manual_seed(0))
    assert (z[1:, 5:] != z[:1, 5:]).any(-1).all()
    # sampled tokens: plan seed + token generator seed reproduce the whole sample
    s1 = ft.generate(prompt, 10, plan=5, generator=torch.Generator().manual_seed(3))
    s2 = ft.generate(prompt, 10, plan=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("layout", ["N", "BN", "T0N", "BT0N"])
def test_explicit_plan_codes_are_honored(layout):
    ft = tiny_ft(seed=18)
    B, T0, N = 2, 4, 6
    prompt = torch.randint(0, 48, (B, T0), generator=torch.Generator().manual_seed(18))
    g = torch.Generator().manual_seed(19)
    shape = {"N": (N,), "BN": (B, N), "T0N": (T0 + N,), "BT0N": (B, T0 + N)}[layout]
    plan = torch.randint(0, 16, shape, generator=g)
    seq, z = ft.generate(prompt, N, temperature=0, plan=plan, return_plan=True)
    assert z.shape == (B, T0 + N)
    expected = plan.expand(B, -1)
    assert torch.equal(z[:, -expected.shape[1]:], expected)
    with torch.no_grad():
        logits = ft(seq[:, :-1], z=z[:, :-1]).logits
    assert torch.equal(seq[:, T0:], logits[:, T0 - 1:].argmax(-1))


@pytest.mark.parametrize("bad", [
    torch.zeros(7, dtype=torch.int64),  # neither N nor T0+N
    torch.zeros(3, 6, dtype=torch.int64),  # wrong batch
    torch.zeros(2, 6, 1, dtype=torch.int64),  # 3-d
    torch.full((6,), 16, dtype=torch.int64),  # out of range (H = 4)
    torch.full((2, 10), -1, dtype=torch.int64),  # negative
    [0] * 6,  # not a tensor
    torch.tensor([1.7, 2.9, 0.5, 3.99, 0.0, 1.0]),  # float codes are not truncated silently
    torch.ones(6, dtype=torch.bool),
    1.5,
    True,
])
def test_invalid_plans_raise(bad):
    ft = tiny_ft(seed=19)
    prompt = torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError):
        ft.generate(prompt, 6, plan=bad)


def test_baseline_rejects_a_plan():
    base = tiny_baseline()
    prompt = torch.zeros(2, 4, dtype=torch.int64)
    for kwargs in (dict(plan=3), dict(plan=torch.zeros(6, dtype=torch.int64)), dict(shared_plan=True)):
        with pytest.raises(ValueError):
            base.generate(prompt, 6, **kwargs)
    seq, z = base.generate(prompt, 6, return_plan=True)
    assert seq.shape == (2, 10) and z is None


def test_generation_first_then_training_and_its_outputs_are_ordinary_tensors():
    """Decoding runs under inference_mode: a model that generates before it trains (the RoPE
    tables are built on first use) still trains, and its tokens and codes feed a training forward."""
    ft = tiny_ft()
    seq, z = ft.generate(torch.zeros(2, 4, dtype=torch.int64), 6, plan=1, return_plan=True)
    assert not seq.is_inference() and not z.is_inference()
    out = ft(seq, z=z)  # a grad-enabled forward that saves the codes for backward
    out.logits.sum().backward()
    assert ft.post_sampler.weight.grad.abs().sum() > 0
    seq[:, 0] = 1  # in place, outside inference mode
    ft.loss(seq)["loss"].backward()


def test_generate_argument_checks():
    ft = tiny_ft()
    with pytest.raises(ValueError):
        ft.generate(torch.zeros(1, 60, dtype=torch.int64), 10)  # beyond max_seq_len=64
    with pytest.raises(ValueError):
        ft.generate(torch.zeros(1, 0, dtype=torch.int64), 3)
    out = ft.generate(torch.zeros(5, dtype=torch.int64), 3)  # 1-d prompt -> one row
    assert out.shape == (1, 8)


def test_shared_plan():
    ft = tiny_ft(seed=20, latent_bits=6)
    with torch.no_grad():
        ft.encoder.readout.weight.normal_(std=1.0)
    prompt = torch.randint(0, 48, (1, 5), generator=torch.Generator().manual_seed(20))
    rows = prompt.expand(4, -1)
    seq, z = ft.generate(rows, 8, plan=21, shared_plan=True, return_plan=True,
                         generator=torch.Generator().manual_seed(22))
    assert (z == z[:1]).all()  # the whole plan, prompt part included, is shared
    assert not (seq == seq[:1]).all()  # the tokens are still sampled per row
    greedy, zg = ft.generate(rows, 8, temperature=0, plan=21, shared_plan=True, return_plan=True)
    assert (greedy == greedy[:1]).all() and torch.equal(zg, z)
    # sample_shared_plan gives the same plan for the same seed, and as an explicit plan reproduces
    plan = sample_shared_plan(ft, prompt, 8, generator=torch.Generator().manual_seed(21))
    assert plan.shape == (13,) and plan.dtype == torch.int64
    assert torch.equal(plan, z[0])
    seq2, z2 = ft.generate(rows, 8, plan=plan, return_plan=True,
                           generator=torch.Generator().manual_seed(22))
    assert torch.equal(z2, z) and torch.equal(seq2, seq)
    # different generator states give different shared plans
    other = sample_shared_plan(ft, prompt[0], 8, generator=torch.Generator().manual_seed(23))
    assert other.shape == (13,) and not torch.equal(other, plan)
    # without shared_plan the rows' plans differ
    _, zi = ft.generate(rows, 8, plan=21, return_plan=True)
    assert not (zi == zi[:1]).all()


# ----------------------------------------------------------------------------------------------
# honest bounds: nll
# ----------------------------------------------------------------------------------------------


def test_baseline_nll_is_cross_entropy():
    base = tiny_baseline(seed=21)
    tokens = torch.randint(0, 48, (3, 12), generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        logits = base(tokens[:, :-1]).logits
    ce = F.cross_entropy(logits.reshape(-1, 48), tokens[:, 1:].reshape(-1))
    assert base.nll(tokens).item() == pytest.approx(ce.item(), rel=1e-6)
    with pytest.raises(ValueError):
        base.nll(tokens[:, :1])


def test_ft_nll_k1_is_the_elbo():
    ft = tiny_ft(seed=22)
    with torch.no_grad():
        ft.encoder.readout.weight.normal_(std=1.0)
    tokens = torch.randint(0, 48, (3, 12), generator=torch.Generator().manual_seed(22))
    nll = ft.nll(tokens, 1, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = ft(tokens[:, :-1], generator=torch.Generator().manual_seed(5))
    ce = F.cross_entropy(out.logits.reshape(-1, 48), tokens[:, 1:].reshape(-1))
    kl = out.kl.mean()
    assert kl.item() > 0.1
    assert nll.item() == pytest.approx((ce + kl).item(), rel=1e-6)
    assert nll.item() - ce.item() == pytest.approx(kl.item(), rel=1e-4)  # never the CE alone
    with pytest.raises(ValueError):
        ft.nll(tokens, 0)


def test_iwae_tightens_towards_the_exact_nll():
    # small enough to sum over every plan: H = 2 bits, T = 3 positions -> 64 plans per sequence
    ft = tiny_ft(seed=23, latent_bits=2, num_layers=2, init_std=0.3)
    with torch.no_grad():
        ft.encoder.readout.weight.normal_(std=1.0)
    B, T, H = 2, 3, 2
    tokens = torch.randint(0, 48, (B, T + 1), generator=torch.Generator().manual_seed(23))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    plans = torch.tensor(list(itertools.product(range(4), repeat=T)))  # (64, T)
    with torch.no_grad():
        zl = ft(inputs).z_logits  # (B, T, H), deterministic
        rep_in = inputs.repeat_interleave(64, 0)
        rep_z = plans.repeat(B, 1)
        logits = ft(rep_in, z=rep_z).logits
        log_px = -F.cross_entropy(logits.reshape(-1, 48), targets.repeat_interleave(64, 0).reshape(-1),
                                  reduction="none").view(B, 64, T).sum(-1)  # (B, 64)
        log_qz = log_q(zl.repeat_interleave(64, 0), rep_z).view(B, 64, T).sum(-1).double()
    log_pz = -T * H * math.log(2)
    exact = -(torch.logsumexp(log_px.double() + log_pz, 1)).sum().item() / (B * T)
    q = log_qz.exp()
    torch.testing.assert_close(q.sum(1), torch.ones(B, dtype=torch.float64))
    exact_elbo = -(q * (log_px.double() + log_pz - log_qz)).sum().item() / (B * T)
    assert exact_elbo - exact > 0.05  # a real gap to close
    seeds = range(12)
    elbo = sum(ft.nll(tokens, 1, generator=torch.Generator().manual_seed(s)).item() for s in seeds) / 12
    iwae4 = sum(ft.nll(tokens, 4, generator=torch.Generator().manual_seed(s)).item() for s in seeds) / 12
    iwae64 = sum(ft.nll(tokens, 64, generator=torch.Generator().manual_seed(s)).item() for s in seeds) / 12
    assert elbo == pytest.approx(exact_elbo, abs=0.1 * (exact_elbo - exact) + 0.02)
    assert iwae64 < iwae4 < elbo
    assert iwae64 >= exact - 0.02  # an upper bound on the NLL, up to sampling noise
    # the estimator itself, replayed on the same draws: -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)
    for k in (1, 4, 16):
        g = torch.Generator().manual_seed(31)
        log_w = []
        for _ in range(k):
            zk = sample_codes(zl, g)  # (B, T): the posterior draw of one forward
            idx = (zk * torch.tensor([16, 4, 1])).sum(-1)  # its row in `plans`
            log_w.append(log_px.double().gather(1, idx[:, None])[:, 0] + log_pz
                         - log_q(zl, zk).sum(-1).double())
        bound = torch.logsumexp(torch.stack(log_w), 0) - math.log(k)
        expected = -bound.sum().item() / (B * T)
        got = ft.nll(tokens, k, generator=torch.Generator().manual_seed(31)).item()
        if k == 1:  # K = 1 uses the analytic KL instead of the single-sample log-ratio
            got_elbo = got
            zk = sample_codes(zl, torch.Generator().manual_seed(31))
            idx = (zk * torch.tensor([16, 4, 1])).sum(-1)
            ce = -log_px.double().gather(1, idx[:, None]).sum().item() / (B * T)
            kl = ft(inputs).kl.mean().item()
            assert got_elbo == pytest.approx(ce + kl, abs=1e-4)
        else:
            assert got == pytest.approx(expected, abs=1e-4), k


# ----------------------------------------------------------------------------------------------
# loss and gradients
# ----------------------------------------------------------------------------------------------


def test_loss_keys_and_values():
    ft = tiny_ft(seed=24, free_bits=0.25)
    with torch.no_grad():
        ft.encoder.readout.weight.normal_(std=0.5)
    tokens = torch.randint(0, 48, (3, 12), generator=torch.Generator().manual_seed(24))
    torch.manual_seed(100)
    losses = ft.loss(tokens)
    assert set(losses) == {"loss", "ce", "kl", "kl_penalty"}
    torch.testing.assert_close(losses["loss"], losses["ce"] + losses["kl_penalty"])
    torch.manual_seed(100)  # replay the same posterior sample
    with torch.no_grad():
        out = ft(tokens[:, :-1])
    ce = F.cross_entropy(out.logits.reshape(-1, 48), tokens[:, 1:].reshape(-1))
    kappa = 0.25 * math.log(2)
    assert losses["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert losses["kl"].item() == pytest.approx(out.kl.mean().item(), rel=1e-6)
    penalty = torch.clamp(out.kl - kappa, min=0).mean()
    assert losses["kl_penalty"].item() == pytest.approx(penalty.item(), rel=1e-6)
    assert (out.kl < kappa).any() or penalty.item() != pytest.approx(out.kl.mean().item())
    assert losses["kl_penalty"].item() > 0
    base = tiny_baseline(seed=24)
    bl = base.loss(tokens)
    assert set(bl) == {"loss", "ce"}
    assert bl["loss"].item() == pytest.approx(base.nll(tokens).item(), rel=1e-6)


@pytest.mark.parametrize("latent_init", ["normal", "zero"])
def test_gradients_reach_the_table_rows_and_the_encoder(latent_init):
    # free bits far above H ln 2: the KL term gives no gradient, so the encoder's gradient can
    # only come through the mapper's dense G
    ft = tiny_ft(seed=25, latent_bits=8, free_bits=100.0, latent_init=latent_init).train()
    tokens = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(25))
    torch.manual_seed(200)
    losses = ft.loss(tokens)
    assert losses["kl_penalty"].item() == 0
    losses["loss"].backward()
    torch.manual_seed(200)
    with torch.no_grad():
        z = ft(tokens[:, :-1]).z
    grad_w = ft.post_sampler.weight.grad
    nonzero_rows = set((grad_w.abs().sum(-1) > 0).nonzero().flatten().tolist())
    assert nonzero_rows == set(z.flatten().tolist())  # exactly the sampled rows
    enc = ft.encoder
    if latent_init == "normal":
        assert enc.readout.weight.grad.abs().sum() > 0
        assert enc.zeta.grad.abs().sum() > 0
        assert enc.block.attn.wk.weight.grad.abs().sum() > 0
    else:  # W = 0: c_d = <W_d, dL/dR> = 0 for every code, nothing reaches the encoder yet
        assert enc.readout.weight.grad is None or enc.readout.weight.grad.abs().sum() == 0
    for name, p in ft.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def test_kl_penalty_gives_the_encoder_a_gradient_even_with_a_zero_table():
    ft = tiny_ft(seed=26, latent_init="zero", free_bits=0.0)
    with torch.no_grad():
        ft.encoder.readout.weight.normal_(std=1.0)
    tokens = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(26))
    ft.loss(tokens)["loss"].backward()
    assert ft.encoder.readout.weight.grad.abs().sum() > 0
    # the KL term alone reaches the encoder and, through it, the shared first half; nothing else
    ft.zero_grad(set_to_none=True)
    ft.loss(tokens)["kl_penalty"].backward()
    j = ft.cfg.inject_layer
    for i, block in enumerate(ft.blocks):
        g = block.attn.wq.weight.grad
        if i < j:  # the encoder reads the first half's output X
            assert g is not None and g.abs().sum() > 0, i
        else:
            assert g is None or g.abs().sum() == 0, i
    assert ft.embed.weight.grad.abs().sum() > 0
    assert ft.lm_head.weight.grad is None or ft.lm_head.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_loss_backward(dtype):
    ft = tiny_ft(seed=27, latent_bits=6).to(dtype).train()
    tokens = torch.randint(0, 48, (2, 13), generator=torch.Generator().manual_seed(27))
    out = ft(tokens[:, :-1])
    assert out.z.dtype == torch.int64 and out.z.min() >= 0 and out.z.max() < 64
    assert out.logits.dtype == dtype
    assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.kl).all()
    losses = ft.loss(tokens)
    for k, v in losses.items():
        assert torch.isfinite(v).all(), k
    losses["loss"].backward()
    for name, p in ft.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad.float()).all(), name
    assert ft.post_sampler.weight.grad.float().abs().sum() > 0
    assert ft.encoder.readout.weight.grad.float().abs().sum() > 0
    with torch.no_grad():
        seq, z = ft.eval().generate(tokens[:, :4], 5, plan=3, return_plan=True)
    assert seq.shape == (2, 9) and z.dtype == torch.int64


# ----------------------------------------------------------------------------------------------
# sizes and cost (check 11)
# ----------------------------------------------------------------------------------------------


def test_num_params_and_flops():
    cfg_kw = dict(latent_bits=5)
    ft, base = tiny_ft(**cfg_kw), tiny_baseline(**cfg_kw)
    d, v = 32, 48
    assert base.num_params() == sum(p.numel() for p in base.parameters())
    assert ft.num_params() == sum(p.numel() for p in ft.parameters())
    enc = sum(p.numel() for p in ft.encoder.parameters())
    block = sum(p.numel() for p in base.blocks[0].parameters())
    assert enc == block + d + d + d * 5  # one block + zeta + norm + read-out to H logits
    assert ft.num_params() - base.num_params() == enc + (1 << 5) * d
    assert base.num_params(exclude_embeddings=True) == base.num_params() - v * d
    assert ft.num_params(exclude_embeddings=True) == base.num_params(exclude_embeddings=True) + enc
    t = 64
    assert base.flops_per_token(t) == pytest.approx(
        6 * base.num_params(exclude_embeddings=True) + 12 * 4 * d * t)
    assert ft.flops_per_token(t) > base.flops_per_token(t)
    assert ft.flops_per_token() == ft.flops_per_token(64)  # defaults to max_seq_len
    tied = BaselineTransformer(tiny_cfg(arch="baseline", tie_embeddings=True))
    assert tied.lm_head.weight is tied.embed.weight
    assert tied.num_params() == base.num_params() - v * d


def test_inference_post_sampler_is_a_gather():
    ft = tiny_ft(seed=28)
    z = torch.randint(0, 16, (2, 7))
    fn = ft.codes_fn(z)
    x = torch.randn(2, 7, 32)
    assert torch.equal(fn(x, None, None), ft.post_sampler.weight[z])
    assert ft.codes_fn(None) is None


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------


def test_top_k_1_and_tiny_top_p_equal_greedy():
    ft = tiny_ft(seed=29)
    prompt = torch.randint(0, 48, (3, 5), generator=torch.Generator().manual_seed(29))
    greedy = ft.generate(prompt, 10, temperature=0, plan=4)
    topk = ft.generate(prompt, 10, temperature=1.0, top_k=1, plan=4,
                       generator=torch.Generator().manual_seed(1))
    topp = ft.generate(prompt, 10, temperature=1.0, top_p=1e-6, plan=4,
                       generator=torch.Generator().manual_seed(2))
    sampled = ft.generate(prompt, 10, temperature=1.5, plan=4,
                          generator=torch.Generator().manual_seed(3))
    assert torch.equal(topk, greedy)
    assert torch.equal(topp, greedy)
    assert not torch.equal(sampled, greedy)  # plain sampling does differ


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    k2 = filter_logits(logits, top_k=2)
    assert torch.isinf(k2[0, [0, 3]]).all() and torch.equal(k2[0, [1, 2]], logits[0, [1, 2]])
    probs = torch.softmax(logits, -1)[0]  # 0.087, 0.644, 0.237, 0.032
    p = filter_logits(logits, top_p=0.7)  # 0.644 < 0.7 -> keep the second best too
    assert torch.isfinite(p[0, [1, 2]]).all() and torch.isinf(p[0, [0, 3]]).all()
    p = filter_logits(logits, top_p=float(probs[1]) - 1e-3)
    assert torch.isfinite(p[0]).sum() == 1 and torch.isfinite(p[0, 1])
    assert torch.equal(filter_logits(logits), logits)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits.expand(4000, -1), generator=g)]).flatten()
    freq = torch.bincount(draws, minlength=4).double() / 4000
    assert ((freq - probs.double()).abs() < 0.03).all()
    assert sample_next(logits, temperature=0).item() == 1


# ----------------------------------------------------------------------------------------------
# the attention layer against a hand-written reference (RoPE rotate-half, GQA grouping, mask)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv", [4, 2, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_a_reference(num_kv, causal):
    from ft_ray.model.layers import Attention, rope_tables

    cfg = tiny_cfg(num_key_value_heads=num_kv, rope_theta=100.0)
    torch.manual_seed(30)
    attn = Attention(cfg).double()
    B, T, D, nh, hd = 2, 7, 32, 4, 8
    xq, xkv = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64)
    cos, sin = rope_tables(hd, T, 100.0)
    out = attn(xq, xkv, cos.double(), sin.double(), causal=causal)

    def rope(x):  # x (B, h, T, hd): rotate pairs (i, i + hd/2) by angle pos * theta^(-2i/hd)
        pos = torch.arange(T, dtype=torch.float64)[:, None]
        ang = pos * 100.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1)

    q = rope((xq @ attn.wq.weight.T).view(B, T, nh, hd).transpose(1, 2))
    k = rope((xkv @ attn.wk.weight.T).view(B, T, num_kv, hd).transpose(1, 2))
    v = (xkv @ attn.wv.weight.T).view(B, T, num_kv, hd).transpose(1, 2)
    heads = []
    for h in range(nh):
        g = h // (nh // num_kv)  # query head h uses KV head h // (heads per group), as in Llama
        s = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(hd)  # (B, T, T)
        if causal:
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(torch.softmax(s, -1) @ v[:, g])
    ref = torch.stack(heads, 2).reshape(B, T, nh * hd) @ attn.wo.weight.T
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# training numerics: the one forward (also used by generation and serving) keeps training exact
# ----------------------------------------------------------------------------------------------


def _ref_block(block, x, cos, sin, kv=None, causal=True):
    """A pre-norm block written out from the spec with plain functional ops (fp32)."""
    a, m, (B, T, D) = block.attn, block.mlp, x.shape
    eps = block.attn_norm.eps
    hq = F.rms_norm(x, (D,), block.attn_norm.weight, eps)
    hkv = hq if kv is None else F.rms_norm(kv, (D,), block.attn_norm.weight, eps)
    heads = lambda t, n: t.view(B, T, n, a.head_dim).transpose(1, 2)  # noqa: E731
    rope = lambda t: t * cos + t.roll(a.head_dim // 2, dims=-1) * sin  # noqa: E731 (rotate-half form)
    q = rope(heads(F.linear(hq, a.wq.weight), a.num_heads))
    k = rope(heads(F.linear(hkv, a.wk.weight), a.num_kv_heads))
    v = heads(F.linear(hkv, a.wv.weight), a.num_kv_heads)
    rep = a.num_heads // a.num_kv_heads
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=causal)
    x = x + F.linear(y.transpose(1, 2).reshape(B, T, -1), a.wo.weight)
    h = F.rms_norm(x, (D,), block.mlp_norm.weight, eps)
    return x + F.linear(F.silu(F.linear(h, m.w1.weight)) * F.linear(h, m.w3.weight), m.w2.weight)


def _ref_loss(model, tokens):
    """The training loss written out from the spec (section 1-2), sharing only the mapper and KL
    functions of latent.py with the model: embed, first half, [encoder, sample, R = W[Z],
    injection through K/V], second half, norm, head, CE (+ free bits)."""
    cfg = model.cfg
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    T, hd = inputs.shape[1], cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    cos = torch.cat([angles.cos().float()] * 2, -1)
    sin = torch.cat([-angles.sin().float(), angles.sin().float()], -1)
    x = model.embed.weight[inputs]
    out = {}
    for i, block in enumerate(model.blocks):
        kv = None
        if isinstance(model, FreeTransformer) and i == cfg.inject_layer:
            enc = model.encoder
            h = _ref_block(enc.block, enc.zeta.expand_as(x), cos, sin, kv=x, causal=False)
            out["z_logits"] = F.linear(F.rms_norm(h, (cfg.hidden_dim,), enc.norm.weight, enc.norm.eps),
                                       enc.readout.weight)
            r, _ = sample_and_embed(out["z_logits"], model.post_sampler.weight, None, cfg.mapper_chunk_elems)
            kv = x + r
        x = _ref_block(block, x, cos, sin, kv=kv)
    logits = F.linear(F.rms_norm(x, (cfg.hidden_dim,), model.norm.weight, model.norm.eps), model.lm_head.weight)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    if "z_logits" in out:
        loss = loss + free_bits_penalty(kl_to_uniform(out["z_logits"]), cfg.free_nats)
    return loss


# Obtained by running this test's set-up (model, tokens, seeds) on the code before the one-forward
# refactor (commit 402b286, CPU, torch 2.13, one thread): `model.loss(tokens)["loss"].item()`.
PRE_REFACTOR_LOSS = {"free_transformer": 3.9659039974212646, "baseline": 4.087439060211182}


@pytest.mark.parametrize("arch", ["free_transformer", "baseline"])
def test_training_loss_and_gradients_are_those_of_a_reference_forward(arch):
    cfg = tiny_cfg(arch=arch, num_key_value_heads=2, latent_init_std=0.5)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    tokens = torch.randint(0, 48, (3, 17), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the posterior sample
    loss = model.loss(tokens)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    ref = _ref_loss(model, tokens)
    ref.backward()
    assert torch.equal(loss, ref)  # bit for bit, not approximately
    for n, p in model.named_parameters():
        assert torch.equal(grads[n], p.grad), n
    assert loss.item() == pytest.approx(PRE_REFACTOR_LOSS[arch], rel=1e-6)  # exact on the machine above


# ----------------------------------------------------------------------------------------------
# sampling never produces NaN from valid settings; only logits without a valid token raise
# ----------------------------------------------------------------------------------------------


def test_sampler_extreme_settings_and_logits_give_valid_tokens():
    from ft_ray.serve.requests import MIN_TEMPERATURE

    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 0.25, 0.4]])
    best = logits.argmax(-1)
    # top_p = 1e-300 is 0 in float32: the most likely token must still survive
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-300, generator=g), best)
    assert torch.equal(sample_next(logits, 1.0, top_k=3, top_p=1e-300, generator=g), best)
    # the smallest accepted temperature: logits / 1e-6 alone would overflow for large logits
    big = torch.tensor([[3e38, -3e38, 2.9e38, 0.0]])
    for lg in (logits, big, logits * 1e30):
        assert torch.equal(sample_next(lg, MIN_TEMPERATURE, generator=g), lg.argmax(-1))
        assert torch.equal(sample_next(lg, MIN_TEMPERATURE, top_p=0.5, top_k=2, generator=g), lg.argmax(-1))
    # +inf logits: the pick is among them, never NaN; -inf tokens are never picked
    inf, ninf = float("inf"), float("-inf")
    odd = torch.tensor([[inf, 1.0, inf, ninf], [ninf, 2.0, ninf, 1.0], [1e38, 3e38, ninf, ninf]])
    for temperature, kw in ((1.0, {}), (MIN_TEMPERATURE, {}), (0.7, {"top_p": 1e-300}), (2.0, {"top_k": 2})):
        picks = torch.stack([sample_next(odd, temperature, generator=g, **kw) for _ in range(200)])  # (200, 3)
        assert set(picks[:, 0].tolist()) <= {0, 2} and set(picks[:, 1].tolist()) <= {1, 3}
        assert set(picks[:, 2].tolist()) <= {0, 1}
    assert set(torch.stack([sample_next(odd[:1], 1.0, generator=g) for _ in range(200)]).flatten().tolist()) == {0, 2}
    assert sample_next(odd, 0).tolist() == [0, 1, 1]
    # bf16 logits (a bf16 model) sample in float32
    assert sample_next(logits.bfloat16(), 0.5, generator=g).dtype == torch.int64
    # no valid token at all: a clear error for the caller to fail that row alone
    for bad in (torch.tensor([[0.0, float("nan")]]), torch.tensor([[ninf, ninf]])):
        for temperature in (0, 1.0):
            with pytest.raises(ValueError, match="NaN|-inf"):
                sample_next(bad, temperature, generator=g)


def test_shared_plan_with_different_prompts_is_refused():
    ft = tiny_ft(seed=31)
    prompts = torch.randint(0, 48, (3, 5), generator=torch.Generator().manual_seed(31))
    for plan in (None, 7, torch.zeros(4, dtype=torch.int64)):
        with pytest.raises(ValueError, match="prompts differ"):
            ft.generate(prompts, 4, plan=plan, shared_plan=True)
    # the same prompt on every row is what sharing means: accepted, one plan for all rows
    _, z = ft.generate(prompts[:1].expand(3, -1), 4, plan=7, shared_plan=True, return_plan=True)
    assert (z == z[:1]).all()
    # and without sharing, different prompts get their own plans (row j seeded row_seed(7, j))
    _, z = ft.generate(prompts, 4, plan=7, return_plan=True)
    _, z1 = ft.generate(prompts[1:2], 4, plan=row_seed(7, 1), return_plan=True)
    assert torch.equal(z[1], z1[0])


def test_sample_rows_is_row_wise_and_follows_each_rows_settings():
    from ft_ray.model.sampling import sample_rows

    g = torch.Generator().manual_seed(3)
    B, V = 6, 40
    logits = torch.randn(B, V, generator=g) * 3
    t = torch.tensor([0.0, 0.7, 1.0, 1.3, 1e-6, 2.0], dtype=torch.float64)
    k = torch.tensor([0, 0, 5, 1, 0, 3])
    p = torch.tensor([1.0, 0.9, 1.0, 1.0, 1e-300, 0.5], dtype=torch.float64)
    for _ in range(50):
        u = torch.rand(B, generator=g, dtype=torch.float64)
        tokens, bad = sample_rows(logits, t, k, p, u)
        assert bad is None
        for i in range(B):  # the same token alone as in the batch, with per-row or scalar settings
            alone, _ = sample_rows(logits[i:i + 1], t[i:i + 1], k[i:i + 1], p[i:i + 1], u[i:i + 1])
            scalar, _ = sample_rows(logits[i:i + 1], t[i].item(), int(k[i]), p[i].item(), u[i:i + 1])
            assert alone.item() == tokens[i].item() == scalar.item()
        best = logits.argmax(-1)
        assert tokens[0] == best[0] and tokens[3] == best[3] and tokens[4] == best[4]  # greedy, top-1, tiny T
        assert tokens[2] in logits[2].topk(5).indices and tokens[5] in logits[5].topk(3).indices
    # frequencies follow the softmax at temperature 1
    probs = torch.softmax(logits[2], -1).double()
    u = torch.rand(20000, generator=g, dtype=torch.float64)
    draws, _ = sample_rows(logits[2:3].expand(20000, -1), torch.ones(20000, dtype=torch.float64),
                           torch.zeros(20000, dtype=torch.int64), torch.ones(20000, dtype=torch.float64), u)
    freq = torch.bincount(draws, minlength=V).double() / 20000
    assert (freq - probs).abs().max() < 0.015
