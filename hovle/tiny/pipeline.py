"""HoVLE-Tiny end to end: the steps around `hovle train` (data + init checkpoint, and evaluation).

    python -m hovle.tiny.pipeline prepare  --out runs/tiny [--train N --heldout N --eval-per-type N ...]
    python -m hovle.tiny.pipeline pool     --out runs/tiny --splits 16      # optional: fresh Stage III images
    python -m hovle.tiny.pipeline selfchat --out runs/tiny                  # optional: SmolLM2's own chats
    hovle train examples/tiny/stage1_distill.yaml      # Stage I  -> runs/tiny/stage1/final
    hovle train examples/tiny/stage2_align.yaml        # Stage II -> runs/tiny/stage2/final
    hovle train examples/tiny/stage3_sft.yaml          # Stage III (LoRA, merged) -> runs/tiny/stage3/final
    python -m hovle.tiny.pipeline ship --model runs/tiny/stage3/final --out runs/tiny/stage3/shipped --rank 16
    hovle train examples/tiny/module_text.yaml         # the module's text path -> runs/tiny/module_text/final
    python -m hovle.tiny.pipeline ship --model runs/tiny/module_text/final --out runs/tiny/module_text/shipped --rank 16
    hovle train examples/tiny/text_kl.yaml             # distilled into SmolLM2's next tokens -> runs/tiny/text_kl/final
    python -m hovle.tiny.pipeline ship --model runs/tiny/text_kl/final --out runs/tiny/hovle-tiny --rank 24
    python -m hovle.tiny.pipeline evaluate --model runs/tiny/hovle-tiny --data runs/tiny/data/eval.jsonl \
        --json runs/tiny/eval.json

`make tiny-model` chains them; every step skips itself when its output exists and `hovle train` resumes
from its own checkpoints, so re-running it continues an interrupted run (docs/hovle-tiny.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from hovle.weights import atomic_write

DONE = "DONE.json"  # written last into a finished data folder / init folder


def _write_text(path: Path, text: str) -> None:
    """Write through a temp file and rename, so an interrupted run never leaves a half-written file."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2) + "\n")


def prepare(out: str | Path, n_train: int, n_heldout: int, n_eval_per_type: int, seed: int = 0,
            max_tiles: int = 2, embedding_layers: int = 3, cache_dir: str | Path | None = None) -> dict[str, Any]:
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


def _pool_split(args: tuple[Path, str, int, int]) -> str:
    from hovle.tiny import data as D

    root, name, n_images, seed = args
    D.write_split(root, name, n_images, seed)
    return name


def pool(out: str | Path, splits: int, images: int = 1000, seed: int = 300, workers: int | None = None) -> dict[str, Any]:
    """Render `splits` x `images` fresh scenes (seeds seed..seed+splits-1, disjoint from prepare's streams) into
    out/data and concatenate their chats into out/data/pool_sft.jsonl: a Stage III pool larger than the
    train split, for budgets that see more samples than it holds (the shipped model: 600 x 32 on one GPU)."""
    from concurrent.futures import ProcessPoolExecutor

    if splits < 1 or images < 1:
        raise ValueError(f"pool needs splits >= 1 and images >= 1, got {splits} x {images}")
    data_dir = Path(out) / "data"
    marker = data_dir / "pool_DONE.json"
    if marker.is_file():
        print(f"pool: {marker} exists, skipped")
        return json.loads(marker.read_text())
    t = time.perf_counter()
    names = [f"pool{k:02d}" for k in range(splits)]
    jobs = [(data_dir, name, images, seed + k) for k, name in enumerate(names)]
    with ProcessPoolExecutor(workers or os.cpu_count()) as ex:
        for name in ex.map(_pool_split, jobs):
            print(f"pool: wrote {name}")
    def concat(tmp: Path) -> None:  # streamed: 16 splits are tens of MB
        with open(tmp, "wb") as f:
            for name in names:
                with open(data_dir / f"{name}_sft.jsonl", "rb") as part:
                    shutil.copyfileobj(part, f)

    atomic_write(data_dir / "pool_sft.jsonl", concat)
    report = {"splits": splits, "images": splits * images, "seed": seed, "seconds": round(time.perf_counter() - t, 1)}
    _write_json(marker, report)
    print(f"pool: {report['images']} images in {report['seconds']} s -> {data_dir / 'pool_sft.jsonl'}")
    return report


