"""The documentation site builds without a warning, and its configuration reference covers the
whole config tree (it is generated from ft_ray/config.py, so this checks the generator)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import ft_ray.config as config

ROOT = Path(__file__).resolve().parents[1]


def _hook():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs/hooks/config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_lists_every_key_with_its_comment():
    hook = _hook()
    text = hook.reference_markdown()
    for section in dataclasses.fields(config.Config):
        cls = type(getattr(config.Config(), section.name))
        assert f"## `{section.name}`: `{cls.__name__}`" in text
        for f in dataclasses.fields(cls):
            assert f"| `{section.name}.{f.name}` |" in text, f"{section.name}.{f.name} missing"
    row = next(line for line in text.splitlines() if line.startswith("| `model.hidden_dim` |"))
    assert row == "| `model.hidden_dim` | `int` | `256` | D, the residual width |"
    # a comment block above a field with no comment of its own is its meaning ...
    assert "an embedded store beside the run directories" in next(
        line for line in text.splitlines() if line.startswith("| `train.tracking` |"))
    # ... and above a field that has one, it names the group of fields that starts there
    assert "| *Free Transformer* | | | |" in text


def test_docs_build_strict(tmp_path):
    """`mkdocs build --strict` (what `make docs` runs): a broken link, a missing page or an API
    page whose module fails to load is an error."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| `train.max_steps` |" not in (tmp_path / "site/configuration/index.html").read_text()  # rendered
    assert "<code>train.max_steps</code>" in (tmp_path / "site/configuration/index.html").read_text()
    assert "FreeTransformer" in (tmp_path / "site/api/model/index.html").read_text()
