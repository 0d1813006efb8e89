"""The Binary Mapper, the post-sampler gather and the KL to the uniform prior (spec section 6,
checks 4-8 and 10)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ft_ray.model.latent import (
    bits_to_codes,
    code_bits,
    free_bits_penalty,
    kl_to_uniform,
    log_q,
    sample_and_embed,
    sample_codes,
    uniform_codes,
)

P_MIN = 1e-3  # reject a frequency test only when its p-value is below this



# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Pearson chi-square statistic and its p-value, dof = cells - 1 (survival function of the
    chi-square distribution as the regularised upper incomplete gamma Q(k/2, x/2))."""
    observed, expected = observed.double().flatten(), expected.double().flatten()
    assert observed.sum().item() == pytest.approx(expected.sum().item())
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = observed.numel() - 1
    p = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2)
    return stat.item(), p.item()


def test_chi2_helper_rejects_a_wrong_distribution():
    # the helper itself can fail: 8 cells, one of them twice as likely as expected
    expected = torch.full((8,), 2500.0)
    observed = expected.clone()
    observed[0] += 400
    observed[1] -= 400
    _, p = chi2_pvalue(observed, expected)
    assert p < 1e-10
    # and the hard-coded critical value chi2.ppf(0.999, 7) = 24.322 gives p = 1e-3
    p_crit = torch.special.gammaincc(torch.tensor(3.5, dtype=torch.float64),
                                     torch.tensor(24.3219 / 2, dtype=torch.float64)).item()
    assert p_crit == pytest.approx(1e-3, rel=1e-3)


def all_code_bits(num_bits: int, dtype=torch.float64) -> torch.Tensor:
    """(2^H, H) bits of every code, bit h of code d = (d >> h) & 1, built without the library."""
    rows = [[(d >> h) & 1 for h in range(num_bits)] for d in range(1 << num_bits)]
    return torch.tensor(rows, dtype=dtype)


def dense_g(logits: torch.Tensor) -> torch.Tensor:
    """(N, H) -> (N, 2^H): G_d = prod_h p_h^{b_h(d)} (1 - p_h)^{1 - b_h(d)}, explicitly."""
    num_bits = logits.shape[-1]
    bits = all_code_bits(num_bits, logits.dtype)  # (C, H)
    p = torch.sigmoid(logits)[:, None, :]  # (N, 1, H)
    return torch.where(bits.bool(), p, 1 - p).prod(-1)  # (N, C)


def brute_force_kl(logits: torch.Tensor) -> torch.Tensor:
    """sum_d Q(d) ln(Q(d) 2^H) over all 2^H codes. logits (N, H) float64 -> (N,)."""
    q = dense_g(logits.double())
    return (q * torch.log(q * (1 << logits.shape[-1]))).sum(-1)


# ----------------------------------------------------------------------------------------------
# check 4: forward is exactly one-hot, index = sum 2^h b_h, frequencies = product of Bernoullis
# ----------------------------------------------------------------------------------------------


def test_code_bits_and_bits_to_codes_match_the_binary_expansion():
    codes = torch.arange(1 << 6)
    bits = code_bits(codes, 6)
    assert bits.dtype == torch.int64
    assert torch.equal(bits, all_code_bits(6, torch.int64))
    assert torch.equal(bits_to_codes(bits), codes)
    # a code above 2^31 survives: integer arithmetic, no float rounding
    big = torch.tensor([(1 << 40) + 12345])
    assert bits_to_codes(code_bits(big, 41)).item() == (1 << 40) + 12345


@pytest.mark.parametrize("h", range(5))
def test_sure_bits_give_the_power_of_two_code(h):
    # bit h certainly 1, the others certainly 0 -> code 2^h: fixes the bit order
    num_bits = 5
    logits = torch.full((64, num_bits), -30.0)
    logits[:, h] = 30.0
    weight = torch.randn(1 << num_bits, 3)
    r, codes = sample_and_embed(logits, weight, torch.Generator().manual_seed(h))
    assert codes.dtype == torch.int64
    assert torch.equal(codes, torch.full((64,), 1 << h))
    assert torch.equal(r, weight[codes])