def selfchat(out: str | Path, model_dir: str | Path, n: int, seed: int = 0) -> dict[str, Any]:
    """Write `out/data/selfchat_sft.jsonl`: `n` text-only chats the step-0 LLM (SmolLM2) writes itself
    (`hovle.tiny.data.self_chat`), and `selfchat_prose.txt`: their turns as plain lines (`prose_lines`), both
    as text rows in SmolLM2's own distribution for a language KL (not part of `make tiny-model`). The chats are
    skipped when they exist."""
    import torch

    from hovle import HoVLE, load_tokenizer
    from hovle.tiny import data as D

    path = Path(out) / "data" / "selfchat_sft.jsonl"
    prose = path.with_name("selfchat_prose.txt")
    report: dict[str, Any] = {"path": str(path), "prose": str(prose)}
    if path.is_file():
        print(f"selfchat: {path} exists, skipped")
        pairs = [tuple(turn["value"] for turn in row["conversations"]) for row in D.read_jsonl(path)]
        report["skipped"] = True
    else:
        if n < 1:
            raise ValueError(f"--n must be at least 1, got {n}")
        t = time.perf_counter()
        model = HoVLE.from_pretrained(model_dir, dtype=torch.bfloat16)
        pairs = D.self_chat(model, load_tokenizer(model_dir), n, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        D.write_jsonl(path, (D.text_sample(p) for p in pairs))
        report |= {"chats": len(pairs), "seconds": round(time.perf_counter() - t, 1)}
        print(f"selfchat: {len(pairs)} chats in {report['seconds']} s -> {path}")
    D.write_lines(prose, D.prose_lines(pairs))
    return report


# Held-out English for the language check: written for this file, never in the training data. 26 passages,
# 986 SmolLM2 tokens (a perplexity bar of +-10% needs that many; run-history entries before 2026-11-27 (late)
# quote the first four alone, 163 tokens).
HELDOUT_TEXT = (
    "The river starts high in the mountains, where snow melts every spring. It runs through narrow valleys and "
    "small villages before it reaches the wide plain, where farmers use its water to grow wheat and vegetables.",
    "Libraries lend books, but they also offer quiet rooms to study, free internet access and reading groups "
    "for children. Many towns see their library as a meeting place for people of all ages.",
    "To make a simple tomato sauce, warm some olive oil in a pan, add a chopped onion and cook it slowly until "
    "it is soft. Then add the tomatoes, a pinch of salt and a little sugar, and let it simmer for twenty minutes.",
    "Bicycles are one of the most efficient ways to travel. A rider can cover several kilometres in a few "
    "minutes, and the bicycle needs no fuel, little space and only simple repairs.",
    "When water freezes, its molecules arrange themselves into a regular lattice that takes up more room than "
    "the liquid. That is why ice floats, and why a bottle left in the freezer can crack.",
    "The old lighthouse keeper climbed the stairs every evening at sunset. He cleaned the lens, checked the oil "
    "and wrote a short note in the logbook about the weather and the ships he had seen.",
    "A good night's sleep helps the body repair itself and the mind sort through the events of the day. Adults "
    "usually need between seven and nine hours, while teenagers need a little more.",
    "Before the printing press, books were copied by hand, often by monks working in quiet rooms. A single "
    "copy of a long book could take a year or more to finish.",
    "To plant a tree, dig a hole twice as wide as its roots but no deeper. Set the tree in the hole, fill it "
    "with soil, press the soil down gently and water it well.",
    "Bees visit thousands of flowers each day. As they collect nectar, pollen sticks to their bodies and is "
    "carried from one flower to the next, which helps the plants make seeds.",
    "The train left the station a few minutes late. Outside the window, the city gave way to fields, then to "
    "forests, and by the afternoon the first hills appeared on the horizon.",
    "Saving money is easier with a simple plan. Write down what you earn and what you spend each month, decide "
    "how much you want to keep, and move that amount to a separate account as soon as you are paid.",
    "Volcanoes form where molten rock from deep inside the Earth finds a way to the surface. Some erupt with "
    "great explosions, while others release slow rivers of lava that cool into new land.",
    "She opened the letter slowly, unsure of what it would say. After reading the first line, she smiled, "
    "folded it carefully and put it back in the envelope to read again later.",
    "Exercise does not have to mean hours in a gym. A brisk walk, a short bicycle ride or a few minutes of "
    "stretching every day can improve your mood, your sleep and your health.",
    "The moon has no light of its own. It reflects the light of the sun, and as it travels around the Earth "
    "we see different parts of its lit side, which gives us the phases from new moon to full moon.",
    "Many people learn a second language at school, but they forget most of it because they never use it. "
    "Speaking with others, even for a few minutes a week, is one of the best ways to remember new words.",
    "The museum opened a new room last spring. It shows tools, clothes and toys from the last two hundred "
    "years, and visitors can touch some of the objects and try them out for themselves.",
    "Bread needs only flour, water, salt and yeast. The yeast feeds on the sugars in the flour and makes small "
    "bubbles of gas, which is what makes the dough rise before it goes into the oven.",
    "A map is a small picture of a large place. It leaves out most details and keeps only what the reader "
    "needs, such as roads, rivers, towns and the distances between them.",
    "The storm arrived just after midnight. Rain hit the windows, the wind bent the trees in the garden, and "
    "for a few hours the whole street was without power.",
    "Computers store everything as numbers. A letter, a colour or a sound is turned into a pattern of ones and "
    "zeros, and programs tell the machine what to do with those patterns.",
    "Children often ask why the sky is blue. Sunlight contains every colour, but the air scatters blue light "
    "more than red light, so blue reaches our eyes from every part of the sky.",
    "Our neighbours keep chickens in a small yard behind their house. Every morning the children collect the "
    "eggs, and on weekends they sell the extra ones at a table by the road.",
    "Recycling saves energy and raw materials. An aluminium can, for example, can be melted down and made into "
    "a new can in a few weeks, using far less energy than making one from ore.",
    "The team had trained for months, but the final match was harder than anyone expected. They were behind "
    "until the last few minutes, when a quick pass led to the winning goal.",
)
TEXT_QUESTIONS = ("What is the capital of France?", "Give me two tips for sleeping better.",
                  "Write a haiku about the sea.", "What is 12 + 7?")
SANITY_QUESTION = "What is in this image?"


REPLY_REQUEST = "Write a short paragraph."  # the user turn before each passage in the reply perplexity


def _perplexity(model, rows: list[tuple[list[int], int]]) -> tuple[float, int]:
    """exp(mean NLL) of the tokens of each (ids, k) row from index k on, and how many tokens that is."""
    import math

    import torch

    nll, n = 0.0, 0
    with torch.inference_mode():
        for ids, k in rows:
            x = torch.tensor([ids])
            logits = model(x).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0, k - 1:-1], x[0, k:], reduction="sum").item()
            n += len(ids) - k
    return math.exp(nll / n), n


