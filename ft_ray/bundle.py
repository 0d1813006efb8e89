"""Serving bundles: what training exports and serving, evaluation and export load.

Bundle directory (never unpickles anything):
  model.safetensors  config.json  tokenizer.json (when known)  metrics.json
written to a temporary sibling and renamed into place, so a partial bundle never looks complete.
Training (ft_ray/train/loop.py) writes it; serving, evaluation, the comparison and the Hugging
Face export read it: none of them needs the training package.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ft_ray.config import ConfigError, ModelConfig, from_dict, to_dict
from ft_ray.model import build_model

REQUIRED_FILES = ("model.safetensors", "config.json", "metrics.json")  # tokenizer.json when known
ALL_FILES = (*REQUIRED_FILES, "tokenizer.json")


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
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
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
