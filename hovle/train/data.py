"""Training data: readers, sample encoding with assistant-only labels, resumable streams, collation.

Sources (all normalised to a `Record`):
  conversation  JSONL, InternVL/LLaVA layout: {"image": path | [paths], "conversations": [{"from": "human" |
                "gpt", "value": "<image>\\n..."}, ...]}; no "image" key = a text-only sample.
  caption       JSONL {"image": path, "caption" | "text": ...}: trained as (data.caption_prompt, caption).
  text          plain text file, one sample per non-empty line.
  images        a folder of images, or a .txt file listing image paths (stage distill only).
  webdataset    tar shards ("shards/{000..099}.tar"): members sharing a key form one sample; key.json holds a
                conversation or caption record (its "image" field is ignored), key.txt a caption, and
                key.jpg / key.png / key.0.jpg ... the images.

Streams hand each process (rank) its own part of the data, in a seeded order, and expose a small `state()`
so a resumed run continues at exactly the same sample. Samples that cannot be used (missing or corrupt
image, over the length limit, malformed record) are skipped and counted by reason.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import posixpath
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from hovle.chat import IMG_CONTEXT, expand_images, get_template
from hovle.config import ConfigError, HoVLEConfig
from hovle.image import dynamic_preprocess, image_to_tensor
from hovle.train.config import DataConfig, SourceConfig

IGNORE_INDEX = -100
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadSample(Exception):
    """A sample that cannot be trained on; `reason` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ---- records ---------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One raw sample. `images` holds paths (str) or encoded bytes (from tar shards)."""

    images: list[str | bytes] = field(default_factory=list)
    turns: list[tuple[str, str]] | None = None  # (role in user|assistant|system, text); None for plain text
    text: str | None = None  # plain text (format text)
    objects: list[dict] | None = None  # boxes and attributes of the objects in its one image (distill.object_weight)


def _resolve(image: str, root: Path) -> str:
    return image if Path(image).is_absolute() else str(root / image)


def record_from_dict(d: dict, fmt: str, root: Path, caption_prompt: str, images: list | None = None) -> Record:
    """A conversation or caption dict -> Record; `images` (from tar shards) replaces d["image"]."""
    if not isinstance(d, dict):
        raise BadSample("bad_record", "not a JSON object")
    if images is None:
        raw = d.get("image", d.get("images")) or []
        raw = [raw] if isinstance(raw, str) else raw
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise BadSample("bad_record", f"image field {raw!r}")
        images = [_resolve(p, root) for p in raw]
    objects = _objects(d["objects"], len(images)) if "objects" in d else None
    if "conversations" in d or fmt == "conversation":
        conv = d.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise BadSample("bad_record", "no conversations list")
        turns = []
        for t in conv:
            if not isinstance(t, dict) or ROLES.get(t.get("from")) is None or not isinstance(t.get("value"), str):
                raise BadSample("bad_record", f"turn {t!r}")
            turns.append((ROLES[t["from"]], t["value"]))
        return Record(images=images, turns=turns, objects=objects)
    caption = d.get("caption", d.get("text"))
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample("bad_record", "no caption")
    return Record(images=images, turns=[("user", caption_prompt), ("assistant", caption)], objects=objects)


def _objects(objects, n_images: int) -> list[dict]:
    """A record's "objects" field, checked: a list of {"box": [x0, y0, x1, y1] in 0-1 image coordinates, ...}
    describing the record's one image."""
    if n_images != 1:
        raise BadSample("bad_record", f"objects need exactly one image, the record has {n_images}")
    if not isinstance(objects, list):
        raise BadSample("bad_record", f"objects must be a list, got {objects!r}")
    for o in objects:
        box = o.get("box") if isinstance(o, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                and 0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1):
            raise BadSample("bad_record", f"object {o!r}: box must be [x0, y0, x1, y1] with 0 <= x0 <= x1 <= 1 "
                                          "and 0 <= y0 <= y1 <= 1")
    return objects