def language_report(model, tokenizer, max_new_tokens: int = 48) -> dict[str, Any]:
    """The check that training kept SmolLM2's language: perplexity of the whole model on HELDOUT_TEXT (text
    passes through the embedding module as in chat) as plain text, and again as the assistant's reply to
    REPLY_REQUEST in the chat template (how the model is used: every chat starts with the same template
    tokens, where plain text starts with a content word); and greedy replies to TEXT_QUESTIONS."""
    from hovle.chat import get_template

    t = get_template(model.config.template)
    prompt = t.system_block() + t.user + REPLY_REQUEST + t.sep + t.assistant
    k = len(tokenizer.encode(prompt))
    plain, n = _perplexity(model, [(tokenizer.encode(text), 1) for text in HELDOUT_TEXT])
    reply, n_reply = _perplexity(model, [(tokenizer.encode(prompt + text), k) for text in HELDOUT_TEXT])
    replies = {q: model.chat(tokenizer, None, q, dict(max_new_tokens=max_new_tokens, do_sample=False))
               for q in TEXT_QUESTIONS}
    return {"perplexity": plain, "tokens": n, "reply_perplexity": reply, "reply_tokens": n_reply, "replies": replies}


def photo_report(model, tokenizer, max_new_tokens: int = 48) -> dict[str, str]:
    """Greedy replies about the real photos kept out of training (scikit-image's cat and coffee)."""
    import torch

    from hovle import load_image
    from hovle.tiny.data import HELD_OUT_PHOTOS, photo_dir

    cfg = model.config
    out = {}
    with torch.inference_mode():
        for name in HELD_OUT_PHOTOS:
            pixels = load_image(photo_dir() / name, input_size=cfg.tile_size, max_num=cfg.max_dynamic_patch,
                                use_thumbnail=cfg.use_thumbnail)
            out[name] = model.chat(tokenizer, pixels, SANITY_QUESTION, dict(max_new_tokens=max_new_tokens, do_sample=False))
    return out


