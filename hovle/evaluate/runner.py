"""`hovle eval`: run a model over VLMEvalKit TSV files, cache predictions, score, write the results.

Outputs in --out, per dataset (MODEL = --model-name or the checkpoint folder's name, DATA = the TSV's stem):
  MODEL_DATA.jsonl       prediction cache, one JSON line per answered index (a rerun skips these)
  MODEL_DATA.csv         the TSV's columns (without image) + prediction, extracted, hit
  MODEL_DATA_score.json  the scores;  MODEL_DATA_score.txt  the same as a readable table
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from hovle.evaluate.data import Row, Table, TSVError, check_images, image_key, parse_answers, read_tsv, row_image
from hovle.evaluate.metrics import (anls, circular_scores, extract_choice, extract_yes_no, headline, mcq_scores,
                                    mme_scores, pope_scores, vqa_accuracy, vqa_scores, yes_no_scores)
from hovle.evaluate.prompts import SPECS, DatasetSpec, build_prompt, detect_type, options


def resolve_spec(data_path: Path, dataset_type: str | None) -> DatasetSpec:
    name = dataset_type or detect_type(data_path.stem)
    if name is None:
        raise TSVError(f"{data_path}: cannot tell the dataset type from the file name; pass --dataset-type "
                       f"({', '.join(SPECS)})")
    if name not in SPECS:
        raise TSVError(f"--dataset-type {name}: unknown; known: {', '.join(SPECS)}")
    return SPECS[name]


def _validate_answers(table: Table, spec: DatasetSpec) -> None:
    """Check every given answer before any inference, so a bad file fails in seconds, not hours."""
    for row in table.rows:
        answer = row.get("answer")
        if answer is None:
            continue
        if spec.kind == "yesno" and answer.strip().lower() not in ("yes", "no"):
            raise TSVError(f"{table.where(row, 'answer')}: expected Yes or No, got {answer!r}")
        if spec.kind == "mcq":
            opts = options(row)
            if not opts:
                raise TSVError(f"{table.where(row, 'A')}: no options (columns A, B, ...)")
            if answer.strip() not in opts:
                raise TSVError(f"{table.where(row, 'answer')}: {answer!r} is not one of the options {', '.join(opts)}")
        if spec.metric == "circular":
            try:
                int(row.index)
            except ValueError:
                raise TSVError(f"{table.where(row, 'index')}: CircularEval needs integer indices") from None


def _records(table: Table, spec: DatasetSpec, preds: dict[str, str]) -> list[dict]:
    out = []
    for row in table.rows:
        if row.get("answer") is None or row.index not in preds:
            continue
        r = {"index": row.index, "prediction": preds[row.index], "answer": row.get("answer"),
             "category": row.get("category"), "l2-category": row.get("l2-category")}
        if spec.kind == "mcq":
            r["options"] = options(row)
        if spec.kind == "vqa":
            r["answers"] = parse_answers(row.get("answer"))
        if spec.metric == "mme":
            r["image"] = image_key(table, row)
        out.append(r)
    return out


def score(table: Table, spec: DatasetSpec, preds: dict[str, str]) -> dict | None:
    records = _records(table, spec, preds)
    if not records:
        return None
    if spec.metric == "mme":
        return mme_scores(records)
    if spec.metric == "pope":
        return pope_scores(records)
    if spec.metric == "yesno":
        return yes_no_scores(records)
    if spec.metric == "circular":
        return circular_scores(records)
    if spec.metric == "mcq":
        return mcq_scores(records)
    return vqa_scores(records, spec.metric)


def _row_result(row: Row, spec: DatasetSpec, prediction: str) -> tuple[str, str]:
    """(extracted answer, hit) for the predictions file; hit is empty when the row has no answer."""
    answer = row.get("answer")
    if spec.kind == "yesno":
        got = extract_yes_no(prediction)
        return got, "" if answer is None else str(int(got.lower() == answer.strip().lower()))
    if spec.kind == "mcq":
        got = extract_choice(prediction, options(row)) or ""
        return got, "" if answer is None else str(int(got == answer.strip()))
    if answer is None:
        return "", ""
    fn = anls if spec.metric == "anls" else vqa_accuracy
    return "", f"{fn(prediction, parse_answers(answer)):.4f}"


def format_table(title: str, spec: DatasetSpec, scores: dict | None) -> str:
    lines = [title]
    if scores is None:
        return title + "\n  (no reference answers: predictions only)\n"
    if spec.metric == "mme":
        lines.append(f"  {'category':24s} {'acc':>7s} {'acc+':>7s} {'score':>7s}")
        for cat, s in scores["categories"].items():
            lines.append(f"  {cat:24s} {s['acc']:7.2f} {s['acc_plus']:7.2f} {s['score']:7.2f}")
        lines.append(f"  {'perception':24s} {scores['perception']:23.2f}  ({scores['perception_categories']}/10 categories)")
        lines.append(f"  {'cognition':24s} {scores['cognition']:23.2f}  ({scores['cognition_categories']}/4 categories)")
        return "\n".join(lines) + "\n"
    if spec.metric == "pope":
        lines.append(f"  {'split':14s} {'acc':>7s} {'prec':>7s} {'recall':>7s} {'F1':>7s} {'yes%':>7s}")
        for name, s in [("overall", scores["overall"]), *scores["categories"].items()]:
            lines.append(f"  {name:14s} {s['accuracy']:7.2f} {s['precision']:7.2f} {s['recall']:7.2f} "
                         f"{s['f1']:7.2f} {s['yes_ratio']:7.2f}")
        lines.append(f"  {'mean F1 of splits':22s} {scores['mean_f1']:.2f}")
        return "\n".join(lines) + "\n"
    name, value = headline(spec.metric, scores)
    lines.append(f"  {name:32s} {value:7.2f}   ({scores['questions']} questions)")
    if "vanilla_accuracy" in scores:
        lines.append(f"  {'accuracy without circular shifts':32s} {scores['vanilla_accuracy']:7.2f}")
    for key in ("category", "l2-category"):
        for cat, v in scores.get(key, {}).items():
            lines.append(f"  {key}: {cat:{max(0, 30 - len(key))}s} {v:7.2f}")
    return "\n".join(lines) + "\n"


def _load_cache(path: Path, meta: dict) -> dict[str, str]:
    if not path.is_file():
        return {}
    preds: dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        return {}
    try:
        head = json.loads(lines[0])["meta"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise TSVError(f"{path}: not a hovle prediction cache (delete it or use another --out)") from None
    if head != meta:
        diff = ", ".join(f"{k}: {head.get(k)!r} -> {v!r}" for k, v in meta.items() if head.get(k) != v)
        raise TSVError(f"{path}: cached predictions were made with other settings ({diff}); "
                       f"use another --out or delete the file")
    for line in lines[1:]:
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run: that row is simply redone
        preds[str(item["index"])] = item["prediction"]
    return preds


def prepare(data: Path, dataset_type: str | None, image_root: str | Path | None) -> tuple[DatasetSpec, Table]:
    """Read and check a dataset file (columns, answers, where images come from) without any model."""
    spec = resolve_spec(data, dataset_type)
    table = read_tsv(data)
    check_images(table, Path(image_root) if image_root is not None else None)
    _validate_answers(table, spec)
    return spec, table


def evaluate_file(model, tokenizer, data: str | Path, out_dir: str | Path, *, model_name: str,
                  dataset_type: str | None = None, image_root: str | Path | None = None, batch_size: int = 1,
                  max_tiles: int | None = None, max_new_tokens: int | None = None, prompt_style: str = "internvl",
                  limit: int | None = None, progress: bool | None = None, log=sys.stderr,
                  table: Table | None = None) -> dict:
    """Run (or resume) one dataset and score it; returns the summary written to MODEL_DATA_score.json."""
    from tqdm import tqdm

    from hovle import load_image

    data = Path(data)
    spec, table = prepare(data, dataset_type, image_root) if table is None else (resolve_spec(data, dataset_type), table)
    root = Path(image_root) if image_root is not None else None
    rows = table.rows[:limit] if limit else table.rows
    cfg = model.config
    tiles = max_tiles or (spec.max_tiles if cfg.dynamic_image_size else 1)
    gen = dict(max_new_tokens=max_new_tokens or spec.max_new_tokens, do_sample=False)
    meta = {"dataset_type": spec.name, "prompt_style": prompt_style, "max_tiles": tiles,
            "max_new_tokens": gen["max_new_tokens"], "tile_size": cfg.tile_size, "use_thumbnail": cfg.use_thumbnail}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{model_name}_{data.stem}"
    cache = out_dir / f"{stem}.jsonl"
    preds = _load_cache(cache, meta)
    todo = [r for r in rows if r.index not in preds]
    if not cache.is_file() or cache.stat().st_size == 0:
        cache.write_text(json.dumps({"meta": meta}) + "\n", encoding="utf-8")
    with cache.open("a", encoding="utf-8") as f, \
            tqdm(total=len(todo), desc=data.stem, unit="q", disable=None if progress is None else not progress,
                 file=log) as bar:
        for start in range(0, len(todo), max(1, batch_size)):
            chunk = todo[start:start + max(1, batch_size)]
            pixels = [load_image(row_image(table, r, root), input_size=cfg.tile_size, max_num=tiles,
                                 min_num=cfg.min_dynamic_patch, use_thumbnail=cfg.use_thumbnail) for r in chunk]
            prompts = [build_prompt(r, spec, prompt_style) for r in chunk]
            if batch_size <= 1:
                replies = [model.chat(tokenizer, pixels[0], prompts[0], gen)]
            else:
                import torch

                replies = model.batch_chat(tokenizer, torch.cat(pixels), prompts, gen,
                                           num_patches_list=[p.shape[0] for p in pixels])
            for r, reply in zip(chunk, replies):
                preds[r.index] = reply
                f.write(json.dumps({"index": r.index, "prediction": reply}, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))

    columns = [c for c in table.columns if c not in ("image", "__row__")]
    with (out_dir / f"{stem}.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns + ["prediction", "extracted", "hit"])
        for r in rows:
            p = preds[r.index]
            w.writerow([r.cells.get(c, "") for c in columns] + [p, *_row_result(r, spec, p)])

    done = {r.index: preds[r.index] for r in rows}
    scores = score(table, spec, done)
    summary = {"model": model_name, "dataset": data.stem, "dataset_type": spec.name, "metric": spec.metric,
               "rows": len(rows), "scored_rows": sum(r.get("answer") is not None for r in rows),
               "settings": meta, "scores": scores}
    if scores is not None:
        summary["headline"] = dict(zip(("name", "value"), headline(spec.metric, scores)))
    (out_dir / f"{stem}_score.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    text = format_table(f"{model_name} on {data.stem} ({spec.description})", spec, scores)
    (out_dir / f"{stem}_score.txt").write_text(text, encoding="utf-8")
    return summary | {"table": text}


def cmd_eval(args) -> None:
    from hovle.cli import _load

    if args.batch_size < 1:
        raise TSVError(f"--batch-size {args.batch_size}: must be at least 1")
    datasets = [Path(d) for d in args.data]
    tables = {}
    for d in datasets:  # a bad file fails now, before the model is loaded
        if not d.is_file():
            raise TSVError(f"{d}: no such file")
        resolve_spec(d, args.dataset_type)
    for d in datasets:
        _, table = prepare(d, args.dataset_type, args.image_root)
        if len(datasets) == 1:  # several files are checked here, then read again one at a time to save memory
            tables[d] = table
    model, tokenizer = _load(args)
    name = args.model_name or Path(args.model).resolve().name
    for d in datasets:
        result = evaluate_file(model, tokenizer, d, args.out, model_name=name, dataset_type=args.dataset_type,
                               image_root=args.image_root, batch_size=args.batch_size, max_tiles=args.max_tiles,
                               max_new_tokens=args.max_new_tokens, prompt_style=args.prompt_style, limit=args.limit,
                               table=tables.pop(d, None))
        print(result["table"], end="", flush=True)


def add_eval_parser(subparsers) -> None:
    """Register `hovle eval` on an argparse subparsers object (hovle.cli.build_parser calls this)."""
    from hovle.cli import DEFAULT_MODEL, MODEL_HELP, add_dtype_argument, add_quantize_argument

    e = subparsers.add_parser("eval", help="score a checkpoint on VLMEvalKit TSV benchmarks (MME, POPE, MMBench, ...)")
    e.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    e.add_argument("--data", required=True, action="append",
                   help="VLMEvalKit TSV file (e.g. MME.tsv, MMBench_DEV_EN.tsv); repeat for several")
    e.add_argument("--dataset-type", choices=list(SPECS),
                   help="how to prompt and score (default: from the file name)")
    e.add_argument("--out", required=True, help="output folder (predictions, cache, scores)")
    e.add_argument("--image-root", help="folder for the image_path column when the TSV has no image column")
    e.add_argument("--batch-size", type=int, default=1, help="questions per forward pass (batch_chat); default 1")
    e.add_argument("--max-tiles", type=int, help="max tiles per image (default: per dataset, InternVL's settings)")
    e.add_argument("--max-new-tokens", type=int, help="default: 32 yes/no, 64 multiple choice and VQA")
    e.add_argument("--prompt-style", choices=["internvl", "vlmevalkit"], default="internvl",
                   help="multiple-choice prompt wording (default internvl)")
    e.add_argument("--model-name", help="name used in output files (default: the checkpoint folder's name)")
    e.add_argument("--limit", type=int, help="only the first N rows (smoke tests)")
    add_dtype_argument(e)
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    add_quantize_argument(e)
    e.set_defaults(func=cmd_eval)
