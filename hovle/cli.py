"""`hovle` command line: chat (one question, or an interactive session) and info."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MODEL = "hovle-tiny"  # the embedded default model (hovle/tiny/hovle-tiny/)
MODEL_HELP = "checkpoint folder (official HoVLE / HoVLE-HD layout), or hovle-tiny (default)"


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, no traceback."""


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    return name


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="weights dtype; auto (default): bf16 where the device multiplies it natively (a GPU "
                             "with bf16, a CPU with AVX512-BF16 or AMX), else fp16 on a GPU and fp32 on a CPU")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """--dtype as a torch dtype. CPUs without native bf16 emulate it: there a bf16 prefill GEMM ran 100x
    slower than fp32 (1.2 against 125 GFLOP/s on a 2-core AVX2 EPYC), so auto takes fp32 on them."""
    from hovle.kernels import native_bf16

    if name != "auto":
        return DTYPES[name]
    dev = torch.device(device)
    if native_bf16(dev):
        return torch.bfloat16
    return torch.float16 if dev.type == "cuda" else torch.float32


def _load(args):
    from hovle import HoVLE, load_tokenizer
    from hovle.tiny.ship import shipped_folder

    # a shipped name goes to the loaders as is: they say what is missing when its weights are not there
    path = args.model
    if shipped_folder(path) is None and not Path(path).is_dir():
        raise UsageError(f"--model {args.model}: not a folder (expected a HoVLE checkpoint folder with config.json, "
                         f"or {DEFAULT_MODEL})")
    tokenizer = load_tokenizer(path)  # first: it fails fast, the weights take a while
    device = _device(args.device)
    model = HoVLE.from_pretrained(path, dtype=resolve_dtype(args.dtype, device), device=device)
    if args.quantize == "int8":
        from hovle.quantize import calibration_ids, quantize_int8

        quantize_int8(model, calibration_ids(tokenizer))
    return model, tokenizer


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=["int8"],
                        help="int8 weights for the decoder linears and the head (half the memory; ~1.75x faster "
                             "decode on CPUs with AVX512-VNNI, see docs/performance.md)")


def _images(model, args):
    """pixel_values [tiles, 3, S, S] and tiles per image, or (None, None) without images."""
    from hovle import load_image, load_video
    from hovle.image import video_prompt_prefix

    cfg = model.config
    max_tiles = args.max_tiles or (cfg.max_dynamic_patch if cfg.dynamic_image_size else 1)
    if args.video:
        pixel_values, counts = load_video(args.video, num_segments=args.frames, max_num=1, input_size=cfg.tile_size)
        return pixel_values, counts, video_prompt_prefix(len(counts))
    if not args.image:
        return None, None, ""
    tiles = [load_image(p, input_size=cfg.tile_size, max_num=max_tiles, min_num=cfg.min_dynamic_patch,
                        use_thumbnail=cfg.use_thumbnail) for p in args.image]
    prefix = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(tiles))) if len(tiles) > 1 else ""
    return torch.cat(tiles), [t.shape[0] for t in tiles], prefix


def _generation_config(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                temperature=args.temperature or 1.0, top_p=args.top_p, repetition_penalty=args.repetition_penalty)


def cmd_chat(args) -> None:
    from hovle.chat import turn_question

    model, tokenizer = _load(args)
    pixel_values, counts, prefix = _images(model, args)
    gen = torch.Generator().manual_seed(args.seed)
    config = _generation_config(args)
    history = None

    def answer(question: str) -> str:
        parts = []
        for piece in model.chat_stream(tokenizer, pixel_values, question, config, history, counts,
                                       system_message=args.system, generator=gen):
            print(piece, end="", flush=True)
            parts.append(piece)
        print()
        return "".join(parts)

    if args.question:
        answer(prefix + args.question)
        return
    print("hovle chat: type a message, /reset to start over, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if not line:
            return
        if line == "/reset":
            history = None
            continue
        question = turn_question(prefix + line if history is None else line, history, pixel_values)
        reply = answer(question)
        history = (history or []) + [(question, reply)]


def cmd_info(args) -> None:
    from hovle import HoVLE, HoVLEConfig
    from hovle.config import PRESETS, config_summary
    from hovle.tiny.ship import shipped_folder

    if args.model in PRESETS:
        cfg = HoVLEConfig.from_name(args.model)
    else:
        cfg = HoVLEConfig.from_json(shipped_folder(args.model) or args.model)
    with torch.device("meta"):
        n_embed = sum(p.numel() for p in HoVLE(cfg).embedding_model.parameters())
        n_total = HoVLE(cfg).num_parameters()
    for key, value in config_summary(cfg).items():
        print(f"{key:40s} {value}")
    print(f"{'parameters.embedding_model':40s} {n_embed:,}")
    print(f"{'parameters.language_model':40s} {n_total - n_embed:,}")
    print(f"{'parameters.total':40s} {n_total:,}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hovle", description="HoVLE vision-language model: chat, inspect.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("chat", help="ask about images (one question, or an interactive session without one)")
    c.add_argument("question", nargs="?", help="the question; omit it for an interactive multi-turn session")
    c.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    c.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    c.add_argument("--video", help="video file (needs the 'video' extra); frames become images")
    c.add_argument("--frames", type=int, default=8, help="frames sampled from --video (default 8)")
    c.add_argument("--max-tiles", type=int, help="max tiles per image (default: the model's config)")
    add_dtype_argument(c)
    c.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    add_quantize_argument(c)
    c.add_argument("--max-new-tokens", type=int, default=512)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--system", help="system message (default: the template's)")
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="print a checkpoint's config summary and parameter count")
    i.add_argument("model", help="checkpoint folder, config.json, hovle-tiny, or a preset name (tiny, hovle-2.6b)")
    i.set_defaults(func=cmd_info)

    from hovle.evaluate import add_eval_parser
    from hovle.serve import add_serve_parser
    from hovle.train.cli import add_train_parser

    add_serve_parser(sub)
    add_eval_parser(sub)
    add_train_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from hovle.config import ConfigError
    from hovle.image import ImageLoadError
    from hovle.weights import CheckpointError

    args = build_parser().parse_args(argv)
    # One line per warning, like the errors: a user has no use for the library line that raised it.
    warnings.formatwarning = lambda message, *_, **__: f"hovle: warning: {message}\n"
    try:
        args.func(args)
    except (UsageError, FileNotFoundError, ConfigError, CheckpointError, ImageLoadError, ImportError, ValueError) as e:
        print(f"hovle: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")
    return 0


if __name__ == "__main__":
    sys.exit(main())
