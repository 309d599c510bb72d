"""The whole HoVLE model in one file: holistic embedding module + LLM, with KV caches for both.

HoVLE is monolithic: there is no vision encoder. A *holistic embedding module* (a few causal decoder
layers) reads ONE sequence that mixes text-token embeddings and image patch embeddings, and its outputs
are the LLM's `inputs_embeds`. Every generated token therefore goes through the module as well as the
LLM, so each part keeps its own KV cache.

Shapes: B batch, T new tokens, S keys (cached + new), C hidden, H query heads, K kv heads, D head dim,
N tiles, P patches per tile side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hovle import kernels
from hovle.config import PRESETS, DecoderConfig, EmbeddingConfig, HoVLEConfig, LLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and cast back before the weight multiply, as the official InternLM2/Llama do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear that uses matrix-vector kernels for decode rows on the CPU.

    Decode is bound by how fast the weight streams: hovle.kernels' bf16 GEMV for a few rows where it
    applies, else torch.mv for a single row (15-60% faster than the matrix-matrix path for one row).
    """

    def forward(self, x: Tensor) -> Tensor:
        y = kernels.linear(x, self.weight, self.bias)
        if y is not None:
            return y
        if x.numel() != self.in_features or x.device.type != "cpu":
            return super().forward(x)
        y = torch.mv(self.weight, x.reshape(-1))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


# ---- rotary position embedding ----------------------------------------------------------------------


def rope_inv_freq(cfg: DecoderConfig, seq_len: int, device: torch.device | None = None) -> Tensor:
    """[D/2] fp32 inverse frequencies; under dynamic NTK the base depends on the total sequence length."""
    base, d = cfg.rope_theta, cfg.head_dim
    rs = cfg.rope_scaling
    if rs is not None and rs.kind == "dynamic" and seq_len > cfg.max_position_embeddings:
        base = base * ((rs.factor * seq_len / cfg.max_position_embeddings) - (rs.factor - 1)) ** (d / (d - 2))
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))


