"""Honest evaluation: validation NLL bounds, the Z-usage gap, and the letter task's plan test."""

from __future__ import annotations

import math
import typing

import numpy as np
import torch

from ft_ray.data.letters import LETTERS, PROMPT_TOKENS, check_body, decode, prompt_ids
from ft_ray.model.latent import uniform_codes


@torch.no_grad()
def batch_metrics(model, tokens: torch.Tensor, iwae_samples: int = 0) -> dict[str, float]:
    """Per-token metrics of one validation batch, nats. For the FT: `nll` is the ELBO (honest),
    `ce_post` the leaky CE with the encoder's Z (never a likelihood), `z_gap` = CE with random Z
    minus `ce_post` (> 0 when the decoder uses Z)."""
    if not model.has_latent:
        return {"nll": model.nll(tokens).item()}
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    post = model(inputs)  # one posterior forward gives both the leaky CE and the ELBO
    ce_post = model._ce(post.logits, targets).item()
    kl = post.kl.mean().item()
    z = uniform_codes(inputs.shape, model.cfg.latent_bits, device=inputs.device)
    ce_rand = model._ce(model(inputs, z=z).logits, targets).item()
    out = {"nll": ce_post + kl,  # the ELBO, as model.nll(tokens) with K = 1
           "ce_post": ce_post, "ce_random_z": ce_rand, "z_gap": ce_rand - ce_post, "kl": kl,
           "kl_bits": kl / math.log(2)}
    if iwae_samples > 1:
        out["iwae"] = model.nll(tokens, num_samples=iwae_samples).item()
    return out


def valid_starts(bodies: list[str], letter: str) -> tuple[float, list[int]]:
    """One group of letter-task bodies (64 characters each) from the same prompt: (the share of
    valid samples, the start positions of the valid samples' runs)."""
    checks = [check_body(body, letter) for body in bodies]
    starts = [typing.cast(int, c.start) for c in checks if c.valid]  # a valid sample's run was found
    return float(np.mean([c.valid for c in checks])), starts


def modal_share(starts: list[int]) -> float | None:
    """The share of `starts` at their most common value; None with fewer than 2."""
    return float(np.unique(starts, return_counts=True)[1].max() / len(starts)) if len(starts) >= 2 else None


def score_group(bodies: list[str], letter: str) -> tuple[float, float | None]:
    """One group of letter-task bodies from the same prompt: (the share of valid samples, the share
    of valid samples whose run starts at the group's most common position, or None with fewer
    than 2 valid samples)."""
    valid, starts = valid_starts(bodies, letter)
    return valid, modal_share(starts)


def chance_modal_share(pool: list[int], sizes: list[int], draws: int = 200, seed: int = 0) -> float:
    """The mean modal share groups of `sizes` valid samples would show if their starts were drawn
    independently from `pool` (the fresh-plan starts): the chance level of the shared-plan
    agreement. It depends on the group sizes (~0.18 for 8 samples spread as the letter task's
    runs are, ~0.5 for 2), so it is computed for the sizes actually observed."""
    if not pool or not sizes:
        return float("nan")
    rng = np.random.default_rng(seed)
    pool_arr = np.asarray(pool)
    return float(np.mean([modal_share(rng.choice(pool_arr, n).tolist()) for n in sizes for _ in range(draws)]))


def _ci95(values: list[float]) -> float:
    """Half-width of a normal-approximation 95% interval of the mean over groups."""
    return float(1.96 * np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) >= 2 else float("nan")


@torch.no_grad()
def letter_plan_eval(model, num_groups: int, group_size: int = 8, seed: int = 0) -> dict[str, float]:
    """Sample groups from letter prompts with fresh plans and with one shared plan per group.

    Per kind of group: `valid_*` (share of valid samples), `pos_agree_*` (share of a group's valid
    samples whose run starts at the group's most common position; `_ci95` its interval over
    groups), `start_spread_*` (standard deviation of the start within a group, positions). For an
    FT, `pos_agree_chance` is what shared-plan groups of the observed sizes would score if their
    starts were as independent as fresh ones: a shared plan carries the position when
    `pos_agree_shared` is above it by more than the interval, and the Fig. 4 effect is
    `start_spread_shared` much below `start_spread_fresh`."""
    device = next(model.parameters()).device
    kinds = ("fresh", "shared") if model.has_latent else ("fresh",)  # a baseline has no plan
    valid: dict[str, list[float]] = {k: [] for k in kinds}
    starts: dict[str, list[list[int]]] = {k: [] for k in kinds}
    for g in range(num_groups):
        letter = LETTERS[g % len(LETTERS)]
        prompt = torch.tensor([prompt_ids(letter)] * group_size, device=device)
        for tag in kinds:
            gen = torch.Generator(device=device).manual_seed(seed * 1000 + g)
            kwargs = dict(plan=seed * 1000 + g, shared_plan=True) if tag == "shared" else {}
            tokens = model.generate(prompt, 65, generator=gen, **kwargs)
            v, s = valid_starts([decode(row[PROMPT_TOKENS:])[:64] for row in tokens.tolist()], letter)
            valid[tag].append(v)
            starts[tag].append(s)
    out: dict[str, float] = {}
    for tag in kinds:
        agree = [a for a in map(modal_share, starts[tag]) if a is not None]
        spread = [float(np.std(s)) for s in starts[tag] if len(s) >= 2]
        out |= {f"valid_{tag}": float(np.mean(valid[tag])),
                f"pos_agree_{tag}": float(np.mean(agree)) if agree else float("nan"),
                f"pos_agree_{tag}_ci95": _ci95(agree),
                f"start_spread_{tag}": float(np.mean(spread)) if spread else float("nan")}
    if "shared" in kinds:
        out["pos_agree_chance"] = chance_modal_share(sum(starts["fresh"], []),
                                                     [len(s) for s in starts["shared"] if len(s) >= 2], seed=seed)
    return out