def evaluate(model_dir: str | Path, data: str | Path, json_out: str | Path | None = None, limit: int | None = None,
             max_new_tokens: int = 24, threads: int | None = None, baseline: str | Path | None = None) -> dict[str, Any]:
    """Greedy `model.chat` over eval.jsonl rows (first question of each), scored by `score_answer`, plus the
    language check (`language_report`, also for `baseline`, e.g. the step-0 model = SmolLM2) and the replies
    about held-out real photos (`photo_report`).

    Prints per-type accuracy; writes {"accuracy": {type: acc}, "overall", "n", "rows": [...], "language",
    "baseline_language", "photos"} to json_out. `limit` takes the first `limit` rows of each question type.
    """
    import torch

    from hovle import HoVLE, load_image, load_tokenizer
    from hovle.tiny.data import read_jsonl, score_answer

    if threads:
        torch.set_num_threads(threads)
    data = Path(data)
    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = HoVLE.from_pretrained(model_dir, dtype=torch.float32)
    cfg = model.config
    max_tiles = cfg.max_dynamic_patch if cfg.dynamic_image_size else 1
    rows = read_jsonl(data)
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
    report["language"] = language_report(model, tokenizer)
    lang = report["language"]
    print(f"perplexity on held-out text: {lang['perplexity']:.2f} (as a chat reply: {lang['reply_perplexity']:.2f})")
    if baseline is not None:
        base = HoVLE.from_pretrained(baseline, dtype=torch.float32)
        report["baseline_language"] = language_report(base, load_tokenizer(baseline))
        lang = report["baseline_language"]
        print(f"baseline ({baseline}) perplexity: {lang['perplexity']:.2f} (as a chat reply: {lang['reply_perplexity']:.2f})")
    report["photos"] = photo_report(model, tokenizer)
    for name, reply in report["photos"].items():
        print(f"{name}: {reply!r}")
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        _write_json(json_out, report)
        print(f"evaluate: wrote {json_out}")
    return report


def _image_tokens(model, folder: Path, images: list[str], batch: int = 32):
    """The image tokens [N, n, C] (fp32) that the embedding module hands the LLM, one tile per image."""
    import torch

    from hovle import load_image

    cfg = model.config
    ctx = cfg.embedding.img_context_token_id
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            pixels = torch.cat([load_image(folder / p, input_size=cfg.tile_size, max_num=1) for p in images[i:i + batch]])
            ids = torch.full((len(pixels), cfg.num_image_token), ctx)
            out.append(model.embed(ids, pixels.to(model.dtype)).float())
    return torch.cat(out)


def _image_features(model, folder: Path, images: list[str]):
    """Mean- and max-pooled image tokens and the last one [N, 3C]. The module is causal: only the last token has
    seen the whole tile (distill.count_weight)."""
    import torch

    x = _image_tokens(model, folder, images)
    return torch.cat([x.mean(1), x.amax(1), x[:, -1]], -1)


