"""Parity with the official model (fixtures), and the fast paths against the naive ones."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hovle import CheckpointError, ConfigError, HoVLE, HoVLEConfig
from hovle.config import RopeScaling
from hovle.model import pixel_shuffle

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ["hovle-tiny-internlm2", "hovle-tiny-llama", "hovle-tiny-hd"]


def load(name, dtype=torch.float32):
    return HoVLE.from_pretrained(FIXTURES / name, dtype=dtype), load_file(FIXTURES / name / "expected.safetensors")


def naive_greedy(model, ids, pixel_values, n):
    """The official generation: full recomputation of the whole sequence every step."""
    out = []
    for _ in range(n):
        hd = model.hd_ids(ids) if model.is_post and pixel_values is not None else None
        nxt = model(ids, pixel_values, hd).logits[:, -1].argmax(-1)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", MODELS)
def test_forward_logits_match_reference(name):
    model, e = load(name)
    with torch.no_grad():
        logits = model(e["input_ids"], e["pixel_values"], e["hd_input_ids"]).logits
    assert logits.shape == e["logits"].shape
    assert (logits - e["logits"]).abs().max() < 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_cached_greedy_reproduces_reference_ids(name):
    model, e = load(name)
    ids = model.generate(e["input_ids"], e["pixel_values"], e["hd_input_ids"], max_new_tokens=len(e["greedy"]))
    assert ids[0].tolist() == e["greedy"].tolist()


def test_post_model_derives_hd_ids():
    model, e = load("hovle-tiny-hd")
    assert torch.equal(model.hd_ids(e["input_ids"]), e["hd_input_ids"])
    with torch.no_grad():
        assert torch.equal(model(e["input_ids"], e["pixel_values"]).logits,
                           model(e["input_ids"], e["pixel_values"], e["hd_input_ids"]).logits)


def test_pre_model_ignores_hd_ids():
    model, e = load("hovle-tiny-internlm2")
    ids = model.generate(e["input_ids"], e["pixel_values"], None, max_new_tokens=4)
    assert ids[0].tolist() == e["greedy"][:4].tolist()


@pytest.mark.parametrize("name", MODELS)
def test_cached_steps_match_full_forward(name):
    """Prefill half the prompt into the cache, then feed one token at a time: every logit row agrees."""
    model, e = load(name)
    ids = torch.cat([e["input_ids"], e["greedy"][None]], dim=1)
    with torch.no_grad():
        full = model(ids, e["pixel_values"]).logits[0]
        T = e["input_ids"].shape[1]
        hd = model.hd_ids(e["input_ids"]) if model.is_post else None
        cache = model.new_cache(1, ids.shape[1], ids.shape[1] * 4)
        rows = [model.step(e["input_ids"], cache, e["pixel_values"], hd)]
        for t in range(T, ids.shape[1] - 1):
            rows.append(model.step(ids[:, t:t + 1], cache))
    cached = torch.cat(rows)
    assert (cached - full[T - 1:-1]).abs().max() < 1e-4


def _left_pad(seqs, pad):
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


@pytest.mark.parametrize("name", MODELS)
def test_left_padded_batch_matches_unbatched(name):
    model, e = load(name)
    image_prompt = e["input_ids"][0].tolist()
    text_prompt = [1, 20, 30, 40, 50]
    ids, mask = _left_pad([text_prompt, image_prompt], pad=0)
    hd_ids = hd_mask = None
    if model.is_post:
        hd_ids, hd_mask = _left_pad([text_prompt, e["hd_input_ids"][0].tolist()], pad=0)
    batched = model.generate(ids, e["pixel_values"], hd_ids, attention_mask=mask, hd_attention_mask=hd_mask,
                             max_new_tokens=8)
    alone_text = model.generate(torch.tensor([text_prompt]), max_new_tokens=8)
    assert batched[0].tolist() == alone_text[0].tolist()
    assert batched[1].tolist() == e["greedy"][:8].tolist()


def test_eos_stops_rows_and_pads():
    model, e = load("hovle-tiny-internlm2")
    eos = int(e["greedy"][2])
    ids = model.generate(e["input_ids"], e["pixel_values"], max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert ids[0].tolist() == e["greedy"][:3].tolist()


@pytest.mark.parametrize("name", MODELS)
def test_save_pretrained_round_trip_is_exact(name, tmp_path):
    model, e = load(name)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=200_000)
    official = {}
    for f in (FIXTURES / name).glob("model-*.safetensors"):
        official |= load_file(f)
    for folder in ("one", "sharded"):
        saved = {}
        for f in (tmp_path / folder).glob("model*.safetensors"):
            saved |= load_file(f)
        assert saved.keys() == official.keys()
        assert all(torch.equal(saved[k], official[k]) for k in official)
        again = HoVLE.from_pretrained(tmp_path / folder)
        assert again.config == model.config
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()


def test_bf16_close_to_fp32():
    model32, e = load("hovle-tiny-internlm2")
    model16, _ = load("hovle-tiny-internlm2", torch.bfloat16)
    assert model16.dtype == torch.bfloat16
    with torch.no_grad():
        a = model32(e["input_ids"], e["pixel_values"]).logits.flatten()
        b = model16(e["input_ids"], e["pixel_values"]).logits.float().flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def _copy_fixture(tmp_path, name="hovle-tiny-internlm2"):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def _edit_shard(folder, fn):
    path = folder / "model-00002-of-00002.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != path.name}
    index["weight_map"] |= {k: path.name for k in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_strict_loading_names_the_bad_tensor(tmp_path):
    folder = _copy_fixture(tmp_path)
    _edit_shard(folder, lambda t: t.pop("language_model.output.weight"))
    with pytest.raises(CheckpointError, match="missing tensors: language_model.output.weight"):
        HoVLE.from_pretrained(folder)
    _edit_shard(folder, lambda t: t.update({"language_model.output.weight": torch.zeros(512, 64),
                                             "extra.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="unexpected tensors: extra.weight"):
        HoVLE.from_pretrained(folder)
    _edit_shard(folder, lambda t: (t.pop("extra.weight"), t.update({"language_model.output.weight": torch.zeros(511, 64)})))
    with pytest.raises(CheckpointError, match=r"language_model.output.weight has shape \[511, 64\], config expects \[512, 64\]"):
        HoVLE.from_pretrained(folder)


def test_missing_or_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HoVLE.from_pretrained(tmp_path)
    folder = _copy_fixture(tmp_path)
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: not a readable safetensors file"):
        HoVLE.from_pretrained(folder)
    (folder / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        HoVLE.from_pretrained(folder)


def test_config_errors_name_the_field(tmp_path):
    d = json.loads((FIXTURES / "hovle-tiny-internlm2" / "config.json").read_text())
    del d["llm_config"]["hidden_size"]
    with pytest.raises(ConfigError, match="llm_config: required field 'hidden_size' is missing"):
        HoVLEConfig.from_dict(d)
    d = json.loads((FIXTURES / "hovle-tiny-internlm2" / "config.json").read_text())
    d["embedding_config"]["hidden_size"] = 32
    with pytest.raises(ConfigError, match="hidden_size"):
        HoVLEConfig.from_dict(d)
    d["embedding_config"]["hidden_size"] = 64
    d["embedding_config"]["pixel_shuffle_loc"] = "middle"
    with pytest.raises(ConfigError, match="pixel_shuffle_loc"):
        HoVLEConfig.from_dict(d)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        HoVLEConfig.from_json(tmp_path)


def test_config_round_trip_and_presets():
    cfg = HoVLEConfig.from_json(FIXTURES / "hovle-tiny-internlm2")
    assert HoVLEConfig.from_dict(cfg.to_dict()) == cfg
    assert HoVLEConfig.from_name("tiny") == cfg
    assert HoVLEConfig.from_json(FIXTURES / "hovle-2.6b-config.json") == HoVLEConfig.from_name("hovle-2.6b")


def test_official_2_6b_parameter_count():
    with torch.device("meta"):
        model = HoVLE(HoVLEConfig.from_name("hovle-2.6b"))
    assert model.num_parameters() == 2_606_327_808
    assert model.config.num_image_token == 256


def test_pixel_shuffle_order():
    # 4x4 grid of patches, channel = patch index: token (r, c) holds patches (2r,2c),(2r,2c+1),(2r+1,2c),(2r+1,2c+1)
    x = torch.arange(16.0).view(1, 16, 1)
    out = pixel_shuffle(x)[0]
    assert out.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def _random(cfg, **llm_changes):
    return HoVLE.from_config(cfg.with_llm(**llm_changes) if llm_changes else cfg)


@pytest.mark.parametrize("scaling", [RopeScaling("dynamic", 2.0), RopeScaling("linear", 2.0)])
def test_rope_scaling_cached_matches_recomputation(scaling):
    """Dynamic NTK moves the RoPE base as the sequence grows past max_position_embeddings (16 here)."""
    model = _random(HoVLEConfig.from_name("tiny"), rope_scaling=scaling, max_position_embeddings=16)
    ids = torch.tensor([[1, 5, 9, 33, 70, 12, 9, 100, 4]])
    cached = model.generate(ids, max_new_tokens=20)
    with torch.no_grad():
        assert cached.tolist() == naive_greedy(model, ids, None, 20).tolist()
        full = model(torch.cat([ids, cached], 1)).logits[0, -2]
        cache = model.new_cache(1, 40)
        model.step(ids, cache)
        for t in cached[0, :-1]:
            last = model.step(t.view(1, 1), cache)
    assert (last[0] - full).abs().max() < 1e-4


def test_special_text_embeddings_and_row0_quirk():
    cfg = HoVLEConfig.from_name("tiny")
    ids = torch.tensor([[3, 510, 511]])
    # No special table: ids past llm_vocab_size are embedded with row 0.
    no_table = replace(cfg.embedding, llm_vocab_size=510)
    m2 = HoVLE.from_config(replace(cfg, embedding=no_table))
    x = m2.embedding_model.embed_text(ids)
    assert torch.equal(x[0, 1], m2.embedding_model.llm_text_embeddings.weight[0])
    assert torch.equal(x[0, 2], m2.embedding_model.llm_text_embeddings.weight[0])
    with_table = replace(cfg.embedding, llm_vocab_size=510, special_token_maps={"<a>": 510, "<b>": 511})
    m3 = HoVLE.from_config(replace(cfg, embedding=with_table))
    x = m3.embedding_model.embed_text(ids)
    assert torch.equal(x[0, 2], m3.embedding_model.special_text_embeddings.weight[1])
    assert torch.equal(x[0, 0], m3.embedding_model.llm_text_embeddings.weight[3])


def test_normalize_encoder_output():
    cfg = replace(HoVLEConfig.from_name("tiny"), normalize_encoder_output=True)
    model = HoVLE.from_config(cfg)
    with torch.no_grad():
        x = model.embed(torch.tensor([[1, 2, 3, 4]]))
    assert torch.allclose(x.norm(dim=-1), torch.ones(1, 4), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_family_round_trip(arch, tmp_path):
    cfg = HoVLEConfig.from_name("tiny").with_llm(architecture=arch, qkv_bias=arch == "qwen2", tie_word_embeddings=False)
    model = HoVLE.from_config(cfg)
    model.save_pretrained(tmp_path)
    names = load_file(tmp_path / "model.safetensors").keys()
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in names
    assert "language_model.lm_head.weight" in names
    assert ("language_model.model.layers.0.self_attn.k_proj.bias" in names) == (arch == "qwen2")
    again = HoVLE.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_image_token_count_mismatch_is_clear():
    model, e = load("hovle-tiny-internlm2")
    with pytest.raises(ValueError, match="<IMG_CONTEXT> tokens but pixel_values"):
        model(e["input_ids"], e["pixel_values"][:2])


@pytest.mark.slow
def test_official_2_6b_builds_and_chats_in_bf16():
    model = HoVLE.from_config("hovle-2.6b", dtype=torch.bfloat16)
    cfg = model.config
    ctx = cfg.embedding.img_context_token_id
    ids = torch.tensor([[1, 92543, 1008, 92544] + [ctx] * cfg.num_image_token + [92545, 1009, 92542, 92543]])
    out = model.generate(ids, torch.randn(1, 3, 448, 448), max_new_tokens=4)
    assert out.shape == (1, 4)
