"""Tokenizer parity with the reference InternLM2Tokenizer, and the tokenizer.json path."""

import json
import random
import shutil
from pathlib import Path

import pytest
import tokenizers
import torch

from hovle.tokenizer import HFTokenizer, InternLM2Tokenizer, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "tokenizer.expected.json").read_text(encoding="utf-8"))

STREAM_TEXTS = [
    "Hello, who are you?",
    "一个红色的圆形, 这是什么?",
    "emoji 🐱🐶 and ü é ï",
    "I don't know, it's 3.14 . Isn't it ?",
    "  spaces  and\nnewlines\n",
    "x ' .  ' m do n ' t",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FIXTURES / "tokenizer")


def stream(tokenizer, ids):
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    return pieces + [decoder.flush()]


# --- InternLM2 parity -------------------------------------------------------------------------------------


def test_kind(tok):
    assert isinstance(tok, InternLM2Tokenizer)


@pytest.mark.parametrize("case", EXPECTED["encode"], ids=lambda c: c["text"][:24])
def test_encode(tok, case):
    assert tok(case["text"])["input_ids"] == case["ids"]
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.encode(case["text"], add_special_tokens=False) == case["ids"][1:]


@pytest.mark.parametrize("case", EXPECTED["decode"], ids=lambda c: str(c["ids"]))
def test_decode(tok, case):
    assert tok.decode(case["ids"], skip_special_tokens=True) == case["text"]
    assert tok.decode(case["ids"], skip_special_tokens=False) == case["text_keep_special"]
    assert tok.decode(torch.tensor(case["ids"]), skip_special_tokens=True) == case["text"]


def test_convert_tokens_to_ids(tok):
    expected = EXPECTED["convert_tokens_to_ids"]
    for token, index in expected.items():
        assert tok.convert_tokens_to_ids(token) == index
        assert tok.convert_ids_to_tokens(index) == token
    assert tok.convert_tokens_to_ids(list(expected)) == list(expected.values())
    assert tok.convert_tokens_to_ids("<not a token>") == 0  # <unk>, like the reference


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == len(tok) == EXPECTED["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.eos_token == "</s>"


def test_decode_added_tokens_joined_with_spaces(tok):
    """Added tokens beyond the SentencePiece vocab are joined with spaces; chat tokens inside it are not."""
    img, ctx, end_img = tok.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    ids = tok.encode("<img><IMG_CONTEXT></img>\nuser<|im_start|>x", add_special_tokens=False)
    assert ids[:3] == [img, ctx, end_img] and im_start in ids
    # The reference puts the space before the text chunk that precedes a special token, not after it.
    assert tok.decode(ids) == "<img> <IMG_CONTEXT> </img>  \nuser<|im_start|>x"
    # "x" was encoded on its own, with SentencePiece's dummy prefix: "▁x".
    assert tok.decode(ids, skip_special_tokens=True) == "\nuser x"


def test_round_trip(tok):
    for text in STREAM_TEXTS[:3]:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_batch_left_padding(tok):
    texts = ["Hello, who are you?", "hi", ""]
    out = tok(texts, padding=True, padding_side="left")
    rows = [tok.encode(t) for t in texts]
    width = max(map(len, rows))
    for ids, mask, row in zip(out["input_ids"], out["attention_mask"], rows):
        n_pad = width - len(row)
        assert ids == [tok.pad_token_id] * n_pad + row
        assert mask == [0] * n_pad + [1] * len(row)
    assert tok(texts)["input_ids"] == rows  # no padding asked


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder(tok, text):
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_random_ids(tok):
    """Byte pieces, spaces, apostrophes and punctuation in random order: the pieces only ever grow the text."""
    pool = list(range(9, 265)) + tok.convert_tokens_to_ids(["▁", "'", "n", "t", "m", ".", ",", "<s>", "<img>"])
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 12))]
        assert "".join(stream(tok, ids)) == tok.decode(ids, skip_special_tokens=True)


def test_save_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(InternLM2Tokenizer.FILES)
    again = load_tokenizer(tmp_path / "saved")
    for case in EXPECTED["encode"]:
        assert again.encode(case["text"]) == case["ids"]


# --- errors -----------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*tokenizer.model.*tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*tokenizer.model.*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_model(tmp_path):
    for name in InternLM2Tokenizer.FILES[1:]:
        shutil.copyfile(FIXTURES / "tokenizer" / name, tmp_path / name)
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


# --- tokenizer.json ---------------------------------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_bpe() -> tokenizers.Tokenizer:
    """A tiny byte-level BPE like SmolLM2's, trained on a few sentences."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["Hello, who are you?", "What color is the circle?", "a red circle"], trainer)
    return tokenizer


@pytest.fixture
def hf_folder(tmp_path):
    byte_level_bpe().save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_tokenizer_json(hf_folder):
    tok = load_tokenizer(hf_folder)
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id == SPECIALS.index("<|im_end|>")
    assert tok.pad_token_id == 0 and tok.bos_token_id is None
    for text in ["Hello, who are you?", "一个红色的圆形 🐱"]:
        ids = tok.encode(text)
        assert tok(text)["input_ids"] == ids
        assert tok.decode(ids) == text
        assert "".join(stream(tok, ids)) == text
    ids = tok.encode("<|im_start|>Hello<|im_end|>")
    assert ids[0] == 1 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Hello"
    assert tok.vocab_size == len(tok) == tok.tokenizer.get_vocab_size()


def test_tokenizer_json_save_round_trip(hf_folder, tmp_path):
    tok = load_tokenizer(hf_folder)
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.eos_token_id == tok.eos_token_id
    assert again.encode("What color is the circle?") == tok.encode("What color is the circle?")


def test_in_memory_tokenizer_with_bos():
    tok = HFTokenizer(byte_level_bpe(), eos_token="<|im_end|>", bos_token="<|endoftext|>", add_bos_token=True)
    assert tok.encode("a red circle")[0] == tok.bos_token_id == 0
    assert tok.encode("a red circle", add_special_tokens=False)[0] != 0
    assert tok.decode(tok.encode("a red circle"), skip_special_tokens=True) == "a red circle"
