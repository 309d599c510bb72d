"""The same parity checks on a CUDA device (run with `pytest -m gpu` where a GPU exists)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hovle import HoVLE
from hovle.quantize import quantize_int8

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ["hovle-tiny-internlm2", "hovle-tiny-llama", "hovle-tiny-hd"]


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 (on by default for cuDNN convolutions) is not fp32: keep the parity check exact."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("name", MODELS)
def test_cuda_fp32_parity(name):
    model = HoVLE.from_pretrained(FIXTURES / name, device="cuda")
    e = {k: v.cuda() for k, v in load_file(FIXTURES / name / "expected.safetensors").items()}
    with torch.no_grad():
        logits = model(e["input_ids"], e["pixel_values"], e["hd_input_ids"]).logits
    assert (logits - e["logits"]).abs().max() < 1e-4
    ids = model.generate(e["input_ids"], e["pixel_values"], e["hd_input_ids"], max_new_tokens=len(e["greedy"]))
    assert ids[0].tolist() == e["greedy"].tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_close(dtype):
    name = "hovle-tiny-internlm2"
    e = {k: v.cuda() for k, v in load_file(FIXTURES / name / "expected.safetensors").items()}
    model = HoVLE.from_pretrained(FIXTURES / name, dtype=dtype, device="cuda")
    with torch.no_grad():
        logits = model(e["input_ids"], e["pixel_values"]).logits.float()
        assert torch.nn.functional.cosine_similarity(logits.flatten(), e["logits"].flatten(), dim=0) > 0.999
        quantize_int8(model)
        q = model(e["input_ids"], e["pixel_values"]).logits.float()
    assert torch.nn.functional.cosine_similarity(q.flatten(), logits.flatten(), dim=0) > 0.999
