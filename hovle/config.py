"""HoVLE configuration: typed dataclasses that read and write the official `config.json` layout.

The official file (InternVLChatConfig) nests an `embedding_config` (the holistic embedding module) and an
`llm_config` (InternLM2, Llama or Qwen2) under a few top-level image settings, plus many generic
transformers fields that we ignore. Every dataclass checks itself in `__post_init__`, so a bad file fails
at load time with the name of the field, not deep inside a forward pass.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

LLM_ARCHITECTURES = {"InternLM2ForCausalLM": "internlm2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


class ConfigError(ValueError):
    """A config file or dict is missing a field, or its fields contradict each other."""


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # "linear" (positions / factor) or "dynamic" (NTK base growth past max_position_embeddings)
    factor: float

    def __post_init__(self):
        if self.kind not in ("linear", "dynamic"):
            raise ConfigError(f"rope_scaling.type must be 'linear' or 'dynamic', got {self.kind!r}")
        if not self.factor >= 1.0:
            raise ConfigError(f"rope_scaling.factor must be >= 1, got {self.factor}")


@dataclass(frozen=True)
class DecoderConfig:
    """One stack of pre-norm causal decoder layers (GQA attention + SwiGLU MLP), shared by both parts."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class EmbeddingConfig(DecoderConfig):
    """The holistic embedding module: text table + patch embedding feeding InternLM2-style layers."""

    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    downsample_ratio: float = 0.5
    pixel_shuffle_loc: str = "pre"  # "pre": HoVLE, shuffle before the layers; "post": HoVLE-HD, after
    llm_vocab_size: int = 92553
    img_context_token_id: int = 92546
    special_token_maps: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        if self.pixel_shuffle_loc not in ("pre", "post"):
            raise ConfigError(f"embedding_config.pixel_shuffle_loc must be 'pre' or 'post', got {self.pixel_shuffle_loc!r}")
        if self.downsample_ratio != 0.5:
            raise ConfigError(f"only downsample_ratio 0.5 (2x2 pixel shuffle) is supported, got {self.downsample_ratio}")
        if self.image_size % self.patch_size or (self.image_size // self.patch_size) % 2:
            raise ConfigError(
                f"embedding_config.image_size {self.image_size} must be an even multiple of patch_size {self.patch_size}"
            )


@dataclass(frozen=True)
class LLMConfig(DecoderConfig):
    architecture: str = "internlm2"  # "internlm2" | "llama" | "qwen2": picks the checkpoint tensor names
    vocab_size: int = 92553
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 2

    def __post_init__(self):
        super().__post_init__()
        if self.architecture not in LLM_ARCHITECTURES.values():
            raise ConfigError(f"unsupported LLM architecture {self.architecture!r}")


@dataclass(frozen=True)
class HoVLEConfig:
    embedding: EmbeddingConfig
    llm: LLMConfig
    template: str = "internlm2-chat"
    force_image_size: int | None = 448
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    normalize_encoder_output: bool = False

    def __post_init__(self):
        e, l = self.embedding, self.llm
        if e.hidden_size != l.hidden_size:
            raise ConfigError(
                f"embedding_config.hidden_size {e.hidden_size} != llm_config.hidden_size {l.hidden_size}: "
                "the embedding module's output is the LLM's input"
            )
        if not 0 <= e.img_context_token_id < max(l.vocab_size, e.llm_vocab_size + len(e.special_token_maps)):
            raise ConfigError(f"embedding_config.img_context_token_id {e.img_context_token_id} is outside the vocabulary")
        if self.tile_size % e.patch_size or (self.tile_size // e.patch_size) % 2:
            raise ConfigError(f"force_image_size {self.tile_size} must be an even multiple of patch_size {e.patch_size}")
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise ConfigError(
                f"need 1 <= min_dynamic_patch <= max_dynamic_patch, got {self.min_dynamic_patch}, {self.max_dynamic_patch}"
            )

    @property
    def tile_size(self) -> int:
        """Pixels per side of one image tile fed to the model."""
        return self.force_image_size or self.embedding.image_size

    @property
    def num_patch_tokens(self) -> int:
        """Patch tokens per tile before pixel shuffle (what a "post" embedding module sees per tile)."""
        return (self.tile_size // self.embedding.patch_size) ** 2

    @property
    def num_image_token(self) -> int:
        """Image tokens per tile in the LLM's sequence (after the 2x2 pixel shuffle)."""
        return self.num_patch_tokens // 4

    @property
    def num_embedding_image_token(self) -> int:
        """Image tokens per tile in the embedding module's own sequence."""
        return self.num_patch_tokens if self.embedding.pixel_shuffle_loc == "post" else self.num_image_token

    # ---- official config.json layout -------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> HoVLEConfig:
        try:
            return cls(
                embedding=_embedding_from_dict(_require(d, "embedding_config", source), f"{source}: embedding_config"),
                llm=_llm_from_dict(_require(d, "llm_config", source), f"{source}: llm_config"),
                **_pick(d, ("template", "force_image_size", "dynamic_image_size", "use_thumbnail",
                            "min_dynamic_patch", "max_dynamic_patch", "normalize_encoder_output")),
            )
        except ConfigError as e:
            raise e if str(e).startswith(source) else ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> HoVLEConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The official InternVLChatConfig layout (what `from_dict` reads back identically)."""
        e, l = self.embedding, self.llm
        emb = _decoder_to_dict(e) | {
            "attention_bias": e.qkv_bias, "mlp_bias": e.mlp_bias, "image_size": e.image_size,
            "patch_size": e.patch_size, "num_channels": e.num_channels, "downsample_ratio": e.downsample_ratio,
            "pixel_shuffle_loc": e.pixel_shuffle_loc, "use_pixel_shuffle_proj": True,
            "llm_vocab_size": e.llm_vocab_size, "llm_hidden_size": e.hidden_size,
            "img_context_token_id": e.img_context_token_id, "special_token_maps": dict(e.special_token_maps),
            "use_ls": False, "model_type": "holistic_embedding",
        }
        arch = {v: k for k, v in LLM_ARCHITECTURES.items()}[l.architecture]
        llm = _decoder_to_dict(l) | {
            "architectures": [arch], "model_type": l.architecture, "vocab_size": l.vocab_size,
            "tie_word_embeddings": l.tie_word_embeddings, "bos_token_id": l.bos_token_id,
            "eos_token_id": l.eos_token_id, "pad_token_id": l.pad_token_id,
        }
        if l.architecture == "internlm2":
            llm["bias"] = l.qkv_bias
        else:
            llm |= {"attention_bias": l.o_bias, "mlp_bias": l.mlp_bias, "head_dim": l.head_dim}
        return {
            "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "embedding_config": emb, "llm_config": llm, "template": self.template,
            "downsample_ratio": e.downsample_ratio, "force_image_size": self.force_image_size,
            "dynamic_image_size": self.dynamic_image_size, "use_thumbnail": self.use_thumbnail,
            "min_dynamic_patch": self.min_dynamic_patch, "max_dynamic_patch": self.max_dynamic_patch,
            "ps_version": "v2", "select_layer": -1, "normalize_encoder_output": self.normalize_encoder_output,
        }

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    # ---- presets ------------------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str) -> HoVLEConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    def with_llm(self, **changes) -> HoVLEConfig:
        return replace(self, llm=replace(self.llm, **changes))


def _require(d: dict, key: str, source: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{source}: required field {key!r} is missing")
    return d[key]


def _pick(d: dict, keys: tuple[str, ...]) -> dict[str, Any]:
    """Optional fields present in `d`, with JSON nulls treated as absent (the default applies)."""
    return {k: d[k] for k in keys if d.get(k) is not None}


def _rope_scaling(d: dict) -> RopeScaling | None:
    rs = d.get("rope_scaling")
    if rs is None:
        return None
    kind = rs.get("type", rs.get("rope_type"))
    if kind == "default":
        return None
    return RopeScaling(kind=kind, factor=float(rs.get("factor", 1.0)))


def _decoder_kwargs(d: dict, source: str) -> dict[str, Any]:
    """The DecoderConfig fields of an InternLM2/Llama/Qwen2-style dict (HF field names)."""
    req = lambda k: _require(d, k, source)  # noqa: E731
    kw = dict(
        num_layers=req("num_hidden_layers"), hidden_size=req("hidden_size"), num_heads=req("num_attention_heads"),
        intermediate_size=req("intermediate_size"), rope_scaling=_rope_scaling(d),
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
    )
    kw |= _pick(d, ("rms_norm_eps", "rope_theta", "max_position_embeddings", "mlp_bias"))
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act must be 'silu', got {act!r}")
    if d.get("head_dim") not in (None, kw["hidden_size"] // kw["num_heads"]):
        raise ConfigError(f"{source}: head_dim {d['head_dim']} != hidden_size / num_attention_heads")
    return kw


def _embedding_from_dict(d: dict, source: str) -> EmbeddingConfig:
    if d.get("use_ls"):
        raise ConfigError(f"{source}: use_ls (layer scale) is not part of HoVLE and is not supported")
    if d.get("use_pixel_shuffle_proj") is False:
        raise ConfigError(f"{source}: use_pixel_shuffle_proj false is not supported")
    kw = _decoder_kwargs(d, source)
    bias = bool(d.get("attention_bias", False))
    kw |= dict(qkv_bias=bias, o_bias=bias, llm_vocab_size=_require(d, "llm_vocab_size", source),
               img_context_token_id=_require(d, "img_context_token_id", source))
    kw |= _pick(d, ("image_size", "patch_size", "num_channels", "downsample_ratio", "pixel_shuffle_loc",
                    "special_token_maps"))
    if d.get("llm_hidden_size") not in (None, kw["hidden_size"]):
        raise ConfigError(f"{source}: llm_hidden_size {d['llm_hidden_size']} != hidden_size {kw['hidden_size']}")
    try:
        return EmbeddingConfig(**kw)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None


def _llm_from_dict(d: dict, source: str) -> LLMConfig:
    archs = d.get("architectures") or []
    if not archs or archs[0] not in LLM_ARCHITECTURES:
        raise ConfigError(
            f"{source}: architectures[0] must be one of {', '.join(LLM_ARCHITECTURES)}, got {archs[:1] or 'nothing'}"
        )
    arch = LLM_ARCHITECTURES[archs[0]]
    kw = _decoder_kwargs(d, source)
    if arch == "internlm2":
        kw |= dict(qkv_bias=bool(d.get("bias", False)), o_bias=bool(d.get("bias", False)))
    elif arch == "llama":
        kw |= dict(qkv_bias=bool(d.get("attention_bias", False)), o_bias=bool(d.get("attention_bias", False)))
    else:  # qwen2: biased q/k/v, unbiased o_proj
        kw |= dict(qkv_bias=True, o_bias=False)
    kw |= dict(architecture=arch, vocab_size=_require(d, "vocab_size", source),
               tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))
    kw |= {k: d.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    try:
        return LLMConfig(**kw)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None


def _decoder_to_dict(c: DecoderConfig) -> dict[str, Any]:
    rs = None if c.rope_scaling is None else {"type": c.rope_scaling.kind, "factor": c.rope_scaling.factor}
    return {
        "num_hidden_layers": c.num_layers, "hidden_size": c.hidden_size, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "intermediate_size": c.intermediate_size, "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_scaling": rs,
        "max_position_embeddings": c.max_position_embeddings,
    }


def _tiny() -> HoVLEConfig:
    """A few-hundred-kB HoVLE for tests: 2+2 layers of width 64, 56-px tiles (4 image tokens each)."""
    dec = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=176,
               max_position_embeddings=2048)
    return HoVLEConfig(
        embedding=EmbeddingConfig(**dec, image_size=56, llm_vocab_size=512, img_context_token_id=502),
        llm=LLMConfig(**dec, vocab_size=512),
        force_image_size=56,
    )


def _hovle_2_6b() -> HoVLEConfig:
    """The official HoVLE (2.6B) architecture, internlm2-chat-1_8b LLM."""
    dec = dict(hidden_size=2048, num_heads=16, num_kv_heads=8, intermediate_size=8192)
    return HoVLEConfig(
        embedding=EmbeddingConfig(**dec, num_layers=8),
        llm=LLMConfig(**dec, num_layers=24, rope_scaling=RopeScaling("dynamic", 2.0)),
    )


PRESETS: dict[str, HoVLEConfig] = {"tiny": _tiny(), "hovle-2.6b": _hovle_2_6b()}


def config_summary(cfg: HoVLEConfig) -> dict[str, Any]:
    """Flat view for `hovle info`: dataclass fields of each part plus the derived sizes."""
    out = {f"embedding.{f.name}": getattr(cfg.embedding, f.name) for f in fields(cfg.embedding)}
    out |= {f"llm.{f.name}": getattr(cfg.llm, f.name) for f in fields(cfg.llm)}
    out |= {k: v for k, v in asdict(cfg).items() if k not in ("embedding", "llm")}
    out |= {"tile_size": cfg.tile_size, "image_tokens_per_tile": cfg.num_image_token}
    return out
