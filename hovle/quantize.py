"""int8 weights for the decoder linears (both parts) and the LLM head.

Decode reads every weight once per token, so it is bound by memory bandwidth: int8 weights halve the
bytes read compared with bf16. Scales are per output channel (symmetric, absmax / 127). Decode rows on
CPUs with hovle.kernels run its VNNI GEMV, which also quantizes the activations, per group of 4 (SmolLM2
decode logits: cosine 0.999 to bf16 on a random prompt, 0.998 on prose), and prefill unpacks the weight
to bf16 chunk by chunk for the dense matmul. Elsewhere activations stay in the model's dtype (PyTorch's
fused int8 GEMV for decode rows, dequantize-then-matmul for prefill).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hovle import kernels


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # [out, in]
        # Round the scales to the compute dtype first, so the int8 rounding uses the scale the kernel applies.
        scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(linear.weight.dtype)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        # Where hovle.kernels' int8 GEMV runs, keep the weight in its packed layout only (no second copy).
        self.packed = kernels.can_pack_int8(q)
        self.register_buffer("weight", kernels.pack_int8(q) if self.packed else q)
        self.register_buffer("scales", scales)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def int8_weight(self) -> Tensor:
        """[out, in] int8 (a copy when packed)."""
        return kernels.unpack_int8(self.weight, self.out_features) if self.packed else self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.packed:  # hovle.kernels' int8 GEMV for decode rows
            y = kernels.linear_int8(x, self.weight, self.scales, self.bias, self.out_features)
            if y is not None:
                return y
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = kernels.prefill_int8(x2, self.weight, self.scales, self.out_features) if self.packed else None
        if y is None and x2.shape[0] <= 4 and x.dtype in (torch.bfloat16, torch.float16) and not self.packed:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)  # fused dequant-GEMV (decode)
        if y is None:  # prefill is compute-bound: dequantize once and use the fast dense matmul
            y = F.linear(x2, self.int8_weight().to(x.dtype)) * self.scales
        y = y.view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace, in place, every linear of the decoder layers and the LLM output head by an Int8Linear."""
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and (name in ("wqkv", "wo", "w13", "w2", "output"))]
    for parent, name in targets:
        setattr(parent, name, Int8Linear(getattr(parent, name)))
    return model