def test_forward_is_the_gathered_row_and_the_code_is_sum_of_bits():
    gen_seed = 123
    num_bits, dim = 4, 8
    torch.manual_seed(0)
    logits = torch.randn(3, 7, num_bits) * 2
    weight = torch.randn(1 << num_bits, dim)
    r, codes = sample_and_embed(logits, weight, torch.Generator().manual_seed(gen_seed))
    assert codes.shape == (3, 7) and codes.dtype == torch.int64
    assert r.shape == (3, 7, dim)
    assert torch.equal(r, weight[codes])  # bit-exact one-hot forward value
    assert codes.min() >= 0 and codes.max() < 1 << num_bits
    # the bits: b_h = [u_h < sigmoid(L_h)] with u from the same generator; code = sum 2^h b_h
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(gen_seed))
    b = (u < torch.sigmoid(logits)).long()
    expected = sum((b[..., h] << h) for h in range(num_bits))
    assert torch.equal(codes, expected)
    # same generator state -> same codes; sample_codes agrees with sample_and_embed
    assert torch.equal(sample_codes(logits, torch.Generator().manual_seed(gen_seed)), codes)


def test_code_frequencies_match_the_product_of_bernoullis():
    num_bits, n = 3, 20000
    lvec = torch.tensor([-1.0, 0.4, 2.0])
    logits = lvec.expand(n, num_bits)
    weight = torch.randn(1 << num_bits, 4)
    _, codes = sample_and_embed(logits, weight, torch.Generator().manual_seed(7))
    observed = torch.bincount(codes, minlength=1 << num_bits)
    expected = n * dense_g(lvec.double()[None])[0]
    _, p = chi2_pvalue(observed, expected)
    assert p > P_MIN, (observed, expected)
    # a per-bit straight-through or a threshold would give a degenerate histogram; so would
    # a wrong bit order: test the same counts against bit order reversed to make sure it fails
    rev = torch.tensor([int(f"{d:03b}"[::-1], 2) for d in range(8)])  # d with its 3 bits reversed
    _, p_rev = chi2_pvalue(observed, expected[rev])
    assert p_rev < 1e-10


def test_codes_are_sampled_per_position_with_their_own_logits():
    # different positions have different posteriors: bit frequencies follow each one
    n, num_bits = 4000, 2
    lvec = torch.tensor([[3.0, -3.0], [-3.0, 3.0], [0.0, 0.0]])
    logits = lvec[None].expand(n, 3, num_bits)
    codes = sample_codes(logits, torch.Generator().manual_seed(1))
    freq = code_bits(codes, num_bits).double().mean(0)  # (3, H)
    p = torch.sigmoid(lvec.double())
    tol = 5 * torch.sqrt(p * (1 - p) / n) + 1e-3
    assert ((freq - p).abs() <= tol).all(), (freq, p)


# ----------------------------------------------------------------------------------------------
# check 5: backward = autograd of sum_d c_d G_d(L) with the dense G; W gets the scatter
# ----------------------------------------------------------------------------------------------


def _reference_grads(logits, weight, codes, upstream):
    """Autograd through the spec's dense surrogate R = (Y + G - sg(G)) W, all 2^H codes."""
    lr = logits.detach().clone().requires_grad_(True)
    wr = weight.detach().clone().requires_grad_(True)
    num_codes = weight.shape[0]
    y = torch.nn.functional.one_hot(codes.reshape(-1), num_codes).to(lr.dtype)  # (N, C)
    g = dense_g(lr.reshape(-1, lr.shape[-1]))  # (N, C)
    r = (y + g - g.detach()) @ wr  # forward value = W[codes]
    torch.testing.assert_close(r.detach(), weight.detach()[codes.reshape(-1)])
    (r * upstream.reshape(r.shape)).sum().backward()
    return lr.grad, wr.grad


