"""Reading VLMEvalKit-format TSV benchmark files.

VLMEvalKit ships each benchmark as one tab-separated file written by pandas: a header row, one row per
question, the image as base64 in an ``image`` column. Two conventions matter here:

* an ``image`` cell of at most 64 characters is not an image but the ``index`` of the row that holds it
  (MME and others store each image once and let the other questions about it point at it);
* empty cells are "missing" (pandas' NaN), e.g. an MMBench question without a hint.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_REF_MAX_LEN = 64  # VLMEvalKit: a shorter `image` cell is a reference to another row's index


class TSVError(ValueError):
    """A benchmark file that cannot be used; the message is one line naming the file, row and column."""


@dataclass
class Row:
    """One question: its cells by column name (missing cells absent) and where it sits in the file."""

    cells: dict[str, str]
    line: int  # 1-based line in the file where the row starts (the header is line 1)

    @property
    def index(self) -> str:
        return self.cells["index"]

    def get(self, column: str, default: str | None = None) -> str | None:
        value = self.cells.get(column)
        return default if value is None else value


@dataclass
class Table:
    path: Path
    columns: list[str]
    rows: list[Row]
    by_index: dict[str, Row] = field(default_factory=dict)

    def __post_init__(self):
        self.by_index = {r.index: r for r in self.rows}

    def where(self, row: Row, column: str) -> str:
        return f"{self.path}: line {row.line} (index {row.index}), column {column!r}"


def _is_missing(value: str) -> bool:
    return value.strip() in ("", "nan", "NaN", "None")


def read_tsv(path: str | Path, required: tuple[str, ...] = ("index", "question")) -> Table:
    """Read a VLMEvalKit TSV. Raises TSVError for a missing file/column, a short row or a duplicate index."""
    path = Path(path)
    if not path.is_file():
        raise TSVError(f"{path}: no such file")
    csv.field_size_limit(sys.maxsize)  # base64 images are far larger than csv's 128 KiB default
    rows: list[Row] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t")
            try:
                header = next(reader)
            except StopIteration:
                raise TSVError(f"{path}: empty file (expected a header row)") from None
            header = [h.strip() for h in header]
            if header and header[0] == "":  # pandas wrote its own row index as an unnamed first column
                header[0] = "__row__"
            for column in required:
                if column not in header:
                    raise TSVError(f"{path}: missing column {column!r} (columns: {', '.join(header)})")
            start = 2
            for values in reader:
                line = start
                start = reader.line_num + 1
                if not values or all(v == "" for v in values):
                    continue
                if len(values) != len(header):
                    raise TSVError(f"{path}: line {line}: {len(values)} fields, the header has {len(header)}")
                cells = {k: v for k, v in zip(header, values) if not _is_missing(v)}
                for column in required:
                    if column not in cells:
                        raise TSVError(f"{path}: line {line}, column {column!r}: empty")
                idx = cells["index"]
                try:  # pandas may write integer indices as floats ("12.0")
                    cells["index"] = str(int(float(idx)))
                except ValueError:
                    pass
                rows.append(Row(cells, line))
    except UnicodeDecodeError as e:
        raise TSVError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    seen: set[str] = set()
    for r in rows:
        if r.index in seen:
            raise TSVError(f"{path}: line {r.line}, column 'index': duplicate index {r.index}")
        seen.add(r.index)
    return Table(path, header, rows)


def check_images(table: Table, image_root: Path | None) -> None:
    """Fail early, naming the row: no `image` column and no usable image_path, a dangling image reference,
    base64 that does not decode (about a second per GB; the images themselves are decoded when used)."""
    if "image" in table.columns:
        for row in table.rows:
            _image_bytes(table, row)
        return
    if "image_path" in table.columns:
        if image_root is None:
            raise TSVError(f"{table.path}: no 'image' column; pass --image-root to read the 'image_path' files")
        return
    raise TSVError(f"{table.path}: missing column 'image' (base64 images) and no 'image_path' column")


def _image_bytes(table: Table, row: Row) -> tuple[Row, bytes]:
    """The row holding the image (the row itself or the one its reference names) and the decoded bytes."""
    data = row.get("image")
    source = row
    if data is not None and len(data) <= IMAGE_REF_MAX_LEN:
        target = table.by_index.get(data.strip())
        if target is None or target.get("image") is None or len(target.get("image")) <= IMAGE_REF_MAX_LEN:
            raise TSVError(f"{table.where(row, 'image')}: {data!r} is neither base64 image data "
                           f"nor the index of a row that holds an image")
        source, data = target, target.get("image")
    if data is None:
        raise TSVError(f"{table.where(row, 'image')}: empty")
    if data.lstrip().startswith("["):
        raise TSVError(f"{table.where(row, 'image')}: several images per question are not supported")
    try:
        return source, base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise TSVError(f"{table.where(source, 'image')}: bad base64 ({e})") from None


def row_image(table: Table, row: Row, image_root: Path | None = None) -> Image.Image:
    """The row's image as RGB: its base64 `image` cell (following an index reference), or image_root/image_path."""
    if "image" in table.columns:
        source, raw = _image_bytes(table, row)
        try:
            with Image.open(io.BytesIO(raw)) as img:
                img.load()
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise TSVError(f"{table.where(source, 'image')}: base64 decodes to no readable image ({e})") from None
    rel = row.get("image_path")
    if rel is None:
        raise TSVError(f"{table.where(row, 'image_path')}: empty")
    if rel.lstrip().startswith("["):
        raise TSVError(f"{table.where(row, 'image_path')}: several images per question are not supported")
    path = Path(image_root or ".") / rel
    if not path.is_file():
        raise TSVError(f"{table.where(row, 'image_path')}: image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise TSVError(f"{table.where(row, 'image_path')}: {path}: not a readable image ({e})") from None


def image_key(table: Table, row: Row) -> str:
    """What identifies a row's image, for MME's per-image acc+: image_path if given, else the image's row."""
    if row.get("image_path") is not None:
        return row.get("image_path")
    data = row.get("image")
    if data is not None and len(data) <= IMAGE_REF_MAX_LEN:
        return "index:" + data.strip()
    return "index:" + row.index


def parse_answers(value: str | None) -> list[str]:
    """A VQA `answer` cell: a single answer, or a Python/JSON list of them written as a string."""
    if value is None:
        return []
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (list, tuple)):
            return [str(a) for a in parsed]
    return [value]
