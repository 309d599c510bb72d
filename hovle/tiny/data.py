"""Procedural vision-language data for HoVLE-Tiny: a seeded world of shapes, colours, counts, positions and
short words, rendered with PIL, described and questioned in varied English.

Everything is a pure function of (seed, index): `sample_scene(seed, index)` draws a JSON-able scene,
`render_scene(scene)` draws it (same scene -> same pixels), `caption(scene, rng)` and `questions(scene, rng)`
phrase it. Writers materialise splits in the InternVL conversation JSONL layout (plus a caption JSONL and a
scene-metadata JSONL), and a balanced eval set whose answers `score_answer` checks leniently.

Layout written by `write_dataset(root, ...)` (image paths are relative to `root`, the JSONL folder):

    root/images/{split}/{index:06d}.png
    root/{split}_sft.jsonl      {"image": "images/train/000000.png", "conversations": [...], "objects": [...], "meta": {...}}
                                text-only samples have no "image"
    root/{split}_caption.jsonl  {"image": ..., "caption": ..., "objects": [{"box", "color", "shape"}, ...]}
    root/{split}_scenes.jsonl   {"image": ..., "scene": {...}} (ground truth for analysis)
    root/{split}_text.jsonl     the text-only chats of {split}_sft.jsonl (mixed into Stage II)
    root/eval.jsonl             one question per image, "meta": {"qtype", "question", "expected", "accepted"}
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hovle.evaluate.prompts import SHORT_ANSWER
from hovle.weights import atomic_write

# ---- the world's vocabulary ------------------------------------------------------------------------------

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 210, 25),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "purple": (135, 55, 175),
    "pink": (245, 120, 185),
    "brown": (125, 75, 35),
}
COLOR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red",), "orange": ("orange",), "yellow": ("yellow",), "green": ("green",), "blue": ("blue",),
    "purple": ("purple", "violet"), "pink": ("pink",), "brown": ("brown",),
}
# Four shapes with distinct outlines. With hexagon, pentagon and diamond too (7 shapes, radii from 7% of the
# image), even direct supervision taught the embedding module shape slowly: 28% held-out after 8k images
# (a small CNN: 34%); on these four at medium and large sizes, 84% (docs/hovle-tiny.md).
SHAPES = ("circle", "square", "triangle", "star")
SHAPE_PLURALS = {s: s + "s" for s in SHAPES}
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk", "round"), "square": ("square",), "triangle": ("triangle", "triangular"),
    "star": ("star",),
}
# What scoring recognises as a shape answer: the world's shapes plus those runs 1-3 drew, so their eval sets
# still score, and "a square or a hexagon" still names a competing shape.
SHAPE_WORDS = SHAPE_SYNONYMS | {"hexagon": ("hexagon", "hexagonal"), "pentagon": ("pentagon", "pentagonal"),
                                "diamond": ("diamond", "rhombus")}
# radius / min(W, H). At 224 px a model token covers 28 px: a small shape spans 1.5-1.8 tokens (radius 10 px,
# one token, left shape at chance in HoVLE-Tiny run 2; radii of 7-9% were still learned slowly, above).
SIZES = {"small": (0.09, 0.11), "medium": (0.12, 0.145), "large": (0.16, 0.2)}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium-sized", "mid-sized"), "large": ("large", "big")}
RELATIONS = ("left", "right", "above", "below")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Backgrounds stay neutral (low saturation) so no background is ever mistaken for a shape colour.
LIGHT_BGS = {"white": (250, 250, 250), "light grey": (215, 215, 215), "cream": (245, 238, 220),
             "pale grey-blue": (222, 228, 236)}
DARK_BGS = {"dark grey": (60, 60, 60), "black": (18, 18, 18), "charcoal": (45, 48, 52)}
BG_KINDS = ("plain", "gradient", "noise", "stripes", "grid")

# (width, height) choices: 1 tile up to 6 tiles (+ thumbnail) at 224 px with max_dynamic_patch 6.
IMAGE_SIZES = ((224, 224), (224, 224), (256, 256), (320, 240), (240, 320), (448, 224), (224, 448),
               (336, 224), (224, 336), (448, 448), (512, 384), (672, 224), (448, 336))

WORDS = (
    "CAT", "DOG", "SUN", "MOON", "STAR", "TREE", "BOOK", "FISH", "BIRD", "CAKE", "MILK", "RAIN", "SNOW", "OPEN",
    "STOP", "EXIT", "PARK", "SHOP", "CAFE", "TAXI", "BUS", "HOTEL", "PIZZA", "APPLE", "LEMON", "MANGO", "HAPPY",
    "HELLO", "WORLD", "RIVER", "OCEAN", "ROBOT", "MUSIC", "DANCE", "LIGHT", "NORTH", "SOUTH", "EAST", "WEST",
    "SALE", "FREE", "WAIT", "PUSH", "PULL", "HOME", "GAME", "PLAY", "JUMP", "FAST", "SLOW", "HOT", "COLD", "BANK",
    "TEA", "JAZZ", "ZOO", "KING", "QUEEN", "BREAD", "SMILE", "CLOUD", "STORM", "GRASS", "STONE", "PAPER", "TIGER",
    "ZEBRA", "HORSE", "MOUSE", "TRAIN", "PLANE", "SHIP", "ROAD", "CITY", "FARM", "GOLD", "SILK", "WOOD", "FIRE",
    "WATER", "EARTH", "SPACE", "DREAM", "PEACE", "LOVE", "HOPE", "TIME", "NOTE", "CODE", "DATA", "INFO", "MENU",
    "PHONE", "RADIO", "VIDEO", "PHOTO", "LAMP", "DOOR", "KEY", "BOX", "CUP", "PEN", "MAP", "HAT", "RED", "BLUE",
)
FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf",
         "LiberationSans-Bold.ttf", "LiberationSerif-Bold.ttf", "LiberationSans-Regular.ttf")
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation", "/usr/share/fonts/TTF",
             "/usr/share/fonts/dejavu", "/usr/share/fonts/liberation")
INK = {"black": (20, 20, 20), "white": (250, 250, 250), "cream": (245, 238, 220), "dark grey": (60, 60, 60), **COLORS}

SCENE_KINDS = ("single", "count", "pair", "multi", "text", "photo")
SCENE_WEIGHTS = (0.2, 0.25, 0.2, 0.15, 0.2, 0.1)  # relative: photos are 0.1 / 1.1 = 9% of scenes

# Real photographs bundled with scikit-image (public domain / CC0), cropped, flipped and resized, so that the
# model says it sees a photograph (and its main colours) instead of describing shapes that are not there. Their
# content is not named: 17 photos cannot teach what a photo shows, and a model taught "a motorcycle" for two of
# them called the held-out cat a motorcycle (docs/hovle-tiny.md, session 30). The cat (chelsea.png) and
# coffee.png never enter training: they are the held-out sanity check.
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "clock_motion.png", "coins.png", "grass.png",
          "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
          "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg")
HELD_OUT_PHOTOS = ("chelsea.png", "coffee.png")
PHOTO_PALETTE = {**COLORS, "black": (20, 20, 20), "grey": (128, 128, 128), "white": (240, 240, 240)}
EVAL_QTYPES = ("color", "shape", "count", "position", "text")


# ---- scenes ------------------------------------------------------------------------------------------------


def _rng(seed: int, index: int, salt: str = "") -> random.Random:
    """A per-sample generator: sample i of a split never depends on how many samples come before it."""
    return random.Random(f"hovle-tiny:{seed}:{index}:{salt}")


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 14) -> list[int]:
    return [min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb]


def _background(rng: random.Random) -> dict[str, Any]:
    dark = rng.random() < 0.2
    names = DARK_BGS if dark else LIGHT_BGS
    name = rng.choice(sorted(names))
    kind = rng.choices(BG_KINDS, weights=(0.35, 0.2, 0.2, 0.125, 0.125))[0]
    bg: dict[str, Any] = {"kind": kind, "name": name, "dark": dark, "rgb": _jitter(names[name], rng, 6)}
    if kind == "gradient":
        other = rng.choice([n for n in sorted(names) if n != name] or [name])
        bg |= {"rgb2": _jitter(names[other], rng, 6), "name2": other,
               "direction": rng.choice(("vertical", "horizontal", "diagonal"))}
    elif kind == "noise":
        bg |= {"amount": rng.randint(6, 18), "seed": rng.randrange(2**31)}
    elif kind in ("stripes", "grid"):
        delta = rng.randint(12, 22) * (1 if dark else -1)  # lines a little lighter (dark) or darker (light)
        bg |= {"period": rng.randint(10, 28), "delta": delta,
               "orientation": rng.choice(("vertical", "horizontal", "diagonal"))}
    return bg


def _region(cx: float, cy: float, w: int, h: int) -> str:
    col = "left" if cx < w / 3 else "right" if cx > 2 * w / 3 else ""
    row = "top" if cy < h / 3 else "bottom" if cy > 2 * h / 3 else ""
    return f"{row} {col}".strip() or "center"


def _new_object(rng: random.Random, w: int, h: int, shape: str, color: str, size: str) -> dict[str, Any]:
    lo, hi = SIZES[size]
    r = round(rng.uniform(lo, hi) * min(w, h), 1)
    rotation = {"circle": 0.0, "square": rng.uniform(-15, 15), "triangle": rng.uniform(-20, 20),
                "star": rng.uniform(-20, 20)}[shape]
    return {"shape": shape, "color": color, "rgb": _jitter(COLORS[color], rng), "size": size, "r": r,
            "rotation": round(rotation, 1)}


def _fits(obj: dict, placed: Iterable[dict], gap: float) -> bool:
    return all(math.hypot(obj["cx"] - o["cx"], obj["cy"] - o["cy"]) > obj["r"] + o["r"] + gap for o in placed)


def _place(rng: random.Random, obj: dict, placed: list[dict], boxes: list[tuple], w: int, h: int,
           tries: int = 300, where=None) -> bool:
    """Put obj at a random free spot (not overlapping objects or text boxes); `where(x, y)` may constrain it."""
    gap = 0.03 * min(w, h)
    m = obj["r"] + 0.02 * min(w, h)
    for _ in range(tries):
        obj["cx"], obj["cy"] = round(rng.uniform(m, w - m), 1), round(rng.uniform(m, h - m), 1)
        if where is not None and not where(obj["cx"], obj["cy"]):
            continue
        if _fits(obj, placed, gap) and not any(_hits_box(obj, b, gap) for b in boxes):
            obj["region"] = _region(obj["cx"], obj["cy"], w, h)
            placed.append(obj)
            return True
    return False


def _hits_box(obj: dict, box: tuple, gap: float) -> bool:
    x0, y0, x1, y1 = box
    nx, ny = min(max(obj["cx"], x0), x1), min(max(obj["cy"], y0), y1)
    return math.hypot(obj["cx"] - nx, obj["cy"] - ny) < obj["r"] + gap


def relation(a: dict, b: dict) -> str | None:
    """'left' / 'right' / 'above' / 'below' when a's position relative to b is clear, else None."""
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    if abs(dx) > 2 * abs(dy) and abs(dx) > a["r"] + b["r"]:
        return "left" if dx < 0 else "right"
    if abs(dy) > 2 * abs(dx) and abs(dy) > a["r"] + b["r"]:
        return "above" if dy < 0 else "below"
    return None


