"""Chat API end to end: template parity, image expansion, chat/stream/batch agreement, CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from hovle import HoVLE, load_image, load_tokenizer
from hovle.chat import IMG_CONTEXT, expand_images, get_template
from hovle.cli import main
from hovle.quantize import calibration_ids, quantize_int8

from conftest import FIXTURES, model_for_fixture_tokenizer

GREEDY = dict(max_new_tokens=8, do_sample=False)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FIXTURES / "tokenizer")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    Image.new("RGB", (120, 50), (200, 30, 30)).save(d / "wide.png")
    Image.new("RGB", (40, 40), (20, 200, 30)).save(d / "square.png")
    return load_image(d / "wide.png", input_size=56, max_num=6), load_image(d / "square.png", input_size=56)


@pytest.mark.parametrize("case", json.loads((FIXTURES / "chat_template.expected.json").read_text()))
def test_template_matches_reference(case):
    t = get_template("internlm2-chat")
    assert t.prompt(case["question"], case["history"], case.get("system_message")) == case["prompt"]


def test_expand_images():
    out = expand_images("a <image> b <image> c", [2, 1], tokens_per_tile=3)
    assert out == "a <img>" + IMG_CONTEXT * 6 + "</img> b <img>" + IMG_CONTEXT * 3 + "</img> c"
    with pytest.raises(ValueError, match="2 images were given but the prompt has only 1"):
        expand_images("<image>", [1, 1], 3)


@pytest.mark.parametrize("loc", ["pre", "post"])
def test_chat_is_generate_on_the_official_prompt(tok, images, loc):
    model = model_for_fixture_tokenizer(loc)
    pv = images[0]
    reply = model.chat(tok, pv, "What color is it?", GREEDY)
    prompt = get_template("internlm2-chat").prompt("<image>\nWhat color is it?")
    ids = torch.tensor([tok(expand_images(prompt, [len(pv)], model.config.num_image_token))["input_ids"]])
    hd = None
    if loc == "post":
        hd = torch.tensor([tok(expand_images(prompt, [len(pv)], model.config.num_patch_tokens))["input_ids"]])
    new = model.generate(ids, pv, hd, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), **GREEDY)
    assert reply == tok.decode(new[0], skip_special_tokens=True).strip()
    assert len(reply) > 0


def test_chat_history_and_stream(tok, images):
    model = model_for_fixture_tokenizer()
    pv = images[0]
    reply, history = model.chat(tok, pv, "Describe.", GREEDY, history=None, return_history=True)
    assert history == [("<image>\nDescribe.", reply)]
    streamed = "".join(model.chat_stream(tok, pv, "Describe.", GREEDY))
    assert streamed == reply
    mine = list(history)
    reply2, history2 = model.chat(tok, pv, "More?", GREEDY, history=mine, return_history=True)
    assert history2 == [("<image>\nDescribe.", reply), ("More?", reply2)]
    assert mine is history2  # appended in place, as the official code does
    assert model.chat(tok, None, "hello", GREEDY) == "".join(model.chat_stream(tok, None, "hello", GREEDY))


@pytest.mark.parametrize("loc", ["pre", "post"])
def test_batch_chat_matches_sequential_chat(tok, images, loc):
    model = model_for_fixture_tokenizer(loc)
    pv = torch.cat(images)
    counts = [len(images[0]), len(images[1])]
    questions = ["What color is it?", "Shape?"]
    batched = model.batch_chat(tok, pv, questions, GREEDY, num_patches_list=counts)
    assert batched == [model.chat(tok, images[0], questions[0], GREEDY), model.chat(tok, images[1], questions[1], GREEDY)]


def test_multi_image_chat(tok, images):
    model = model_for_fixture_tokenizer()
    pv = torch.cat(images)
    q = "Image-1: <image>\nImage-2: <image>\nCompare."
    reply = model.chat(tok, pv, q, GREEDY, num_patches_list=[len(images[0]), len(images[1])])
    assert isinstance(reply, str)
    with pytest.raises(ValueError, match="num_patches_list"):
        model.chat(tok, pv, q, GREEDY, num_patches_list=[1, 1])


def test_chat_errors_are_clear(tok, images):
    model = model_for_fixture_tokenizer()
    with pytest.raises(ValueError, match=r"pixel_values must be \[tiles, 3, 56, 56\]"):
        model.chat(tok, torch.zeros(1, 3, 448, 448), "hi", GREEDY)
    with pytest.raises(ValueError, match="unknown generation option"):
        model.chat(tok, None, "hi", dict(max_new_tokens=2, beams=3))
    with pytest.raises(ValueError, match="num_beams"):
        model.chat(tok, None, "hi", dict(max_new_tokens=2, num_beams=3))
    other = HoVLE.from_config("tiny")
    with pytest.raises(ValueError, match="tokenizer and model do not belong together"):
        other.chat(tok, images[1], "hi", GREEDY)


def test_sampling_is_seeded(tok):
    model = model_for_fixture_tokenizer()
    cfg = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9)
    a = model.chat(tok, None, "hi", cfg, generator=torch.Generator().manual_seed(3))
    b = model.chat(tok, None, "hi", cfg, generator=torch.Generator().manual_seed(3))
    assert a == b


def test_cli_chat_and_info(checkpoint, tmp_path, capsys):
    Image.new("RGB", (90, 60), "blue").save(tmp_path / "x.png")
    assert main(["chat", "--model", str(checkpoint), "--image", str(tmp_path / "x.png"), "--dtype", "fp32",
                 "--max-new-tokens", "6", "What is it?"]) == 0
    model = HoVLE.from_pretrained(checkpoint)
    tok = load_tokenizer(checkpoint)
    pv = load_image(tmp_path / "x.png", input_size=56)
    expected = model.chat(tok, pv, "What is it?", dict(max_new_tokens=6))
    assert capsys.readouterr().out == expected + "\n"
    assert main(["info", str(checkpoint)]) == 0
    assert "parameters.total" in capsys.readouterr().out


def test_cli_dtype_auto_avoids_emulated_bf16(monkeypatch):
    """chat, serve and eval default to 'auto': bf16 only where the device multiplies it natively, else fp32 on
    a CPU (emulated bf16 prefills ~100x slower) and fp16 on a GPU; an explicit name is taken as is."""
    from hovle import kernels
    from hovle.cli import build_parser, resolve_dtype

    parser = build_parser()
    assert [parser.parse_args([cmd]).dtype for cmd in ("chat", "serve")] == ["auto", "auto"]
    assert parser.parse_args(["eval", "--data", "x.tsv", "--out", "o"]).dtype == "auto"
    for native, cpu, cuda in ((True, torch.bfloat16, torch.bfloat16), (False, torch.float32, torch.float16)):
        monkeypatch.setattr(kernels, "native_bf16", lambda device, native=native: native)
        assert (resolve_dtype("auto", "cpu"), resolve_dtype("auto", "cuda:0")) == (cpu, cuda)
        assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype("fp32", "cuda") == torch.float32


def test_cli_chat_quantized(checkpoint, tmp_path, capsys):
    Image.new("RGB", (90, 60), "blue").save(tmp_path / "x.png")
    args = ["--model", str(checkpoint), "--image", str(tmp_path / "x.png"), "--max-new-tokens", "6", "What is it?"]
    assert main(["chat", "--quantize", "int8", "--dtype", "bf16", *args]) == 0
    tok = load_tokenizer(checkpoint)
    model = quantize_int8(HoVLE.from_pretrained(checkpoint, dtype=torch.bfloat16), calibration_ids(tok))
    expected = model.chat(tok, load_image(tmp_path / "x.png", input_size=56).bfloat16(), "What is it?",
                          dict(max_new_tokens=6))
    assert capsys.readouterr().out == expected + "\n"


def test_cli_bad_input_is_one_line(checkpoint, tmp_path, capsys):
    (tmp_path / "bad.png").write_text("not an image")
    cases = [
        (["chat", "--model", str(checkpoint), "--image", str(tmp_path / "bad.png"), "q"], "bad.png: not a recognised image format"),
        (["chat", "--model", str(checkpoint), "--image", str(tmp_path / "missing.png"), "q"], "missing.png"),
        (["chat", "--model", str(tmp_path / "nope"), "q"], "not a folder"),
        (["info", str(tmp_path)], "no config.json"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("hovle: error:") and message in err and err.count("\n") == 1


def test_cli_interactive_session(checkpoint, monkeypatch, capsys):
    lines = iter(["hello", "again", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(checkpoint), "--dtype", "fp32", "--max-new-tokens", "4"]) == 0
    model, tok = HoVLE.from_pretrained(checkpoint), load_tokenizer(checkpoint)
    r1, h = model.chat(tok, None, "hello", dict(max_new_tokens=4), return_history=True)
    r2 = model.chat(tok, None, "again", dict(max_new_tokens=4), history=h)
    assert capsys.readouterr().out == f"{r1}\n{r2}\n"


def test_cli_warnings_are_one_line(checkpoint, tmp_path):
    from hovle import kernels

    if not kernels.REQUIRED_CPU_FLAGS <= kernels._cpu_flags():
        pytest.skip("no AVX512-BF16/VNNI CPU: the kernels are never built")
    env = {**os.environ, "HOVLE_CACHE_DIR": str(tmp_path), "CC": str(tmp_path / "no-such-compiler")}
    code = f"from hovle.cli import main; raise SystemExit(main(['chat', '--model', {str(checkpoint)!r}, " \
           f"'--max-new-tokens', '2', 'hi']))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0
    assert run.stderr.startswith("hovle: warning: could not build the CPU decode kernels") and run.stderr.count("\n") == 1
