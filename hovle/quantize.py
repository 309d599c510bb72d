"""int8 weights for the decoder linears (both parts) and the LLM head.

Decode reads every weight once per token, so it is bound by memory bandwidth: int8 weights halve the
bytes read compared with bf16. Scales are fp32, symmetric, one per output row and group of 64 input
channels where hovle.kernels runs. Decode rows there run its VNNI GEMV, which also quantizes the activations,
per group of 4; prefill dequantizes the weight to bf16 chunk by chunk for the dense matmul. Elsewhere
(other CPUs, CUDA) scales are per row and decode rows take PyTorch's fused int8 GEMV, which keeps
activations in bf16 (about as fast as bf16: it is compute-bound); prefill dequantizes and uses the matmul.

Before rounding, `smooth` rescales each linear's input channels by their measured activation size (folded
into the RMSNorm or linear in front, so the model computes the same function): channels that carry large
activations get finer weight steps. On SmolLM2 prose this takes the int8 logits from cosine 0.9989 to 0.9993
of bf16 (benchmarks/int8_accuracy.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hovle import kernels
from hovle.model import DecoderLayer

# Plain English for the activation statistics of `smooth` (written for this file; no benchmark text).
CALIBRATION_TEXT = (
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to make food "
    "from carbon dioxide and water. It takes place mainly in the leaves, whose cells hold chloroplasts, and it "
    "releases oxygen. Most life on Earth depends on it, directly or indirectly, for energy and for the air. "
    "Q: How many legs does a spider have? A: Eight. The meeting moved to Tuesday at 3 pm; bring the report.")
SMOOTH_ALPHA = 0.3  # input channel c of a linear is scaled by mean|x_c| ** alpha (0: no smoothing)


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


@torch.no_grad()
def activation_sizes(model: nn.Module, input_ids: Tensor) -> dict[nn.Linear, Tensor]:
    """Mean |x| per input channel [in] (fp32) of every decoder layer's wqkv, w13 and w2, over one text forward."""
    sizes: dict[nn.Linear, Tensor] = {}
    hooks = []
    for layer in model.modules():
        if isinstance(layer, DecoderLayer):
            for lin in (layer.attention.wqkv, layer.feed_forward.w13, layer.feed_forward.w2):
                def record(mod, inputs, output):
                    sizes[mod] = inputs[0].detach().float().abs().reshape(-1, mod.in_features).mean(0)
                hooks.append(lin.register_forward_hook(record))
    try:
        model(input_ids.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _scales(size: Tensor, alpha: float) -> Tensor:
    """[in] channel factors, size ** alpha, centred so that their geometric mean of extremes is 1."""
    s = size.clamp(min=1e-5) ** alpha
    return s / (s.max() * s.min()).sqrt()


def _scale_(t: Tensor, factor: Tensor) -> None:
    t.copy_((t.float() * factor).to(t.dtype))


@torch.no_grad()
def smooth(model: nn.Module, input_ids: Tensor, alpha: float = SMOOTH_ALPHA) -> nn.Module:
    """Rescale, in place, the input channels of each decoder layer's wqkv, w13 and w2 by s = mean|x| ** alpha
    (measured on `input_ids` [1, T]), and divide the producer of those inputs by s: the attention / FFN
    RMSNorm weight, and for w2 the up-projection rows of w13 (w2's input is silu(gate) * up). The function is
    unchanged up to rounding; the weights then round to int8 with finer steps where activations are large."""
    sizes = activation_sizes(model, input_ids)
    for layer in model.modules():
        if not isinstance(layer, DecoderLayer):
            continue
        ff = layer.feed_forward
        for lin, norm in ((layer.attention.wqkv, layer.attention_norm), (ff.w13, layer.ffn_norm)):
            s = _scales(sizes[lin], alpha)
            _scale_(lin.weight, s)
            _scale_(norm.weight, 1 / s)
        s = _scales(sizes[ff.w2], alpha)
        _scale_(ff.w2.weight, s)
        up = ff.w13.weight[ff.intermediate_size:]  # [I, hidden], a view
        _scale_(up, 1 / s[:, None])
        if ff.w13.bias is not None:
            _scale_(ff.w13.bias[ff.intermediate_size:], 1 / s)
    return model


def quantize_int8(model: nn.Module, calibration_ids: Tensor | None = None) -> nn.Module:
    """Replace, in place, every linear of the decoder layers and the LLM output head by an Int8Linear, after
    `smooth` on `calibration_ids` [1, T] (text token ids, e.g. `calibration_ids(tokenizer)`) when given."""
    if calibration_ids is not None:
        smooth(model, calibration_ids)
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and (name in ("wqkv", "wo", "w13", "w2", "output"))]
    for parent, name in targets:
        setattr(parent, name, Int8Linear(getattr(parent, name)))
    return model


def calibration_ids(tokenizer) -> Tensor:
    """[1, T] ids of CALIBRATION_TEXT, the input `quantize_int8` measures activation sizes on."""
    return torch.tensor([tokenizer.encode(CALIBRATION_TEXT)])
