"""Models: torch only (no ray, no torch.distributed, no device logic)."""

from ft_ray.config import ModelConfig
from ft_ray.model.free_transformer import FreeTransformer, sample_shared_plan
from ft_ray.model.transformer import BaselineTransformer, ModelOutput


def build_model(cfg: ModelConfig) -> BaselineTransformer:
    """The model class named by `cfg.arch`."""
    return FreeTransformer(cfg) if cfg.arch == "free_transformer" else BaselineTransformer(cfg)


__all__ = ["BaselineTransformer", "FreeTransformer", "ModelOutput", "build_model", "sample_shared_plan"]
