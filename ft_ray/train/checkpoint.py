"""Sharded (DCP) training checkpoints and unsharded serving bundles.

Checkpoint directory (every rank writes into its own copy; Ray Train merges them):
  .metadata, __<rank>_0.distcp   model + optimizer, sharded (DCP reshards on load)
  train_state.json               step, epoch, batches consumed in the epoch, scheduler (rank 0)
  rng_rank<r>.pt                 this rank's torch RNG state (tensors only, loaded weights_only)

Bundle directory (what serving loads; never unpickles anything):
  model.safetensors  config.json  tokenizer.json (when known)  metrics.json
written to a temporary sibling and renamed into place, so a partial bundle never looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ft_ray.config import ConfigError, ModelConfig, from_dict, to_dict
from ft_ray.model import build_model

TRAIN_STATE = "train_state.json"
BUNDLE_FILES = ("model.safetensors", "config.json", "metrics.json")


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


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a complete checkpoint directory (every rank's shard present), else None."""
    path = Path(path)
    try:
        state = json.loads((path / TRAIN_STATE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    world = state.get("world_size", 1)
    shards = all((path / f"__{r}_0.distcp").is_file() for r in range(world))
    return state["step"] if shards and (path / ".metadata").is_file() else None


def newest_checkpoint(*candidates: str | Path | None, run_dir: str | Path | None = None) -> str | None:
    """The complete checkpoint with the highest step among `candidates` and the run directory's
    checkpoint_* folders. Ray registers a reported checkpoint asynchronously; a worker that dies
    right after reporting can leave the newest one on disk but not yet in Ray's records."""
    paths = [Path(c) for c in candidates if c]
    if run_dir is not None and Path(run_dir).is_dir():
        paths += sorted(Path(run_dir).glob("checkpoint_*"))
    steps = [(step, str(p)) for p in paths if (step := checkpoint_step(p)) is not None]
    return max(steps)[1] if steps else None


def load_checkpoint(path: str | Path, model, optimizer, scheduler, rank: int) -> dict:
    """Restore model, optimizer, scheduler and RNG in place; return the train state."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
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
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_bundle(out_dir: str | Path, state: dict[str, torch.Tensor], model_cfg: ModelConfig,
                 metrics: dict, tokenizer_path: str | Path | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write a serving bundle atomically (rank 0 only)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # clone: tied weights share storage, which safetensors refuses
        tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(to_dict(model_cfg), indent=2))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_bundle(path: str | Path, device: str | torch.device = "cpu"):
    """Load a bundle: (model in eval mode, ModelConfig, metrics dict). No pickle anywhere."""
    from safetensors.torch import load_file

    path = Path(path)
    missing = [f for f in BUNDLE_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: not a complete bundle, missing {', '.join(missing)}")
    try:
        cfg = from_dict(ModelConfig, json.loads((path / "config.json").read_text()),
                        str(path / "config.json"))
    except json.JSONDecodeError as e:
        raise ConfigError("<file>", f"not valid JSON: {e}", str(path / "config.json")) from None
    model = build_model(cfg)
    state = load_file(str(path / "model.safetensors"), device=str(device))
    dtype = next(iter(state.values())).dtype
    model.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True)
    metrics = json.loads((path / "metrics.json").read_text())
    return model.eval(), cfg, metrics
