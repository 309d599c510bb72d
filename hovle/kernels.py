"""Decode kernels for CPUs (hovle/gemv.c), compiled once with the system C compiler and called via ctypes.

Decode multiplies one row per sequence by every weight, so it runs at the speed weights stream from
memory. gemv.c streams bf16 weights at about the machine's read bandwidth with less per-call overhead
than torch.mv, and int8 weights in ~55% of the bf16 time (PyTorch's own int8 GEMV is compute-bound and
no faster than bf16 here). For one sequence, `decode_stack` runs a whole decoder stack's step (norms, RoPE,
cache write, attention, SwiGLU and the GEMVs) in one call, so small models are not bound by PyTorch's
per-op dispatch (HoVLE-Tiny: 34 -> 73 tok/s). The library is built for the machine it runs on
(`-march=native`) into the cache dir, keyed by source and CPU flags, so a home folder shared between
machines is safe.

PyTorch's ops stay the reference and the fallback: on CPUs without AVX512-BF16 and AVX512-VNNI, without
a C compiler, for many rows (prefill; int8 weights are unpacked here for PyTorch's matmul), with
gradients, under torch.compile, or with HOVLE_KERNELS=0.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import threading
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
REQUIRED_CPU_FLAGS = {"avx512_bf16", "avx512_vnni"}
# Most rows (sequences in a decode batch) per call. Measured on 2 cores: past these, PyTorch's bf16 matmul (which
# reuses each weight load across rows) wins, and int8 beats dequantize-then-matmul up to 16 rows and beyond.
MAX_ROWS = {torch.bfloat16: 2, torch.int8: 16}
INT8_GROUP = 64  # input channels per int8 weight scale: the k's of one vpdpbusd (gemv.c's QBLOCK)


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # Linux


@functools.cache
def _madvise():
    """libc's madvise, or None off Linux."""
    if platform.system() != "Linux":
        return None
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU tensor backed by 2 MB transparent huge pages where the kernel allows them.

    Decode streams gigabytes of weights per token; on 4 kB pages each 4 kB costs a TLB miss and a page
    walk, which the prefetchers cannot hide. Measured on the int8 GEMV: +20-70% bandwidth on huge pages.
    Linux hands them out only to regions marked with madvise before first touch, and (in the common
    "madvise" mode) only then, so the storage is over-allocated by one page, aligned and marked here.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    madvise = _madvise()
    if nbytes < HUGE_PAGE or madvise is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -storage.data_ptr() % HUGE_PAGE
    madvise(storage.data_ptr() + start, (storage.numel() - start) // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)
    return storage[start:start + nbytes].view(dtype).view(shape)


def move_to_huge_pages(module: torch.nn.Module) -> None:
    """Give every large (>= 2 MB) CPU parameter and buffer of an unfilled module huge-page storage."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "cpu" and t.numel() * t.element_size() >= HUGE_PAGE:
                t.data = empty_on_huge_pages(tuple(t.shape), t.dtype)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively. CPUs without AVX512-BF16 or AMX emulate it: on a
    2-core AVX2 EPYC a bf16 GEMM ran at 1.2 GFLOP/s against fp32's 125, and bf16-mixed training 15x slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def _build(target: Path) -> None:
    """Compile gemv.c to `target` atomically (a concurrent process never sees a half-written library), and
    remove the builds of older sources (a process still using one keeps its mapped copy)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [os.environ.get("CC", "cc"), *FLAGS, str(SOURCE), "-o", str(out), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(out, target)
    for old in target.parent.glob("gemv-*.so"):
        if old != target:
            old.unlink(missing_ok=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they do not apply (see the module docstring)."""
    if os.environ.get("HOVLE_KERNELS", "1") == "0" or platform.machine() != "x86_64":
        return None
    flags = _cpu_flags()
    if not REQUIRED_CPU_FLAGS <= flags:
        return None
    from hovle.tiny.smollm2 import default_cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([*FLAGS, *sorted(flags)]).encode()).hexdigest()[:16]
    path = default_cache_dir() / "kernels" / f"gemv-{key}.so"
    if not path.exists():
        try:
            _build(path)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()[0]  # the compiler's first complaint
            warnings.warn(f"could not build the CPU decode kernels ({detail}); using PyTorch's", stacklevel=2)
            return None
    lib = ctypes.CDLL(str(path))
    ptrs, sizes = [ctypes.c_void_p] * 4, [ctypes.c_int64] * 3
    lib.gemv_bf16.argtypes, lib.gemv_bf16.restype = ptrs + sizes, None
    lib.gemv_int8.argtypes, lib.gemv_int8.restype = [ctypes.c_void_p] + ptrs + sizes, ctypes.c_int
    lib.unpack_int8_bf16.argtypes, lib.unpack_int8_bf16.restype = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2, None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.decode_stack.argtypes = [p, p, i64, p, i64, p, p, p, ctypes.c_float, p, p]
    lib.decode_stack.restype = ctypes.c_int
    return lib


def _applies(x: Tensor, weight: Tensor, K: int, max_rows: int) -> bool:
    """A few bf16 rows (decode) on the CPU, K % 64 == 0, no autograd, not being traced by torch.compile."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() <= max_rows * K and K % 64 == 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling() and library() is not None)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """x [..., K] @ weight[N, K].T + bias for bf16 weights, or None where the kernel does not apply."""
    N, K = weight.shape
    if not (weight.dtype == torch.bfloat16 and weight.is_contiguous() and (bias is None or bias.dtype == torch.bfloat16)
            and _applies(x, weight, K, MAX_ROWS[torch.bfloat16])):
        return None
    x2 = x.reshape(-1, K).contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.bfloat16)
    b = None if bias is None else bias.contiguous().data_ptr()
    library().gemv_bf16(weight.data_ptr(), b, x2.data_ptr(), y.data_ptr(), x2.shape[0], N, K)
    return y


def can_pack_int8(weight: Tensor) -> bool:
    """Whether linear_int8 will run for this [N, K] weight once quantized (so packing it pays off)."""
    return weight.device.type == "cpu" and weight.shape[1] % 64 == 0 and library() is not None


def pack_int8(weight: Tensor) -> Tensor:
    """[N, K] -> [ceil(N/4), K/64, 4, 64]: each block of four rows with their 64-byte chunks interleaved."""
    N, K = weight.shape
    padded = F.pad(weight, (0, 0, 0, -N % 4))  # zero rows up to a multiple of four
    packed = empty_on_huge_pages((padded.shape[0] // 4, K // 64, 4, 64), torch.int8)
    return packed.copy_(padded.view(-1, 4, K // 64, 64).transpose(1, 2))


def unpack_int8(packed: Tensor, out_features: int) -> Tensor:
    """The inverse of pack_int8: [N, K] int8."""
    blocks, chunks = packed.shape[:2]
    return packed.transpose(1, 2).reshape(4 * blocks, 64 * chunks)[:out_features]


_scratch = threading.local()
PREFILL_CHUNK_BYTES = 16 << 20  # bf16 weight rows unpacked at a time: stays in cache for the matmul


def prefill_int8(x2: Tensor, packed: Tensor, scales: Tensor, out_features: int) -> Tensor | None:
    """x2 [M, K] bf16 @ (int8 weight * scales).T for many rows (prefill), or None without the library.

    The dense bf16 matmul is fast for many rows, so the packed weight is dequantized to bf16, a cache-sized
    chunk of rows at a time into one reused buffer (a fresh full-size copy per call spent more time in
    page faults than in the matmul: 51 -> 18 ms for a 16384x2048 linear over 321 rows).
    """
    lib = library()
    if (lib is None or x2.dtype != torch.bfloat16 or x2.device.type != "cpu" or not _int8_scales_fit(scales, packed)
            or (torch.is_grad_enabled() and x2.requires_grad)):
        return None
    N, K = out_features, packed.shape[1] * 64
    rows = max(4, PREFILL_CHUNK_BYTES // (2 * K) // 4 * 4)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < rows * K:
        buf = _scratch.buf = torch.empty(rows * K, dtype=torch.bfloat16)
    y = torch.empty(x2.shape[0], N, dtype=torch.bfloat16)
    for n0 in range(0, N, rows):
        n = min(rows, N - n0)
        w = buf[:n * K].view(n, K)
        # n0 % 4 == 0: a block boundary of the packed weight
        lib.unpack_int8_bf16(packed.data_ptr() + n0 * K, scales[n0].data_ptr(), w.data_ptr(), n, K)
        y[:, n0:n0 + n] = F.linear(x2, w)
    return y


def _int8_scales_fit(scales: Tensor, packed: Tensor) -> bool:
    """fp32 scales [N, K / INT8_GROUP], contiguous, as the kernels read them (not cast by a model.to(dtype))."""
    return (scales.dtype == torch.float32 and scales.is_contiguous() and scales.dim() == 2
            and scales.shape[1] * INT8_GROUP == packed.shape[1] * 64)


def linear_int8(x: Tensor, packed: Tensor, scales: Tensor, bias: Tensor | None, out_features: int) -> Tensor | None:
    """x [..., K] @ (int8 weight * scales).T + bias, weight from pack_int8 and scales [N, K/64] fp32;
    None where it does not apply."""
    N, K = out_features, packed.shape[1] * 64
    if not (_int8_scales_fit(scales, packed) and (bias is None or bias.dtype == torch.bfloat16)
            and _applies(x, packed, K, MAX_ROWS[torch.int8])):
        return None
    x2 = x.reshape(-1, K).contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.bfloat16)
    b = None if bias is None else bias.contiguous().data_ptr()
    if library().gemv_int8(packed.data_ptr(), scales.data_ptr(), b, x2.data_ptr(), y.data_ptr(),
                           x2.shape[0], N, K):
        raise MemoryError("gemv_int8 could not allocate its quantized activations")
    return y


# ---- a whole decoder stack's decode step in one call ----------------------------------------------------------


class _StackPlan:
    """What decode_stack passes to C for one (decoder, cache) pair: every layer's weight and cache pointers,
    the dimensions and the work buffers, gathered once per generation rather than once per token."""

    def __init__(self, decoder: torch.nn.Module, cache):
        cfg, L = decoder.cfg, cache.max_len
        self.decoder = weakref.ref(decoder)
        self.tensors = []  # views of the memory the pointers name: kept alive even if a parameter's .data is swapped
        ptrs = []
        for i, layer in enumerate(decoder.layers):
            att, ff = layer.attention, layer.feed_forward
            tensors = [layer.attention_norm.weight, layer.ffn_norm.weight, cache.k[i, 0], cache.v[i, 0]]
            for lin in (att.wqkv, att.wo, ff.w13, ff.w2):  # (weight, int8 scales or None for bf16, bias)
                tensors += [lin.weight, getattr(lin, "scales", None), lin.bias]
            ptrs += [None if t is None else t.data_ptr() for t in tensors]
            self.tensors += [None if t is None else t.detach() for t in tensors]
        self.needs_grad = any(q.requires_grad for q in decoder.parameters())
        self.params = (ctypes.c_void_p * len(ptrs))(*ptrs)
        C, H, KVH, D, I = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        self.dims = (ctypes.c_int64 * 6)(C, H, KVH, D, I, L)
        self.scratch = torch.empty(H * L, dtype=torch.float32)
        self.buf = torch.empty(2 * C + (2 * H + 2 * KVH) * D + 3 * I, dtype=torch.bfloat16)
        self.eps = cfg.rms_norm_eps  # every RMSNorm of the stack


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KVCache -> _StackPlan


def stack_applies(decoder: torch.nn.Module, x: Tensor, cache) -> bool:
    """One bf16 token of one sequence on the CPU, layers of bf16 or packed int8 linears (not LoRA-wrapped), no autograd."""
    from hovle.model import Linear, RMSNorm
    from hovle.quantize import Int8Linear

    cfg = decoder.cfg
    if not (x.shape[:2] == (1, 1) and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and cache.k.dtype == torch.bfloat16 and cache.k.shape[:2] == (len(decoder.layers), 1)
            and cache.k.is_contiguous() and cache.v.is_contiguous() and not torch.compiler.is_compiling()
            and cfg.head_dim % 32 == 0 and cfg.head_dim <= 512 and cfg.hidden_size % 64 == 0
            and cfg.intermediate_size % 64 == 0 and library() is not None):
        return False
    grad = torch.is_grad_enabled()
    for layer in decoder.layers:
        att, ff = layer.attention, layer.feed_forward
        for lin in (att.wqkv, att.wo, ff.w13, ff.w2):
            bf16 = type(lin) is Linear and lin.weight.dtype == torch.bfloat16 and lin.weight.is_contiguous()
            int8 = type(lin) is Int8Linear and lin.packed and _int8_scales_fit(lin.scales, lin.weight)
            if not (bf16 or int8) or (lin.bias is not None and lin.bias.dtype != torch.bfloat16):
                return False
        for norm in (layer.attention_norm, layer.ffn_norm):
            if type(norm) is not RMSNorm or norm.weight.dtype != torch.bfloat16:
                return False
        if grad and any(q.requires_grad for q in layer.parameters()):
            return False
    return not (grad and x.requires_grad)


def decode_stack(decoder: torch.nn.Module, x: Tensor, cache, cos: Tensor, sin: Tensor) -> Tensor | None:
    """All of `decoder`'s layers for one new token x [1, 1, C] whose cache slot `cache.advance` has claimed
    (cos, sin: its RoPE row), in one C call; None where it does not apply (then the layers run one by one)."""
    if torch.compiler.is_compiling():  # traced graphs run PyTorch's ops (a ctypes call is opaque to them)
        return None
    plan = _PLANS.get(cache)
    if plan is None or (plan and plan.decoder() is not decoder):  # checked once per generation (False: does not apply)
        plan = _PLANS[cache] = stack_applies(decoder, x, cache) and _StackPlan(decoder, cache)
    if not plan or (torch.is_grad_enabled() and (x.requires_grad or plan.needs_grad)):
        return None
    slot = cache.pos - 1
    if cache.slots.numel() != 1 or not 0 <= slot < cache.max_len:
        raise ValueError(f"decode_stack needs a cache advanced by one token, got slots {cache.slots.tolist()}")
    y = x.to(torch.bfloat16, copy=True).contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    if library().decode_stack(y.data_ptr(), plan.params, len(decoder.layers), cache.valid.data_ptr(), slot,
                              cos.data_ptr(), sin.data_ptr(), plan.dims, plan.eps, plan.scratch.data_ptr(),
                              plan.buf.data_ptr()):
        raise MemoryError("decode_stack could not allocate its quantized activations")
    return y
