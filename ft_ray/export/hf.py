"""Export a serving bundle as a Hugging Face transformers model directory (`trust_remote_code`).

    out/config.json               FtRayConfig, with `auto_map` naming the two files below
    out/configuration_ft_ray.py   shipped verbatim from hf_modeling/ (imports transformers only)
    out/modeling_ft_ray.py        the baseline and the Free Transformer, PreTrainedModel + GenerationMixin
    out/model.safetensors         the bundle's weights, unchanged (the parameter names are ft-ray's)
    out/generation_config.json    bos/eos/pad ids
    out/tokenizer.json, tokenizer_config.json   the bundle's tokenizer as a PreTrainedTokenizerFast

The directory is written into a temporary sibling and renamed into place only when complete. A
non-empty --out is replaced only with `overwrite`, and never when it holds a file an export does
not write: we do not delete files we did not write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ft_ray.fsutil import atomic_directory

MODELING_DIR = Path(__file__).parent / "hf_modeling"
SHIPPED = ("configuration_ft_ray.py", "modeling_ft_ray.py")
ARCHITECTURES = ("baseline", "free_transformer")
AUTO_MAP = {"AutoConfig": "configuration_ft_ray.FtRayConfig",
            "AutoModelForCausalLM": "modeling_ft_ray.FtRayForCausalLM"}
# everything an export writes (tokenizer files vary a little with the transformers version)
EXPORT_FILES = (*SHIPPED, "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
BUNDLE_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class ExportError(Exception):
    """Bad input to an export: the message is one line for the user."""


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a --out that is a file, holds files an export does not write, or is not empty
    (without `overwrite`). Cheap: run before any work, and again just before the swap."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    names = sorted(p.name for p in out.iterdir())
    foreign = next((n for n in names if n not in EXPORT_FILES or not (out / n).is_file()), None)
    if foreign is not None:  # --overwrite would not help: do not suggest it
        raise ExportError(f"--out {out} holds {foreign}, which an export does not write: "
                          "ft-ray never deletes files it did not write; choose another --out")
    if names and not overwrite:
        raise ExportError(f"--out {out} is not empty: pass --overwrite to replace the export there, "
                          "or choose another --out")


def read_bundle(bundle: Path) -> dict:
    """The bundle's ft-ray model config (a dict), after checking its files and architecture."""
    if not bundle.is_dir():
        raise ExportError(f"{bundle}: not a directory")
    missing = [f for f in BUNDLE_FILES if not (bundle / f).is_file()]
    if missing == ["tokenizer.json"]:
        raise ExportError(f"{bundle}: the bundle has no tokenizer.json; a transformers model needs "
                          "its tokenizer (train with a tokenizer, or copy the shards' tokenizer.json there)")
    if missing:
        raise ExportError(f"{bundle}: not a complete bundle, missing {', '.join(missing)}")
    try:
        cfg = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{bundle / 'config.json'}: not valid JSON ({e})") from None
    arch = cfg.get("arch", "free_transformer") if isinstance(cfg, dict) else None
    if arch not in ARCHITECTURES:
        raise ExportError(f"{bundle / 'config.json'}: unknown architecture {arch!r}; "
                          f"export knows {', '.join(ARCHITECTURES)}")
    from ft_ray.config import ConfigError, ModelConfig, from_dict, to_dict

    try:  # the resolved config: defaults filled in, types checked
        return to_dict(from_dict(ModelConfig, cfg, str(bundle / "config.json")))
    except ConfigError as e:
        raise ExportError(str(e)) from None


