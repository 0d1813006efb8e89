"""The Ray Data pipeline: deterministic synthetic rows, shards validated before training, and
two Ray Train workers that receive disjoint batches covering the epoch."""

from __future__ import annotations

import numpy as np
import pytest

from ft_ray.config import DataConfig, ModelConfig
from ft_ray.data.errors import DataError
from ft_ray.data.pipeline import TRAIN_STREAM, VAL_STREAM, build_datasets
from ft_ray.data.shards import read_split, write_synthetic_shards
from ft_ray.data.synthetic import synthetic_rows

MODEL = ModelConfig(vocab_size=64, hidden_dim=32, num_layers=2, num_heads=2, max_seq_len=128, latent_bits=3)


def test_synthetic_rows_depend_only_on_seed_and_row_id():
    ids = np.arange(10, 30)
    full = synthetic_rows("letters", 7, TRAIN_STREAM, ids)
    parts = np.concatenate([synthetic_rows("letters", 7, TRAIN_STREAM, ids[i:i + 3]) for i in range(0, 20, 3)])
    assert np.array_equal(full, parts)  # however the rows are batched
    assert full.shape == (20, 68)
    assert not np.array_equal(full, synthetic_rows("letters", 8, TRAIN_STREAM, ids))
    assert not np.array_equal(full, synthetic_rows("letters", 7, VAL_STREAM, ids))


@pytest.mark.timeout(120)
def test_synthetic_dataset_streams_the_same_rows(ray_cluster):
    data = DataConfig(num_train_sequences=50, num_val_sequences=10, shuffle_seed=3)
    datasets, info = build_datasets(data, MODEL)
    assert info.seq_len == 67
    got = np.stack([r["tokens"] for r in datasets["train"].iter_rows()])
    assert np.array_equal(got, synthetic_rows("letters", 3, TRAIN_STREAM, np.arange(50)))
    val = np.stack([r["tokens"] for r in datasets["val"].iter_rows()])
    assert np.array_equal(val, synthetic_rows("letters", 3, VAL_STREAM, np.arange(10)))


def _collect_per_worker(data: DataConfig, out_dir, num_workers: int = 2, batch_size: int = 4, epochs: int = 1):
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bench.ingest_probe import probe_loop

    datasets, _ = build_datasets(data, MODEL)
    TorchTrainer(
        probe_loop(),
        train_loop_config={"batch_size": batch_size, "out_dir": str(out_dir), "epochs": epochs},
        scaling_config=ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(out_dir), name="probe"),
        datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    ).fit()
    return [np.load(out_dir / f"rank{r}.npy") for r in range(num_workers)]


def _as_set(rows: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in rows.astype(np.int64)}


def _check_disjoint_cover(per_worker, expected: np.ndarray, batch_size: int):
    assert all(len(rows) > 0 and len(rows) % batch_size == 0 for rows in per_worker)
    a, b = (_as_set(r) for r in per_worker)
    assert not a & b  # no sequence reaches both workers
    assert a | b == _as_set(expected)  # together they cover the epoch
    assert len(per_worker[0]) == len(per_worker[1])  # equal shares: no rank blocks the other


@pytest.mark.timeout(180)
def test_two_workers_get_disjoint_batches_covering_a_synthetic_epoch(ray_cluster, tmp_path):
    data = DataConfig(num_train_sequences=64, num_val_sequences=8)
    per_worker = _collect_per_worker(data, tmp_path)
    _check_disjoint_cover(per_worker, synthetic_rows("letters", 0, TRAIN_STREAM, np.arange(64)), 4)


@pytest.mark.timeout(180)
def test_two_workers_get_disjoint_batches_covering_a_shard_epoch(ray_cluster, tmp_path):
    shards = tmp_path / "shards"
    manifest = write_synthetic_shards("letters", 96, seed=5, out_dir=shards, val_fraction=0.1,
                                      shard_max_bytes=2000, progress=lambda _: None)
    assert len(manifest["splits"]["train"]["shards"]) >= 3  # several files to split and shuffle
    out = tmp_path / "out"
    out.mkdir()
    per_worker = _collect_per_worker(DataConfig(source="shards", path=str(shards)), out)
    _check_disjoint_cover(per_worker, read_split(shards, "train"), 4)


@pytest.mark.timeout(120)
def test_shard_order_is_reshuffled_every_epoch(ray_cluster, tmp_path):
    write_synthetic_shards("letters", 200, seed=1, out_dir=tmp_path, val_fraction=0.05,
                           shard_max_bytes=1500, progress=lambda _: None)
    datasets, _ = build_datasets(DataConfig(source="shards", path=str(tmp_path), shuffle_seed=4), MODEL)
    epochs = [np.stack([r["tokens"] for r in datasets["train"].iter_rows()]) for _ in range(2)]
    assert _as_set(epochs[0]) == _as_set(epochs[1]) == _as_set(read_split(tmp_path, "train"))
    assert not np.array_equal(epochs[0], epochs[1])  # same rows, another order


def test_bad_shards_fail_before_training(tmp_path):
    write_synthetic_shards("letters", 40, seed=0, out_dir=tmp_path, val_fraction=0.1, progress=lambda _: None)
    with pytest.raises(DataError, match="vocab"):  # the model's vocabulary is too small for the ids
        build_datasets(DataConfig(source="shards", path=str(tmp_path)), ModelConfig(vocab_size=40, hidden_dim=32,
                       num_layers=2, num_heads=2))
    shard = next(tmp_path.glob("train-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(DataError, match=shard.name):
        build_datasets(DataConfig(source="shards", path=str(tmp_path)), MODEL)
    with pytest.raises(DataError, match="shard directory not found: .*missing"):
        build_datasets(DataConfig(source="shards", path=str(tmp_path / "missing")), MODEL)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json"):
        build_datasets(DataConfig(source="shards", path=str(tmp_path)), MODEL)