def word_map_check(model_dir: str | Path, captions: str | Path, n: int = 400) -> dict[str, float]:
    """How well the image tokens write distill.word_weight's map, on the first `n` images with objects of a
    {split}_caption.jsonl (one tile each): the share of objects whose centre token is nearest their colour word
    and whose next token is nearest their shape word (among the attribute's values; where that token is not
    another object's centre), and the share of quiet tokens under half a word's norm."""
    import math

    import torch

    from hovle import HoVLE, load_tokenizer
    from hovle.tiny.data import COLORS, SHAPES, read_jsonl
    from hovle.train.data import object_targets
    from hovle.train.trainer import attribute_word_embeddings, word_map, word_positions

    captions = Path(captions)
    rows = [r for r in read_jsonl(captions) if r.get("objects")][:n]
    model = HoVLE.from_pretrained(model_dir)
    labels = {"color": list(COLORS), "shape": list(SHAPES)}
    words = attribute_word_embeddings(labels, load_tokenizer(model_dir), model.language_model.tok_embeddings.weight.detach())
    grid = math.isqrt(model.config.num_image_token)
    targets = torch.stack([object_targets(r["objects"], labels, grid) for r in rows])  # [N, n, K]
    x = _image_tokens(model, captions.parent, [r["image"] for r in rows])  # [N, n, C]
    _, _, quiet = word_map(targets, words)
    centre = word_positions(targets)
    tile, pos = centre.nonzero(as_tuple=True)
    color_hit = torch.cdist(x[tile, pos], words[0]).argmin(-1) == targets[tile, pos, 1]
    shaped = (pos + 1 < grid * grid) & ~centre[tile, (pos + 1).clamp(max=grid * grid - 1)]
    t, p = tile[shaped], pos[shaped]
    shape_hit = torch.cdist(x[t, p + 1], words[1]).argmin(-1) == targets[t, p, 2]
    word_norm = float(torch.cat(words).norm(dim=-1).mean())
    report = {"map_color": float(color_hit.float().mean()),
              "map_shape": float(shape_hit.float().mean()),
              "map_quiet": float((x[quiet].norm(dim=-1) < word_norm / 2).float().mean())}
    print(f"word map: {len(pos)} objects in {len(rows)} images: colour words {report['map_color']:.1%}, shape words "
          f"{report['map_shape']:.1%} ({len(t)}), quiet tokens {report['map_quiet']:.1%}")
    return report


