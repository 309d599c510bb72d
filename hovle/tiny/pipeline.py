"""HoVLE-Tiny end to end: the steps around `hovle train` (data + init checkpoint, and evaluation).

    python -m hovle.tiny.pipeline prepare  --out runs/tiny [--train N --heldout N --eval-per-type N ...]
    hovle train examples/tiny/stage1_distill.yaml      # Stage I  -> runs/tiny/stage1/final
    hovle train examples/tiny/stage2_align.yaml        # Stage II -> runs/tiny/stage2/final
    hovle train examples/tiny/stage3_sft.yaml          # Stage III (LoRA, merged) -> runs/tiny/stage3/final
    python -m hovle.tiny.pipeline evaluate --model runs/tiny/stage3/final --data runs/tiny/data/eval.jsonl \
        --json runs/tiny/eval.json

`make tiny-model` chains them; every step skips itself when its output exists and `hovle train` resumes
from its own checkpoints, so re-running it continues an interrupted run (docs/hovle-tiny.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

DONE = "DONE.json"  # written last into a finished data folder / init folder


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def prepare(out: str | Path, n_train: int, n_heldout: int, n_eval_per_type: int, seed: int = 0,
            max_tiles: int = 2, embedding_layers: int = 2, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Write the data splits to `out/data` and the step-0 HoVLE-Tiny (weights + tokenizer) to `out/init`.

    Each part is skipped when its DONE.json marker exists (written last, so an interrupted prepare redoes
    only the unfinished part). `max_tiles` becomes the model's max_dynamic_patch, so training (which tiles
    with the model's setting) and `hovle chat` / evaluate see images the same way.
    """
    from hovle.tiny import data as D
    from hovle.tiny.smollm2 import init_tiny_model, load_smollm2_tokenizer, tiny_config

    out = Path(out)
    data_dir, init_dir = out / "data", out / "init"
    report: dict[str, Any] = {}
    if (data_dir / DONE).is_file():
        report["data"] = json.loads((data_dir / DONE).read_text())
        print(f"prepare: {data_dir} exists, skipped")
    else:
        t = time.perf_counter()
        data_dir.mkdir(parents=True, exist_ok=True)
        info = D.write_dataset(data_dir, n_train, n_heldout, n_eval_per_type, seed=seed)
        report["data"] = {"seed": seed, **info, "seconds": round(time.perf_counter() - t, 1)}
        _write_json(data_dir / DONE, report["data"])
        print(f"prepare: wrote {data_dir} in {report['data']['seconds']} s")
    if (init_dir / DONE).is_file():
        report["init"] = json.loads((init_dir / DONE).read_text())
        print(f"prepare: {init_dir} exists, skipped")
    else:
        model = init_tiny_model(tiny_config(embedding_layers=embedding_layers, max_dynamic_patch=max_tiles),
                                seed=seed, cache_dir=cache_dir)
        model.save_pretrained(init_dir)
        load_smollm2_tokenizer(cache_dir).save_pretrained(init_dir)
        report["init"] = {"seed": seed, "max_tiles": max_tiles, "embedding_layers": embedding_layers,
                          "parameters": model.num_parameters()}
        _write_json(init_dir / DONE, report["init"])
        print(f"prepare: wrote {init_dir} ({model.num_parameters() / 1e6:.1f}M parameters)")
    return report


def evaluate(model_dir: str | Path, data: str | Path, json_out: str | Path | None = None, limit: int | None = None,
             max_new_tokens: int = 24, threads: int | None = None) -> dict[str, Any]:
    """Greedy `model.chat` over eval.jsonl rows (first question of each), scored by `score_answer`.

    Prints per-type accuracy; writes {"accuracy": {type: acc}, "overall", "n", "rows": [...]} to json_out.
    `limit` takes the first `limit` rows of each question type.
    """
    import torch

    from hovle import HoVLE, load_image, load_tokenizer
    from hovle.tiny.data import score_answer

    if threads:
        torch.set_num_threads(threads)
    data = Path(data)
    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = HoVLE.from_pretrained(model_dir, dtype=torch.float32)
    cfg = model.config
    max_tiles = cfg.max_dynamic_patch if cfg.dynamic_image_size else 1
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    if limit is not None:
        seen: dict[str, int] = defaultdict(int)
        kept = []
        for r in rows:
            q = r["meta"]["qtype"]
            if seen[q] < limit:
                seen[q] += 1
                kept.append(r)
        rows = kept
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False)
    results, right, total = [], defaultdict(int), defaultdict(int)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for r in rows:
            meta = r["meta"]
            pixel_values = None
            if r.get("image"):
                pixel_values = load_image(data.parent / r["image"], input_size=cfg.tile_size, max_num=max_tiles,
                                          min_num=cfg.min_dynamic_patch, use_thumbnail=cfg.use_thumbnail)
            question = r["conversations"][0]["value"]
            reply = model.chat(tokenizer, pixel_values, question, gen)
            ok = score_answer(meta["qtype"], reply, meta["expected"], meta.get("question"))
            total[meta["qtype"]] += 1
            right[meta["qtype"]] += int(ok)
            results.append({"image": r.get("image"), "qtype": meta["qtype"], "question": meta.get("question"),
                            "expected": meta["expected"], "reply": reply, "correct": ok})
    accuracy = {q: right[q] / total[q] for q in total}
    n = sum(total.values())
    report = {"model": str(model_dir), "data": str(data), "n": n, "accuracy": accuracy,
              "overall": (sum(right.values()) / n) if n else None,
              "seconds": round(time.perf_counter() - t0, 1), "rows": results}
    for q in total:
        print(f"{q:10s} {right[q]:4d}/{total[q]:<4d} {accuracy[q]:6.1%}")
    if n:
        print(f"{'overall':10s} {sum(right.values()):4d}/{n:<4d} {report['overall']:6.1%}")
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        _write_json(json_out, report)
        print(f"evaluate: wrote {json_out}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hovle.tiny.pipeline", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("prepare", help="write data splits and the step-0 checkpoint (skips finished parts)")
    a.add_argument("--out", default="runs/tiny")
    a.add_argument("--train", type=int, default=6000, help="training images (one caption + one chat each)")
    a.add_argument("--heldout", type=int, default=200, help="held-out images (eval_loss)")
    a.add_argument("--eval-per-type", type=int, default=50, help="eval questions per type (eval.jsonl)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--max-tiles", type=int, default=2, help="the model's max_dynamic_patch")
    a.add_argument("--embedding-layers", type=int, default=2)
    e = sub.add_parser("evaluate", help="per-type accuracy of model.chat on eval.jsonl")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True, help="eval.jsonl (images relative to its folder)")
    e.add_argument("--json", help="write the report here")
    e.add_argument("--limit", type=int, help="first N questions of each type")
    e.add_argument("--max-new-tokens", type=int, default=24)
    e.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out, args.train, args.heldout, args.eval_per_type, args.seed, args.max_tiles,
                args.embedding_layers)
    else:
        report = evaluate(args.model, args.data, args.json, args.limit, args.max_new_tokens, args.threads)
        if not report["n"]:
            print("evaluate: no rows", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