def _reference_logit_grad_from_c(logits, weight, upstream):
    """The same logits gradient written as autograd of sum_d c_d G_d(L), c_d = <W_d, dL/dR>."""
    lr = logits.detach().clone().requires_grad_(True)
    c = upstream.reshape(-1, weight.shape[1]) @ weight.detach().T  # (N, C), constants
    (c * dense_g(lr.reshape(-1, lr.shape[-1]))).sum().backward()
    return lr.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_equals_dense_g_autograd(dtype):
    num_bits, dim = 4, 8
    torch.manual_seed(1)
    logits = (torch.randn(2, 5, num_bits, dtype=dtype) * 1.5).requires_grad_(True)
    weight = torch.randn(1 << num_bits, dim, dtype=dtype).requires_grad_(True)
    upstream = torch.randn(2, 5, dim, dtype=dtype)
    r, codes = sample_and_embed(logits, weight, torch.Generator().manual_seed(3))
    (r * upstream).sum().backward()

    ref_l, ref_w = _reference_grads(logits, weight, codes, upstream)
    ref_l2 = _reference_logit_grad_from_c(logits, weight, upstream)
    assert logits.grad.dtype == dtype and weight.grad.dtype == dtype
    torch.testing.assert_close(ref_l, ref_l2, rtol=1e-10 if dtype == torch.float64 else 1e-5,
                               atol=1e-10 if dtype == torch.float64 else 1e-6)
    # the mapper computes p, G and the sums in fp32 whatever the input dtype
    torch.testing.assert_close(logits.grad, ref_l.reshape(logits.shape), rtol=2e-5, atol=2e-6)
    # the table: scatter (index_add) of dL/dR into the sampled rows, nothing elsewhere
    scatter = torch.zeros_like(weight).index_add_(0, codes.reshape(-1), upstream.reshape(-1, dim))
    torch.testing.assert_close(weight.grad, scatter, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weight.grad, ref_w, rtol=1e-6, atol=1e-7)
    unsampled = torch.ones(1 << num_bits, dtype=torch.bool)
    unsampled[codes.reshape(-1)] = False
    assert unsampled.any()
    assert (weight.grad[unsampled] == 0).all()
    assert (weight.grad[~unsampled].abs().sum(-1) > 0).all()


