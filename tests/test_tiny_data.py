"""Procedural HoVLE-Tiny data: determinism, balance, pixels that match the metadata, JSONL files, scoring."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hovle.evaluate.prompts import SHORT_ANSWER
from hovle.tiny import data as D


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    for name in ("a", "b"):
        D.write_split(tmp_path / name, "train", 6, seed=7)
        D.write_eval(tmp_path / name, 1, seed=8)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b and len(a) == 6 + 5 + 6  # images, eval images, 4 split files + eval.jsonl + the eval TSV
    D.write_split(tmp_path / "c", "train", 6, seed=9)
    c = _digest(tmp_path / "c")
    assert sum(c[k] != a[k] for k in c if k.startswith("images/")) == 6


def test_sample_does_not_depend_on_split_size():
    assert D.sample_scene(3, 5) == D.sample_scene(3, 5)
    assert D.sample_scene(3, 5) != D.sample_scene(4, 5)
    assert json.loads(json.dumps(D.sample_scene(3, 5))) == D.sample_scene(3, 5)  # JSON-able


def test_counts_are_balanced():
    counts = Counter(D.sample_scene(0, i, kind="count")["count_query"]["count"] for i in range(500))
    assert set(counts) == {1, 2, 3, 4, 5}
    assert all(70 <= counts[n] <= 130 for n in counts), counts
    answers = Counter(qa["expected"] for i in range(1000) for qa in D.questions(D.sample_scene(0, i), random.Random(i))
                      if qa["qtype"] == "count")
    share = {n: answers[n] / sum(answers.values()) for n in answers}
    assert all(0.12 < share[str(n)] < 0.28 for n in range(1, 6)), share  # training questions too
    assert sum(share[n] for n in share if int(n) > 5) < 0.1, share  # "how many shapes" in a busy count scene
    kinds = Counter(D.sample_scene(0, i)["kind"] for i in range(500))
    assert set(kinds) == set(D.SCENE_KINDS)
    evals = [D.eval_sample("count", 1, i, k)[1]["expected"] for i, k in enumerate(range(10))]
    assert Counter(evals) == {str(n): 2 for n in range(1, 6)}
    rels = [D.eval_sample("position", 1, i, k)[1]["expected"] for i, k in enumerate(range(8))]
    assert Counter(rels) == {r: 2 for r in D.RELATIONS}


def test_every_count_a_scene_holds_is_a_question():
    objs = [{"shape": s, "color": c} for s, c in [("circle", "red"), ("circle", "red"), ("star", "red"),
                                                     ("circle", "blue"), ("square", "green")]]
    queries = {(q["by"], q["shape"], q["color"]): q["count"] for q in D.count_queries(objs)}
    assert queries == {("all", None, None): 5, ("color", None, "red"): 3, ("color", None, "blue"): 1,
                       ("color", None, "green"): 1, ("shape", "circle", None): 3, ("shape", "star", None): 1,
                       ("shape", "square", None): 1, ("both", "circle", "red"): 2, ("both", "star", "red"): 1,
                       ("both", "circle", "blue"): 1, ("both", "square", "green"): 1}
    assert D.count_queries(objs[::-1]) == D.count_queries(objs) and D.count_queries([]) == []
    # each question's answer is the number of objects its words name, and a count scene asks several
    n_count = []
    for i in range(200):
        scene = D.sample_scene(5, i, kind="count")
        qas = [qa for qa in D.questions(scene, random.Random(i)) if qa["qtype"] == "count"]
        n_count.append(len(qas))
        for qa in qas:  # no colour or shape word ("how many shapes / objects / things") names them all
            colors = [c for c in D.COLORS if c in qa["question"].split()]
            shapes = [s for s in D.SHAPES if s in qa["question"]]
            named = [o for o in scene["objects"]
                     if (not colors or o["color"] in colors) and (not shapes or o["shape"] in shapes)]
            assert qa["expected"] == str(len(named)), (qa, scene["objects"])
    assert 1.5 < sum(n_count) / len(n_count) < 4, n_count


def _blobs(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of a boolean mask (plain flood fill)."""
    seen = np.zeros_like(mask)
    sizes = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, n = [(y0, x0)], 0
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            n += 1
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        sizes.append(n)
    return sizes


