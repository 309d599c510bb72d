"""Inference benchmark: every figure next to this machine's ceiling, measured in the same run.

    python benchmarks/bench.py --random hovle-2.6b --dtype bf16            # official architecture, random weights
    python benchmarks/bench.py --model path/to/HoVLE --dtype bf16 --quantize int8

Ceilings: decode is bound by memory bandwidth (every weight is read once per token), so its ceiling is
measured read bandwidth / bytes read per token; prefill is bound by matmul throughput, so its ceiling
is measured matmul FLOP/s / model FLOPs per token. The baseline is what the official code does: no KV
cache, the whole sequence recomputed for every new token.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hovle import HoVLE, HoVLEConfig, kernels, load_image  # noqa: E402
from hovle.generation import stream_generate  # noqa: E402
from hovle.quantize import quantize_int8  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device, repeats: int) -> float:
    """Fastest of `repeats` timed calls after one warm-up (the least disturbed measurement)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def measure_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Read bandwidth in bytes/s: a reduction over a buffer far larger than the caches (on CPU, on huge
    pages like the model's weights, so the ceiling is not lowered by TLB misses the model does not pay)."""
    if device.type == "cpu":
        x = kernels.empty_on_huge_pages((nbytes // 4,), torch.float32).fill_(1.0)
    else:
        x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / best_time(lambda: x.sum(), device, 5)


def measure_matmul(dtype, device, m: int = 512, k: int = 2048, n: int = 8192) -> float:
    """FLOP/s of a prefill-shaped matmul in the model's dtype."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(n, k, dtype=dtype, device=device)
    return 2 * m * k * n / best_time(lambda: torch.nn.functional.linear(a, b), device, 5)


def matmul_params(model: HoVLE) -> tuple[int, int]:
    """(weights every token multiplies through, bytes of everything decode reads per token except the cache)."""
    layers = [*model.embedding_model.encoder.layers, *model.language_model.decoder.layers]
    per_token = [t for l in layers for t in (*l.parameters(), *l.buffers())]
    per_token += [*model.language_model.output.parameters(), *model.language_model.output.buffers(),
                  model.language_model.norm.weight]
    n_mult = sum(t.numel() for t in per_token if t.dim() >= 2)  # int8 weights may be packed 4-d
    return n_mult, sum(t.numel() * t.element_size() for t in per_token)


def attention_flops(cfg, context: int) -> int:
    """FLOPs per token of QK^T and AV over `context` keys, summed over both parts' layers."""
    return sum(4 * d.num_layers * d.num_heads * d.head_dim * context for d in (cfg.embedding, cfg.llm))


def kv_bytes(cfg, context: int, elem: int) -> int:
    return sum(2 * d.num_layers * d.num_kv_heads * d.head_dim * context * elem for d in (cfg.embedding, cfg.llm))


def build_prompt(model: HoVLE, tiles: int, text_tokens: int, seed: int = 0) -> torch.Tensor:
    """A chat-shaped prompt: text ids around <img> + tiles x num_image_token <IMG_CONTEXT> + </img>."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, min(cfg.llm.vocab_size, cfg.embedding.llm_vocab_size) - 16, (text_tokens,), generator=g)
    ctx = torch.full((tiles * cfg.num_image_token,), cfg.embedding.img_context_token_id)
    half = text_tokens // 2
    return torch.cat([torch.tensor([1]), text[:half], ctx, text[half:]])[None]


def preprocess_time(tile_size: int) -> tuple[float, int]:
    """Seconds to load_image a 1280x960 photo-sized image with the default 12-tile budget, and its tiles."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (960, 1280, 3), dtype=np.uint8))
    pv = load_image(img, input_size=tile_size)
    t = time.perf_counter()
    for _ in range(3):
        load_image(img, input_size=tile_size)
    return (time.perf_counter() - t) / 3, pv.shape[0]


def decode_run(model, ids, pixel_values, new_tokens: int, device, **options) -> tuple[float, float]:
    """(time to first token incl. prefill, decode tokens/s after the first) for one greedy generation."""
    sync(device)
    t0 = time.perf_counter()
    stamps = []
    for _ in stream_generate(model, ids, pixel_values, max_new_tokens=new_tokens, **options):
        sync(device)
        stamps.append(time.perf_counter())
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])


@torch.inference_mode()
def decode_logits(model, ids, pixel_values, steps: int = 8) -> torch.Tensor:
    """[1 + steps, vocab] fp32 logits: the prompt's last position, then cached steps fed fixed tokens (ids[0, 1:])."""
    cache = model.new_cache(1, ids.shape[1] + steps)
    logits = [model.step(ids, cache, pixel_values)]
    for i in range(steps):
        logits.append(model.step(ids[:, 1 + i:2 + i], cache))
    return torch.cat(logits).float()


@torch.inference_mode()
def recompute_tokens_per_s(model, ids, pixel_values, steps: int, device) -> float:
    """The official generation loop: a full forward of the whole sequence for each new token."""
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        nxt = model(ids, pixel_values).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    sync(device)
    return steps / (time.perf_counter() - t)


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def row(name: str, value: float, unit: str, ceiling: float | None = None) -> None:
    frac = f"   {value / ceiling:6.1%} of ceiling {ceiling:,.1f} {unit}" if ceiling else ""
    print(f"{name:34s} {value:12,.2f} {unit:10s}{frac}")


def decode_path(model: HoVLE, device: torch.device) -> str:
    """Which code runs a CPU decode step: one C call per decoder stack, C GEMVs under PyTorch's other ops, or PyTorch."""
    if device.type != "cpu" or kernels.library() is None:
        return "torch"
    with torch.inference_mode():
        x = torch.zeros(1, 1, model.config.llm.hidden_size, dtype=model.dtype)
        fused = kernels.stack_applies(model.language_model.decoder, x, model.new_cache(1, 1).llm)
    return "hovle fused stack (C)" if fused else "hovle GEMVs (C) + torch"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder")
    src.add_argument("--random", help="config preset (tiny, hovle-2.6b) or config.json, random weights")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quantize", choices=["int8"], help="weight-only int8 for decoder linears and the head")
    p.add_argument("--tiles", type=int, default=1, help="image tiles in the prompt (default 1)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens around the image (default 64)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--baseline-steps", type=int, default=8,
                   help="new tokens timed for the no-cache baseline (it only gets slower with length)")
    p.add_argument("--batch", type=int, default=4, help="batch size for the batched-decode comparison (0: skip)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    t = time.perf_counter()
    if args.model:
        model = HoVLE.from_pretrained(args.model, dtype=dtype, device=device)
    else:
        cfg = HoVLEConfig.from_name(args.random) if not args.random.endswith(".json") else HoVLEConfig.from_json(args.random)
        model = HoVLE.from_config(cfg, dtype=dtype, device=device)
    load_s = time.perf_counter() - t
    n_params = model.num_parameters()
    reference = None
    if args.quantize:
        ids = build_prompt(model, args.tiles, args.text_tokens).to(device)
        pv = torch.randn(args.tiles, 3, model.config.tile_size, model.config.tile_size,
                         generator=torch.Generator().manual_seed(0)).to(device, dtype)
        reference = decode_logits(model, ids, pv)
        with torch.inference_mode():  # the unquantized decode speed, for a same-run comparison
            unquantized_tps = decode_run(model, ids, pv, args.new_tokens, device)[1]
        # random weights: random text ids stand in for the calibration text (same code path as the CLI)
        quantize_int8(model, torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0)).to(device))
    cfg = model.config
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}   torch {torch.__version__}   dtype {args.dtype}   quantize {args.quantize or 'none'}   "
          f"compile {args.compile}   cuda graph {device.type == 'cuda' and not args.no_cuda_graph}   "
          f"decode {decode_path(model, device)}")
    print(f"model: {args.model or args.random}, {n_params / 1e9:.3f}B parameters, built/loaded in {load_s:.1f} s")

    bandwidth = measure_bandwidth(device)
    flops = measure_matmul(dtype, device)
    print(f"measured: memory read {bandwidth / 1e9:.1f} GB/s, {args.dtype} matmul {flops / 1e9:,.0f} GFLOP/s\n")

    pre_s, pre_tiles = preprocess_time(cfg.tile_size)
    ids = build_prompt(model, args.tiles, args.text_tokens).to(device)
    pv = torch.randn(args.tiles, 3, cfg.tile_size, cfg.tile_size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    T = ids.shape[1]
    n_mult, weight_bytes = matmul_params(model)

    with torch.inference_mode():
        if reference is not None:
            got = decode_logits(model, ids, pv)
            cos = torch.nn.functional.cosine_similarity(got, reference, dim=-1).min().item()
            print(f"int8 vs {args.dtype} logits: min cosine {cos:.5f} over the prompt's last position and 8 decode steps\n")
        prefill_s = statistics.median(
            best_time(lambda: model.step(ids, model.new_cache(1, T)), device, 1) for _ in range(3))
        options = dict(compile=args.compile, cuda_graph=not args.no_cuda_graph)
        if args.compile:  # compile outside the timed run (the first step of a new shape compiles)
            decode_run(model, ids, pv, args.new_tokens, device, **options)
        ttft, decode_tps = decode_run(model, ids, pv, args.new_tokens, device, **options)

    ctx_avg = T + args.new_tokens // 2
    prefill_flops_per_token = 2 * n_mult + attention_flops(cfg, T // 2)
    decode_bytes = weight_bytes + kv_bytes(cfg, ctx_avg, model.dtype.itemsize)
    row("preprocess (1280x960 image)", pre_s * 1e3, "ms")
    print(f"{'':34s} ({pre_tiles} tiles of {cfg.tile_size} px)")
    row(f"prefill ({T} tokens)", T / prefill_s, "tok/s", flops / prefill_flops_per_token)
    row("time to first token", ttft * 1e3, "ms")
    row(f"decode ({args.new_tokens} new tokens)", decode_tps, "tok/s", bandwidth / decode_bytes)
    print(f"{'':34s} ({decode_bytes / 1e9:.2f} GB read per token)")
    if args.quantize:
        print(f"{'':34s} {decode_tps / unquantized_tps:.2f}x the {args.dtype} decode measured in this run "
              f"({unquantized_tps:.2f} tok/s)")

    if args.baseline_steps:
        base = recompute_tokens_per_s(model, ids, pv, args.baseline_steps, device)
        row(f"no-cache baseline ({args.baseline_steps} tokens)", base, "tok/s")
        full = args.new_tokens / (args.new_tokens / decode_tps + ttft)
        print(f"{'':34s} ours {full:.2f} tok/s over all {args.new_tokens} tokens incl. prefill = "
              f"{full / base:.1f}x the baseline's first {args.baseline_steps} (which only slow down with length)")

    if args.batch > 1:
        with torch.inference_mode():
            batch_ids, batch_pv = ids.repeat(args.batch, 1), pv.repeat(args.batch, 1, 1, 1)
            t = time.perf_counter()
            list(stream_generate(model, batch_ids, batch_pv, max_new_tokens=32))
            sync(device)
            per_reply_batched = (time.perf_counter() - t) / args.batch
            t = time.perf_counter()
            list(stream_generate(model, ids, pv, max_new_tokens=32))
            sync(device)
            per_reply_single = time.perf_counter() - t
        print(f"batched generation, 32 tokens: {per_reply_batched:.2f} s per reply at batch {args.batch} vs "
              f"{per_reply_single:.2f} s alone ({per_reply_single / per_reply_batched:.2f}x)")
    row("peak memory", peak_memory_gib(device), "GiB")


if __name__ == "__main__":
    main()