def rope_cos_sin(cfg: DecoderConfig, positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions [B, T] -> cos, sin [B, T, D/2], computed in fp32 then cast (as the official code does)."""
    t = positions.float()
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "linear":
        t = t / cfg.rope_scaling.factor
    freqs = t[..., None] * inv_freq
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE, x * cos + rotate_half(x) * sin, written on the two halves (no negated copy)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---- KV cache -----------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys/values for every layer of one decoder stack, written at explicit slots.

    `advance` (host side, before a forward) claims the next slots for the new tokens and sets their RoPE
    positions; the forward writes keys/values at `slots` and attends over all `max_len` slots through a
    mask built from `valid`. A decode step therefore has static shapes and reuses the same buffers, so one
    CUDA graph can replay every step. Rows are left-padded, so `pos` (filled slots) is shared by all rows.
    Keys are stored rotated; under dynamic NTK, whose RoPE base grows with the length, they are re-rotated
    when the base moves (the official code recomputes everything each step, so every key uses the current base).
    """

    def __init__(self, cfg: DecoderConfig, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.cfg = cfg
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # real (non-pad) slots
        self.slot_ids = torch.arange(max_len, device=device)
        self.next_position = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.inv_freq = rope_inv_freq(cfg, 0, device)  # [D/2], updated in place
        self.pos = 0
        # Decode-step buffers, reused in place so a captured graph keeps reading the right memory.
        self._one_slot = torch.zeros(1, dtype=torch.long, device=device)
        self._one_position = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.slots = self._one_slot  # [T] slots of the current tokens
        self.positions = self._one_position  # [B, T] their RoPE positions

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def advance(self, num_tokens: int, valid: Tensor | None = None) -> None:
        """Claim the next `num_tokens` slots; valid [B, T] marks real tokens (False = left padding)."""
        T, start = num_tokens, self.pos
        if start + T > self.max_len:
            raise ValueError(f"sequence of {start + T} tokens does not fit the KV cache of {self.max_len}")
        if T == 1 and valid is None:
            self.valid[:, start] = True
            self._one_slot.fill_(start)
            self._one_position.copy_(self.next_position)
            self.next_position += 1
            self.slots, self.positions = self._one_slot, self._one_position
        else:
            valid = torch.ones_like(self.valid[:, :T]) if valid is None else valid.bool()
            self.valid[:, start:start + T] = valid
            counts = valid.long().cumsum(-1)
            self.positions = (self.next_position + counts - 1).clamp(min=0)
            self.next_position += counts[:, -1:]
            self.slots = self.slot_ids[start:start + T]
        self.pos = start + T
        rs = self.cfg.rope_scaling
        if rs is not None and rs.kind == "dynamic" and self.pos > self.cfg.max_position_embeddings:
            self._rerotate(rope_inv_freq(self.cfg, self.pos, self.inv_freq.device), start)

    def _rerotate(self, inv_freq: Tensor, filled: int) -> None:
        """Move the first `filled` cached keys to new RoPE frequencies (a rotation by the difference)."""
        if filled:
            positions = (self.valid[:, :filled].long().cumsum(-1) - 1).clamp(min=0)
            cos, sin = rope_cos_sin(self.cfg, positions, inv_freq - self.inv_freq, torch.float32)
            keys = self.k[:, :, :, :filled]  # [layers, B, K, filled, D]
            keys.copy_(apply_rope(keys.float(), cos[:, None], sin[:, None]))
        self.inv_freq.copy_(inv_freq)

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, K, T, D] at `slots`; return every slot's keys/values [B, K, max_len, D]."""
        self.k[layer].index_copy_(2, self.slots, k)
        self.v[layer].index_copy_(2, self.slots, v)
        return self.k[layer], self.v[layer]

    def mask(self) -> Tensor:
        return attention_mask(self.valid, self.slots, self.slot_ids)


def attention_mask(valid: Tensor, slots: Tensor, key_slots: Tensor) -> Tensor:
    """[B, 1, T, S] boolean (True = attend): the query at slots[t] sees valid keys at or before it.

    A query always sees itself, so a padding row is never fully masked (SDPA would return NaN there).
    """
    causal = key_slots <= slots[:, None]  # [T, S]
    own = key_slots == slots[:, None]
    return ((causal & valid[:, None, :]) | own)[:, None]


# ---- decoder ------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # Fused projection, rows [all query heads | all key heads | all value heads].
        self.wqkv = Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int) -> Tensor:
        B, T, _ = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split((H * D, K * D, K * D), dim=-1)
        # RoPE in the [B, T, heads, D] layout, where each token's heads are contiguous (much faster on CPU).
        q = apply_rope(q.view(B, T, H, D), cos, sin).transpose(1, 2)  # [B, H, T, D]
        k = apply_rope(k.view(B, T, K, D), cos, sin).transpose(1, 2)  # [B, K, T, D]
        v = v.view(B, T, K, D).transpose(1, 2)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # [B, K, max_len, D]
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=H != K)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))


class FeedForward(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.w13 = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)  # [gate | up]
        self.w2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.intermediate_size, dim=-1)
        return self.w2(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Decoder(nn.Module):
    """A stack of decoder layers that owns its positions and masks (padding-aware, cache-aware)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: Tensor, valid: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """x [B, T, C] -> [B, T, C]. With a cache (already `advance`d for these T tokens) `valid` is unused.

        Without a cache: valid [B, T] (False = left padding), or None for SDPA's own causal mask.
        """
        B, T, _ = x.shape
        if cache is not None:
            positions, inv_freq, mask = cache.positions, cache.inv_freq, cache.mask()
        else:
            inv_freq = rope_inv_freq(self.cfg, T, x.device)
            if valid is None:
                positions, mask = torch.arange(T, device=x.device).expand(B, T), None
            else:
                positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
                slots = torch.arange(T, device=x.device)
                mask = attention_mask(valid, slots, slots)
        cos, sin = rope_cos_sin(self.cfg, positions, inv_freq, x.dtype)
        cos, sin = cos[:, :, None], sin[:, :, None]  # [B, T, 1, D/2], broadcast over heads
        if cache is not None and T == 1 and B == 1:  # CPU decode: the whole stack in one C call where it applies
            y = kernels.decode_stack(self, x, cache, cos, sin)
            if y is not None:
                return y
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        return x


# ---- holistic embedding module --------------------------------------------------------------------------


class VisionEmbeddings(nn.Module):
    """Conv patch embedding plus a learned position table (interpolated to the tile's patch grid)."""

    def __init__(self, cfg: EmbeddingConfig):
        super().__init__()
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))  # in the checkpoint, unused
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid**2 + 1, cfg.hidden_size))

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[N, 3, S, S] -> [N, P*P, C] row-major patch tokens with positions added."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        N, C, P, _ = x.shape
        pos = self.position_embedding[:, 1:]  # slot 0 is a CLS position HoVLE does not use
        if P != self.grid:
            grid = pos.float().reshape(1, self.grid, self.grid, C).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(P, P), mode="bicubic", align_corners=False)
            pos = grid.reshape(1, C, P * P).transpose(1, 2).to(x.dtype)
        return x.flatten(2).transpose(1, 2) + pos