def probe(model_dir: str | Path, scenes: str | Path, n: int = 600, seed: int = 0) -> dict[str, float]:
    """Linear-probe check of what the image tokens carry: held-out accuracy of a logistic regression on pooled
    and last image tokens predicting the object's colour and shape (one-object scenes) and the number of objects (1-5,
    counting and mixed scenes), 3/4 train, 1/4 test. Run it on Stage I's output before spending hours on Stages II and III."""
    import torch

    from hovle import HoVLE
    from hovle.tiny.data import read_jsonl

    scenes = Path(scenes)
    rows = read_jsonl(scenes)
    tasks = {
        "color": [(r["image"], r["scene"]["objects"][0]["color"]) for r in rows if r["scene"]["kind"] == "single"],
        "shape": [(r["image"], r["scene"]["objects"][0]["shape"]) for r in rows if r["scene"]["kind"] == "single"],
        "count": [(r["image"], len(r["scene"]["objects"])) for r in rows if r["scene"]["kind"] in ("count", "multi")
                  and len(r["scene"]["objects"]) <= 5],
    }
    model = HoVLE.from_pretrained(model_dir)
    cache: dict[str, torch.Tensor] = {}
    report = {}
    for task, pairs in tasks.items():
        pairs = pairs[:n]
        if len(pairs) < 8 or len({y for _, y in pairs}) < 2:
            print(f"probe {task:6s} skipped: {len(pairs)} images")
            continue
        todo = [p for p, _ in pairs if p not in cache]
        if todo:
            cache.update(zip(todo, _image_features(model, scenes.parent, todo)))
        x = torch.stack([cache[p] for p, _ in pairs])
        classes = sorted({y for _, y in pairs})
        y = torch.tensor([classes.index(lab) for _, lab in pairs])
        cut = 3 * len(pairs) // 4
        mu, sd = x[:cut].mean(0), x[:cut].std(0) + 1e-6
        x = (x - mu) / sd
        torch.manual_seed(seed)
        head = torch.nn.Linear(x.shape[1], len(classes))
        opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(x[:cut]), y[:cut]) + 1e-3 * head.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            report[task] = (head(x[cut:]).argmax(1) == y[cut:]).float().mean().item()
        print(f"probe {task:6s} {report[task]:6.1%}  ({len(pairs) - cut} test, {len(classes)} classes)")
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
    a.add_argument("--embedding-layers", type=int, default=3)
    o = sub.add_parser("pool", help="render extra images for Stage III into out/data/pool_sft.jsonl")
    o.add_argument("--out", default="runs/tiny")
    o.add_argument("--splits", type=int, required=True, help="splits of --images each, rendered in parallel")
    o.add_argument("--images", type=int, default=1000)
    o.add_argument("--seed", type=int, default=300, help="split k uses seed + k")
    o.add_argument("--workers", type=int, help="processes (default: all cores)")
    c = sub.add_parser("selfchat", help="text-only chats the LLM writes itself, into out/data/selfchat_sft.jsonl (+ selfchat_prose.txt)")
    c.add_argument("--out", default="runs/tiny")
    c.add_argument("--model", help="whose LLM writes them (default: out/init, i.e. SmolLM2)")
    c.add_argument("--n", type=int, default=256, help="chats to keep (256 take about an hour on 2 CPU cores)")
    c.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("ship", help="write the shipped form (embedding module + low-rank LLM deltas) of a trained model")
    s.add_argument("--model", required=True, help="a trained folder (e.g. stage3/final)")
    s.add_argument("--out", required=True)
    s.add_argument("--rank", type=int, default=16, help="rank of the LLM deltas (the sum of the LoRA ranks trained on SmolLM2)")
    s.add_argument("--truncate", action="store_true",
                   help="keep each LLM delta's best rank-RANK part when it has more (a LoRA continued a shipped model)")
    r = sub.add_parser("probe", help="linear-probe colour/shape/count from a model's image tokens")
    r.add_argument("--model", required=True)
    r.add_argument("--scenes", required=True, help="a {split}_scenes.jsonl (images relative to its folder)")
    r.add_argument("--n", type=int, default=600, help="images per task")
    w = sub.add_parser("mapcheck", help="how well a model's image tokens write distill.word_weight's word map")
    w.add_argument("--model", required=True)
    w.add_argument("--captions", required=True, help="a {split}_caption.jsonl with object boxes")
    w.add_argument("--n", type=int, default=400, help="images with objects")
    e = sub.add_parser("evaluate", help="per-type accuracy of model.chat on eval.jsonl")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True, help="eval.jsonl (images relative to its folder)")
    e.add_argument("--json", help="write the report here")
    e.add_argument("--limit", type=int, help="first N questions of each type")
    e.add_argument("--max-new-tokens", type=int, default=24)
    e.add_argument("--threads", type=int)
    e.add_argument("--baseline", help="also run the language check on this model (e.g. the step-0 init = SmolLM2)")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except FileNotFoundError as e:  # a missing input folder or file: say which, and what makes it
        hint = f" (run `prepare --out {args.out}` first, or name a model folder with --model)" if args.command == "selfchat" else ""
        p.error(f"{e}{hint}")
    except ValueError as e:  # bad arguments, or a config that names the field (ConfigError)
        p.error(str(e))


def _run(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        prepare(args.out, args.train, args.heldout, args.eval_per_type, args.seed, args.max_tiles,
                args.embedding_layers)
    elif args.command == "pool":
        pool(args.out, args.splits, args.images, args.seed, args.workers)
    elif args.command == "selfchat":
        selfchat(args.out, args.model or Path(args.out) / "init", args.n, args.seed)
    elif args.command == "probe":
        probe(args.model, args.scenes, args.n)
    elif args.command == "mapcheck":
        word_map_check(args.model, args.captions, args.n)
    elif args.command == "ship":
        from hovle.tiny.ship import export

        manifest = export(args.model, args.out, args.rank, truncate=args.truncate)
        print(f"ship: wrote {args.out} ({manifest['bytes'] / 2**20:.1f} MiB, {manifest['llm_deltas']} LLM deltas, "
              f"{manifest['delta_left_out']:.1e} of a delta's norm left out at most)")
    else:
        report = evaluate(args.model, args.data, args.json, args.limit, args.max_new_tokens, args.threads,
                          args.baseline)
        if not report["n"]:
            print("evaluate: no rows", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
