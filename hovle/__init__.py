"""hovle: HoVLE, the monolithic vision-language model, without transformers or remote code."""

from hovle.chat import TEMPLATES, Template
from hovle.config import ConfigError, HoVLEConfig
from hovle.generation import GenerationConfig
from hovle.image import load_image, load_video
from hovle.model import HoVLE
from hovle.tokenizer import load_tokenizer
from hovle.weights import CheckpointError

__all__ = [
    "HoVLE", "HoVLEConfig", "GenerationConfig", "Template", "TEMPLATES", "load_image", "load_video",
    "load_tokenizer", "ConfigError", "CheckpointError",
]
