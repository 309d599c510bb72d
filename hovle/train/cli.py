"""`hovle train CONFIG.yaml [key=value ...]`, and `python -m hovle.train` for torchrun launches."""

from __future__ import annotations

import argparse
import sys


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `train` subcommand on an argparse subparsers object (hovle/cli.py wires it in)."""
    t = subparsers.add_parser("train", help="train a stage (distill, align, sft) from a YAML config",
                              description="Train HoVLE. Overrides are dotted key=value pairs parsed as YAML, "
                                          "e.g. train.max_steps=100 optim.lr=1e-5 'data.sources=[{path: a.jsonl}]'.")
    t.add_argument("config", help="YAML config file (see examples/train/ and docs/training.md)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.out_dir=runs/x")
    t.set_defaults(func=cmd_train)
    return t


def cmd_train(args) -> None:
    from hovle.train.config import TrainConfig
    from hovle.train.trainer import train

    final = train(TrainConfig.load(args.config, args.overrides))
    if final is not None:
        print(f"saved {final}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m hovle.train CONFIG [key=value ...]` (what torchrun launches)."""
    from hovle.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m hovle.train")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ImportError) as e:
        print(f"hovle train: error: {e}", file=sys.stderr)
        return 2
    return 0
