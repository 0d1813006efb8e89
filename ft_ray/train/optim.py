"""AdamW with decoupled weight decay on matrices only, and warmup + one cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, embeddings); never norms' gains or vectors like zeta."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW; the fused kernel on CUDA."""
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=fused or None)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float,
          decay_from: tuple[int, float] | None = None) -> float:
    """Linear warmup to base_lr, then a single cosine decay to min_lr at total_steps, flat after.

    The decay starts at (warmup_steps, base_lr), or at `decay_from` = (step, lr) for a run whose
    max_steps changed on resume: its LR continues from where it was instead of jumping to the
    new horizon's curve (see `Schedule.retarget`).
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    start, top = decay_from or (warmup_steps, base_lr)
    span = max(1, total_steps - start)
    progress = min(1.0, (step - start) / span)
    return min_lr + (top - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """The LR multiplier of `LambdaLR`, with the state a resumed run needs: the horizon it decays
    to and where the decay started. A callable object, so `LambdaLR.state_dict()` saves its
    attributes with the checkpoint and `load_state_dict` restores them."""

    def __init__(self, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float):
        self.base_lr, self.warmup_steps, self.min_lr = base_lr, warmup_steps, min_lr
        self.total_steps = total_steps
        self.decay_from: tuple[int, float] | None = None

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.base_lr

    def lr(self, step: int) -> float:
        return lr_at(step, self.base_lr, self.warmup_steps, self.total_steps, self.min_lr, self.decay_from)

    def retarget(self, step: int, total_steps: int) -> None:
        """Decay to min_lr at `total_steps` instead, from `step` on: after warmup, a new cosine from
        the LR the run has now (continuous); during warmup the new horizon simply replaces the old."""
        if step > self.warmup_steps:
            self.decay_from = (step, self.lr(step))
        self.total_steps = total_steps


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """`scheduler.lr_lambdas[0]` is the `Schedule` (shared by the param groups)."""
    base = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(base, warmup_steps, total_steps, min_lr))
