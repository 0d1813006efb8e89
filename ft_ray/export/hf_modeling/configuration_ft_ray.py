"""Configuration of an ft-ray model exported for Hugging Face transformers (`trust_remote_code`).

Shipped verbatim beside the weights by `ft-ray export hf`; it imports only transformers.
Field names follow transformers' conventions (`hidden_size`, `num_hidden_layers`, ...), so tools
that read them (lm-eval reads `max_position_embeddings` for the context length) find them.
"""

from __future__ import annotations

from transformers import PretrainedConfig

ARCHITECTURES = ("baseline", "free_transformer")


class FtRayConfig(PretrainedConfig):
    model_type = "ft_ray"

    def __init__(
        self,
        arch: str = "baseline",  # "baseline" (Llama-style decoder) or "free_transformer"
        vocab_size: int = 256,
        hidden_size: int = 256,  # D
        num_hidden_layers: int = 8,  # L decoder blocks (the FT's encoder has one more of its own)
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,  # GQA; None -> num_attention_heads
        intermediate_size: int = 704,  # SwiGLU width
        max_position_embeddings: int = 512,  # longest sequence RoPE covers
        rms_norm_eps: float = 1e-5,
        rope_base: float = 10000.0,  # RoPE theta
        initializer_range: float = 0.02,
        # Free Transformer only
        latent_bits: int = 16,  # H: one code Z_t in [0, 2^H) per position
        inject_layer: int | None = None,  # 0-based block whose keys/values get X + W[Z]; None -> L // 2
        plan_seed: int = 0,  # seed of the plans drawn when no codes are given (see modeling_ft_ray.py)
        num_plans: int = 1,  # K prior plans averaged when scoring (the forward without codes)
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown ft-ray architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
        self.arch = arch
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_base = rope_base
        self.initializer_range = initializer_range
        self.latent_bits = latent_bits
        self.inject_layer = num_hidden_layers // 2 if inject_layer is None else inject_layer
        self.plan_seed = plan_seed
        self.num_plans = num_plans
        self.use_cache = use_cache
        kwargs.pop("head_dim", None)  # derived, written for tools that read it
        self.head_dim = hidden_size // num_attention_heads
        # a PreTrainedConfig kwarg at run time, which transformers' annotated signature leaves out
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)  # type: ignore[call-arg]
