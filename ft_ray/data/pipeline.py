"""Ray Data datasets for training: synthetic streams and Parquet token shards.

- Synthetic: `ray.data.range(n).map_batches(...)`; row i is generated from its own seed
  (`shuffle_seed`, split, i), so the data do not depend on block sizes or the number of workers.
- Shards: `read_parquet` over the files the manifest lists, after `validate_shards` checked them
  against the manifest and the model (a bad shard fails here, before any worker starts). The
  training files are read in a new order every epoch (`FileShuffleConfig`).
Workers consume them with `get_dataset_shard(split).iter_batches(...)` (see train/runtime.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ft_ray.config import DataConfig, ModelConfig
from ft_ray.data.errors import DataError
from ft_ray.data.synthetic import get_task, synthetic_rows

TRAIN_STREAM, VAL_STREAM = "train", "val"  # the synthetic splits' seed streams (synthetic_rows)


@dataclass
class DataInfo:
    seq_len: int  # tokens per training input (each row holds seq_len + 1)
    vocab_size: int
    tokenizer_path: str | None  # tokenizer.json that decodes these ids (None: write the task's)


class _SyntheticBatch:
    """map_batches function: {"id": ids} -> {"tokens": (n, seq_tokens)}."""

    def __init__(self, task: str, seed: int, stream: str):
        self.task, self.seed, self.stream = task, seed, stream

    def __call__(self, batch: dict) -> dict:
        return {"tokens": synthetic_rows(self.task, self.seed, self.stream, batch["id"])}


def synthetic_task_of(data: DataConfig) -> str | None:
    """The synthetic task the data come from (generated on the fly, or shards written by
    `ft-ray data synthetic`), or None for real text."""
    if data.source == "synthetic":
        return data.task
    from ft_ray.data.shards import load_manifest

    try:
        return load_manifest(data.shards).get("task")
    except DataError:
        return None


def resolve_data(data: DataConfig, model: ModelConfig, num_workers: int | None = None) -> DataInfo:
    """Check the data against the model (and, given `num_workers`, the split sizes against the
    batch size) and return what the run needs to know; no Ray needed."""
    if data.source == "synthetic":
        from ft_ray.data.letters import VOCAB

        task = get_task(data.task)
        info = DataInfo(seq_len=task.seq_tokens - 1, vocab_size=len(VOCAB), tokenizer_path=None)
        where = f"synthetic task {data.task!r}"
        rows = {"train": data.num_train_sequences, "val": data.num_val_sequences}
        row_keys = {"train": "data.num_train_sequences", "val": "data.num_val_sequences"}
    else:
        from ft_ray.data.shards import validate_shards

        manifest = validate_shards(data.shards, vocab_size=model.vocab_size, seq_len=data.seq_len)
        tokenizer = data.shards / "tokenizer.json"
        if not tokenizer.is_file():  # the bundle needs it at the end of training: say so now
            raise DataError(f"{tokenizer}: not found; the shards' tokenizer must sit beside manifest.json")
        info = DataInfo(seq_len=int(manifest["seq_len"]), vocab_size=int(manifest["vocab_size"]),
                        tokenizer_path=str(tokenizer))
        where = f"shards {data.path}"
        rows = {split: int(manifest["splits"][split]["num_sequences"]) for split in ("train", "val")}
        row_keys = {split: f"{data.shards / 'manifest.json'} splits.{split}" for split in rows}
    if num_workers is not None:
        _check_split_sizes(rows, row_keys, data.batch_size, max(1, num_workers))
    if data.seq_len is not None and data.seq_len != info.seq_len:
        raise DataError(f"data.seq_len={data.seq_len} but the {where} have seq_len={info.seq_len}")
    if info.vocab_size > model.vocab_size:
        raise DataError(f"model.vocab_size={model.vocab_size} is smaller than the {where}' vocabulary "
                        f"({info.vocab_size} ids)")
    if info.seq_len > model.max_seq_len:
        raise DataError(f"model.max_seq_len={model.max_seq_len} is shorter than the {where}' "
                        f"seq_len={info.seq_len}")
    return info


def _check_split_sizes(rows: dict[str, int], keys: dict[str, str], batch_size: int, workers: int) -> None:
    """Each worker needs one full training batch of its 1/workers of the train split, and at
    least one validation batch of its own (ranks take interleaved batches of the whole split):
    found here, not at the first evaluation hundreds of steps in."""
    need = batch_size * workers
    for split, num in rows.items():
        if num < need:
            raise DataError(f"{keys[split]}: the {split} split has {num} sequences; data.batch_size="
                            f"{batch_size} x {workers} worker(s) needs at least {need}")


def build_datasets(data: DataConfig, model: ModelConfig, info: DataInfo | None = None) -> tuple[dict, DataInfo]:
    """{"train": Dataset, "val": Dataset} and the data's shape. Call on the driver."""
    import ray.data

    info = info or resolve_data(data, model)  # `info`: the driver already checked (and hashed) the data
    if data.source == "synthetic":
        datasets = {
            "train": ray.data.range(data.num_train_sequences).map_batches(
                _SyntheticBatch(data.task, data.shuffle_seed, TRAIN_STREAM), batch_size=256),
            "val": ray.data.range(data.num_val_sequences).map_batches(
                _SyntheticBatch(data.task, data.shuffle_seed, VAL_STREAM), batch_size=256),
        }
    else:
        from ft_ray.data.shards import load_manifest

        manifest = load_manifest(data.shards)
        files = {split: [str(data.shards / s["file"]) for s in manifest["splits"][split]["shards"]]
                 for split in ("train", "val")}
        shuffle = ray.data.FileShuffleConfig(seed=data.shuffle_seed)  # reseeded every epoch
        datasets = {"train": ray.data.read_parquet(files["train"], shuffle=shuffle),
                    "val": ray.data.read_parquet(files["val"])}
    return datasets, info