def hf_config(model_cfg: dict, tokens: dict, dtype: str):
    """The FtRayConfig of an ft-ray ModelConfig dict; `tokens`: bos/eos/pad ids."""
    from ft_ray.export.hf_modeling.configuration_ft_ray import FtRayConfig

    c = model_cfg
    config = FtRayConfig(
        arch=c["arch"], vocab_size=c["vocab_size"], hidden_size=c["hidden_dim"],
        num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
        num_key_value_heads=c["num_key_value_heads"], intermediate_size=c["intermediate_size"],
        max_position_embeddings=c["max_seq_len"], rms_norm_eps=c["rms_norm_eps"],
        rope_base=c["rope_theta"], initializer_range=c["init_std"], latent_bits=c["latent_bits"],
        inject_layer=c["inject_layer"], tie_word_embeddings=c["tie_embeddings"],
        architectures=["FtRayForCausalLM"], auto_map=AUTO_MAP, dtype=dtype, **tokens)
    config.ft_ray = c  # provenance: the bundle's own resolved config
    return config


def _weights_dtype(path: Path) -> str:
    """The dtype name of the bundle's tensors (write_bundle writes one dtype)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        code = f.get_slice(next(iter(f.keys()))).get_dtype()
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(code, "float32")


def _check_weights(path: Path, config) -> None:
    """Every parameter of the exported model is in the bundle with its shape, and nothing else."""
    import torch
    from safetensors import safe_open

    from ft_ray.export.hf_modeling.modeling_ft_ray import FtRayForCausalLM

    with torch.device("meta"):
        model = FtRayForCausalLM(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(path), framework="pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise ExportError(f"{path}: the weights do not match the bundle's config.json ({', '.join(diff[:3])})")


def save_tokenizer(tokenizer_json: Path, out: Path, max_len: int) -> dict:
    """Save the bundle's tokenizer as a PreTrainedTokenizerFast; return its bos/eos/pad ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from ft_ray.data.tokenizer import BOS_NAMES, EOS_NAMES, PAD_NAMES

    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON or schema
        raise ExportError(f"{tokenizer_json}: not a valid tokenizer.json ({e})") from None
    specials = {role: next((n for n in names if tok.token_to_id(n) is not None), None)
                for role, names in (("bos", BOS_NAMES), ("eos", EOS_NAMES), ("pad", PAD_NAMES))}
    if specials["eos"] is None:
        raise ExportError(f"{tokenizer_json}: no end-of-sequence token (looked for {', '.join(EOS_NAMES)})")
    # split_special_tokens: "<eos>" written in a text stays text, as ft-ray's encode_batch does
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_len, clean_up_tokenization_spaces=False,
        split_special_tokens=True, **{f"{role}_token": name for role, name in specials.items() if name})
    fast.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"  # the class name every transformers version knows
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()),
                                           tokenizer_class="PreTrainedTokenizerFast"), indent=2) + "\n")
    return {f"{role}_token_id": tok.token_to_id(name) for role, name in specials.items() if name}


def export_hf(bundle: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the transformers model directory of `bundle` to `out`; return `out`."""
    bundle, out = Path(bundle), Path(out)
    check_out_dir(out, overwrite)
    model_cfg = read_bundle(bundle)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ExportError("exporting to Hugging Face needs transformers: pip install 'ft-ray[hf]'") from None
    weights = bundle / "model.safetensors"
    with atomic_directory(out) as tmp:
        tokens = save_tokenizer(bundle / "tokenizer.json", tmp, model_cfg["max_seq_len"])
        config = hf_config(model_cfg, tokens, _weights_dtype(weights))
        _check_weights(weights, config)
        config.save_pretrained(str(tmp))
        from transformers import GenerationConfig

        GenerationConfig(**tokens).save_pretrained(str(tmp))
        for name in SHIPPED:
            shutil.copyfile(MODELING_DIR / name, tmp / name)
        shutil.copyfile(weights, tmp / "model.safetensors")
        stray = sorted(p.name for p in tmp.iterdir() if p.name not in EXPORT_FILES)
        if stray:  # keep EXPORT_FILES complete, or --overwrite would refuse our own export
            raise ExportError(f"internal: the export wrote unexpected files {', '.join(stray)}")
        check_out_dir(out, overwrite)  # again: `out` is about to be replaced
    return out
