"""Weight-only int8: stays within 0.999 cosine of bf16 logits, and generation runs on it."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hovle import HoVLE, kernels
from hovle.quantize import Int8Linear, quantize_int8, quantize_weight, smooth

FIXTURE = Path(__file__).parent / "fixtures" / "hovle-tiny-internlm2"
CALIBRATION = torch.randint(3, 1000, (1, 48), generator=torch.Generator().manual_seed(0))  # text ids


def test_smoothing_keeps_the_function_and_rescales_the_weights():
    e = load_file(FIXTURE / "expected.safetensors")
    model = HoVLE.from_pretrained(FIXTURE, dtype=torch.float32)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = model(e["input_ids"], e["pixel_values"]).logits
        smooth(model, CALIBRATION)
        got = model(e["input_ids"], e["pixel_values"]).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for part in ("embedding_model", "language_model"):
        for i in range(2):
            for name in ("attention_norm.weight", "ffn_norm.weight", "attention.wqkv.weight",
                         "feed_forward.w13.weight", "feed_forward.w2.weight"):
                assert any(n.startswith(part) and n.endswith(f"layers.{i}.{name}") for n in changed), (part, i, name)
    assert not any(n.endswith(("wo.weight", "output.weight")) for n in changed)


@pytest.mark.parametrize("cpu_kernels", [True, False])  # per-group scales and our GEMV, or per-row and PyTorch's
def test_int8_close_to_bf16_and_generates(monkeypatch, cpu_kernels):
    if not cpu_kernels:
        monkeypatch.setattr(kernels, "library", lambda: None)
    e = load_file(FIXTURE / "expected.safetensors")
    model = HoVLE.from_pretrained(FIXTURE, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(e["input_ids"], e["pixel_values"]).logits.float()
        quantize_int8(model, CALIBRATION)  # as --quantize int8 does
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