def _text_item(rng: random.Random, w: int, h: int, bg: dict) -> dict[str, Any]:
    word = rng.choice(WORDS)
    case = rng.choices(("upper", "title", "lower"), weights=(0.6, 0.25, 0.15))[0]
    word = {"upper": word, "title": word.title(), "lower": word.lower()}[case]
    size = int(rng.uniform(0.13, 0.22) * min(w, h))
    plate = rng.random() < 0.35
    if plate:
        plate_color = rng.choice(("white", "cream", "black", "dark grey"))  # neutral: never mistaken for a shape
        ink = rng.choice(("black", "blue", "red")) if plate_color in ("white", "cream") else rng.choice(("white", "yellow"))
    else:
        plate_color = None
        ink = rng.choice(("white", "yellow", "orange", "pink")) if bg["dark"] else rng.choice(
            ("black", "black", "blue", "red", "green", "purple", "brown"))
    return {"word": word, "font": rng.choice(FONTS), "font_size": size, "ink": ink, "plate": plate_color}


def _place_text(rng: random.Random, item: dict, w: int, h: int) -> tuple | None:
    tw, th = _text_size(item["word"], item["font"], item["font_size"])
    pad = int(0.25 * item["font_size"]) if item["plate"] else 2
    bw, bh = tw + 2 * pad, th + 2 * pad
    if bw > w - 8 or bh > h - 8:
        return None
    x0, y0 = rng.randint(4, w - 4 - bw), rng.randint(4, h - 4 - bh)
    item |= {"x": x0 + pad, "y": y0 + pad, "box": [x0, y0, x0 + bw, y0 + bh], "region": _region(x0 + bw / 2, y0 + bh / 2, w, h)}
    return (x0, y0, x0 + bw, y0 + bh)


def sample_scene(seed: int, index: int, kind: str | None = None, variant: int = 0, **force) -> dict[str, Any]:
    """A JSON-able scene: size, background, objects (shape, colour, size, centre, radius), optional word.

    `kind` picks the scene type (else drawn with SCENE_WEIGHTS); `force` pins choices for balanced sets:
    count=n (count scenes), relation=rel (pair scenes), size=(w, h). `variant` draws another scene for the
    same (seed, index).
    """
    rng = _rng(seed, index, f"scene{variant}" if variant else "scene")
    kind = kind or rng.choices(SCENE_KINDS, weights=SCENE_WEIGHTS)[0]
    for attempt in range(50):
        scene = _try_scene(rng, kind, force)
        if scene is not None:
            scene |= {"seed": seed, "index": index, "variant": variant}
            return scene
    raise RuntimeError(f"could not lay out a {kind} scene for seed {seed}, index {index}")


