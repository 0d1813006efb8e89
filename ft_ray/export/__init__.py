"""Exports of ft-ray bundles to other ecosystems: `hf` writes a Hugging Face transformers model
directory (`ft-ray export hf BUNDLE --out DIR`). Only `ft_ray.export.hf` needs transformers."""

from ft_ray.export.hf import ExportError, export_hf

__all__ = ["ExportError", "export_hf"]
