"""Weight-only int8: stays within 0.999 cosine of bf16 logits, and generation runs on it."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hovle import HoVLE, kernels
from hovle.quantize import Int8Linear, quantize_int8, quantize_weight

FIXTURE = Path(__file__).parent / "fixtures" / "hovle-tiny-internlm2"


@pytest.mark.parametrize("cpu_kernels", [True, False])  # per-group scales and our GEMV, or per-row and PyTorch's
def test_int8_close_to_bf16_and_generates(monkeypatch, cpu_kernels):
    if not cpu_kernels:
        monkeypatch.setattr(kernels, "library", lambda: None)
    e = load_file(FIXTURE / "expected.safetensors")
    model = HoVLE.from_pretrained(FIXTURE, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(e["input_ids"], e["pixel_values"]).logits.float()
        quantize_int8(model)
        got = model(e["input_ids"], e["pixel_values"]).logits.float()
    n_int8 = sum(isinstance(m, Int8Linear) for m in model.modules())
    assert n_int8 == 4 * 4 + 1  # 4 linears x (2 + 2) layers + the LLM head
    assert model.language_model.output.weight.dtype == torch.int8
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min() > 0.999
    ids = model.generate(e["input_ids"], e["pixel_values"], max_new_tokens=4)
    assert ids.shape == (1, 4)


def test_int8_linear_matches_dequantized_weights():
    lin = torch.nn.Linear(128, 32, bias=True).to(torch.bfloat16)
    q = Int8Linear(lin)
    # with the CPU kernels a scale per row and 64 inputs, else per row (PyTorch's int8 GEMV)
    assert q.scales.shape == (32, 2 if q.packed else 1) and q.scales.dtype == torch.float32
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    deq = q.dequantized(torch.float32)
    expected = x.float() @ deq.t() + lin.bias.float()
    assert (q(x).float() - expected).abs().max() < 0.05


def test_weight_scales_are_per_row_and_group_of_64():
    w = torch.randn(48, 192)
    w[3, 5] = 12.0  # an outlier coarsens its own group of 64 only
    q, scales = quantize_weight(w, 64)
    assert q.dtype == torch.int8 and scales.shape == (48, 3)
    deq = q.float().view(48, 3, 64) * scales[..., None]
    assert ((deq - w.view(48, 3, 64)).abs() <= scales[..., None] / 2 * (1 + 1e-5)).all()  # half a step
    assert scales[3, 0] == pytest.approx(12.0 / 127) and scales[3, 1] < 5.0 / 127
