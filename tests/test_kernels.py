"""The CPU decode kernels (hovle/gemv.c) against PyTorch: single linears, then whole cached decode steps."""

import dataclasses
import platform

import pytest
import torch
import torch.nn.functional as F

from hovle import HoVLE, HoVLEConfig, kernels
from hovle.quantize import Int8Linear, quantize_int8, quantize_weight

needs_kernels = pytest.mark.skipif(kernels.library() is None,
                                   reason="no AVX512-BF16/VNNI CPU or no C compiler: PyTorch's kernels are used")


def relative_error(got, expected):
    return ((got.float() - expected).norm() / expected.norm()).item()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("out_features", [4, 7, 130])  # 7 and 130: a partial last block of four rows
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_kernel_matches_fp32_matmul(rows, out_features, bias):
    g = torch.Generator().manual_seed(out_features + rows)
    w = torch.randn(out_features, 576, generator=g).bfloat16()
    b = torch.randn(out_features, generator=g).bfloat16() if bias else None
    x = torch.randn(rows, 1, 576, generator=g).bfloat16()
    got = kernels.linear(x, w, b)
    assert got is not None and got.shape == (rows, 1, out_features) and got.dtype == torch.bfloat16
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert relative_error(got, expected) < 4e-3  # bf16 output rounding is 2e-3 at most
    assert relative_error(got, expected) < 2 * relative_error(F.linear(x, w, b), expected) + 1e-3


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_kernel_matches_dequantized_matmul(rows, bias):
    lin = torch.nn.Linear(1024, 130, bias=bias).bfloat16()
    q = Int8Linear(lin)
    x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(rows)).bfloat16()
    assert q.packed and q.weight.shape == (33, 16, 4, 64)  # 130 rows padded to 132
    plain, _ = quantize_weight(lin.weight, 64)
    assert torch.equal(q.int8_weight(), plain)  # unpack_int8 inverts pack_int8
    got = kernels.linear_int8(x, q.weight, q.scales, q.bias, 130)
    assert got is not None and got.shape == (rows, 130)
    deq = q.dequantized(torch.float32)
    expected = F.linear(x.float(), deq, None if lin.bias is None else lin.bias.float())
    # Activations are quantized in groups of 4 (absmax / 127): ~0.35% error, near a bf16 matmul's ~0.23%.
    assert relative_error(got, expected) < 5e-3


@needs_kernels
def test_kernel_declines_what_it_does_not_cover():
    w = torch.randn(8, 128).bfloat16()
    x = torch.randn(1, 128).bfloat16()
    assert kernels.linear(x.float(), w.float(), None) is None  # fp32
    assert kernels.linear(torch.randn(1, 96).bfloat16(), torch.randn(8, 96).bfloat16(), None) is None  # K % 64
    assert kernels.linear(torch.randn(3, 128).bfloat16(), w, None) is None  # more bf16 rows than MAX_ROWS
    assert kernels.linear(x, w.t().contiguous().t(), None) is None  # not contiguous
    assert kernels.linear(x, w.requires_grad_(), None) is None  # autograd needs PyTorch's op


@needs_kernels
def test_cached_decode_with_kernels_matches_pytorch(monkeypatch):
    """Greedy decode of the random tiny bf16 model (width 64: every linear but w2 takes the kernels)."""
    model = HoVLE.from_config(HoVLEConfig.from_name("tiny"), dtype=torch.bfloat16, seed=0)
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))

    def decode(model):
        with torch.inference_mode():
            cache = model.new_cache(1, 32)
            logits = [model.step(ids, cache)]
            for _ in range(6):
                logits.append(model.step(logits[-1].argmax(-1, keepdim=True), cache))
        return torch.stack(logits).float()

    fast = decode(model)
    monkeypatch.setattr(kernels, "library", lambda: None)
    reference = decode(model)
    assert F.cosine_similarity(fast, reference, dim=-1).min() > 0.999
    quantize_int8(model)
    int8_reference = decode(model)
    monkeypatch.undo()
    assert F.cosine_similarity(decode(model), int8_reference, dim=-1).min() > 0.999


