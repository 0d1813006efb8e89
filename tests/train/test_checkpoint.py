"""Checkpoints that can be trusted, and runs that stay what they are: checksum verification and
fallback to the newest intact checkpoint, the LR schedule of a run whose max_steps changed, and
the driver-side refusals (another configuration under the same name, data too small for the
batch, a shard directory as run directory). No Ray here: see test_train.py for real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ft_ray.config import ConfigError, ModelConfig, load_config
from ft_ray.data.errors import DataError
from ft_ray.model import build_model
from ft_ray.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    newest_checkpoint,
    quarantine,
    save_checkpoint,
    verify_checkpoint,
)
from ft_ray.train.optim import build_optimizer, build_scheduler, lr_at

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
TINY = ModelConfig(vocab_size=32, hidden_dim=16, num_layers=2, num_heads=2, latent_bits=3, max_seq_len=16)


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(TINY)
    optimizer = build_optimizer(model, 1e-3)
    return model, optimizer, build_scheduler(optimizer, 2, 10, 1e-4)


def _save(path: Path, step: int, seed: int = 0) -> Path:
    model, optimizer, scheduler = _parts(seed)
    save_checkpoint(path, model, optimizer, scheduler, {"step": step, "epoch": 0, "batches_in_epoch": step}, 0)
    return path


def _distcp(path: Path) -> Path:
    return next(path.glob("*.distcp"))


def test_a_saved_checkpoint_verifies_and_loads(tmp_path):
    ckpt = _save(tmp_path / "checkpoint_a", step=3, seed=1)
    listed = json.loads((ckpt / "checksums_rank0.json").read_text())["files"]
    assert {".metadata", "train_state.json", "rng_rank0.pt", _distcp(ckpt).name} <= set(listed)
    assert verify_checkpoint(ckpt) is None
    model, optimizer, scheduler = _parts(seed=2)
    assert load_checkpoint(ckpt, model, optimizer, scheduler, 0)["step"] == 3
    torch.testing.assert_close(model.state_dict(), _parts(seed=1)[0].state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("damage, problem", [
    (lambda c: _flip(_distcp(c), 4096), "sha256 differs"),
    (lambda c: _distcp(c).write_bytes(_distcp(c).read_bytes()[:-100]), "bytes"),
    (lambda c: (c / "checksums_rank0.json").unlink(), "save did not complete"),
    (lambda c: (c / ".metadata").unlink(), ".metadata missing"),
    (lambda c: (c / "train_state.json").write_text("{"), "train_state.json"),
])
def test_damaged_checkpoint_is_named_and_skipped_for_the_newest_intact_one(tmp_path, damage, problem):
    older = _save(tmp_path / "checkpoint_1", step=2)
    newer = _save(tmp_path / "checkpoint_2", step=4)
    assert newest_checkpoint(run_dir=tmp_path) == str(newer)
    damage(newer)
    assert problem in verify_checkpoint(newer)
    warnings: list[str] = []
    assert newest_checkpoint(run_dir=tmp_path, warn=warnings.append) == str(older)
    assert len(warnings) == 1 and "checkpoint_2" in warnings[0] and problem in warnings[0]
    damage(older)
    with pytest.raises(CheckpointError, match="no intact checkpoint.*checkpoint_2.*checkpoint_1"):
        newest_checkpoint(run_dir=tmp_path, warn=warnings.append)


def _flip(path: Path, num_bytes: int) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + num_bytes] = bytes(b ^ 0xFF for b in data[mid:mid + num_bytes])
    path.write_bytes(bytes(data))


def test_quarantine_moves_only_checkpoints_ray_does_not_track(tmp_path):
    tracked, untracked = _save(tmp_path / "checkpoint_t", 2), _save(tmp_path / "checkpoint_u", 4)
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps({"dirs": ["checkpoint_t"]}))
    assert quarantine(tracked, tmp_path) is None and tracked.is_dir()  # Ray would refuse to restore without it
    assert quarantine(untracked, tmp_path) == tmp_path / "quarantine" / "checkpoint_u"
    assert not untracked.exists() and (tmp_path / "quarantine" / "checkpoint_u" / ".metadata").is_file()


def test_raising_max_steps_continues_the_lr_from_where_it_was():
    model, optimizer, scheduler = _parts()
    for _ in range(6):  # warmup 2, decay to 1e-4 at step 10
        optimizer.step()
        scheduler.step()
    before = scheduler.get_last_lr()[0]
    assert before == pytest.approx(lr_at(6, 1e-3, 2, 10, 1e-4))
    state = scheduler.state_dict()
    _, _, resumed = _parts()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as train_state.json stores it
    schedule = resumed.lr_lambdas[0]
    assert schedule.total_steps == 10  # the horizon travels with the checkpoint
    schedule.retarget(6, 30)
    lrs = [schedule.lr(s) for s in range(6, 40)]
    assert lrs[0] == pytest.approx(before)  # no jump: the old code gave lr_at(6, ..., 30) here
    assert lr_at(6, 1e-3, 2, 30, 1e-4) > 1.5 * before
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))  # one decay...
    assert schedule.lr(30) == pytest.approx(1e-4) and schedule.lr(39) == pytest.approx(1e-4)  # ...to min_lr
    fresh = _parts()[2].lr_lambdas[0]  # a run that is not extended follows lr_at exactly
    assert [fresh.lr(s) for s in range(12)] == [lr_at(s, 1e-3, 2, 10, 1e-4) for s in range(12)]


# ----------------------------------------------------------------------------------------------
# driver-side refusals
# ----------------------------------------------------------------------------------------------


def _cfg(tmp: Path, *overrides: str):
    return load_config(SMOKE, [f"train.storage_path={tmp}", "train.name=r", *overrides])


def _started_run(tmp: Path, *overrides: str) -> Path:
    """What a run that saved a checkpoint leaves on disk, without training it."""
    from ft_ray.train.trainer import prepare, resolve

    run = resolve(_cfg(tmp, *overrides))
    prepare(run)
    _save(run.run_dir / "checkpoint_x", step=2)
    return run.run_dir


def _listing(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def test_resuming_under_another_configuration_is_refused_naming_the_keys(tmp_path):
    from ft_ray.train.trainer import resolve

    run_dir = _started_run(tmp_path)
    before = _listing(run_dir)
    with pytest.raises(ConfigError) as err:
        resolve(_cfg(tmp_path, "model.arch=baseline", "model.num_heads=2", "optim.lr=1e-2"))
    message = str(err.value)
    for part in ("train.name", "model.arch 'free_transformer' -> 'baseline'", "model.num_heads 4 -> 2",
                 "optim.lr 0.003 -> 0.01", "train.max_steps", "choose a new train.name"):
        assert part in message
    assert _listing(run_dir) == before  # a refusal writes nothing
    run = resolve(_cfg(tmp_path, "train.max_steps=40", "train.num_workers=1", "train.eval_every=5"))
    assert run.resume_from == str(run_dir / "checkpoint_x")


def test_shard_fingerprint_is_part_of_the_run(tmp_path):
    from ft_ray.data.shards import write_synthetic_shards
    from ft_ray.train.trainer import resolve

    shards = tmp_path / "shards"
    write_synthetic_shards("letters", 64, seed=0, out_dir=shards, val_fraction=0.25, progress=lambda _: None)
    data = ["data.source=shards", f"data.path={shards}"]
    _started_run(tmp_path, *data)
    moved = tmp_path / "moved"
    shards.rename(moved)  # the same shards elsewhere: still the same run
    assert resolve(_cfg(tmp_path, "data.source=shards", f"data.path={moved}")).resume_from
    write_synthetic_shards("letters", 64, seed=1, out_dir=moved, val_fraction=0.25,
                           progress=lambda _: None, overwrite=True)
    with pytest.raises(ConfigError, match=r"data \(manifest.json sha256\)"):
        resolve(_cfg(tmp_path, "data.source=shards", f"data.path={moved}"))


def test_no_intact_checkpoint_is_a_one_line_refusal(tmp_path):
    from ft_ray.train.trainer import resolve

    run_dir = _started_run(tmp_path)
    (run_dir / "checkpoint_x" / "checksums_rank0.json").unlink()
    with pytest.raises(CheckpointError, match="checkpoint_x.*save did not complete.*another train.name"):
        resolve(_cfg(tmp_path))


def test_damaged_newer_checkpoint_is_quarantined_when_the_run_goes_ahead(tmp_path, capsys):
    from ft_ray.train.trainer import prepare, resolve

    run_dir = _started_run(tmp_path)
    _save(run_dir / "checkpoint_y", step=4)
    _flip(_distcp(run_dir / "checkpoint_y"), 4096)
    run = resolve(_cfg(tmp_path))
    assert run.resume_from == str(run_dir / "checkpoint_x")
    assert (run_dir / "checkpoint_y").is_dir()  # resolve only reads
    prepare(run)
    assert not (run_dir / "checkpoint_y").exists() and (run_dir / "quarantine" / "checkpoint_y").is_dir()
    assert "checkpoint_y is damaged" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, match", [
    (["data.num_val_sequences=15", "data.batch_size=8"],
     r"data.num_val_sequences: the val split has 15 .* needs at least 16"),
    (["data.num_train_sequences=7", "train.num_workers=0"],
     r"data.num_train_sequences: the train split has 7 .* at least 8"),
])
def test_splits_smaller_than_a_batch_per_worker_are_refused(tmp_path, overrides, match):
    from ft_ray.train.trainer import resolve

    with pytest.raises(DataError, match=match):
        resolve(_cfg(tmp_path, *overrides))
    assert not (tmp_path / "r").exists()


def test_shard_directory_without_tokenizer_or_as_run_directory_is_refused(tmp_path):
    from ft_ray.data.shards import write_synthetic_shards
    from ft_ray.train.trainer import resolve

    shards = tmp_path / "shards"
    write_synthetic_shards("letters", 64, seed=0, out_dir=shards, val_fraction=0.25, progress=lambda _: None)
    tokenizer = (shards / "tokenizer.json").read_bytes()
    with pytest.raises(ConfigError, match="shard directory"):  # its tokenizer.json would be overwritten
        resolve(load_config(SMOKE, [f"train.storage_path={tmp_path}", "train.name=shards"]))
    assert (shards / "tokenizer.json").read_bytes() == tokenizer
    (shards / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="tokenizer.json: not found"):
        resolve(_cfg(tmp_path, "data.source=shards", f"data.path={shards}"))


def test_numbers_in_exponent_form_and_names_that_escape_the_storage_path():
    cfg = load_config(SMOKE, ["optim.lr=1e-3", "optim.min_lr=5E-5"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.min_lr == 5e-5
    for name in ("..", ".", "a/b", ""):
        with pytest.raises(ConfigError, match="train.name: must be one path component"):
            load_config(SMOKE, [f"train.name={name}"])
    with pytest.raises(ConfigError, match="optim.lr: expected float"):
        load_config(SMOKE, ["optim.lr=fast"])
