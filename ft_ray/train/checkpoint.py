"""Sharded (DCP) training checkpoints.

Checkpoint directory (every rank writes into its own copy; Ray Train merges them):
  .metadata, __<rank>_0.distcp   model + optimizer, sharded (DCP reshards on load)
  train_state.json               step, epoch, batches consumed in the epoch, scheduler (rank 0)
  rng_rank<r>.pt                 this rank's torch RNG state (tensors only, loaded weights_only)
  checksums_rank<r>.json         size and sha256 of every file rank r wrote, written last and
                                 atomically: a checkpoint is complete and intact only when every
                                 rank's checksum file is present and every listed file matches it

Serving bundles (what a finished run exports) are ft_ray/bundle.py's.
"""

from __future__ import annotations

import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ft_ray.data.manifest import file_sha256

TRAIN_STATE = "train_state.json"
CHECKSUMS = "checksums_rank{}.json"
QUARANTINE = "quarantine"  # where the driver moves damaged checkpoints that Ray does not track


def save_checkpoint(path: str | Path, model, optimizer, scheduler, train_state: dict, rank: int) -> None:
    """Every rank calls this (DCP is collective)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    torch.save({"cpu": torch.get_rng_state()}, path / f"rng_rank{rank}.pt")
    if rank == 0:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        state = dict(train_state, scheduler=scheduler.state_dict(), world_size=world)
        (path / TRAIN_STATE).write_text(json.dumps(state))
    write_checksums(path, rank)


def write_checksums(path: Path, rank: int) -> None:
    """Record size and sha256 of every file in this rank's checkpoint directory, atomically and
    last: a save cut short (a full disk, a killed worker) leaves no checksum file at all."""
    files = {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(path.iterdir()) if f.is_file() and not f.name.startswith("checksums_rank")}
    tmp = path / f".{CHECKSUMS.format(rank)}.tmp"
    tmp.write_text(json.dumps({"rank": rank, "files": files}, indent=1))
    os.replace(tmp, path / CHECKSUMS.format(rank))


def checkpoint_step(path: str | Path) -> int | None:
    """The step a checkpoint directory says it holds (train_state.json), else None. Says nothing
    about whether its files are intact: see `verify_checkpoint`."""
    try:
        step = json.loads((Path(path) / TRAIN_STATE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def verify_checkpoint(path: str | Path) -> str | None:
    """None when every rank's checksum file is present and every file it lists has its size and
    sha256; otherwise what is wrong, in a few words."""
    path = Path(path)
    try:
        world = int(json.loads((path / TRAIN_STATE).read_text()).get("world_size", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return f"{TRAIN_STATE} missing or unreadable"
    for rank in range(world):
        try:
            listed = json.loads((path / CHECKSUMS.format(rank)).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{CHECKSUMS.format(rank)} missing or unreadable (save did not complete)"
        for name, want in listed.items():
            f = path / name
            if not f.is_file():
                return f"{name} missing"
            if f.stat().st_size != want["size"]:
                return f"{name} has {f.stat().st_size} bytes, {want['size']} were written"
            if file_sha256(f) != want["sha256"]:
                return f"{name} changed since it was written (sha256 differs)"
    return None


def _candidates(*paths: str | Path | None, run_dir: str | Path | None) -> list[Path]:
    """`paths` and the run directory's checkpoint_* folders, highest step first; those whose step
    cannot be read come first (they may be the newest, and fail verification at once)."""
    found = [Path(p) for p in paths if p]
    if run_dir is not None and Path(run_dir).is_dir():
        found += sorted(Path(run_dir).glob("checkpoint_*"))
    unique = list(dict.fromkeys(p.resolve() for p in found if p.is_dir()))
    steps = {p: checkpoint_step(p) for p in unique}
    return sorted(unique, key=lambda p: (steps[p] is None, steps[p] or 0, p.name), reverse=True)


def newest_checkpoint(*candidates: str | Path | None, run_dir: str | Path | None = None,
                      warn=None) -> str | None:
    """The verified checkpoint with the highest step among `candidates` and the run directory's
    checkpoint_* folders (Ray registers a reported checkpoint asynchronously; a worker that dies
    right after reporting can leave the newest one on disk but not yet in Ray's records). A
    damaged one is skipped with a warning naming it. Raises `CheckpointError` when checkpoints
    exist but none verifies: starting from scratch instead would silently throw the run away."""
    warn = warn or (lambda msg: print(f"[ft-ray] warning: {msg}", file=sys.stderr, flush=True))
    damaged = []
    for path in _candidates(*candidates, run_dir=run_dir):
        problem = verify_checkpoint(path)
        if problem is None:
            return str(path)
        damaged.append(f"{path.name} ({problem})")
        warn(f"skipping damaged checkpoint {path}: {problem}")
    if damaged:
        raise CheckpointError(f"no intact checkpoint to resume from: {'; '.join(damaged)}")
    return None


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be trusted."""


def damaged_checkpoints(run_dir: str | Path) -> tuple[str | None, list[tuple[Path, str]]]:
    """(the newest verified checkpoint or None, [(damaged checkpoint newer than it, problem)])."""
    damaged: list[tuple[Path, str]] = []
    for path in _candidates(run_dir=run_dir):
        problem = verify_checkpoint(path)
        if problem is None:
            return str(path), damaged
        damaged.append((path, problem))
    return None, damaged


def quarantine(path: Path, run_dir: Path) -> Path | None:
    """Move a damaged checkpoint that Ray's run snapshot does not list into run_dir/quarantine/
    (Ray refuses to restore a run whose snapshot names a missing checkpoint, so those stay, are
    skipped on every resume, and go when Ray's num_to_keep retention deletes them)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if snapshot.is_file() and path.name in snapshot.read_text():
        return None
    target = run_dir / QUARANTINE / path.name
    target.parent.mkdir(exist_ok=True)
    path.rename(target)
    return target


def load_checkpoint(path: str | Path, model, optimizer, scheduler, rank: int) -> dict:
    """Restore model, optimizer, scheduler and RNG in place; return the train state."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train_state = json.loads((path / TRAIN_STATE).read_text())
    scheduler.load_state_dict(train_state.pop("scheduler"))
    train_state.pop("world_size", None)
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.exists():  # absent when the world size grew: keep this rank's fresh RNG
        torch.set_rng_state(torch.load(rng_file, weights_only=True)["cpu"])
    return train_state


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU. Collective under FSDP: every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return typing.cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))  # tensors only
