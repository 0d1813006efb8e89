"""The Free Transformer's generation plan: the code Z_t of every position, drawn in ONE order.

`model.generate`, `sample_shared_plan` and the serving engine all use `Plan`, so a plan seed gives
the same codes in-process and served. Per plan row, from that row's generator:
  1. the prompt's Z (T0 codes): sampled from the encoder's posterior over the prompt during the
     prefill (never thresholded), unless given;
  2. the new positions' Z (N codes): drawn from the uniform prior, all N at once, right after,
     unless given.
Every row draws step 1 before any row draws step 2, so rows that share one generator consume it
exactly as one batched draw over the rows would. A plan seeded with s gives plan row j the
generator seed `row_seed(s, j)` (s itself for row 0), as the engine does for a request's n samples.
A plan has one row per batch row, or one row shared by the whole batch (`shared`: every row must
then have the same prompt, since the prompt's Z is sampled from one posterior).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ft_ray.model.latent import sample_codes, uniform_codes
from ft_ray.seeds import row_seed

if TYPE_CHECKING:
    from ft_ray.model.free_transformer import FreeTransformer


def seeded_generators(seeds: list[int], device: torch.device | str) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


class Plan:
    """The codes of one generation of `batch` rows: (batch, T0 + N) once the prefill has run.

    generators: one per plan row: `batch` of them, or 1 for a plan shared by every row (the same
        object may repeat; None is torch's global generator).
    prompt_codes, new_codes: given codes, (1 or batch, T0) and (1 or batch, N); None to draw them.
    """

    def __init__(self, model: FreeTransformer, batch: int, num_new: int,
                 generators: list[torch.Generator | None], prompt_codes: torch.Tensor | None = None,
                 new_codes: torch.Tensor | None = None):
        if len(generators) not in (1, batch):
            raise ValueError(f"a plan for {batch} rows needs 1 or {batch} generators, got {len(generators)}")
        self.model, self.batch, self.num_new, self.generators = model, batch, num_new, generators
        self.prompt_codes, self.new_codes = prompt_codes, new_codes

    def latent_fn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The prefill's latent: x (batch, T0, D), the first half's output over the prompt -> R =
        W[prompt Z] (batch, T0, D). Draws the prompt's Z (step 1), then the new Z (step 2)."""
        rows = len(self.generators)
        if self.prompt_codes is None:
            logits = self.model.encoder(x[:rows], cos, sin)  # (rows, T0, H); shared: row 0's prompt
            self.prompt_codes = self._draw(lambda r, g: sample_codes(logits[r], g))
        if self.new_codes is None:
            bits, device = self.model.cfg.latent_bits, x.device
            self.new_codes = self._draw(lambda r, g: uniform_codes((r.stop - r.start, self.num_new), bits, g, device))
        return self.model.post_sampler.weight[self._rows(self.prompt_codes)]

    def _draw(self, draw) -> torch.Tensor:
        """draw(row slice, generator) for every plan row; one batched draw when all rows share a
        generator (the same numbers: the generator is consumed in row order either way)."""
        gens = self.generators
        if all(g is gens[0] for g in gens):
            return draw(slice(0, len(gens)), gens[0])
        return torch.cat([draw(slice(j, j + 1), g) for j, g in enumerate(gens)])

    def _rows(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.expand(self.batch, -1) if codes.shape[0] == 1 else codes

    @property
    def codes(self) -> torch.Tensor:
        """(batch, T0 + N) int64: the prompt's codes, then the new positions'."""
        if self.prompt_codes is None or self.new_codes is None:
            raise RuntimeError("the plan is complete only after the prefill has run latent_fn")
        return torch.cat([self._rows(self.prompt_codes), self._rows(self.new_codes)], dim=1)


def make_plan(model: FreeTransformer, prompt: torch.Tensor, num_new: int, plan,
              generator: torch.Generator | None, shared: bool) -> Plan:
    """`model.generate`'s `plan` argument -> a `Plan` for prompt (B, T0).

    plan: None (draw with `generator`), an int seed (plan row j seeded `row_seed(seed, j)`), or a
    LongTensor of codes for the new positions ((N,) or (B, N)) or the whole sequence ((T0+N,) or
    (B, T0+N)). shared: one plan row for every row; refused when the rows' prompts differ.
    """
    B, T0 = prompt.shape
    if isinstance(plan, bool) or not (plan is None or isinstance(plan, (int, torch.Tensor))):
        raise ValueError(f"plan must be None, an int seed or a LongTensor of codes, got {type(plan).__name__}")
    if shared and B > 1 and not torch.equal(prompt, prompt[:1].expand_as(prompt)):
        raise ValueError("shared_plan=True samples one plan from one prompt, but the rows' prompts "
                         "differ; generate each prompt separately (or share explicit codes)")
    rows = 1 if shared else B
    generators: list[torch.Generator | None]
    if isinstance(plan, int):
        generators = list(seeded_generators([row_seed(plan, j) for j in range(rows)], prompt.device))
    else:
        generators = [generator] * rows
    prompt_codes = new_codes = None
    if isinstance(plan, torch.Tensor):
        codes = _check_plan_codes(model, plan, B, T0, num_new).to(prompt.device)
        if codes.shape[1] == T0 + num_new:
            prompt_codes, new_codes = codes[:, :T0], codes[:, T0:]
        else:
            new_codes = codes
    return Plan(model, B, num_new, generators, prompt_codes, new_codes)


def _check_plan_codes(model: FreeTransformer, plan: torch.Tensor, B: int, T0: int, n: int) -> torch.Tensor:
    """Explicit codes -> (B, N) or (B, T0+N) int64, or ValueError."""
    if plan.dtype.is_floating_point or plan.dtype == torch.bool:
        raise ValueError(f"plan codes must be integers, got {plan.dtype}")
    codes = plan.unsqueeze(0).expand(B, -1) if plan.dim() == 1 else plan
    if codes.dim() != 2 or codes.shape[0] != B or codes.shape[1] not in (n, T0 + n):
        raise ValueError(f"plan codes must have shape (N,), (B, N), (T0+N,) or (B, T0+N) with "
                         f"B={B}, T0={T0}, N={n}; got {tuple(plan.shape)}")
    codes = codes.long()
    model.check_codes(codes, codes.shape)
    return codes