def _try_scene(rng: random.Random, kind: str, force: dict) -> dict[str, Any] | None:
    w, h = force.get("size") or rng.choice(IMAGE_SIZES)
    if kind == "photo":
        return _photo_scene(rng, w, h)
    bg = _background(rng)
    objs: list[dict] = []
    boxes: list[tuple] = []
    scene: dict[str, Any] = {"kind": kind, "width": w, "height": h, "background": bg, "objects": objs, "text": None}
    colors, shapes = sorted(COLORS), list(SHAPES)
    if kind == "text":
        item = _text_item(rng, w, h, bg)
        box = _place_text(rng, item, w, h)
        if box is None:
            return None
        scene["text"], boxes = item, [box]
        for _ in range(rng.choice((0, 0, 1, 2))):
            o = _new_object(rng, w, h, rng.choice(shapes), rng.choice(colors), rng.choice(("small", "medium")))
            if not _place(rng, o, objs, boxes, w, h):
                return None
    elif kind == "single":
        o = _new_object(rng, w, h, rng.choice(shapes), rng.choice(colors), rng.choice(tuple(SIZES)))
        if not _place(rng, o, objs, boxes, w, h):
            return None
    elif kind == "count":
        n = force.get("count") or rng.randint(1, 5)
        by = rng.choice(("shape", "color", "both", "all"))
        shape, color = rng.choice(shapes), rng.choice(colors)
        size = rng.choice(("small", "medium"))
        same_color = by in ("color", "both") or rng.random() < 0.6  # "how many circles" scenes: often one colour
        for _ in range(n):
            c = color if same_color else rng.choice(colors)
            s = shape if by in ("shape", "both") or (by == "all" and rng.random() < 0.5) else rng.choice(shapes)
            if by == "color":
                s = rng.choice(shapes)
            o = _new_object(rng, w, h, s, c, size if rng.random() < 0.7 else rng.choice(("small", "medium")))
            o["target"] = True
            if not _place(rng, o, objs, boxes, w, h):
                return None
        if by != "all":
            for _ in range(rng.choice((0, 1, 1, 2, 3))):  # distractors that do not match the counted class
                if by == "shape":
                    s, c = rng.choice([x for x in shapes if x != shape]), rng.choice(colors)
                elif by == "color":
                    s, c = rng.choice(shapes), rng.choice([x for x in colors if x != color])
                else:
                    s, c = (rng.choice([x for x in shapes if x != shape]), color) if rng.random() < 0.5 else (
                        shape, rng.choice([x for x in colors if x != color]))
                o = _new_object(rng, w, h, s, c, rng.choice(("small", "medium")))
                o["target"] = False
                if not _place(rng, o, objs, boxes, w, h):
                    return None
        scene["count_query"] = {"by": by, "shape": shape if by in ("shape", "both") else None,
                                "color": color if by in ("color", "both") else None, "count": n}
    elif kind == "pair":
        rel = force.get("relation") or rng.choice(RELATIONS)
        a = _new_object(rng, w, h, rng.choice(shapes), rng.choice(colors), rng.choice(tuple(SIZES)))
        b_shape = rng.choice([s for s in shapes if s != a["shape"]])
        b = _new_object(rng, w, h, b_shape, rng.choice(colors), rng.choice(tuple(SIZES)))
        if not _place(rng, b, objs, boxes, w, h):
            return None
        if not _place(rng, a, objs, boxes, w, h, tries=600, where=lambda x, y: relation(
                {"cx": x, "cy": y, "r": a["r"]}, b) == rel):
            return None
        objs[:] = [a, b]
        scene["relation"] = {"a": 0, "b": 1, "relation": rel}
    elif kind == "multi":
        n = rng.randint(2, 5)
        combos = rng.sample([(s, c) for s in shapes for c in colors], n)
        for s, c in combos:
            o = _new_object(rng, w, h, s, c, rng.choice(("small", "medium", "medium", "large") if n <= 3 else ("small", "medium")))
            if not _place(rng, o, objs, boxes, w, h):
                return None
    else:
        raise ValueError(f"unknown scene kind {kind!r}; known: {', '.join(SCENE_KINDS)}")
    return scene


# ---- rendering ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _font(name: str, size: int) -> ImageFont.ImageFont:
    for folder in FONT_DIRS:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)  # Pillow's built-in scalable font


def _text_size(word: str, font: str, size: int) -> tuple[int, int]:
    x0, y0, x1, y1 = _font(font, size).getbbox(word)
    return x1 - x0, y1 - y0


