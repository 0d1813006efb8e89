"""Where the training loop runs: what it needs from its launcher, and nothing else.

`RayRuntime` wraps Ray Train V2 (workers started by `TorchTrainer`, or the in-process local mode
with `num_workers=0`): rank and device from the train context, data from
`get_dataset_shard(...).iter_torch_batches`, reports and checkpoints through `ray.train.report`.
`PlainRuntime` is the same contract for a plain `torch.distributed` launch (no Ray): it exists so
the loop can be benchmarked against Ray Train on identical code.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def collate_tokens(batch: dict) -> torch.Tensor:
    """A Ray Data batch {"tokens": (n, T+1) array or n arrays} -> LongTensor (n, T+1)."""
    tokens = batch["tokens"]
    arr = tokens if isinstance(tokens, np.ndarray) and tokens.dtype != object else np.stack(list(tokens))
    return torch.from_numpy(np.array(arr, dtype=np.int64))  # a writable copy


class RayRuntime:
    def __init__(self, run_dir: str | Path | None = None):
        import ray.train
        import ray.train.torch

        self.run_dir = run_dir
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # before any collective (NCCL)

    def batches(self, split: str, batch_size: int) -> Iterator[torch.Tensor]:
        import ray.train

        shard = ray.train.get_dataset_shard(split)
        if shard is None:
            raise ValueError(f"no dataset named {split!r} was given to the trainer")
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
            yield collate_tokens(batch)

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    @contextmanager
    def latest_checkpoint(self):
        """Yield the directory of the checkpoint to resume from, or None: Ray's latest, or a
        newer complete one in the run directory (see `newest_checkpoint`)."""
        import ray.train

        from ft_ray.train.checkpoint import newest_checkpoint

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield agreed(lambda: newest_checkpoint(run_dir=self.run_dir), self.rank)
        else:
            with checkpoint.as_directory() as path:
                yield agreed(lambda: newest_checkpoint(path, run_dir=self.run_dir), self.rank)


class PlainRuntime:
    """torch.distributed without Ray: data from in-process iterator factories, checkpoints in
    `checkpoint_root/checkpoint_<step>`."""

    def __init__(self, data: Mapping[str, Callable[[int, int, int], Iterator[torch.Tensor]]],
                 checkpoint_root: str | Path, device: torch.device | None = None):
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = device or torch.device("cpu")
        self.data, self.root = data, Path(checkpoint_root)
        self.reports: list[dict] = []

    def batches(self, split: str, batch_size: int) -> Iterator[torch.Tensor]:
        return self.data[split](self.rank, self.world_size, batch_size)

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir and self.rank == 0:
            target = self.root / f"checkpoint_{metrics['step']:08d}"
            target.mkdir(parents=True, exist_ok=True)
        if checkpoint_dir:
            if dist.is_initialized():
                dist.barrier()
            target = self.root / f"checkpoint_{metrics['step']:08d}"
            for f in Path(checkpoint_dir).iterdir():
                os.replace(f, target / f.name)

    @contextmanager
    def latest_checkpoint(self):
        from ft_ray.train.checkpoint import newest_checkpoint

        yield agreed(lambda: newest_checkpoint(run_dir=self.root), self.rank)


def agreed(choose: Callable[[], object], rank: int):
    """`choose()` run on rank 0 only and its answer given to every rank: all ranks must resume
    from the same checkpoint, and hashing its files once is enough."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return choose()
    box: list = [None]
    if rank == 0:
        try:
            box[0] = ("ok", choose())
        except Exception as e:  # every rank raises it, none waits for an answer that never comes
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


@contextmanager
def scratch_dir(prefix: str):
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield d