def test_pixels_show_the_stated_shapes_and_colours():
    names = sorted(D.COLORS)
    palette = np.array([D.COLORS[c] for c in names], dtype=np.float32)
    for i in range(6):
        scene = D.sample_scene(11, i, kind="count", count=1 + i % 5, size=(224, 224))
        px = np.asarray(D.render_scene(scene), dtype=np.float32)
        dist = np.linalg.norm(px[:, :, None, :] - palette[None, None], axis=-1)  # [H, W, colours]
        nearest, close = dist.argmin(-1), dist.min(-1) < 45
        found = Counter()
        for k, c in enumerate(names):
            found[c] = sum(1 for n in _blobs(close & (nearest == k)) if n >= 20)
        stated = Counter(o["color"] for o in scene["objects"])
        assert +found == stated, (scene["objects"], found)
        q = scene["count_query"]
        match = [o for o in scene["objects"] if (q["shape"] in (None, o["shape"])) and (q["color"] in (None, o["color"]))]
        assert len(match) == q["count"] == 1 + i % 5
        # Stage I's object targets: every pixel of a shape's colour lies in a box of that colour (to a pixel)
        ys, xs = np.mgrid[0:224, 0:224] + 0.5
        covered = np.zeros((224, 224, len(names)), dtype=bool)
        for o in D.object_boxes(scene):
            x0, y0, x1, y1 = (v * 224 for v in o["box"])
            covered[..., names.index(o["color"])] |= (abs(xs - (x0 + x1) / 2) <= (x1 - x0) / 2 + 1) & (
                abs(ys - (y0 + y1) / 2) <= (y1 - y0) / 2 + 1)
        shape_px = close & (dist.min(-1) < 20)
        assert np.take_along_axis(covered, nearest[..., None], -1)[..., 0][shape_px].all()


def test_photo_scenes():
    """Real photos, cropped and mirrored, described as photos with their main colours (never their content,
    which 17 photos cannot teach); the cat and the coffee cup (the held-out sanity check) never appear."""
    pytest.importorskip("skimage")
    kinds = Counter(D.sample_scene(5, i)["kind"] for i in range(400))
    assert 20 <= kinds["photo"] <= 60, kinds  # about 9%
    seen = set()
    for i in range(60):
        scene = D.sample_scene(5, i, kind="photo")
        seen.add(scene["photo"])
        img = D.render_scene(scene)
        assert img.size == (scene["width"], scene["height"]) and img.mode == "RGB"
        assert scene["colors"] == D.main_colors(img) and np.array_equal(np.asarray(img), np.asarray(D.render_scene(scene)))
        qas = {qa["qtype"]: qa for qa in D.questions(scene, random.Random(i))}
        assert set(qas) == {"photo", "photo_colors", "photo_absent"}
        for text in (qas["photo"]["answer"], qas["photo_absent"]["answer"], D.caption(scene, random.Random(i))):
            assert "photo" in text and all(c in text for c in scene["colors"]), text
            assert not any(w in text for w in ("motorcycle", "astronaut", "rocket", "coins", "moon")), text
        assert all(c in qas["photo_colors"]["answer"] for c in scene["colors"])
    assert seen <= set(D.PHOTOS) and len(seen) >= 10 and not seen & set(D.HELD_OUT_PHOTOS)
    assert D.main_colors(Image.new("RGB", (32, 32), D.COLORS["green"]), k=2) == ["green"]


def test_image_sizes_give_one_to_several_tiles():
    tiles = {D.num_tiles(w, h) for w, h in D.IMAGE_SIZES}
    assert 1 in tiles and max(tiles) >= 4


