"""Token generation: small pure sampling functions and one streaming generator over the KV caches.

Sampling follows transformers' order and defaults (repetition penalty, then temperature, top-k 50,
top-p 1.0), so a generation_config written for the official model means the same thing here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    num_beams: int = 1
    cuda_graph: bool = True  # on CUDA, replay decode steps from one captured graph
    compile: bool = False  # torch.compile the decode step (fuses elementwise kernels; slow first step)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams != 1:
            raise ValueError("beam search (num_beams > 1) is not supported; use greedy or sampling")

    @classmethod
    def from_kwargs(cls, **kwargs) -> GenerationConfig:
        """Build from a user's generation_config dict; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown generation option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):
            kwargs["eos_token_id"] = tuple(eos)
        return cls(**kwargs)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """logits [B, V]; seen [B, S] ids. Divide positive / multiply negative logits of seen tokens (CTRL)."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(1, seen, picked)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: Tensor, seen: Tensor, cfg: GenerationConfig, generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] (last position) -> next ids [B]."""
    logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = apply_top_p(apply_top_k(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


class DecodeStep:
    """One-token steps on a prefilled cache; on CUDA they replay a single captured CUDA graph.

    A 2.6B HoVLE launches ~700 small kernels per decode step: at small batch sizes the launches, not the
    GPU, set the pace. The cache's decode buffers are updated in place, so the graph stays valid.
    """

    def __init__(self, model, cache, batch_size: int, cuda_graph: bool, compile: bool = False):
        self.cache = cache
        self.forward = torch.compile(model.cached_logits, dynamic=False) if compile else model.cached_logits
        self.tok = torch.zeros(batch_size, 1, dtype=torch.long, device=model.device)
        self.use_graph = cuda_graph and model.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None

    def __call__(self, tok: Tensor) -> Tensor:
        """tok [B] -> next logits [B, vocab]."""
        self.cache.embedding.advance(1)
        self.cache.llm.advance(1)
        self.tok.copy_(tok.view(-1, 1))
        if not self.use_graph:
            return self.forward(self.tok, self.cache)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy initialisation, compilation)
            for _ in range(2):
                self.forward(self.tok, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.forward(self.tok, self.cache)


@torch.inference_mode()
def stream_generate(model, input_ids: Tensor, pixel_values: Tensor | None = None, hd_input_ids: Tensor | None = None,
                    attention_mask: Tensor | None = None, hd_attention_mask: Tensor | None = None,
                    generator: torch.Generator | None = None, **options) -> Iterator[Tensor]:
    """Yield the next token of every row [B], step by step, until all rows hit EOS or max_new_tokens.

    Rows that already stopped yield pad_token_id (or their EOS). The prompt is prefilled once into
    preallocated caches; each step then runs one token through the embedding module and the LLM.
    """
    cfg = GenerationConfig.from_kwargs(**options)
    dev = model.device
    input_ids = input_ids.to(dev)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
    if pixel_values is not None:
        pixel_values = pixel_values.to(dev, model.dtype)
    hd_input_ids = None if hd_input_ids is None else hd_input_ids.to(dev)
    attention_mask = None if attention_mask is None else attention_mask.to(dev)
    hd_attention_mask = None if hd_attention_mask is None else hd_attention_mask.to(dev)
    # The embedding module's own prompt (longer for "post" models with images) sizes its cache.
    module_ids, module_mask = model.module_inputs(input_ids, pixel_values, hd_input_ids, attention_mask,
                                                  hd_attention_mask)

    B, T = input_ids.shape
    cache = model.new_cache(B, T + cfg.max_new_tokens, module_ids.shape[1] + cfg.max_new_tokens)
    logits = model.step(input_ids, cache, pixel_values, module_ids, attention_mask, module_mask)

    eos = torch.tensor(cfg.eos_ids or (-1,), device=dev)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_ids[0] if cfg.eos_ids else 0)
    seen = input_ids if attention_mask is None else input_ids.masked_fill(~attention_mask.bool(), pad)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    decode = DecodeStep(model, cache, B, cfg.cuda_graph, cfg.compile)
    for step in range(cfg.max_new_tokens):
        tok = next_token(logits, seen, cfg, generator).masked_fill(done, pad)
        yield tok
        done |= torch.isin(tok, eos)
        if step + 1 == cfg.max_new_tokens or bool(done.all()):
            return
        seen = torch.cat((seen, tok[:, None]), dim=1)
        logits = decode(tok)


def generate(model, input_ids: Tensor, pixel_values: Tensor | None = None, hd_input_ids: Tensor | None = None,
             attention_mask: Tensor | None = None, hd_attention_mask: Tensor | None = None,
             generator: torch.Generator | None = None, **options) -> Tensor:
    """All new ids [B, n] at once; see `stream_generate`."""
    steps = list(stream_generate(model, input_ids, pixel_values, hd_input_ids, attention_mask,
                                 hd_attention_mask, generator, **options))
    return torch.stack(steps, dim=1)