def pixel_shuffle(x: Tensor) -> Tensor:
    """[N, P*P, C] -> [N, (P/2)^2, 4C]; token (r, c) stacks patches (2r,2c), (2r,2c+1), (2r+1,2c), (2r+1,2c+1)."""
    N, L, C = x.shape
    P = math.isqrt(L)
    x = x.view(N, P // 2, 2, P // 2, 2, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(N, (P // 2) ** 2, 4 * C)


class HolisticEmbedding(nn.Module):
    """Embeds a mixed text+image sequence and runs the embedding layers; outputs the LLM's inputs."""

    def __init__(self, cfg: EmbeddingConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        self.vision_embeddings = VisionEmbeddings(cfg)
        self.llm_text_embeddings = nn.Embedding(cfg.llm_vocab_size, C)
        self.special_text_embeddings = nn.Embedding(len(cfg.special_token_maps), C) if cfg.special_token_maps else None
        self.pixel_shuffle_proj = nn.Sequential(nn.Linear(4 * C, C), nn.GELU(), nn.Linear(C, C))
        self.encoder = Decoder(cfg)

    def embed_text(self, ids: Tensor) -> Tensor:
        """[B, T] ids -> [B, T, C]. Ids past the LLM vocab use the special table, or row 0 without one."""
        V = self.cfg.llm_vocab_size
        x = self.llm_text_embeddings(torch.where(ids < V, ids, 0))
        if self.special_text_embeddings is not None:
            special = self.special_text_embeddings((ids - V).clamp(0, self.special_text_embeddings.num_embeddings - 1))
            x = torch.where((ids >= V)[..., None], special, x)
        return x

    def image_tokens(self, pixel_values: Tensor) -> Tensor:
        """[N, 3, S, S] -> [N, tokens per tile, C] as placed in this module's own sequence."""
        x = self.vision_embeddings(pixel_values)
        return self.shuffle(x) if self.cfg.pixel_shuffle_loc == "pre" else x

    def shuffle(self, x: Tensor) -> Tensor:
        return self.pixel_shuffle_proj(pixel_shuffle(x))

    def forward(self, ids: Tensor, pixel_values: Tensor | None = None, valid: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        x = self.embed_text(ids)
        if pixel_values is not None:
            img = self.image_tokens(pixel_values)  # [N, n, C]
            slots = ids == self.cfg.img_context_token_id
            if int(slots.sum()) != img.shape[0] * img.shape[1]:
                raise ValueError(
                    f"the prompt has {int(slots.sum())} <IMG_CONTEXT> tokens but pixel_values ({img.shape[0]} tiles) "
                    f"give {img.shape[0] * img.shape[1]} image tokens"
                )
            x[slots] = img.reshape(-1, img.shape[-1]).to(x.dtype)
        return self.encoder(x, valid, cache)


# ---- LLM ------------------------------------------------------------------------------------------------


class LanguageModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # input side unused by HoVLE
        self.decoder = Decoder(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, x: Tensor, valid: Tensor | None = None, cache: KVCache | None = None, last_only: bool = False) -> Tensor:
        h = self.decoder(x, valid, cache)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h))


# ---- the whole model -------------------------------------------------------------------------------------


@dataclass
class HoVLEOutput:
    logits: Tensor  # [B, T, vocab]


@dataclass
class HoVLECache:
    """One KV cache per part: in "post" mode they hold different lengths at different positions."""

    embedding: KVCache
    llm: KVCache


class HoVLE(nn.Module):
    def __init__(self, config: HoVLEConfig):
        super().__init__()
        self.config = config
        self.embedding_model = HolisticEmbedding(config.embedding)
        self.language_model = LanguageModel(config.llm)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.norm.weight.device

    @property
    def is_post(self) -> bool:
        return self.config.embedding.pixel_shuffle_loc == "post"

    def hd_ids(self, input_ids: Tensor) -> Tensor:
        """Derive the "post" module's prompt: each LLM <IMG_CONTEXT> stands for 4 patch tokens."""
        ctx = self.config.embedding.img_context_token_id
        rows = [torch.repeat_interleave(r, torch.where(r == ctx, 4, 1)) for r in input_ids]
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)

    def module_inputs(self, input_ids: Tensor, pixel_values: Tensor | None, hd_input_ids: Tensor | None,
                      attention_mask: Tensor | None, hd_attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(ids, mask) of the embedding module's own sequence: the longer prompt of "post" models with images."""
        if not (self.is_post and pixel_values is not None):
            return input_ids, attention_mask
        if hd_input_ids is not None:
            return hd_input_ids, hd_attention_mask
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("left-padded batches in 'post' mode need hd_input_ids and hd_attention_mask")
        return self.hd_ids(input_ids), None

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None, hd_input_ids: Tensor | None = None,
              attention_mask: Tensor | None = None, hd_attention_mask: Tensor | None = None,
              cache: HoVLECache | None = None) -> Tensor:
        """The LLM's inputs_embeds [B, T, C] for input_ids [B, T]: the embedding module's whole job."""
        ids, mask = self.module_inputs(input_ids, pixel_values, hd_input_ids, attention_mask, hd_attention_mask)
        valid = None if mask is None else mask.bool()
        h = self.embedding_model(ids, pixel_values, valid, cache.embedding if cache is not None else None)
        if self.is_post and pixel_values is not None:
            h = self._post_to_llm(h, ids, valid, input_ids, attention_mask)
        return F.normalize(h, dim=-1) if self.config.normalize_encoder_output else h

    def _post_to_llm(self, h: Tensor, hd_ids: Tensor, hd_valid: Tensor | None, input_ids: Tensor,
                     attention_mask: Tensor | None) -> Tensor:
        """HoVLE-HD: shuffle the module's full-resolution image outputs into the LLM's image slots, copy text."""
        ctx = self.config.embedding.img_context_token_id
        hd_img, img = hd_ids == ctx, input_ids == ctx
        hd_text, text = ~hd_img, ~img
        if hd_valid is not None:
            hd_text &= hd_valid
        if attention_mask is not None:
            text &= attention_mask.bool()
        # The official code groups the module's image outputs by the position table's grid, not the tile.
        group = (self.config.embedding.image_size // self.config.embedding.patch_size) ** 2
        C = h.shape[-1]
        feats = h[hd_img]
        if feats.shape[0] % group or int(img.sum()) * 4 != feats.shape[0] or int(text.sum()) != int(hd_text.sum()):
            raise ValueError(
                f"'post' prompts disagree: {int(img.sum())} LLM image tokens and {int(text.sum())} text tokens vs "
                f"{feats.shape[0]} module image tokens (groups of {group}) and {int(hd_text.sum())} text tokens"
            )
        x = h.new_zeros(*input_ids.shape, C)
        x[img] = self.embedding_model.shuffle(feats.view(-1, group, C)).reshape(-1, C).to(x.dtype)  # autocast-safe
        x[text] = h[hd_text]
        return x

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None, hd_input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, hd_attention_mask: Tensor | None = None) -> HoVLEOutput:
        """Full (uncached) forward: logits [B, T, vocab]. The reference the cached path is tested against."""
        x = self.embed(input_ids, pixel_values, hd_input_ids, attention_mask, hd_attention_mask)
        valid = None if attention_mask is None else attention_mask.bool()
        return HoVLEOutput(logits=self.language_model(x, valid))

    def new_cache(self, batch_size: int, max_len: int, hd_max_len: int | None = None) -> HoVLECache:
        return HoVLECache(
            embedding=KVCache(self.config.embedding, batch_size, hd_max_len or max_len, self.dtype, self.device),
            llm=KVCache(self.config.llm, batch_size, max_len, self.dtype, self.device),
        )

    def step(self, input_ids: Tensor, cache: HoVLECache, pixel_values: Tensor | None = None,
             hd_input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
             hd_attention_mask: Tensor | None = None) -> Tensor:
        """Cached forward of new tokens (a prompt, or one token per row): last-position logits [B, vocab]."""
        ids, mask = self.module_inputs(input_ids, pixel_values, hd_input_ids, attention_mask, hd_attention_mask)
        cache.embedding.advance(ids.shape[1], mask)
        cache.llm.advance(input_ids.shape[1], attention_mask)
        return self.cached_logits(input_ids, cache, pixel_values, ids, attention_mask, mask)

    def cached_logits(self, input_ids: Tensor, cache: HoVLECache, pixel_values: Tensor | None = None,
                      hd_input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                      hd_attention_mask: Tensor | None = None) -> Tensor:
        """The compute of `step`, on caches already advanced: no host-side state, so a CUDA graph can replay it."""
        x = self.embed(input_ids, pixel_values, hd_input_ids, attention_mask, hd_attention_mask, cache)
        return self.language_model(x, None, cache.llm, last_only=True)[:, -1]

    # ---- construction, weights -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: HoVLEConfig | str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", seed: int | None = 0) -> HoVLE:
        """Random weights (std 0.02 normal, unit norms): for tests, benchmarks and training from scratch."""
        if not isinstance(config, HoVLEConfig):
            config = HoVLEConfig.from_name(config) if str(config) in PRESETS else HoVLEConfig.from_json(config)
        model = _build(config, dtype, device)
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> HoVLE:
        """Load an official-layout checkpoint folder (config.json + safetensors), tensor by tensor, or
        "hovle-tiny" (the embedded default model, rebuilt on SmolLM2: hovle.tiny.ship)."""
        from hovle.tiny.ship import load_shipped, shipped_folder
        from hovle.weights import load_checkpoint

        if shipped_folder(path) is not None:
            return load_shipped(path, dtype, device)
        config = HoVLEConfig.from_json(Path(path))
        model = _build(config, dtype, device)
        load_checkpoint(model, Path(path))
        return model.eval()

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write config.json + safetensors shards with the official tensor names and layout."""
        from hovle.weights import save_checkpoint

        self.config.save(path)
        save_checkpoint(self, Path(path), max_shard_bytes)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- generation and chat (implemented in hovle.generation / hovle.chat) ----------------------------

    def generate(self, input_ids: Tensor, pixel_values: Tensor | None = None, hd_input_ids: Tensor | None = None,
                 **kwargs) -> Tensor:
        """New token ids [B, n] (rows that stop early are padded with pad_token_id)."""
        from hovle.generation import generate

        return generate(self, input_ids, pixel_values, hd_input_ids, **kwargs)

    def chat(self, tokenizer, pixel_values, question, generation_config, history=None, return_history=False,
             num_patches_list=None, **kwargs):
        from hovle.chat import chat

        return chat(self, tokenizer, pixel_values, question, generation_config, history, return_history,
                    num_patches_list, **kwargs)

    def chat_stream(self, tokenizer, pixel_values, question, generation_config, history=None,
                    num_patches_list=None, **kwargs):
        from hovle.chat import chat_stream

        return chat_stream(self, tokenizer, pixel_values, question, generation_config, history,
                           num_patches_list, **kwargs)

    def batch_chat(self, tokenizer, pixel_values, questions, generation_config, num_patches_list=None, **kwargs):
        from hovle.chat import batch_chat

        return batch_chat(self, tokenizer, pixel_values, questions, generation_config, num_patches_list, **kwargs)


def _build(config: HoVLEConfig, dtype: torch.dtype, device: str | torch.device) -> HoVLE:
    """Allocate the model once, directly in `dtype` on `device` (uninitialised; the caller fills it)."""
    with torch.device("meta"):
        model = HoVLE(config).to(dtype)  # free on meta: no transient fp32 copy of the weights
    model = model.to_empty(device=device)
    kernels.move_to_huge_pages(model)  # before the weights are written: decode streams them every token
    if config.llm.tie_word_embeddings:  # to_empty re-creates parameters, which unties them
        model.language_model.output.weight = model.language_model.tok_embeddings.weight
    return model