def test_dataset_files(tmp_path):
    info = D.write_dataset(tmp_path, n_train=12, n_heldout=4, n_eval_per_type=5, seed=0)
    assert info["eval"]["per_type"] == {q: 5 for q in D.EVAL_QTYPES}
    assert info["train"]["text_only"] >= 1
    for name in ("train_sft", "train_caption", "train_scenes", "train_text", "heldout_sft", "heldout_caption", "eval"):
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert rows
        for row in rows:
            images = [row["image"]] if isinstance(row.get("image"), str) else row.get("image", [])
            for rel in images:
                with Image.open(tmp_path / rel) as im:
                    assert im.mode == "RGB" and min(im.size) >= 224
            if "caption" in row:
                assert row["caption"].strip() and images
            if "conversations" in row:
                conv = row["conversations"]
                assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
                assert all(t["value"].strip() for t in conv)
                assert conv[0]["value"].startswith("<image>\n") == bool(images)
                assert sum(t["value"].count("<image>") for t in conv) == len(images)
    train = (tmp_path / "train_sft.jsonl").read_text().splitlines()
    heldout = (tmp_path / "heldout_sft.jsonl").read_text().splitlines()
    assert not set(train) & set(heldout)
    assert (tmp_path / "train_text.jsonl").read_text().splitlines() == [r for r in train if '"image"' not in r]
    assert (tmp_path / "images/train/000000.png").read_bytes() != (tmp_path / "images/heldout/000000.png").read_bytes()
    prose = (tmp_path / "reference_prose.txt").read_text(encoding="utf-8").splitlines()
    assert len(prose) == info["reference_prose"] > 2000 and all(len(p) >= 40 and ">>>" not in p for p in prose)
    # the eval set again as a VLMEvalKit TSV, which `hovle eval` reads and scores as short-answer VQA
    from hovle.evaluate.runner import prepare

    spec, table = prepare(Path(info["eval"]["tsv"]), None, None)
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert spec.name == "vqa" and len(table.rows) == len(rows)
    assert [(r.get("question"), r.get("answer"), r.get("category")) for r in table.rows] == [
        (r["meta"]["question"], r["meta"]["expected"], r["meta"]["qtype"]) for r in rows]


def test_stage3_pool_is_its_splits_in_order_and_new_images(tmp_path, capsys):
    from hovle.tiny.pipeline import main, pool

    report = pool(tmp_path, splits=2, images=3, seed=300, workers=2)
    data = tmp_path / "data"
    assert report["images"] == 6 and (data / "pool_DONE.json").is_file()
    parts = [(data / f"pool{k:02d}_sft.jsonl").read_text() for k in range(2)]
    assert (data / "pool_sft.jsonl").read_text() == "".join(parts) and parts[0] != parts[1]
    D.write_split(tmp_path / "train", "train", 3, seed=0)
    assert not {p.read_bytes() for p in (data / "images").rglob("*.png")} & {
        p.read_bytes() for p in (tmp_path / "train" / "images").rglob("*.png")}
    (data / "pool_sft.jsonl").unlink()
    assert pool(tmp_path, splits=2, images=3) == report  # finished: skipped, the marker's report returned
    with pytest.raises(SystemExit):
        main(["pool", "--out", str(tmp_path / "none"), "--splits", "0"])
    assert "pool needs splits >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no step-0 model to write the chats yet
        main(["selfchat", "--out", str(tmp_path / "none")])
    assert "no config.json at" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # nothing trained there to ship
        main(["ship", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "ship")])
    assert "error: no config.json at" in capsys.readouterr().err


