"""int8 weights for the decoder linears (both parts) and the LLM head.

Decode reads every weight once per token, so it is bound by memory bandwidth: int8 weights halve the
bytes read compared with bf16. Scales are fp32, symmetric, one per output row and group of 64 input
channels where hovle.kernels runs. Decode rows there run its VNNI GEMV, which also quantizes the activations,
per group of 4; prefill dequantizes the weight to bf16 chunk by chunk for the dense matmul. Elsewhere
(other CPUs, CUDA) scales are per row and decode rows take PyTorch's fused int8 GEMV, which keeps
activations in bf16 (about as fast as bf16: it is compute-bound); prefill dequantizes and uses the matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hovle import kernels


def quantize_weight(weight: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """[N, K] -> (int8 [N, K], fp32 scales [N, K / group]): symmetric, absmax / 127 per row and group.

    Groups of 64 rather than whole rows: with the weight rounding alone, SmolLM2 prose logits keep cosine
    0.9990 to bf16 instead of 0.9986 (benchmarks/int8_accuracy.py measures the whole int8 path).
    (Searching a clipping ratio below absmax never lowered the rounding error with fp32 scales.)
    """
    N, K = weight.shape
    w = weight.float().view(N, K // group, group)
    scales = w.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127  # [N, K / group, 1]
    q = torch.round(w / scales).clamp(-127, 127).to(torch.int8)
    return q.view(N, K), scales.view(N, K // group)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        # Where hovle.kernels' int8 GEMV runs: scales per group of 64, and the weight in its packed layout only.
        # Elsewhere per row, which PyTorch's fused int8 GEMV takes.
        self.packed = kernels.can_pack_int8(linear.weight)
        K = linear.in_features
        self.group = kernels.INT8_GROUP if self.packed else K
        q, scales = quantize_weight(linear.weight.detach(), self.group)
        self.register_buffer("weight", kernels.pack_int8(q) if self.packed else q)
        self.register_buffer("scales", scales)  # [out, in / group] fp32
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def int8_weight(self) -> Tensor:
        """[out, in] int8 (a copy when packed)."""
        return kernels.unpack_int8(self.weight, self.out_features) if self.packed else self.weight

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """[out, in] in `dtype`: what the int8 weight and its scales stand for."""
        w = self.int8_weight().float().view(self.out_features, -1, self.group) * self.scales[..., None]
        return w.view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.packed:  # hovle.kernels' int8 GEMV for decode rows
            y = kernels.linear_int8(x, self.weight, self.scales, self.bias, self.out_features)
            if y is not None:
                return y
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = kernels.prefill_int8(x2, self.weight, self.scales, self.out_features) if self.packed else None
        if y is None and x2.shape[0] <= 4 and x.dtype in (torch.bfloat16, torch.float16) and not self.packed:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales.view(-1).to(x.dtype))  # decode rows
        if y is None:  # prefill is compute-bound: dequantize once and use the fast dense matmul
            y = F.linear(x2, self.dequantized(x.dtype))
        y = y.view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace, in place, every linear of the decoder layers and the LLM output head by an Int8Linear."""
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and (name in ("wqkv", "wo", "w13", "w2", "output"))]
    for parent, name in targets:
        setattr(parent, name, Int8Linear(getattr(parent, name)))
    return model
