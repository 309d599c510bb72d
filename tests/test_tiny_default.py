"""The default model name: `hovle-tiny` resolves to the package's HoVLE-Tiny folder, and without its trained
weights (before `make tiny-install`) every entry point says so in one line instead of failing deep inside."""

from __future__ import annotations

import pytest

from hovle.tiny import ship


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
