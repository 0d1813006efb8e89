"""Honest evaluation: validation NLL bounds, the Z-usage gap, and the letter task's plan test."""

from __future__ import annotations

import math

import numpy as np
import torch

from ft_ray.data.letters import LETTERS, PROMPT_TOKENS, check_body, decode, prompt_ids
from ft_ray.model.latent import uniform_codes


@torch.no_grad()
def batch_metrics(model, tokens: torch.Tensor, iwae_samples: int = 0) -> dict[str, float]:
    """Per-token metrics of one validation batch, nats. For the FT: `nll` is the ELBO (honest),
    `ce_post` the leaky CE with the encoder's Z (never a likelihood), `z_gap` = CE with random Z
    minus `ce_post` (> 0 when the decoder uses Z)."""
    if not hasattr(model, "encoder"):
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


def score_group(bodies: list[str], letter: str) -> tuple[float, float | None]:
    """One group of letter-task bodies (64 characters each) from the same prompt: (the share of
    valid samples, the share of valid samples whose run starts at the group's most common
    position, or None with fewer than 2 valid samples)."""
    checks = [check_body(body, letter) for body in bodies]
    starts = [c.start for c in checks if c.valid]
    agree = float(np.unique(starts, return_counts=True)[1].max() / len(starts)) if len(starts) >= 2 else None
    return float(np.mean([c.valid for c in checks])), agree


@torch.no_grad()
def letter_plan_eval(model, num_groups: int, group_size: int = 8, seed: int = 0) -> dict[str, float]:
    """Sample groups from letter prompts with fresh plans and with one shared plan per group.
    Scores validity and how often a group's valid samples put the run at the group's most common
    start position: with a shared plan this rises above the fresh-plan level when Z carries it."""
    device = next(model.parameters()).device
    stats: dict[str, list[float]] = {k: [] for k in ("valid_fresh", "valid_shared", "pos_agree_fresh", "pos_agree_shared")}
    for g in range(num_groups):
        letter = LETTERS[g % len(LETTERS)]
        prompt = torch.tensor([prompt_ids(letter)] * group_size, device=device)
        for shared in (False, True) if hasattr(model, "encoder") else (False,):  # a baseline has no plan
            gen = torch.Generator(device=device).manual_seed(seed * 1000 + g)
            kwargs = dict(plan=seed * 1000 + g, shared_plan=True) if shared else {}
            tokens = model.generate(prompt, 65, generator=gen, **kwargs)
            valid, agree = score_group([decode(row[PROMPT_TOKENS:])[:64] for row in tokens.tolist()], letter)
            tag = "shared" if shared else "fresh"
            stats[f"valid_{tag}"].append(valid)
            if agree is not None:
                stats[f"pos_agree_{tag}"].append(agree)
    return {k: float(np.mean(v)) if v else float("nan") for k, v in stats.items()}