def test_read_jsonl_is_write_jsonl_back_and_names_a_bad_line(tmp_path):
    rows = [{"a": "naïve"}, {"b": [1, 2]}]
    D.write_jsonl(tmp_path / "rows.jsonl", rows)
    assert D.read_jsonl(tmp_path / "rows.jsonl") == rows
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n\n{bad\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: not valid JSON"):
        D.read_jsonl(tmp_path / "bad.jsonl")


def test_selfchat_prose_is_each_turn_as_a_plain_line(tmp_path):
    """Existing chats are kept (no model is loaded) and their turns of 8+ words become plain-text lines."""
    from hovle.tiny.pipeline import selfchat

    pairs = [("Tell me about rivers and how they\nshape the valleys they run through.", "Rivers carry sand and stones "
              "that slowly wear   the rock away."), ("Hi there!", "Hello! How can I help you today, my friend?")]
    chats = tmp_path / "data" / "selfchat_sft.jsonl"
    chats.parent.mkdir()
    D.write_jsonl(chats, (D.text_sample(p) for p in pairs))
    report = selfchat(tmp_path, tmp_path / "no-model", n=2)
    assert report["skipped"] and (tmp_path / "data" / "selfchat_prose.txt").read_text().splitlines() == [
        "Tell me about rivers and how they shape the valleys they run through.",
        "Rivers carry sand and stones that slowly wear the rock away.", "Hello! How can I help you today, my friend?"]


def test_some_turns_use_the_benchmarks_short_answer_form():
    """hovle eval's VQA prompt (question + SHORT_ANSWER) is in the training data, answered with the bare answer."""
    short = total = 0
    for i in range(200):
        sample = D.image_sample(D.sample_scene(0, i), random.Random(i), "x.png", multi_turn=True)
        conv = sample["conversations"]
        for qtype, q, a in zip(sample["meta"]["qtypes"], conv[::2], conv[1::2]):
            total += 1
            if q["value"].endswith("\n" + SHORT_ANSWER):
                short += 1
                assert qtype in D.SHORT_ANSWER_QTYPES and 0 < len(a["value"].split()) <= 3 and "." not in a["value"]
    assert 0.05 < short / total < 0.2


def test_every_generated_answer_scores_as_correct():
    """The scorer accepts every phrasing the generator uses for the answer (and the eval set's answers)."""
    for i in range(300):
        scene = D.sample_scene(5, i)
        for qa in D.questions(scene, random.Random(i)):
            if qa["qtype"] in D.EVAL_QTYPES:
                assert D.score_answer(qa["qtype"], qa["answer"], qa["expected"], qa["question"]), qa
    for qtype in D.EVAL_QTYPES:
        for k in range(10):
            _, qa = D.eval_sample(qtype, 2, 100 * k, k)
            assert D.score_answer(qtype, qa["answer"], qa["expected"], qa["question"]), qa


@pytest.mark.parametrize("qtype, reply, expected, ok", [
    ("color", "It is red.", "red", True),
    ("color", "RED", "red", True),
    ("color", "The circle is violet.", "purple", True),
    ("color", "It is red or blue.", "red", False),
    ("color", "Reddish", "red", False),
    ("color", "", "red", False),
    ("shape", "A star.", "star", True),
    ("shape", "It looks like two stars.", "star", True),
    ("shape", "It's round.", "circle", True),
    ("shape", "A square next to a circle.", "square", False),
    ("shape", "A square or a hexagon.", "square", False),  # shapes of earlier worlds still compete
    ("shape", "It is a hexagon.", "hexagon", True),  # and eval sets of runs 1-3 still score
    ("count", "three", "3", True),
    ("count", "There are 3 circles.", "3", True),
    ("count", "I can see a single star.", "1", True),
    ("count", "There are four.", "3", False),
    ("count", "Several.", "3", False),
    ("count", "Someone drew 2 shapes.", "2", True),
    ("position", "It is to the left of the square.", "left", True),
    ("position", "Left.", "left", True),
    ("position", "The circle is on top of the star.", "above", True),
    ("position", "Underneath it.", "below", True),
    ("position", "Left or right.", "left", False),
    ("position", "To the right.", "left", False),
    ("text", 'It says "OPEN".', "OPEN", True),
    ("text", "open", "OPEN", True),
    ("text", "The word is opening.", "OPEN", False),
    ("text", "Hello world", "World", True),
])
def test_score_answer(qtype, reply, expected, ok):
    assert D.score_answer(qtype, reply, expected) is ok


def test_score_answer_ignores_items_named_in_the_question():
    q = "What colour is the shape next to the blue square?"
    assert D.score_answer("color", "The shape next to the blue square is red.", "red", q)
    assert not D.score_answer("color", "The shape next to the blue square is red.", "red")
    with pytest.raises(ValueError):
        D.score_answer("color", "red", "magenta")


def test_text_chats_are_spread_through_the_sft_split(tmp_path):
    pairs = [("What is the capital of Japan?", "Tokyo is the capital of Japan.")]
    info = D.write_split(tmp_path, "train", 9, seed=1, text_samples=pairs, text_fraction=0.25)
    rows = [json.loads(x) for x in (tmp_path / "train_sft.jsonl").read_text().splitlines()]
    text_rows = [r for r in rows if "image" not in r]
    assert len(text_rows) == info["text_only"] == 3
    assert text_rows[0]["conversations"][1]["value"] == pairs[0][1]
    assert len(D.TEXT_CHAT) >= 20
