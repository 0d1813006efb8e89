"""Presets: the shipped run configurations (jobs/configs/*.yaml, package data), found by name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ft_ray.config import ConfigError

# the `jobs` package's data: found wherever ft-ray is installed, not relative to this file
PRESET_DIR = Path(str(resources.files("jobs").joinpath("configs")))


def resolve_preset(name_or_path: str) -> Path:
    """`smoke` -> jobs/configs/smoke.yaml; a path is used as given."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.exists():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ConfigError("--config", f"unknown preset {name_or_path!r} (presets: {known})")
    return preset
