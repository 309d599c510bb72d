"""HoVLE-Tiny: a small real HoVLE built on SmolLM2-135M-Instruct, and the procedural data to train it."""

from hovle.tiny.smollm2 import (
    IMAGE_TOKENS,
    SMOLLM2_135M,
    SMOLLM2_TEMPLATE,
    TEMPLATE_NAME,
    default_cache_dir,
    gguf_path,
    init_tiny_model,
    load_smollm2_llm,
    load_smollm2_tokenizer,
    tiny_config,
)

__all__ = [
    "IMAGE_TOKENS", "SMOLLM2_135M", "SMOLLM2_TEMPLATE", "TEMPLATE_NAME", "default_cache_dir", "gguf_path",
    "init_tiny_model", "load_smollm2_llm", "load_smollm2_tokenizer", "tiny_config",
]
