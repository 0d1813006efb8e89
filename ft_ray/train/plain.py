"""The same training loop launched with plain torch.distributed (no Ray): the baseline the Ray
Train launch is benchmarked against. Data are generated or read in-process, each rank taking
every world-th row."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ft_ray.config import Config, from_dict, to_dict
from ft_ray.data.pipeline import TRAIN_STREAM, VAL_STREAM
from ft_ray.data.synthetic import synthetic_rows


def _rows(cfg: Config, split: str, rank: int, world: int, batch_size: int) -> Iterator[torch.Tensor]:
    data = cfg.data
    if data.source == "synthetic":
        n = data.num_train_sequences if split == "train" else data.num_val_sequences
        stream = TRAIN_STREAM if split == "train" else VAL_STREAM
        ids = np.arange(rank, n - n % world, world)  # equal shares, like streaming_split(equal=True)
        for start in range(0, len(ids) - batch_size + 1, batch_size):
            rows = synthetic_rows(data.task, data.shuffle_seed, stream, ids[start:start + batch_size])
            yield torch.from_numpy(rows.astype(np.int64))
    else:
        from ft_ray.data.shards import read_split

        assert data.path is not None  # DataConfig.validate: shards need a path
        rows = read_split(data.path, split)
        rows = rows[rank:len(rows) - len(rows) % world:world]
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            yield torch.from_numpy(rows[start:start + batch_size])


def _worker(rank: int, world: int, port: int, cfg_dict: dict, run_dir: str, out: str) -> None:
    import torch.distributed as dist

    from ft_ray.train.loop import run_training
    from ft_ray.train.runtime import PlainRuntime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = from_dict(Config, cfg_dict)
        data = {split: functools.partial(_rows, cfg, split) for split in ("train", "val")}
        runtime = PlainRuntime(data, Path(run_dir) / "checkpoints")
        final = run_training(cfg, runtime, run_dir)
        if rank == 0:
            import json

            Path(out).write_text(json.dumps(final))
    finally:
        if world > 1:
            dist.destroy_process_group()


def launch_plain(cfg: Config, run_dir: str | Path, world_size: int) -> dict:
    """Run the training loop on `world_size` local processes (gloo); return rank 0's final metrics."""
    import json

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "final.json"
    mp.spawn(_worker, args=(world_size, port, to_dict(cfg), str(run_dir), str(out)), nprocs=world_size, join=True)
    return json.loads(out.read_text())
