"""Parallelism, applied in exactly one place and in this order (torchtitan's):

1. activation checkpointing per block (optional: trades compute for memory);
2. torch.compile per block (optional; GPU);
3. FSDP2 `fully_shard` per block, then the FT's encoder, then the root, over a 1-D device mesh,
   with `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` when precision is bf16.

The model file knows nothing of this. With one worker and fp32, nothing is sharded.
"""

from __future__ import annotations

import contextlib
import typing

import torch
from torch import nn

M = typing.TypeVar("M", bound=nn.Module)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on CUDA and fp32 elsewhere (bf16 matmul is 6-16x slower on CPUs without it)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (`model.blocks`), typed: nn.Module's attributes read as Tensor | Module."""
    return typing.cast(nn.ModuleList, model.blocks)


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def apply_compile(model: nn.Module) -> None:
    for block in _blocks(model):
        block.compile()


def apply_fsdp(model: nn.Module, mesh, param_dtype: torch.dtype | None) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype
          else MixedPrecisionPolicy())
    last = len(_blocks(model)) - 1
    for i, block in enumerate(_blocks(model)):
        # the last block's parameters are needed again right away by the backward: keep them
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < last)
    if model.has_latent:
        fully_shard(typing.cast(nn.Module, model.encoder), mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # root: embeddings, final norm, head, W


def parallelize(model: M, world_size: int, device: torch.device, precision: str,
                activation_checkpointing: bool = False, compile: bool = False) -> M:
    """Return the model ready for training on this worker (modified in place)."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    bf16 = precision == "bf16"
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world_size,))
        apply_fsdp(model, mesh, torch.bfloat16 if bf16 else None)
    return model


def autocast_context(precision: str, world_size: int, device: torch.device):
    """A single worker has no FSDP mixed-precision policy: bf16 runs under autocast instead,
    keeping fp32 master weights."""
    if precision == "bf16" and world_size == 1:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