def _paint_background(bg: dict, w: int, h: int) -> Image.Image:
    base = np.array(bg["rgb"], dtype=np.float32)
    kind = bg["kind"]
    if kind == "plain":
        arr = np.broadcast_to(base, (h, w, 3)).copy()
    elif kind == "gradient":
        other = np.array(bg["rgb2"], dtype=np.float32)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        t = {"vertical": ys / max(h - 1, 1), "horizontal": xs / max(w - 1, 1),
             "diagonal": (xs + ys) / max(w + h - 2, 1)}[bg["direction"]]
        arr = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == "noise":
        noise = np.random.default_rng(bg["seed"]).normal(0.0, bg["amount"], size=(h, w, 1)).astype(np.float32)
        arr = base + noise  # grey noise: the hue stays neutral
    else:
        ys, xs = np.mgrid[0:h, 0:w]
        coord = {"vertical": xs, "horizontal": ys, "diagonal": xs + ys}[bg["orientation"]]
        on = (coord // bg["period"]) % 2 == 1
        if kind == "grid":
            other = {"vertical": ys, "horizontal": xs, "diagonal": xs - ys}[bg["orientation"]]
            on = (coord % bg["period"] < 2) | (other % bg["period"] < 2)
        arr = base + on[..., None] * np.float32(bg["delta"])
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def shape_points(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of outer radius r (circle: not a polygon, handled by the caller)."""
    rot = math.radians(rotation)

    def ring(n: int, radius: float, start: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(start + rot + 2 * math.pi * k / n),
                 cy + radius * math.sin(start + rot + 2 * math.pi * k / n)) for k in range(n)]

    if shape == "square":
        return ring(4, r, math.pi / 4)
    if shape == "triangle":
        pts = ring(3, r, -math.pi / 2)
        return [(x, y + 0.25 * r) for x, y in pts]  # centre the triangle's box on cy
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, 0.45 * r, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    raise ValueError(f"unknown shape {shape!r}")


def photo_dir() -> Path:
    """scikit-image's data folder (found without importing scikit-image)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("HoVLE-Tiny's photo samples come from scikit-image: pip install scikit-image==0.26.0")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@lru_cache(maxsize=len(PHOTOS))
def _photo(name: str) -> Image.Image:
    return Image.open(photo_dir() / name).convert("RGB")


def main_colors(img: Image.Image, k: int = 2) -> list[str]:
    """The `k` palette colours (shape colours plus black, grey, white) that most pixels are nearest to."""
    px = np.asarray(img.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32).reshape(-1, 3)
    names = list(PHOTO_PALETTE)
    pal = np.array([PHOTO_PALETTE[n] for n in names], dtype=np.float32)
    nearest = ((px[:, None] - pal[None]) ** 2).sum(-1).argmin(1)
    return [names[i] for i, _ in Counter(nearest.tolist()).most_common(k)]


def _photo_scene(rng: random.Random, w: int, h: int) -> dict[str, Any]:
    """A random crop (at least half of each side) of a training photo, maybe mirrored, resized to w x h."""
    name = rng.choice(PHOTOS)
    pw, ph = _photo(name).size
    cw, ch = int(pw * rng.uniform(0.5, 1.0)), int(ph * rng.uniform(0.5, 1.0))
    x0, y0 = rng.randint(0, pw - cw), rng.randint(0, ph - ch)
    scene = {"kind": "photo", "width": w, "height": h, "photo": name,
             "crop": [x0, y0, x0 + cw, y0 + ch], "mirror": name != "page.png" and rng.random() < 0.5,
             "objects": [], "text": None}
    scene["colors"] = main_colors(render_scene(scene))
    return scene


def render_scene(scene: dict[str, Any]) -> Image.Image:
    """Draw a scene: the same scene dict always gives the same pixels (no antialiasing, so colours are exact)."""
    w, h = scene["width"], scene["height"]
    if scene["kind"] == "photo":
        img = _photo(scene["photo"]).crop(tuple(scene["crop"])).resize((w, h), Image.Resampling.BICUBIC)
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if scene["mirror"] else img
    img = _paint_background(scene["background"], w, h)
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        color = tuple(o["rgb"])
        if o["shape"] == "circle":
            draw.ellipse((o["cx"] - o["r"], o["cy"] - o["r"], o["cx"] + o["r"], o["cy"] + o["r"]), fill=color)
        else:
            draw.polygon(shape_points(o["shape"], o["cx"], o["cy"], o["r"], o["rotation"]), fill=color)
    t = scene.get("text")
    if t:
        if t["plate"]:
            draw.rectangle(t["box"], fill=INK[t["plate"]])
        font = _font(t["font"], t["font_size"])
        x0, y0, _, _ = font.getbbox(t["word"])
        draw.text((t["x"] - x0, t["y"] - y0), t["word"], fill=INK[t["ink"]], font=font)
    return img


def num_tiles(width: int, height: int, tile: int = 224, max_num: int = 6) -> int:
    """Tiles the model sees for an image of this size (dynamic tiling + thumbnail), as hovle.image does."""
    from hovle.image import dynamic_preprocess

    return len(dynamic_preprocess(Image.new("RGB", (width, height)), 1, max_num, tile, use_thumbnail=True))


# ---- language: phrases ---------------------------------------------------------------------------------------


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _num(n: int, rng: random.Random, digits: float = 0.3) -> str:
    return str(n) if rng.random() < digits or n >= len(NUMBER_WORDS) else NUMBER_WORDS[n]


def _obj_phrase(o: dict, rng: random.Random, size: bool | None = None, color: bool = True) -> str:
    """'red circle', 'large red circle', 'big purple star' (without article)."""
    words = []
    if size or (size is None and rng.random() < 0.3):
        words.append(rng.choice(SIZE_WORDS[o["size"]]))
    if color:
        words.append(o["color"])
    words.append(o["shape"])
    return " ".join(words)


def _region_phrase(region: str, rng: random.Random) -> str:
    if region == "center":
        return rng.choice(("in the center", "in the middle", "near the center"))
    if " " in region:
        return rng.choice((f"in the {region} corner", f"at the {region}", f"near the {region} corner"))
    if region in ("top", "bottom"):
        return rng.choice((f"at the {region}", f"near the {region}", f"in the {region} part of the image"))
    return rng.choice((f"on the {region}", f"on the {region} side", f"in the {region} part of the image"))


def _bg_phrase(bg: dict, rng: random.Random) -> str:
    name = bg["name"]
    if bg["kind"] == "plain":
        return rng.choice((f"a plain {name} background", f"a {name} background", f"a solid {name} background"))
    if bg["kind"] == "gradient":
        return rng.choice((f"a {name} to {bg['name2']} gradient", f"a gradient background fading from {name} to {bg['name2']}",
                           f"a softly shaded {name} background"))
    if bg["kind"] == "noise":
        return rng.choice((f"a noisy {name} background", f"a grainy {name} background", f"a speckled {name} texture"))
    if bg["kind"] == "stripes":
        return rng.choice((f"a {name} background with faint stripes", f"a striped {name} background"))
    return rng.choice((f"a {name} background with a faint grid", f"a {name} grid pattern"))


def _group_phrase(objs: list[dict], rng: random.Random) -> str:
    """'two blue squares and a red star' (groups of the same colour and shape)."""
    groups = Counter((o["color"], o["shape"]) for o in objs)
    parts = []
    for (c, s), n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0])):
        parts.append(_a(f"{c} {s}") if n == 1 else f"{_num(n, rng, 0.15)} {c} {SHAPE_PLURALS[s]}")
    return _join(parts)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _text_phrase(t: dict, rng: random.Random) -> str:
    where = f" on {_a(t['plate'])} sign" if t["plate"] else ""
    return rng.choice((f'the word "{t["word"]}" written in {t["ink"]}{where}',
                       f'the text "{t["word"]}"{where}', f'"{t["word"]}" in {t["ink"]} letters{where}'))


def _photo_caption(scene: dict[str, Any], rng: random.Random) -> str:
    colors = " and ".join(scene["colors"])
    return rng.choice((f"A real photograph, mostly {colors}.",
                       f"This is a photograph, not a drawing of shapes; its main colours are {colors}.",
                       f"A photo, mostly {colors}. I can describe simple shapes, colours and words, but I cannot "
                       "tell what a photograph shows.",
                       f"It looks like a real photograph, mostly {colors}; I cannot tell what it shows."))


def caption(scene: dict[str, Any], rng: random.Random) -> str:
    """One caption in one of several phrasings (sizes, places and background mentioned at random)."""
    if scene["kind"] == "photo":
        return _photo_caption(scene, rng)
    objs, t, bg = scene["objects"], scene.get("text"), scene["background"]
    if len(objs) == 1:
        o = objs[0]
        things = _a(_obj_phrase(o, rng)) + (" " + _region_phrase(o["region"], rng) if rng.random() < 0.6 else "")
    elif len(objs) == 2 and scene.get("relation") and rng.random() < 0.6:
        a, b = objs
        rel = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[
            scene["relation"]["relation"]]
        things = f"{_a(_obj_phrase(a, rng))} {rel} {_a(_obj_phrase(b, rng))}"
    elif objs:
        things = _group_phrase(objs, rng)
    else:
        things = ""
    if t:
        tp = _text_phrase(t, rng)
        things = f"{tp}, next to {things}" if things and rng.random() < 0.5 else (f"{things} and {tp}" if things else tp)
    bgp = _bg_phrase(bg, rng)
    n = len(objs)
    frames = [
        f"{_cap(things)} on {bgp}.",
        f"An image showing {things}.",
        f"This picture contains {things}, set against {bgp}.",
        f"{_cap(things)}, drawn on {bgp}.",
        f"A simple drawing of {things}.",
        f"There {'is' if n <= 1 and not (t and n) else 'are'} {things} in the image.",
        f"A {scene['width']}x{scene['height']} image with {things} on {bgp}.",
    ]
    if n >= 2 and not t:
        frames.append(f"{_cap(_num(n, rng))} shapes on {bgp}: {things}.")
    return rng.choice(frames)


# ---- language: questions and answers ---------------------------------------------------------------------------


def _unique(objs: list[dict], key) -> list[dict]:
    counts = Counter(key(o) for o in objs)
    return [o for o in objs if counts[key(o)] == 1]


def _qa(qtype: str, question: str, answer: str, expected: str, accepted: Iterable[str] = ()) -> dict[str, Any]:
    return {"qtype": qtype, "question": question, "answer": answer, "expected": expected,
            "accepted": sorted(set(accepted) | {expected})}


def color_qa(o: dict, rng: random.Random, only: bool = False) -> dict:
    ref = rng.choice(("shape", "object", "figure")) if only and rng.random() < 0.4 else o["shape"]
    q = rng.choice((f"What colour is the {ref}?", f"What color is the {ref}?", f"Which colour is the {ref}?",
                    f"Can you tell me the colour of the {ref}?", f"What is the color of the {ref} in the image?",
                    f"The {ref} is what colour?", f"Name the colour of the {ref}."))
    c = o["color"]
    a = rng.choice((f"{_cap(c)}.", f"It is {c}.", f"The {ref} is {c}.", _cap(c), f"It's {c}.",
                    f"The colour of the {ref} is {c}."))
    return _qa("color", q, a, c, COLOR_SYNONYMS[c])