def count_classes(labels: dict[str, list[str]]) -> list[dict[str, str]]:
    """The object classes distill.count_weight counts: every combination of values of every subset of the
    attributes, smallest subsets first: {} (all objects), {"color": "red"}, ..., {"color": "red", "shape": "star"}."""
    return [dict(zip(attrs, values)) for r in range(len(labels) + 1) for attrs in itertools.combinations(labels, r)
            for values in itertools.product(*(labels[a] for a in attrs))]


def object_targets(objects: list[dict], labels: dict[str, list[str]], grid: int) -> Tensor:
    """[grid*grid, 1 + len(labels) + len(count_classes(labels))] long targets of the image tokens, row-major over
    the image: column 0 is 1 where an object's box centre lies in the token's cell, else 0; column 1 + i is the
    index in labels' i-th value list of that attribute of the object whose centre lies in the cell, else of the
    object whose box covers the cell's centre (the nearest centre where boxes overlap), IGNORE_INDEX where none
    does; then, per count class, how many objects of the class have their centre cell at or before the token's.
    A centre cell always has its object's attributes, also where a small box misses the cell's centre."""
    classes = count_classes(labels)
    counts = torch.zeros(grid * grid, len(classes), dtype=torch.long)
    out = torch.full((grid, grid, 1 + len(labels)), IGNORE_INDEX, dtype=torch.long)
    out[..., 0] = 0
    centre = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid  # cell centres, 0-1
    v, u = torch.meshgrid(centre, centre, indexing="ij")  # [g, g] row (y) and column (x)
    best = torch.full((grid, grid), float("inf"), dtype=torch.float64)
    centres = []
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        row, col = min(int(cy * grid), grid - 1), min(int(cx * grid), grid - 1)
        dist = (u - cx) ** 2 + (v - cy) ** 2
        cover = (u >= x0) & (u <= x1) & (v >= y0) & (v <= y1) & (dist < best)
        best = torch.where(cover, dist, best)
        attrs = []
        for attr, values in labels.items():
            if o.get(attr) not in values:
                raise BadSample("bad_record", f"object {attr} {o.get(attr)!r} is not one of distill.object_labels"
                                              f"[{attr!r}] {values}")
            attrs.append(values.index(o[attr]))
        out[..., 1:][cover] = torch.tensor(attrs)
        centres.append((row, col, attrs))
        counts[row * grid + col:] += torch.tensor([all(o[a] == v for a, v in c.items()) for c in classes])
    for row, col, attrs in centres:
        out[row, col] = torch.tensor([1, *attrs])
    return torch.cat([out.reshape(grid * grid, -1), counts], dim=1)


def read_source(src: SourceConfig, caption_prompt: str) -> list[Record | BadSample]:
    """All records of a map-style source (bad lines kept as BadSample, counted when reached)."""
    path = Path(src.path)
    if src.format == "images":
        if path.is_dir():
            files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
        elif path.is_file():
            root = Path(src.image_root) if src.image_root else path.parent
            files = [_resolve(line.strip(), root) for line in path.read_text().splitlines() if line.strip()]
            _check_images_found(src, files, root)
        else:
            raise ConfigError(f"data source {src.path}: no such folder or file")
        return [Record(images=[f]) for f in files]
    if not path.is_file():
        raise ConfigError(f"data source {src.path}: no such file")
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if src.format == "text":
        return [Record(text=line) for line in lines]
    root = Path(src.image_root) if src.image_root else path.parent
    out: list[Record | BadSample] = []
    for line in lines:
        try:
            out.append(record_from_dict(json.loads(line), src.format, root, caption_prompt))
        except json.JSONDecodeError as e:
            out.append(BadSample("bad_record", f"invalid JSON ({e})"))
        except BadSample as e:
            out.append(e)
    _check_images_found(src, [i for r in out if isinstance(r, Record) for i in r.images], root)
    return out


def _check_images_found(src: SourceConfig, images: list[str], root: Path) -> None:
    """A few missing images are skipped and counted; a source none of whose images exist is a wrong root."""
    if images and not any(Path(i).is_file() for i in images):
        raise ConfigError(f"data source {src.path}: none of its {len(images)} images exist (the first is {images[0]}); "
                          f"relative image paths are read from {root} (set image_root on the source to change it)")


