"""Model benchmarks (CPU, fp32): FT vs baseline training step, mapper memory, KV-cache generation.

Targets (issue 2): FT/baseline step time <= (1 + 1/L) * 1.10 at H=8; the mapper never allocates
B*T*2^H floats at once; KV-cache generation >= 5x full recompute for 256 new tokens.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import torch

from bench.common import Row
from ft_ray.config import ModelConfig
from ft_ray.model import BaselineTransformer, FreeTransformer
from ft_ray.model.latent import sample_and_embed

SHAPE = dict(vocab_size=256, hidden_dim=256, num_layers=8, num_heads=8, max_seq_len=512)
B, T = 8, 256


def _step_fn(model, tokens):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        model.loss(tokens)["loss"].backward()
        opt.step()
    return step


def _interleaved(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Median seconds per call, the candidates timed in alternation so that load from elsewhere
    on the machine affects all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step_rows(repeats: int) -> list[Row]:
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (B, T + 1))
    fns = {"base": _step_fn(BaselineTransformer(ModelConfig(arch="baseline", **SHAPE)), tokens)}
    mapper = {}
    for h in (8, 16):
        fns[f"ft{h}"] = _step_fn(FreeTransformer(ModelConfig(latent_bits=h, **SHAPE)), tokens)
        # where the FT's extra time goes: the mapper (sample, gather, eq. 8 backward) alone
        logits = torch.randn(B, T, h, requires_grad=True)
        weight = torch.randn(1 << h, SHAPE["hidden_dim"], requires_grad=True)
        grad = torch.randn(B, T, SHAPE["hidden_dim"])
        mapper[h] = lambda lg=logits, w=weight, g=grad: sample_and_embed(lg, w)[0].backward(g)
    t = _interleaved(fns, repeats)
    t_map = _interleaved({h: f for h, f in mapper.items()}, repeats)
    bound = (1 + 1 / SHAPE["num_layers"]) * 1.10
    rows = [Row("train step, baseline (L=8 D=256 T=256 B=8)", t["base"] * 1e3, "ms")]
    for h in (8, 16):
        rows.append(Row(f"train step FT/baseline, H={h}", t[f"ft{h}"] / t["base"], "x",
                        f"<= {bound:.4f}" if h == 8 else "",
                        f"FT {t[f'ft{h}'] * 1e3:.0f} ms, of which the mapper (sample, gather, eq. 8 "
                        f"backward over 2^{h} codes) {t_map[h] * 1e3:.0f} ms"))
    return rows


_MEM_SNIPPET = """
import sys, torch
from ft_ray.config import ModelConfig
from ft_ray.model import build_model
from ft_ray.model.latent import sample_and_embed
torch.manual_seed(0)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])  # kB
if sys.argv[1] == "mapper":  # the mapper alone at H=16: sample, gather, eq. 8 backward
    logits = torch.randn({B}, {T}, 16, requires_grad=True)
    weight = torch.randn(1 << 16, {D}, requires_grad=True)
    grad = torch.randn({B}, {T}, {D})
    weight.grad = torch.zeros_like(weight)  # W's gradient exists in any implementation: not counted
    run = lambda: sample_and_embed(logits, weight)[0].backward(grad)
else:
    model = build_model(ModelConfig(arch=sys.argv[1], latent_bits=16, **{shape}))
    tokens = torch.randint(0, 256, ({B}, {T} + 1))
    run = lambda: model.loss(tokens)["loss"].backward()
run()  # warm-up: library start-up (thread pools, kernels) is not the step's memory
if sys.argv[1] != "mapper":
    model.zero_grad(set_to_none=True)
import gc; gc.collect()
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
run()
print((status("VmHWM:") - before) / 1024)
"""


def memory_rows() -> list[Row]:
    """Peak RSS growth (MiB) during one training step, and during the mapper alone, each in a
    fresh process."""
    code = _MEM_SNIPPET.format(shape=SHAPE, B=B, T=T, D=SHAPE["hidden_dim"])
    peak = {what: float(subprocess.run([sys.executable, "-c", code, what], check=True,
                                       capture_output=True, text=True).stdout.split()[-1])
            for what in ("baseline", "free_transformer", "mapper")}
    dense_mib = B * T * (1 << 16) * 4 / 2**20
    return [Row("train step peak memory, baseline", peak["baseline"], "MiB"),
            Row("train step peak memory, FT H=16", peak["free_transformer"], "MiB", "",
                "includes W's gradient (2^16 x D fp32 = 64 MiB) and the encoder block"),
            Row("mapper fwd+bwd working memory at H=16 / one dense B*T*2^H fp32 tensor", peak["mapper"] / dense_mib,
                "x", "<= 0.25", f"{peak['mapper']:.0f} MiB vs {dense_mib:.0f} MiB for G alone (chunks of 2^21 floats)")]


def generation_rows(repeats: int) -> list[Row]:
    torch.manual_seed(0)
    ft = FreeTransformer(ModelConfig(latent_bits=16, **SHAPE)).eval()
    new = 256
    prompt = torch.randint(0, 256, (1, 16))

    def gen(batch: int, use_cache: bool):
        p = prompt.expand(batch, -1)
        return lambda: ft.generate(p, new, plan=0, generator=torch.Generator().manual_seed(0), use_cache=use_cache)

    def unpacked(batch: int):  # the same decode through the nn.Linear layout (no DecodeWeights)
        run = gen(batch, True)

        def call():
            ft.decode_weights = lambda: None  # an instance attribute shadows the method
            try:
                return run()
            finally:
                del ft.decode_weights
        return call

    # the candidates timed in alternation, so that load from elsewhere hits them alike
    t = _interleaved({"cache": gen(1, True), "full": gen(1, False), "b16": gen(16, True),
                      "plain": unpacked(1), "plain16": unpacked(16)}, repeats)
    weights_mb = sum(p.numel() * p.element_size() for p in ft.blocks.parameters()) / 1e6
    return [Row("generate 256 tokens: KV cache vs full recompute", t["full"] / t["cache"], "x", ">= 5",
                f"cache {new / t['cache']:.0f} tok/s, recompute {new / t['full']:.0f} tok/s"),
            Row("decode tokens/s, batch 1 (FT, KV cache)", new / t["cache"], "tok/s", "",
                f"reads {weights_mb:.0f} MB of block weights a token: {weights_mb * new / t['cache'] / 1e3:.1f} GB/s"),
            Row("decode tokens/s, batch 16 (FT, KV cache)", 16 * new / t["b16"], "tok/s"),
            Row("decode with packed CPU weights (DecodeWeights) / nn.Linear layout, batch 1", t["plain"] / t["cache"],
                "x", "", f"batch 16: {t['plain16'] / t['b16']:.2f}x; > 1 means the packed layout still pays")]


def run(quick: bool = False) -> list[Row]:
    repeats = 2 if quick else 5
    return train_step_rows(repeats) + memory_rows() + generation_rows(repeats)


if __name__ == "__main__":
    print(json.dumps([r.__dict__ for r in run(quick="--quick" in sys.argv)], indent=2))