def shape_qa(o: dict, rng: random.Random, only: bool = False) -> dict:
    c = o["color"]
    qs = [f"What shape is the {c} object?", f"Which shape is {c}?", f"What is the shape of the {c} figure?",
          f"What kind of shape is drawn in {c}?", f"Identify the {c} shape.", f"What is the {c} thing in the image?"]
    if only:
        qs += ["What shape is shown?", "What shape do you see?", "Which shape is in the picture?"]
    s = o["shape"]
    a = rng.choice((f"{_cap(_a(s))}.", f"It is {_a(s)}.", f"The {c} shape is {_a(s)}.", f"{_cap(s)}.", f"It's {_a(s)}.",
                    f"{_cap(_a(c + ' ' + s))}."))
    return _qa("shape", rng.choice(qs), a, s, SHAPE_SYNONYMS[s])


# Each extra count question a scene could ask is kept with this probability by its answer, so that answers 1-5
# come about equally often: most colour and shape classes hold one object, few hold three or more. Every count
# a scene holds is a question (not only the one its layout was drawn for): run 26 kept the count table in the
# image tokens but, with count questions only ~1 turn in 15, never learned to read it.
COUNT_KEEP = {1: 0.035, 2: 0.2}


def count_queries(objs: list[dict]) -> list[dict]:
    """Every count question `objs` answer, as count queries: all of them, each colour, each shape and each
    colour-shape pair present (sorted, so a scene's list does not depend on its objects' order)."""
    counts = Counter({("all", None, None): len(objs)} if objs else {})
    for o in objs:
        counts.update([("color", None, o["color"]), ("shape", o["shape"], None), ("both", o["shape"], o["color"])])
    return [{"by": by, "shape": shape, "color": color, "count": n}
            for (by, shape, color), n in sorted(counts.items(), key=lambda kv: tuple(map(str, kv[0])))]


def count_qa(scene: dict, rng: random.Random) -> dict:
    cq = scene["count_query"]
    n = cq["count"]
    if cq["by"] == "shape":
        noun, one = SHAPE_PLURALS[cq["shape"]], cq["shape"]
    elif cq["by"] == "color":
        kind = rng.choice(("shapes", "objects", "things"))
        noun, one = f"{cq['color']} {kind}", f"{cq['color']} {kind[:-1]}"
    elif cq["by"] == "both":
        noun, one = f"{cq['color']} {SHAPE_PLURALS[cq['shape']]}", f"{cq['color']} {cq['shape']}"
    else:
        kind = rng.choice(("shapes", "objects"))
        noun, one = kind, kind[:-1]
    q = rng.choice((f"How many {noun} are there?", f"How many {noun} can you see?", f"Count the {noun}.",
                    f"What is the number of {noun} in the image?", f"How many {noun} are in the picture?",
                    f"Count how many {noun} there are."))
    if n == 1:
        a = rng.choice((f"There is one {one}.", "One.", "1", f"Just one {one}.", f"I can see a single {one}."))
    else:
        num = _num(n, rng)
        a = rng.choice((f"{_cap(num)}.", f"There are {num} {noun}.", f"I can see {num} {noun}.", str(n),
                        f"{_cap(num)} {noun}."))
    return _qa("count", q, a, str(n), {str(n), NUMBER_WORDS[n]})


OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
REL_PHRASES = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
REL_SYNONYMS = {"left": ("left",), "right": ("right",), "above": ("above", "over", "on top of", "higher"),
                "below": ("below", "under", "beneath", "underneath", "lower")}


def position_qa(a: dict, b: dict, rel: str, rng: random.Random, ref=None) -> dict:
    ref = ref or (lambda o: o["shape"])
    A, B = ref(a), ref(b)
    horizontal = rel in ("left", "right")
    qs = [f"Where is the {A} relative to the {B}?", f"What is the position of the {A} compared to the {B}?",
          f"In which direction from the {B} is the {A}?",
          f"Is the {A} to the left or to the right of the {B}?" if horizontal else f"Is the {A} above or below the {B}?"]
    if rng.random() < 0.5:
        other = {"left": "right", "right": "left", "above": "below", "below": "above"}[rel]
        pair = [rel, other] if rng.random() < 0.5 else [other, rel]
        words = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
        qs.append(f"Is the {A} {words[pair[0]]} or {words[pair[1]]} the {B}?")
    short = {"left": "Left", "right": "Right", "above": "Above", "below": "Below"}[rel]
    ans = rng.choice((f"{short}.", f"It is {REL_PHRASES[rel]} the {B}.", f"The {A} is {REL_PHRASES[rel]} the {B}.",
                      f"{_cap(REL_PHRASES[rel])} the {B}.", f"It's {REL_PHRASES[rel]} it."))
    return _qa("position", rng.choice(qs), ans, rel, REL_SYNONYMS[rel])


def text_qa(t: dict, rng: random.Random) -> dict:
    w = t["word"]
    qs = ["What does the text say?", "What word is written in the image?", "Read the text in the image.",
          "Which word appears in the picture?", "What is written here?"]
    if t["plate"]:
        qs.append("What is written on the sign?")
    a = rng.choice((w, f'It says "{w}".', f'The word is "{w}".', f'The text reads "{w}".', f"{w}."))
    return _qa("text", rng.choice(qs), a, w)


def location_qa(o: dict, rng: random.Random) -> dict:
    q = rng.choice((f"Where is the {o['shape']} in the image?", f"In which part of the image is the {o['shape']}?",
                    f"Where can you find the {o['shape']}?"))
    a = _cap(_region_phrase(o["region"], rng)) + "."
    return _qa("location", q, a, o["region"])


def exists_qa(scene: dict, rng: random.Random) -> dict:
    objs = scene["objects"]
    if objs and rng.random() < 0.5:
        o = rng.choice(objs)
        c, s, yes = o["color"], o["shape"], True
    else:
        present = {(o["color"], o["shape"]) for o in objs}
        c, s = rng.choice([(c, s) for c in sorted(COLORS) for s in SHAPES if (c, s) not in present])
        yes = False
    q = rng.choice((f"Is there {_a(c + ' ' + s)} in the image?", f"Do you see {_a(c + ' ' + s)}?",
                    f"Does the picture contain {_a(c + ' ' + s)}?"))
    a = rng.choice((f"Yes, there is {_a(c + ' ' + s)}.", "Yes.")) if yes else rng.choice(
        (f"No, there is no {c} {s}.", "No.", f"No, I don't see {_a(c + ' ' + s)}."))
    return _qa("exists", q, a, "yes" if yes else "no")


def size_qa(a: dict, b: dict, rng: random.Random) -> dict | None:
    order = tuple(SIZES)
    if a["size"] == b["size"]:
        return None
    big, small = (a, b) if order.index(a["size"]) > order.index(b["size"]) else (b, a)
    A, B = (a["shape"], b["shape"]) if rng.random() < 0.5 else (b["shape"], a["shape"])
    if rng.random() < 0.5:
        q, ans = f"Which is bigger, the {A} or the {B}?", rng.choice((f"The {big['shape']} is bigger.", f"The {big['shape']}."))
    else:
        q, ans = f"Which is smaller, the {A} or the {B}?", rng.choice((f"The {small['shape']} is smaller.", f"The {small['shape']}."))
    return _qa("size", q, ans, big["shape"] if "bigger" in q else small["shape"])


def describe_qa(scene: dict, rng: random.Random) -> dict:
    q = rng.choice(("Describe the image.", "What do you see in this picture?", "Give a short description of the image.",
                    "What is in the image?", "Describe this image briefly.", "What does this picture show?"))
    return _qa("describe", q, caption(scene, rng), "")