def expand_braces(pattern: str) -> list[str]:
    """"a/{000..002}.tar" -> ["a/000.tar", "a/001.tar", "a/002.tar"] (zero padding kept); also "{a,b}"."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [s for item in items for s in expand_braces(pattern[: m.start()] + item + pattern[m.end():])]


def iter_tar(path: str) -> Iterator[dict[str, bytes]]:
    """Samples of one WebDataset shard: {extension: bytes} per key, in archive order."""
    key, files = None, {}
    with tarfile.open(path, "r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            dirname, base = posixpath.split(member.name)
            stem, _, ext = base.partition(".")
            k = posixpath.join(dirname, stem)
            if k != key and files:
                yield files
                files = {}
            key = k
            files[ext.lower()] = tf.extractfile(member).read()
    if files:
        yield files


def record_from_tar(files: dict[str, bytes], caption_prompt: str) -> Record:
    images = [files[e] for e in sorted(files) if e.rsplit(".", 1)[-1] in IMAGE_EXTS]
    if "json" in files:
        try:
            d = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadSample("bad_record", f"invalid JSON ({e})") from None
        return record_from_dict(d, "caption", Path("."), caption_prompt, images)
    if "txt" in files:
        text = files["txt"].decode("utf-8", errors="replace")
        if not images:
            return Record(text=text)
        return Record(images=images, turns=[("user", caption_prompt), ("assistant", text)])
    if images:
        return Record(images=images)
    raise BadSample("bad_record", f"shard sample with only {sorted(files)}")


# ---- streams -----------------------------------------------------------------------------------------------


class MapStream:
    """Records in memory; each epoch a seeded permutation, of which rank r takes positions r, r+W, ..."""

    def __init__(self, records: list[Record | BadSample], seed: int, rank: int, world: int, shuffle: bool):
        if len(records) < world:
            raise ConfigError(f"{len(records)} samples cannot be split over {world} processes")
        self.records, self.seed, self.rank, self.world, self.shuffle = records, seed, rank, world, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order()

    def __len__(self) -> int:
        return len(self.records) // self.world  # per rank; the remainder is dropped each epoch

    def _epoch_order(self) -> list[int]:
        n = len(self.records)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
                 if self.shuffle else torch.arange(n))
        return order[self.rank: len(self) * self.world: self.world].tolist()

    def next(self) -> Record | BadSample:
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._epoch_order()
        self.pos += 1
        return self.records[self._order[self.pos - 1]]

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._epoch_order()


class ShardStream:
    """WebDataset shards; each epoch a seeded shard order, of which rank r reads shards r, r+W, ...

    A shard that cannot be read is counted ("bad_shard") and the rest of it skipped. Resuming re-opens the
    current shard and skips the samples already seen.
    """

    def __init__(self, shards: list[str], caption_prompt: str, seed: int, rank: int, world: int, shuffle: bool):
        if len(shards) < world:
            raise ConfigError(f"{len(shards)} shards cannot be split over {world} processes (need one each at least)")
        self.shards, self.caption_prompt = shards, caption_prompt
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        self.epoch, self.shard_pos, self.sample_pos = 0, 0, 0
        self._it: Iterator[dict[str, bytes]] | None = None

    def __len__(self) -> int:
        return len(self.shards) // self.world  # shards per rank (samples are not known ahead)

    def _my_shards(self) -> list[str]:
        n = len(self.shards)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
                 if self.shuffle else list(range(n)))
        return [self.shards[i] for i in order[self.rank: len(self) * self.world: self.world]]

    def _open(self) -> None:
        self._it = iter_tar(self._my_shards()[self.shard_pos])
        for _ in range(self.sample_pos):
            next(self._it)

    def _advance(self) -> None:
        self._it, self.sample_pos = None, 0
        self.shard_pos += 1
        if self.shard_pos >= len(self):
            self.epoch, self.shard_pos = self.epoch + 1, 0

    def next(self) -> Record | BadSample:
        for _ in range(len(self) + 1):  # at most one pass over my shards without a sample
            try:
                if self._it is None:
                    self._open()
                files = next(self._it)
            except StopIteration:
                self._advance()
                continue
            except (tarfile.TarError, OSError, EOFError) as e:  # unreadable or truncated shard: skip its rest
                self._advance()
                return BadSample("bad_shard", str(e))
            self.sample_pos += 1
            try:
                return record_from_tar(files, self.caption_prompt)
            except BadSample as e:
                return e
        raise ConfigError(f"no sample in shards {self._my_shards()}")

    def state(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "sample_pos": self.sample_pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.shard_pos, self.sample_pos = state["epoch"], state["shard_pos"], state["sample_pos"]
        self._it = None


Stream = MapStream | ShardStream


def build_streams(cfg: DataConfig, seed: int, rank: int, world: int) -> tuple[Stream, Stream | None]:
    """(train stream, eval stream or None) for this rank."""

    def shard_stream(sources, shuffle):
        shards = [s for src in sources for s in expand_braces(src.path) for _ in range(src.repeat)]
        return ShardStream(shards, cfg.caption_prompt, seed, rank, world, shuffle)

    def records(sources) -> tuple[list[Record | BadSample], list[int]]:
        """Each source's records once, and how often each one repeats per epoch."""
        recs, repeats = [], []
        for src in sources:
            r = read_source(src, cfg.caption_prompt)
            recs += r
            repeats += [src.repeat] * len(r)
        return recs, repeats

    if cfg.sources[0].format == "webdataset":
        train = shard_stream(cfg.sources, cfg.shuffle)
    else:
        recs, repeats = records(cfg.sources)
        keep, held = list(range(len(recs))), []
        if cfg.eval_fraction > 0:  # held out before repeating, so no sample is in both splits
            k = max(1, int(len(recs) * cfg.eval_fraction))
            perm = torch.randperm(len(recs), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
            held, keep = [recs[i] for i in perm[:k]], sorted(perm[k:])
        train = MapStream([recs[i] for i in keep for _ in range(repeats[i])], seed, rank, world, cfg.shuffle)
        if held and not cfg.eval_sources:
            return train, MapStream(held, seed, rank, world, shuffle=False)
    if not cfg.eval_sources:
        return train, None
    if cfg.eval_sources[0].format == "webdataset":
        return train, shard_stream(cfg.eval_sources, False)
    return train, MapStream(records(cfg.eval_sources)[0], seed, rank, world, shuffle=False)


# ---- encoding ------------------------------------------------------------------------------------------------


def open_image(ref: str | bytes) -> Image.Image:
    """Decode fully to RGB; a missing file or undecodable data becomes a BadSample."""
    if isinstance(ref, str) and not Path(ref).is_file():
        raise BadSample("missing_image", ref)
    try:
        with Image.open(ref if isinstance(ref, str) else io.BytesIO(ref)) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise BadSample("corrupt_image", f"{ref if isinstance(ref, str) else '<bytes>'}: {e}") from None


@dataclass
class Example:
    """One encoded sample. LM stages: input_ids/labels [T] (+ hd_input_ids [Th] for "post" models) and
    pixel_values [N, 3, S, S]. Distill: pixel_values, teacher_pixels [N, 3, s, s] and the text's input_ids [T]."""

    input_ids: Tensor | None = None
    labels: Tensor | None = None
    hd_input_ids: Tensor | None = None
    pixel_values: Tensor | None = None
    teacher_pixels: Tensor | None = None
    # [N, n, 1 + attributes + count classes] per tile's image tokens: the boxes are on the whole image, so only
    # its whole-image tile (the only one, or the thumbnail, last) has targets; the others are IGNORE_INDEX
    object_targets: Tensor | None = None


class Encoder:
    """Record -> Example for one stage: renders the model's chat template and masks labels to replies."""

    def __init__(self, model_cfg: HoVLEConfig, tokenizer, data_cfg: DataConfig, stage: str, teacher=None,
                 distill_text: bool = True, object_labels: dict[str, list[str]] | None = None):
        self.cfg, self.tok, self.data, self.stage, self.teacher = model_cfg, tokenizer, data_cfg, stage, teacher
        self.distill_text = distill_text  # Stage I: whether text has a target (anchor.text_weight)
        self.object_labels = object_labels  # the attributes of distill.object_weight's and count_weight's targets
        self.template = get_template(model_cfg.template)
        self.max_tiles = data_cfg.max_tiles or (model_cfg.max_dynamic_patch if model_cfg.dynamic_image_size else 1)
        self.min_tiles = min(model_cfg.min_dynamic_patch, self.max_tiles)
        ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        if ctx != model_cfg.embedding.img_context_token_id:
            raise ConfigError(f"the tokenizer's {IMG_CONTEXT} id is {ctx}, the model's is "
                              f"{model_cfg.embedding.img_context_token_id}: tokenizer and model do not belong together")
        self.ctx = ctx

    def __call__(self, rec: Record | BadSample) -> Example:
        if isinstance(rec, BadSample):
            raise rec
        return self.distill(rec) if self.stage == "distill" else self.chat(rec)

    def _tiles(self, ref) -> list[Image.Image]:
        return dynamic_preprocess(open_image(ref), self.min_tiles, self.max_tiles, self.cfg.tile_size,
                                  self.cfg.use_thumbnail)

    def _hd(self, ids: Tensor) -> Tensor | None:
        """The "post" embedding module's ids: each <IMG_CONTEXT> stands for 4 patch tokens."""
        if self.cfg.embedding.pixel_shuffle_loc != "post":
            return None
        return torch.repeat_interleave(ids, torch.where(ids == self.ctx, 4, 1))

    def _object_targets(self, rec: Record, n_tiles: int) -> Tensor | None:
        """[n_tiles, n, K] targets for the tiles of a record's one image, on its last (whole-image) tile."""
        if not self.object_labels or rec.objects is None:
            return None
        tile = object_targets(rec.objects, self.object_labels, math.isqrt(self.cfg.num_image_token))
        out = torch.full((n_tiles, *tile.shape), IGNORE_INDEX, dtype=torch.long)
        out[-1] = tile
        return out

    def _check_length(self, n: int) -> None:
        if n > self.data.max_length:
            raise BadSample("too_long", f"{n} tokens > data.max_length {self.data.max_length}")

    def chat(self, rec: Record) -> Example:
        if rec.turns is None:  # plain text: every token after BOS is a target
            ids = self.tok.encode(rec.text) + [self.tok.eos_token_id]
            self._check_length(len(ids))
            ids_t = torch.tensor(ids)
            labels = ids_t.clone()
            labels[0] = IGNORE_INDEX
            return Example(input_ids=ids_t, labels=labels, hd_input_ids=self._hd(ids_t))
        tiles = [self._tiles(ref) for ref in rec.images]
        text, spans = self.render(rec.turns, [len(t) for t in tiles])
        ids = self.tok.encode(text)
        self._check_length(len(ids))
        labels = torch.full((len(ids),), IGNORE_INDEX)
        for start, end in spans:
            a, b = len(self.tok.encode(text[:start])), len(self.tok.encode(text[:end]))
            labels[a:b] = torch.tensor(ids[a:b])
        ids_t = torch.tensor(ids)
        pv = torch.stack([image_to_tensor(t, self.cfg.tile_size) for ts in tiles for t in ts]) if tiles else None
        return Example(input_ids=ids_t, labels=labels, hd_input_ids=self._hd(ids_t), pixel_values=pv,
                       object_targets=self._object_targets(rec, len(pv)) if tiles else None)

    def render(self, turns: list[tuple[str, str]], tiles_per_image: list[int]) -> tuple[str, list[tuple[int, int]]]:
        """The template text of a conversation and the character spans of the assistant replies (+ sep)."""
        t = self.template
        system = self.data.system_message
        if turns and turns[0][0] == "system":
            system, turns = turns[0][1], turns[1:]
        while turns and turns[-1][0] != "assistant":
            turns = turns[:-1]  # a trailing question has no reply to learn
        roles = [r for r, _ in turns]
        if not turns or roles != ["user", "assistant"] * (len(turns) // 2):
            raise BadSample("bad_record", f"turns must alternate user/assistant, got {roles}")
        n_img = len(tiles_per_image)
        placeholders = sum(v.count("<image>") for r, v in turns if r == "user")
        if placeholders == 0 and n_img:
            prefix = "<image>\n" if n_img == 1 else "".join(f"Image-{i + 1}: <image>\n" for i in range(n_img))
            turns = [("user", prefix + turns[0][1])] + turns[1:]
        elif placeholders != n_img:
            raise BadSample("bad_record", f"{placeholders} <image> placeholders for {n_img} images")
        text = t.system_prefix + (t.system_message if system is None else system) + t.sep
        spans, remaining = [], list(tiles_per_image)
        for (_, q), (_, a) in zip(turns[0::2], turns[1::2]):
            k = q.count("<image>")
            q = expand_images(q, remaining[:k], self.cfg.num_image_token)
            remaining = remaining[k:]
            text += t.user + q + t.sep + t.assistant
            spans.append((len(text), len(text) + len(a) + len(t.sep)))
            text += a + t.sep
        return text, spans

    def distill(self, rec: Record) -> Example:
        """Unpaired: the record's images (tiles for the student, the teacher's own view of each tile) and its
        text (caption, conversation text without placeholders, or the plain line) are used independently."""
        ex = Example()
        tiles = [t for ref in rec.images for t in self._tiles(ref)]
        if tiles:
            ex.pixel_values = torch.stack([image_to_tensor(t, self.cfg.tile_size) for t in tiles])  # [N, 3, S, S]
            if self.teacher is not None:
                ex.teacher_pixels = torch.stack([self.teacher.preprocess(t) for t in tiles])  # [N, 3, s, s]
            ex.object_targets = self._object_targets(rec, len(tiles))
        text = rec.text if rec.turns is None else "\n".join(v.replace("<image>", "").strip() for _, v in rec.turns)
        if text and text.strip() and self.distill_text:
            ids = self.tok.encode(text.strip())
            self._check_length(len(ids))
            ex.input_ids = torch.tensor(ids)
        if ex.pixel_values is None and ex.input_ids is None:
            if text and text.strip():  # a micro-batch of such samples alone would have no loss to step on
                raise BadSample("no_target", "text only, and Stage I uses text only when anchor.text_weight > 0")
            raise BadSample("bad_record", "neither image nor text")
        return ex


class Loader:
    """Encoded examples from a stream, skipping and counting bad samples; its state resumes exactly.

    With `num_workers` threads the samples of a batch are decoded and tokenized in parallel. The records
    consumed are the same as one by one: exactly as many are drawn as good samples are still missing.

    With `group_by_length` = k > 1, k micro-batches are drawn at once, sorted by length, cut into batches and
    served in a seeded random order: a batch pads to its own longest sample, so grouping similar lengths cuts
    the padded tokens (HoVLE-Tiny Stage III at batch 8: 61% real tokens alone, 84% grouped by 8).
    """

    def __init__(self, stream: MapStream | ShardStream, encoder: Encoder, num_workers: int = 0,
                 group_by_length: int = 1):
        self.stream, self.encoder, self.group_by_length = stream, encoder, group_by_length
        self.skipped: Counter[str] = Counter()
        self.pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self.groups = 0  # length groups drawn so far (seeds each group's batch order)
        self.queue: list[list[Example]] = []  # the current group's batches not served yet
        self.group_start: dict = {}  # the state before the current group was drawn: resume redraws it
        self.to_skip = 0  # batches of a redrawn group that were served before the checkpoint

    def _encode(self, rec: Record | BadSample) -> Example | BadSample:
        try:
            return self.encoder(rec)
        except BadSample as e:
            return e

    def _draw(self, n: int) -> list[Example]:
        out: list[Example] = []
        bad_in_a_row = 0
        while len(out) < n:
            records = [self.stream.next() for _ in range(n - len(out))]
            results = self.pool.map(self._encode, records) if self.pool else map(self._encode, records)
            for r in results:
                if isinstance(r, BadSample):
                    self.skipped[r.reason] += 1
                    bad_in_a_row += 1
                else:
                    out.append(r)
                    bad_in_a_row = 0
            if bad_in_a_row > max(len(self.stream), 1000):
                raise ConfigError(f"every sample is bad; skipped so far: {dict(self.skipped)}")
        return out

    def batch(self, n: int) -> list[Example]:
        if self.group_by_length <= 1:
            return self._draw(n)
        if not self.queue:
            self.group_start = self._plain_state()
            group = sorted(self._draw(n * self.group_by_length),
                           key=lambda e: 0 if e.input_ids is None else len(e.input_ids))
            self.queue = [group[i: i + n] for i in range(0, len(group), n)]
            random.Random(self.groups).shuffle(self.queue)
            self.groups += 1
            del self.queue[: self.to_skip]
            self.to_skip = 0
        return self.queue.pop(0)

    def _plain_state(self) -> dict:
        return {"stream": self.stream.state(), "skipped": dict(self.skipped), "groups": self.groups}

    def state(self) -> dict:
        if not self.queue:
            return self._plain_state()
        return {**self.group_start, "served": self.group_by_length - len(self.queue)}

    def load_state(self, state: dict) -> None:
        self.stream.load_state(state["stream"])
        self.skipped = Counter(state["skipped"])
        self.groups, self.to_skip, self.queue = state.get("groups", 0), state.get("served", 0), []


# ---- collation --------------------------------------------------------------------------------------------


def _pad_right(rows: list[Tensor], value: int, multiple: int = 1) -> tuple[Tensor, Tensor]:
    """Rows of ids -> [B, T] right-padded with `value` (T rounded up to `multiple`), and the mask [B, T]
    (1 = real token)."""
    T = -(-max(len(r) for r in rows) // multiple) * multiple
    out = torch.full((len(rows), T), value, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return out, mask


def _collate_object_targets(examples: list[Example]) -> Tensor | None:
    """[N, n, K] targets of all the batch's N tiles, in pixel_values order; tiles of images without objects
    are ignored. None when no sample has any."""
    ot = [e.object_targets for e in examples if e.object_targets is not None]
    if not ot:
        return None
    blank = torch.full_like(ot[0][:1], IGNORE_INDEX)
    return torch.cat([blank.expand(len(e.pixel_values), -1, -1) if e.object_targets is None else e.object_targets
                      for e in examples if e.pixel_values is not None])


def collate_lm(examples: list[Example], pad_id: int, multiple: int = 1) -> dict[str, Tensor | None]:
    """Right padding to a length that is a multiple of `multiple` (data.pad_to_multiple); pads are masked in
    attention and ignored in the loss."""
    ids, mask = _pad_right([e.input_ids for e in examples], pad_id, multiple)
    labels, _ = _pad_right([e.labels for e in examples], IGNORE_INDEX, multiple)
    pv = [e.pixel_values for e in examples if e.pixel_values is not None]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": torch.cat(pv) if pv else None,
             "hd_input_ids": None, "hd_attention_mask": None, "object_targets": _collate_object_targets(examples)}
    if examples[0].hd_input_ids is not None:
        batch["hd_input_ids"], batch["hd_attention_mask"] = _pad_right([e.hd_input_ids for e in examples], pad_id, multiple)
    return batch


def collate_distill(examples: list[Example], pad_id: int) -> dict[str, Tensor | None]:
    """Image tiles of all samples (each tile its own sequence) and the padded text of all samples."""
    pv = [e.pixel_values for e in examples if e.pixel_values is not None]
    text = [e.input_ids for e in examples if e.input_ids is not None]
    batch = {"pixel_values": None, "teacher_pixels": None, "object_targets": None, "text_ids": None, "text_mask": None}
    if pv:
        batch["pixel_values"] = torch.cat(pv)  # [N, 3, S, S]
        tp = [e.teacher_pixels for e in examples if e.teacher_pixels is not None]
        batch["teacher_pixels"] = torch.cat(tp) if tp else None
        batch["object_targets"] = _collate_object_targets(examples)
    if text:
        batch["text_ids"], batch["text_mask"] = _pad_right(text, pad_id)  # [B, T]
    return batch