def test_logit_gradient_is_not_the_sampled_code_only_surrogate():
    # a deviation named in the spec (gradient through the sampled code's probability only)
    # gives different numbers: make sure we are not it
    num_bits, dim = 4, 8
    torch.manual_seed(2)
    logits = torch.randn(6, num_bits, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(1 << num_bits, dim, dtype=torch.float64)
    upstream = torch.randn(6, dim, dtype=torch.float64)
    r, codes = sample_and_embed(logits, weight, torch.Generator().manual_seed(5))
    (r * upstream).sum().backward()
    # sampled-code-only surrogate: R = (1 + G_code - sg(G_code)) W[code]
    lr = logits.detach().clone().requires_grad_(True)
    g_code = dense_g(lr).gather(1, codes[:, None])
    ((1 + g_code - g_code.detach()) * weight[codes] * upstream).sum().backward()
    assert (logits.grad - lr.grad).abs().max() > 1e-3


def test_chunking_over_codes_does_not_change_the_gradient():
    num_bits, dim = 4, 8
    torch.manual_seed(4)
    base_logits = torch.randn(2, 3, num_bits)
    base_weight = torch.randn(1 << num_bits, dim)
    upstream = torch.randn(2, 3, dim)
    grads = {}
    for chunk_elems in (1 << 22, 3, 6 * 5, 6 * 16):  # chunk 1 code, 5 codes (ragged), 16, all
        logits = base_logits.clone().requires_grad_(True)
        weight = base_weight.clone().requires_grad_(True)
        r, codes = sample_and_embed(logits, weight, torch.Generator().manual_seed(9), chunk_elems)
        (r * upstream).sum().backward()
        grads[chunk_elems] = (logits.grad, weight.grad, codes)
    ref_l, ref_w, ref_codes = grads[1 << 22]
    for chunk_elems, (gl, gw, codes) in grads.items():
        assert torch.equal(codes, ref_codes)
        torch.testing.assert_close(gl, ref_l, rtol=1e-5, atol=1e-7, msg=f"chunk_elems={chunk_elems}")
        torch.testing.assert_close(gw, ref_w, rtol=0, atol=0)
    dense_l, _ = _reference_grads(base_logits.double(), base_weight.double(), ref_codes,
                                  upstream.double())
    torch.testing.assert_close(grads[3][0].double(), dense_l.reshape(2, 3, num_bits),
                               rtol=1e-5, atol=1e-6)


def test_sample_and_embed_rejects_a_table_of_the_wrong_size():
    with pytest.raises(ValueError, match="2\\^H"):
        sample_and_embed(torch.zeros(2, 3), torch.zeros(7, 4))


# ----------------------------------------------------------------------------------------------
# check 6: KL = brute-force categorical KL; 0 at 0; -> H ln 2; finite in bf16 / fp16
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_bits", [1, 3, 5])
def test_kl_equals_brute_force_categorical_kl(num_bits):
    torch.manual_seed(num_bits)
    logits = torch.randn(16, num_bits, dtype=torch.float64) * 3
    kl = kl_to_uniform(logits)
    assert kl.shape == (16,)
    assert kl.dtype == torch.float32  # computed in fp32
    torch.testing.assert_close(kl.double(), brute_force_kl(logits), rtol=1e-5, atol=1e-6)
    assert (kl >= -1e-6).all() and (kl <= num_bits * math.log(2) + 1e-6).all()


def test_kl_is_zero_at_zero_logits_and_tends_to_h_ln2():
    num_bits = 6
    torch.testing.assert_close(kl_to_uniform(torch.zeros(4, num_bits)), torch.zeros(4),
                               rtol=0, atol=1e-6)
    values = []
    for scale in (1.0, 4.0, 10.0, 30.0):
        lg = torch.tensor([[scale, -scale] * (num_bits // 2)])
        values.append(kl_to_uniform(lg).item())
    assert values == sorted(values) and values[0] < values[-1]  # grows with |logits|
    assert values[-1] == pytest.approx(num_bits * math.log(2), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_finite_for_large_logits_in_low_precision(dtype):
    num_bits = 8
    logits = torch.tensor([[30.0, -30.0] * 4, [30.0] * 8, [-30.0] * 8, [0.0] * 8]).to(dtype)
    logits.requires_grad_(True)
    kl = kl_to_uniform(logits)
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl[:3].float(), torch.full((3,), num_bits * math.log(2)),
                               rtol=0, atol=1e-4)
    assert abs(kl[3].item()) < 1e-5
    kl.sum().backward()
    assert torch.isfinite(logits.grad.float()).all()
    # log Q of a code is finite too (used by the IWAE bound)
    lq = log_q(logits.detach(), torch.tensor([0x55, 0xFF, 0x00, 3]))
    assert torch.isfinite(lq).all()


def test_log_q_matches_dense_g():
    torch.manual_seed(3)
    logits = torch.randn(5, 4, dtype=torch.float64) * 2
    codes = torch.tensor([0, 3, 7, 12, 15])
    expected = torch.log(dense_g(logits).gather(1, codes[:, None])[:, 0])
    torch.testing.assert_close(log_q(logits, codes).double(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# check 7: free bits
# ----------------------------------------------------------------------------------------------


def test_free_bits_penalty_is_mean_of_hinge_in_nats():
    kl = torch.tensor([[0.1, 0.5, 2.0], [0.0, 1.0, 3.0]])
    kappa = 0.75 * math.log(2)  # 3/4 bit in nats
    expected = sum(max(0.0, k - kappa) for k in kl.flatten().tolist()) / kl.numel()
    assert free_bits_penalty(kl, kappa).item() == pytest.approx(expected, rel=1e-6)
    assert free_bits_penalty(kl, 0.0).item() == pytest.approx(kl.mean().item(), rel=1e-6)
    assert free_bits_penalty(kl, 10.0).item() == 0.0


def test_free_bits_no_gradient_below_kappa():
    logits = torch.tensor([[0.1, -0.1, 0.2, 0.0],  # KL ~ 0
                           [5.0, -5.0, 5.0, -5.0],  # KL ~ H ln 2
                           [0.3, 0.0, 0.0, -0.2],  # small
                           [4.0, 4.0, -4.0, 4.0]], requires_grad=True)
    kl = kl_to_uniform(logits)
    kappa = 1.0
    below = kl.detach() < kappa
    assert below.tolist() == [True, False, True, False]
    free_bits_penalty(kl, kappa).backward()
    assert (logits.grad[below] == 0).all()
    assert (logits.grad[~below].abs() > 0).all()
    # the gradient above kappa is (1/T) dKL/dL
    lr = logits.detach().clone().requires_grad_(True)
    (kl_to_uniform(lr)[~below].sum() / 4).backward()
    torch.testing.assert_close(logits.grad[~below], lr.grad[~below])


# ----------------------------------------------------------------------------------------------
# check 10: bf16 / fp16 mapper
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_mapper_exact_codes_and_finite_backward(dtype):
    num_bits, dim = 10, 16  # codes up to 1023: not exactly representable in bf16's 8-bit mantissa
    torch.manual_seed(6)
    logits = (torch.randn(4, 16, num_bits) * 3).to(dtype)
    logits[0, 0] = 30.0
    logits[0, 1] = -30.0
    logits.requires_grad_(True)
    weight = torch.randn(1 << num_bits, dim).to(dtype).requires_grad_(True)
    r, codes = sample_and_embed(logits, weight, torch.Generator().manual_seed(11), chunk_elems=4096)
    assert codes.dtype == torch.int64
    assert codes[0, 0].item() == (1 << num_bits) - 1 and codes[0, 1].item() == 0
    # the same codes as from the fp32 values of these logits with the same generator seed
    ref_codes = sample_codes(logits.detach().float(), torch.Generator().manual_seed(11))
    assert torch.equal(codes, ref_codes)
    assert r.dtype == dtype and torch.equal(r, weight.detach()[codes])
    (r.float() * torch.randn(4, 16, dim)).sum().backward()
    assert logits.grad.dtype == dtype and weight.grad.dtype == dtype
    assert torch.isfinite(logits.grad.float()).all() and logits.grad.float().abs().sum() > 0
    assert torch.isfinite(weight.grad.float()).all()
    assert torch.isfinite(kl_to_uniform(logits)).all()
    # the low-precision logits gradient agrees with the fp32 one on the same values
    lf = logits.detach().float().requires_grad_(True)
    wf = weight.detach().float().requires_grad_(True)
    torch.manual_seed(0)
    up = torch.randn(4, 16, dim)
    rf, _ = sample_and_embed(lf, wf, torch.Generator().manual_seed(11))
    (rf * up).sum().backward()
    logits.grad = None
    r, _ = sample_and_embed(logits, weight, torch.Generator().manual_seed(11))
    (r.float() * up).sum().backward()
    torch.testing.assert_close(logits.grad.float(), lf.grad, rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------------------------
# check 8: prior codes uniform and independent
# ----------------------------------------------------------------------------------------------


def test_uniform_codes_are_uniform():
    num_bits = 3
    codes = uniform_codes((2500, 8), num_bits, torch.Generator().manual_seed(0))
    assert codes.dtype == torch.int64 and codes.shape == (2500, 8)
    observed = torch.bincount(codes.flatten(), minlength=8)
    assert observed.numel() == 8  # nothing outside [0, 8)
    _, p = chi2_pvalue(observed, torch.full((8,), codes.numel() / 8))
    assert p > P_MIN


@pytest.mark.parametrize("num_bits", [1, 16, 20])
def test_uniform_codes_range(num_bits):
    codes = uniform_codes((64, 64), num_bits, torch.Generator().manual_seed(num_bits))
    assert codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 1 << num_bits
    assert codes.max() >= ((1 << num_bits) - 1) * 0.9  # the whole range is used
    # every bit is a fair coin
    freq = code_bits(codes.flatten(), num_bits).double().mean(0)
    assert ((freq - 0.5).abs() < 5 * math.sqrt(0.25 / codes.numel())).all()


def test_uniform_codes_independent_across_positions_and_sequences():
    num_bits, n = 3, 20000
    codes = uniform_codes((n, 2), num_bits, torch.Generator().manual_seed(5))
    cells = 1 << (2 * num_bits)
    # adjacent positions of one sequence: joint histogram = product of uniforms
    pairs = codes[:, 0] * 8 + codes[:, 1]
    _, p = chi2_pvalue(torch.bincount(pairs, minlength=cells), torch.full((cells,), n / cells))
    assert p > P_MIN
    # the same position of consecutive sequences
    rows = codes[0::2, 0] * 8 + codes[1::2, 0]
    _, p = chi2_pvalue(torch.bincount(rows, minlength=cells), torch.full((cells,), n / 2 / cells))
    assert p > P_MIN
    # correlation of adjacent positions near 0
    x = codes.double()
    corr = torch.corrcoef(x.T)[0, 1].item()
    assert abs(corr) < 4 / math.sqrt(n)
    # the test would catch a plan that repeats one code along the sequence
    rep = torch.stack([codes[:, 0], codes[:, 0]], 1)
    _, p_rep = chi2_pvalue(torch.bincount(rep[:, 0] * 8 + rep[:, 1], minlength=cells),
                           torch.full((cells,), n / cells))
    assert p_rep < 1e-10


def test_uniform_codes_reproducible_with_a_generator():
    a = uniform_codes((4, 9), 8, torch.Generator().manual_seed(42))
    b = uniform_codes((4, 9), 8, torch.Generator().manual_seed(42))
    c = uniform_codes((4, 9), 8, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_all_code_bits_helper_matches_itertools():
    # sanity of the test helper itself (bit h of d is (d >> h) & 1)
    bits = all_code_bits(3, torch.int64).tolist()
    expected = [list(reversed(t)) for t in itertools.product([0, 1], repeat=3)]
    assert bits == expected