def photo_questions(scene: dict[str, Any], rng: random.Random) -> list[dict]:
    """What a photo can answer: that it is one, its main colours, and questions about shapes it does not have."""
    colors = " and ".join(scene["colors"])
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    absent = rng.choice((f"What colour is the {shape}?", f"How many {SHAPE_PLURALS[shape]} are there?",
                         f"Where is the {color} {shape}?", f"Which shape is {color}?"))
    return [
        _qa("photo", rng.choice(("What is in this image?", "What does this picture show?", "Describe the image.",
                                 "What do you see?")), _photo_caption(scene, rng), "photograph"),
        _qa("photo_colors", rng.choice(("What are the main colours of this image?", "Which colours do you see?")),
            f"Mostly {colors}.", colors),
        _qa("photo_absent", absent, f"I don't see any simple shapes: this is a real photograph, mostly {colors}.",
            "photograph"),
    ]


def questions(scene: dict[str, Any], rng: random.Random) -> list[dict]:
    """Every question this scene can answer unambiguously (one per type, phrasing drawn with rng)."""
    if scene["kind"] == "photo":
        return photo_questions(scene, rng)
    objs = scene["objects"]
    out = []
    only = len(objs) == 1 and not scene.get("text")
    by_shape = _unique(objs, lambda o: o["shape"])
    by_color = _unique(objs, lambda o: o["color"])
    if by_shape:
        out.append(color_qa(rng.choice(by_shape), rng, only))
        o = rng.choice(by_shape)
        if o["region"] != "center" or only:
            out.append(location_qa(o, rng))
    if by_color:
        out.append(shape_qa(rng.choice(by_color), rng, only))
    asked = scene.get("count_query")
    if asked:
        out.append(count_qa(scene, rng))
    if not scene.get("text"):
        for q in count_queries(objs):
            if q != asked and rng.random() < COUNT_KEEP.get(q["count"], 1.0):
                out.append(count_qa({"count_query": q}, rng))
    if scene.get("relation"):
        r = scene["relation"]
        a, b = objs[r["a"]], objs[r["b"]]
        out.append(position_qa(a, b, r["relation"], rng) if rng.random() < 0.7 else position_qa(
            b, a, {"left": "right", "right": "left", "above": "below", "below": "above"}[r["relation"]], rng))
        if (s := size_qa(a, b, rng)) is not None:
            out.append(s)
    elif len(by_shape) >= 2:
        pairs = [(a, b) for a in by_shape for b in by_shape if a is not b and relation(a, b)]
        if pairs:
            a, b = rng.choice(pairs)
            out.append(position_qa(a, b, relation(a, b), rng))
    if scene.get("text"):
        out.append(text_qa(scene["text"], rng))
    out.append(exists_qa(scene, rng))
    out.append(describe_qa(scene, rng))
    return out


# ---- text-only chat (keeps the LLM's language ability) -----------------------------------------------------------