@needs_kernels
def test_fused_decode_stack_matches_the_layers(monkeypatch):
    """A whole stack's decode step in one C call (head_dim 32, 4 query heads per KV head, q/k/v biases, a
    left-padded prompt) against the layer-by-layer bf16 path and an fp32 reference: no further from fp32 than
    the layers, and used for both stacks each step."""
    dims = dict(num_layers=2, hidden_size=256, num_heads=8, num_kv_heads=2, intermediate_size=320, qkv_bias=True)
    tiny = HoVLEConfig.from_name("tiny")
    cfg = dataclasses.replace(tiny, embedding=dataclasses.replace(tiny.embedding, **dims),
                              llm=dataclasses.replace(tiny.llm, **dims))
    model = HoVLE.from_config(cfg, dtype=torch.bfloat16, seed=0)
    with torch.no_grad():  # biases and norm weights away from their zero / one init, so each one matters
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))).bfloat16() * 0.1)
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    left_padded = torch.tensor([[0] * 3 + [1] * 9])  # the padded slots must stay unseen by every decode step
    fused_calls = []
    fused = kernels.decode_stack

    def counting(*args):
        y = fused(*args)
        fused_calls.append(y is not None)
        return y

    def decode(model):
        with torch.inference_mode():
            cache = model.new_cache(1, 40)
            logits = [model.step(ids, cache, attention_mask=left_padded)]
            for t in range(20):  # fixed tokens: both paths see the same inputs
                logits.append(model.step(torch.tensor([[7 + 13 * t]]), cache))
        return torch.stack(logits).float()

    monkeypatch.setattr(kernels, "decode_stack", counting)
    got = decode(model)
    assert fused_calls == [True] * 40  # 20 steps x (embedding module, LLM)
    monkeypatch.setattr(kernels, "decode_stack", lambda *args: None)
    layers = decode(model)
    reference = decode(model.float())
    assert torch.equal(got[0], layers[0])  # the prompt does not take the fused path
    err, layers_err = relative_error(got[1:], reference[1:]), relative_error(layers[1:], reference[1:])
    assert err < 1.5 * layers_err + 1e-3, (err, layers_err)
    quantize_int8(model.bfloat16())  # int8 linears in the same C call: as the int8 layers one by one
    int8_layers = decode(model)
    monkeypatch.setattr(kernels, "decode_stack", counting)
    int8_fused = decode(model)
    assert fused_calls == [True] * 80
    assert F.cosine_similarity(int8_fused, int8_layers, dim=-1).min() > 0.9999


@needs_kernels
def test_fused_decode_stack_declines_what_it_does_not_cover():
    cfg = HoVLEConfig.from_name("tiny").with_llm(num_heads=2, num_kv_heads=1, intermediate_size=192)  # head_dim 32
    model = HoVLE.from_config(cfg, dtype=torch.bfloat16, seed=0)
    decoder, x = model.language_model.decoder, torch.randn(1, 1, 64).bfloat16()

    def applies(model, x, batch=1):
        with torch.no_grad():
            return kernels.stack_applies(model.language_model.decoder, x, model.new_cache(batch, 8).llm)

    assert applies(model, x)
    assert not kernels.stack_applies(decoder, x, model.new_cache(1, 8).llm)  # autograd runs the layers
    assert not applies(model, x, batch=2)  # one sequence only
    assert not applies(model, torch.randn(1, 2, 64).bfloat16())  # one token only
    assert not applies(model, x.float())
    decoder.layers[1].feed_forward.w2 = Int8Linear(decoder.layers[1].feed_forward.w2)
    assert applies(model, x)  # packed int8 linears too
    decoder.layers[0].attention.wo = torch.nn.Linear(64, 64).bfloat16()  # e.g. a LoRA wrapper: unknown to C
    assert not applies(model, x)
    assert not applies(HoVLE.from_config(HoVLEConfig.from_name("tiny"), dtype=torch.bfloat16), x)  # head_dim 16


@needs_kernels
def test_build_failure_falls_back_to_pytorch_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("HOVLE_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    kernels.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not build the CPU decode kernels"):
            assert kernels.library() is None
        x, w = torch.randn(1, 64).bfloat16(), torch.randn(8, 64).bfloat16()
        assert kernels.linear(x, w, None) is None
        monkeypatch.delenv("CC")
        kernels.library.cache_clear()
        assert kernels.library() is not None  # builds into the empty cache dir
        assert list((tmp_path / "kernels").glob("gemv-*.so"))
        monkeypatch.setenv("HOVLE_KERNELS", "0")
        kernels.library.cache_clear()
        assert kernels.library() is None
    finally:
        kernels.library.cache_clear()


@pytest.mark.skipif(platform.system() != "Linux", reason="huge pages are a Linux feature")
def test_large_weights_are_placed_for_huge_pages():
    t = kernels.empty_on_huge_pages((3, kernels.HUGE_PAGE), torch.bfloat16)
    assert t.shape == (3, kernels.HUGE_PAGE) and t.is_contiguous() and t.data_ptr() % kernels.HUGE_PAGE == 0
    t.fill_(1.5)
    assert t.sum().item() == 1.5 * t.numel()
    cfg = HoVLEConfig.from_name("tiny").with_llm(vocab_size=16384)  # a 2 MB head (bf16)
    model = HoVLE.from_config(cfg, dtype=torch.bfloat16)
    head = model.language_model.output.weight
    assert head.data_ptr() % kernels.HUGE_PAGE == 0 and head.std().item() == pytest.approx(0.02, rel=0.05)


@needs_kernels
@pytest.mark.parametrize("chunk_rows", [4, 64, 4096])  # several chunks with a partial last one, and one chunk
def test_int8_prefill_matches_dequantized_matmul(monkeypatch, chunk_rows):
    monkeypatch.setattr(kernels, "PREFILL_CHUNK_BYTES", chunk_rows * 2 * 1024)
    lin = torch.nn.Linear(1024, 130, bias=True).bfloat16()
    q = Int8Linear(lin)
    x = torch.randn(2, 20, 1024, generator=torch.Generator().manual_seed(chunk_rows)).bfloat16()
    with torch.no_grad():
        got = q(x)
    deq = q.dequantized(torch.float32)
    expected = F.linear(x.float(), deq, lin.bias.float())
    assert got.shape == (2, 20, 130) and relative_error(got, expected) < 4e-3
