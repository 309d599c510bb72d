"""Weight-only int8: stays within 0.999 cosine of bf16 logits, and generation runs on it."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from hovle import HoVLE
from hovle.quantize import Int8Linear, quantize_int8

FIXTURE = Path(__file__).parent / "fixtures" / "hovle-tiny-internlm2"


def test_int8_close_to_bf16_and_generates():
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
    lin = torch.nn.Linear(64, 32, bias=True).to(torch.bfloat16)
    q = Int8Linear(lin)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    deq = q.int8_weight().float() * q.scales.float()[:, None]
    expected = x.float() @ deq.t() + lin.bias.float()
    assert (q(x).float() - expected).abs().max() < 0.05
    assert ((deq - lin.weight.float()).abs() <= q.scales.float()[:, None] / 2 * (1 + 1e-3)).all()  # half a step