TEXT_CHAT: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are there in a week?", "There are seven days in a week."),
    ("What is 12 times 7?", "12 times 7 is 84."),
    ("Give me three tips for staying focused while studying.",
     "1. Put your phone away or switch off notifications.\n2. Work in short blocks, such as 25 minutes, with short breaks.\n"
     "3. Decide what you want to finish before you start, and check it off when you are done."),
    ("Translate 'good morning' into Spanish.", "\"Good morning\" in Spanish is \"buenos días\"."),
    ("Write a haiku about autumn.", "Crisp leaves drift and fall,\ngolden light on quiet paths,\nthe year exhales slow."),
    ("What is photosynthesis?",
     "Photosynthesis is the process plants, algae and some bacteria use to turn light energy into chemical energy. "
     "They take in carbon dioxide and water and, using sunlight, produce glucose and release oxygen."),
    ("Summarize the water cycle in one sentence.",
     "Water evaporates from oceans and lakes, condenses into clouds, falls as rain or snow, and flows back to the sea."),
    ("Hi! How are you?", "Hello! I'm doing well, thank you. How can I help you today?"),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level."),
    ("Name three primary colors.", "The three primary colors of paint are red, yellow and blue."),
    ("Write a Python function that returns the square of a number.", "def square(x):\n    return x * x"),
    ("Who wrote 'Romeo and Juliet'?", "'Romeo and Juliet' was written by William Shakespeare."),
    ("Explain what a triangle is to a child.",
     "A triangle is a flat shape with three straight sides and three corners, like a slice of pizza."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("Give me a synonym for 'happy'.", "A synonym for \"happy\" is \"joyful\"."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the opposite of 'above'?", "The opposite of \"above\" is \"below\"."),
    ("Suggest a name for a friendly robot.", "How about \"Bolt\"? It is short, friendly and easy to remember."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("Is a tomato a fruit or a vegetable?",
     "Botanically, a tomato is a fruit because it grows from a flower and contains seeds, "
     "but in cooking it is usually treated as a vegetable."),
    ("Write one sentence about the ocean.", "The ocean covers most of our planet and is home to countless living things."),
    ("What is 15 + 27?", "15 + 27 = 42."),
    ("List the four seasons.", "The four seasons are spring, summer, autumn (fall) and winter."),
    ("Thank you!", "You're welcome! Let me know if there is anything else I can help with."),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("Rewrite this sentence more politely: 'Give me the report.'", "Could you please send me the report?"),
    ("What is a star?", "A star is a huge ball of hot gas, mostly hydrogen and helium, that shines by nuclear fusion. "
                        "The Sun is the closest star to Earth."),
)

def self_chat(model, tokenizer, n: int, seed: int = 0, batch_size: int = 16, max_question_tokens: int = 64,
              max_reply_tokens: int = 256) -> list[tuple[str, str]]:
    """(question, reply) pairs the LLM writes itself, for text-only chat in its own distribution.

    Magpie-style: given only its chat template up to the user turn, an instruct model samples a plausible user
    question (temperature 1, top-p 0.95); it then answers that question (temperature 0.7). Questions or replies
    that did not reach the stop token within their budget are dropped, so no sample stops mid-sentence.
    Stops after `n` pairs or after 4n questions tried.
    """
    import torch
    from tqdm import tqdm

    from hovle.chat import get_template
    from hovle.generation import generate

    template = get_template(model.config.template)
    stop = tokenizer.convert_tokens_to_ids(template.stop_token)
    prefix = tokenizer.encode(template.system_block() + template.user)  # the chat up to the user's words
    g = torch.Generator().manual_seed(seed)
    out: list[tuple[str, str]] = []
    tried = 0
    bar = tqdm(total=n, desc="self-chat", unit="chat", disable=None)
    while len(out) < n and tried < 4 * n:
        ids = generate(model, torch.tensor([prefix] * batch_size), generator=g, max_new_tokens=max_question_tokens,
                       do_sample=True, temperature=1.0, top_p=0.95, eos_token_id=stop, pad_token_id=stop).tolist()
        tried += batch_size
        questions = [tokenizer.decode(r[:r.index(stop)], skip_special_tokens=True).strip() for r in ids if stop in r]
        questions = [q for q in questions if q]
        if not questions:
            continue
        replies = model.batch_chat(tokenizer, None, questions, dict(max_new_tokens=max_reply_tokens, do_sample=True,
                                                                    temperature=0.7, top_p=0.9), generator=g)
        kept = [(q, r) for q, r in zip(questions, replies)
                if r and len(tokenizer.encode(r, add_special_tokens=False)) < max_reply_tokens - 2]
        bar.update(min(len(kept), n - len(out)))
        out += kept
    bar.close()
    return out[:n]


# ---- samples and writers ------------------------------------------------------------------------------------------


def _human(q: str, first: bool) -> dict:
    return {"from": "human", "value": ("<image>\n" + q) if first else q}


# How often each question type is picked among those a scene can answer (counting is the hardest skill).
QTYPE_WEIGHTS = {"color": 1.0, "shape": 1.0, "count": 2.5, "position": 1.5, "text": 1.5, "size": 0.5,
                 "location": 0.4, "exists": 0.4, "describe": 0.4, "photo": 1.0, "photo_colors": 0.5,
                 "photo_absent": 0.7}
# Share of turns asked in the benchmarks' short-answer form (question + SHORT_ANSWER -> the bare answer): run 4,
# never shown it, answered nearly every such question with its reading template.
SHORT_ANSWER_SHARE = 0.15
SHORT_ANSWER_QTYPES = {"color", "shape", "count", "position", "location", "exists", "size", "text"}  # a word or two


def image_sample(scene: dict, rng: random.Random, image: str, multi_turn: bool) -> dict[str, Any]:
    """A conversation about one image: one QA turn, or 3-5 turns of different question types (the image tokens,
    most of a sample's compute, are paid once for all of them), with the scene's object boxes (Stage III's
    distill.object_head anchor)."""
    pool = questions(scene, rng)
    k = min(len(pool), rng.choice((3, 4, 5))) if multi_turn else 1
    qas = []
    for _ in range(k):  # weighted draws without replacement
        qa = rng.choices(pool, weights=[QTYPE_WEIGHTS.get(q["qtype"], 1.0) for q in pool])[0]
        pool.remove(qa)
        qas.append(qa)
    conv = []
    for j, qa in enumerate(qas):
        question, answer = qa["question"], qa["answer"]
        if qa["qtype"] in SHORT_ANSWER_QTYPES and rng.random() < SHORT_ANSWER_SHARE:
            question, answer = f"{question}\n{SHORT_ANSWER}", qa["expected"]
        conv += [_human(question, j == 0), {"from": "gpt", "value": answer}]
    return {"image": image, "conversations": conv, "objects": object_boxes(scene),
            "meta": {"qtypes": [qa["qtype"] for qa in qas], "kind": scene["kind"]}}


def prose_lines(pairs: Iterable[tuple[str, str]], min_words: int = 8) -> list[str]:
    """Each question and reply of `pairs` as one line of plain text (whitespace collapsed), for a `format: text`
    source: without the chat template, they teach the embedding module's text path on plain prose too."""
    lines = (" ".join(turn.split()) for pair in pairs for turn in pair)
    return [line for line in lines if len(line.split()) >= min_words]


def text_sample(pair: tuple[str, str]) -> dict[str, Any]:
    return {"conversations": [{"from": "human", "value": pair[0]}, {"from": "gpt", "value": pair[1]}],
            "meta": {"qtypes": ["text_chat"]}}


def _save_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG", optimize=False))


def read_jsonl(path: Path) -> list[dict]:
    """The rows `write_jsonl` wrote (UTF-8, one JSON object per non-blank line); a bad line is a ValueError
    that names the file and the line."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
    return rows


def write_lines(path: Path, lines: Iterable[str]) -> int:
    """Write one line per item, UTF-8, atomically (a temporary file renamed into place); returns the count."""
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
                n += 1

    atomic_write(path, write)
    return n


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    return write_lines(path, (json.dumps(row, ensure_ascii=False) for row in rows))


def object_boxes(scene: dict[str, Any]) -> list[dict[str, Any]]:
    """The scene's shapes as object targets (distill.object_weight and count_weight): each one's bounding box in 0-1
    image coordinates (its centre +- its radius), colour and shape. Photos and rendered words have none."""
    w, h = scene["width"], scene["height"]
    return [{"box": [round(max(0.0, (o["cx"] - o["r"]) / w), 4), round(max(0.0, (o["cy"] - o["r"]) / h), 4),
                     round(min(1.0, (o["cx"] + o["r"]) / w), 4), round(min(1.0, (o["cy"] + o["r"]) / h), 4)],
             "color": o["color"], "shape": o["shape"]} for o in scene["objects"]]


def write_split(root: str | Path, split: str, n_images: int, seed: int, text_samples: Iterable[tuple[str, str]] | None = None,
                text_fraction: float = 0.1, multi_turn_fraction: float = 0.8) -> dict[str, Any]:
    """Render `n_images` scenes and write `{split}_sft.jsonl`, `{split}_caption.jsonl`, `{split}_scenes.jsonl`
    and `{split}_text.jsonl` (the SFT file's text-only chats alone).

    The SFT file gets one conversation per image (multi-turn with probability `multi_turn_fraction`) plus
    about `text_fraction` text-only chats (cycled from `text_samples`, default the hand-written TEXT_CHAT),
    interleaved deterministically.
    """
    root = Path(root)
    texts = list(text_samples if text_samples is not None else TEXT_CHAT)
    sft, caps, scenes = [], [], []
    t_done = 0
    n_text = round(n_images * text_fraction / max(1e-9, 1 - text_fraction)) if texts else 0
    for i in range(n_images):
        scene = sample_scene(seed, i)
        rel = f"images/{split}/{i:06d}.png"
        _save_png(render_scene(scene), root / rel)
        rng = _rng(seed, i, "language")
        caps.append({"image": rel, "caption": caption(scene, rng), "objects": object_boxes(scene)})
        sft.append(image_sample(scene, rng, rel, rng.random() < multi_turn_fraction))
        scenes.append({"image": rel, "scene": scene})
        while t_done < (i + 1) * n_text // n_images:  # spread the text-only chats evenly
            sft.append(text_sample(texts[(seed + t_done) % len(texts)]))
            t_done += 1
    paths = {k: root / f"{split}_{k}.jsonl" for k in ("sft", "caption", "scenes", "text")}
    write_jsonl(paths["sft"], sft)
    write_jsonl(paths["caption"], caps)
    write_jsonl(paths["scenes"], scenes)
    write_jsonl(paths["text"], (row for row in sft if "image" not in row))  # Stage II's text anchor
    return {"images": n_images, "text_only": n_text, "sft_rows": len(sft), **{k: str(p) for k, p in paths.items()}}


def eval_sample(qtype: str, seed: int, index: int, k: int) -> tuple[dict, dict]:
    """(scene, qa) for the k-th eval question of a type; counts cycle 1-5, relations cycle over the four,
    colour/shape questions alternate single-object and multi-object scenes."""
    if qtype not in EVAL_QTYPES:
        raise ValueError(f"unknown eval question type {qtype!r}; known: {', '.join(EVAL_QTYPES)}")
    for variant in range(100):
        if qtype in ("color", "shape"):
            scene = sample_scene(seed, index, kind="single" if k % 2 == 0 else "multi", variant=variant)
        elif qtype == "count":
            scene = sample_scene(seed, index, kind="count", count=1 + k % 5, variant=variant)
        elif qtype == "position":
            scene = sample_scene(seed, index, kind="pair", relation=RELATIONS[k % 4], variant=variant)
        else:
            scene = sample_scene(seed, index, kind="text", variant=variant)
        rng = _rng(seed, index, f"eval{variant}")
        objs = scene["objects"]
        only = len(objs) == 1 and not scene.get("text")
        if qtype == "color" and (targets := _unique(objs, lambda o: o["shape"])):
            return scene, color_qa(rng.choice(targets), rng, only)
        if qtype == "shape" and (targets := _unique(objs, lambda o: o["color"])):
            return scene, shape_qa(rng.choice(targets), rng, only)
        if qtype == "count":
            return scene, count_qa(scene, rng)
        if qtype == "position":
            r = scene["relation"]
            return scene, position_qa(objs[r["a"]], objs[r["b"]], r["relation"], rng)
        if qtype == "text":
            return scene, text_qa(scene["text"], rng)
    raise RuntimeError(f"no {qtype} question for seed {seed}, index {index}")


def write_eval(root: str | Path, n_per_type: int, seed: int, qtypes: Iterable[str] = EVAL_QTYPES,
               split: str = "eval") -> dict[str, Any]:
    """A balanced eval set: n_per_type questions of each type, one image each, with scoring metadata."""
    root = Path(root)
    rows = []
    index = 0
    for qtype in qtypes:
        for k in range(n_per_type):
            scene, qa = eval_sample(qtype, seed, index, k)
            rel = f"images/{split}/{index:06d}.png"
            _save_png(render_scene(scene), root / rel)
            rows.append({"image": rel, "conversations": [_human(qa["question"], True), {"from": "gpt", "value": qa["answer"]}],
                         "meta": {"qtype": qtype, "question": qa["question"], "expected": qa["expected"],
                                  "accepted": qa["accepted"], "scene": scene}})
            index += 1
    path = root / f"{split}.jsonl"
    write_jsonl(path, rows)
    tsv = write_eval_tsv(root, rows)
    return {"rows": len(rows), "path": str(path), "tsv": str(tsv),
            "per_type": dict(Counter(r["meta"]["qtype"] for r in rows))}


EVAL_TSV = "HoVLE-Tiny_VQA.tsv"  # "VQA" in the name: `hovle eval` scores it as short-answer VQA


def write_eval_tsv(root: str | Path, rows: list[dict]) -> Path:
    """The eval rows as a VLMEvalKit TSV (index, base64 image, question, answer, category = question type),
    for `hovle eval --data root/HoVLE-Tiny_VQA.tsv`. One reference answer per question, so VQA accuracy is
    exact match after the official normalisation ("Red." = "red", "three" = "3"; synonyms do not count)."""
    import base64
    import csv

    root = Path(root)
    path = root / EVAL_TSV

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(["index", "image", "question", "answer", "category"])
            for i, r in enumerate(rows):
                meta = r["meta"]
                w.writerow([i, base64.b64encode((root / r["image"]).read_bytes()).decode(), meta["question"],
                            meta["expected"], meta["qtype"]])

    atomic_write(path, write)
    return path


def write_dataset(root: str | Path, n_train: int, n_heldout: int, n_eval_per_type: int, seed: int = 0,
                  text_samples: Iterable[tuple[str, str]] | None = None, **split_kw) -> dict[str, Any]:
    """train (seed), heldout (seed + 1_000_003) and eval (seed + 2_000_006): disjoint random streams; and
    reference_prose.txt, one paragraph of `reference_prose()` per line."""
    texts = list(text_samples) if text_samples is not None else None
    prose = reference_prose()
    write_lines(Path(root) / "reference_prose.txt", prose)
    return {
        "reference_prose": len(prose),
        "train": write_split(root, "train", n_train, seed, texts, **split_kw),
        "heldout": write_split(root, "heldout", n_heldout, seed + 1_000_003, texts, **split_kw),
        "eval": write_eval(root, n_eval_per_type, seed + 2_000_006),
    }


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def reference_prose(seed: int = 0, min_chars: int = 40) -> list[str]:
    """Lines of English prose from the Python language reference (`pydoc_data.topics`, in every CPython):
    about 350 KB of varied wording, offline, for the embedding module's text path alone. The anchor's target
    is the LLM's own embedding of each token, so any real text teaches it; the 256 self-chats alone left
    the path 2.5x further off on held-out prose than on theirs (docs/hovle-tiny.md). Each line is 1-3
    consecutive sentences of a paragraph, so that many lines start a text: the first tokens are where the
    module was furthest off, and where the LLM looks most (fixing the first 4 alone took perplexity from
    35.8 to 30.7). Code blocks (indented past their paragraph's first line) are left out."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    out = []
    for _, text in sorted(topics.items()):
        for block in text.split("\n\n"):
            lines = [ln for ln in block.splitlines() if ln.strip()]
            if not lines or ">>>" in block:
                continue
            indent = len(lines[0]) - len(lines[0].lstrip())
            if any(len(ln) - len(ln.lstrip()) > indent + 2 for ln in lines):
                continue
            sentences = _SENTENCE_END.split(" ".join(ln.strip() for ln in lines))
            while sentences:
                k = rng.randint(1, 3)
                line, sentences = " ".join(sentences[:k]), sentences[k:]
                if len(line) >= min_chars:
                    out.append(line)
    return out


# ---- scoring ----------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+(?:-[a-z]+)?")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _mentions(text: str, vocab: dict[str, tuple[str, ...]]) -> list[tuple[int, str]]:
    """(position, canonical) for each mention of a vocabulary item (synonyms and plurals included)."""
    low = text.lower()
    out = []
    for canon, syns in vocab.items():
        for s in syns:
            for m in re.finditer(rf"\b{re.escape(s)}(?:e?s)?\b", low):
                out.append((m.start(), canon))
    return sorted(out)


_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)} | {"none": 0, "single": 1}
_NUMBER_RE = re.compile(r"\b(\d+|" + "|".join(sorted(_NUMBERS, key=len, reverse=True)) + r")\b")


def parse_count(reply: str) -> int | None:
    """The first number in a reply: digits or number words (zero..ten, 'no', 'a single')."""
    m = _NUMBER_RE.search(reply.lower())
    if m is None:
        return None
    tok = m.group(1)
    return int(tok) if tok.isdigit() else _NUMBERS[tok]


def score_answer(qtype: str, reply: str, expected: str, question: str | None = None) -> bool:
    """Whether `reply` answers an eval question of `qtype` whose answer is `expected`, leniently:
    "It is red." is red, "three"/"3" are 3, "to the left of the square" is left, 'It says "OPEN"' is OPEN.

    color / shape: the expected item must be mentioned and no competing item may be (items the question itself
    names are ignored). position: the expected relation is mentioned, its opposite is not (a reply that
    repeats both options of "left or right?" fails). count: the first number in the reply.
    text: the expected word appears as a whole word (case-insensitive). Other types: normalised equality.
    """
    reply = reply or ""
    if qtype in ("color", "shape", "position"):
        vocab = {"color": COLOR_SYNONYMS, "shape": SHAPE_WORDS, "position": REL_SYNONYMS}[qtype]
        if expected not in vocab:
            raise ValueError(f"{expected!r} is not a {qtype} answer; known: {', '.join(vocab)}")
        said = {c for _, c in _mentions(reply, vocab)}
        if expected not in said:
            return False
        if qtype == "position":
            return OPPOSITE[expected] not in said
        asked = {c for _, c in _mentions(question, vocab)} if question else set()
        return not (said - {expected} - asked)
    if qtype == "count":
        n = parse_count(reply)
        return n is not None and n == int(expected)
    if qtype == "text":
        target = _words(expected)
        words = _words(reply)
        return bool(target) and any(words[i:i + len(target)] == target for i in range(len(words)))
    return " ".join(_words(reply)) == " ".join(_words(expected))
