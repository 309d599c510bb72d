"""Image and video preprocessing for HoVLE.

Reproduces the HoVLE/InternVL model-card ``load_image`` bit for bit: dynamic
tiling into ``input_size`` squares (plus a thumbnail), ImageNet normalisation.
Only PIL and torch are used; the float path mirrors torchvision's ``ToTensor``
and ``Normalize`` so the model sees exactly the pixels it was trained on.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Same default as PIL's Image.MAX_IMAGE_PIXELS (~ 1024 * 1024 * 1024 // 4 // 3).
MAX_PIXELS = 89_478_485

ImageInput = str | PathLike | Image.Image


class ImageLoadError(ValueError):
    """An image file exists but cannot be decoded (empty, truncated, not an image, too big)."""


# ---------------------------------------------------------------------------
# Dynamic tiling
# ---------------------------------------------------------------------------


def _candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) grids with min_num <= cols*rows <= max_num, in the reference order.

    The reference sorts a Python *set* by area; ties keep the set's iteration
    order, which decides the winner among equal-ratio candidates, so the set is
    built the same way here (small-int tuple hashes are deterministic).
    """
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def find_closest_aspect_ratio(
    aspect_ratio: float,
    target_ratios: Sequence[tuple[int, int]],
    width: int,
    height: int,
    image_size: int,
) -> tuple[int, int]:
    """Pick the grid whose cols/rows is closest to ``aspect_ratio``.

    On an exact tie a later (larger) grid wins only if the image has enough
    pixels to fill more than half of it, so small images are not upsampled.
    """
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for cols, rows in target_ratios:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> list[Image.Image]:
    """Split ``image`` into ``image_size`` square tiles on the best-fitting grid (row-major).

    With ``use_thumbnail`` and more than one tile, a downscaled copy of the
    whole image is appended so the model also sees global context.
    """
    width, height = image.size
    cols, rows = find_closest_aspect_ratio(
        width / height, _candidate_grids(min_num, max_num), width, height, image_size
    )
    # Default filter on purpose: the reference relies on Image.resize's default.
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = [
        resized.crop(
            (c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)
        )
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


# ---------------------------------------------------------------------------
# Tensor conversion
# ---------------------------------------------------------------------------


def image_to_tensor(tile: Image.Image, input_size: int = 448) -> torch.Tensor:
    """RGB PIL tile -> normalised float32 [3, S, S], as torchvision Resize+ToTensor+Normalize."""
    tile = tile.convert("RGB") if tile.mode != "RGB" else tile
    # PIL returns a copy when the size already matches, i.e. a no-op for tiles.
    tile = tile.resize((input_size, input_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(tile, dtype=np.uint8))  # [S, S, 3] uint8
    x = pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # [3, S, S]
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return x.sub(mean).div(std)  # [3, S, S]


def _tiles_to_tensor(tiles: Sequence[Image.Image], input_size: int) -> torch.Tensor:
    return torch.stack([image_to_tensor(t, input_size) for t in tiles])  # [N, 3, S, S]


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _validate(input_size: int, min_num: int, max_num: int) -> None:
    if input_size <= 0:
        raise ValueError(f"input_size must be > 0, got {input_size}")
    if not 1 <= min_num <= max_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")


def _check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{name}: image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels} (possible decompression bomb)"
        )


def _open_rgb(path: Path, max_pixels: int) -> Image.Image:
    """Open and fully decode ``path`` so every failure surfaces here, with the file name."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            # PIL only warns below 2x its limit; a bomb is an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(img.width, img.height, max_pixels, str(path))
                img.load()  # full decode: truncation fails now, not later
                return img.convert("RGB")
    except ImageLoadError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: decompression bomb refused ({e})") from e
    except Image.UnidentifiedImageError as e:
        problem = "file is empty" if path.stat().st_size == 0 else "not a recognised image format"
        raise ImageLoadError(f"{path}: {problem}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports truncated/corrupt data with any of these types.
        raise ImageLoadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def _as_rgb(image: ImageInput, max_pixels: int) -> Image.Image:
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, max_pixels, "<PIL.Image>")
        return image.convert("RGB")
    return _open_rgb(Path(image), max_pixels)


def load_image(
    image: ImageInput,
    input_size: int = 448,
    max_num: int = 12,
    min_num: int = 1,
    use_thumbnail: bool = True,
    max_pixels: int = MAX_PIXELS,
) -> torch.Tensor:
    """Path or PIL image -> pixel_values float32 [tiles, 3, input_size, input_size].

    ``max_pixels`` can only tighten PIL's own ``Image.MAX_IMAGE_PIXELS`` guard,
    which still applies when opening files.
    """
    _validate(input_size, min_num, max_num)
    rgb = _as_rgb(image, max_pixels)
    tiles = dynamic_preprocess(rgb, min_num, max_num, input_size, use_thumbnail)
    return _tiles_to_tensor(tiles, input_size)  # [N, 3, S, S]


# ---------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------

_VIDEO_HINT = "video input needs decord or PyAV: pip install 'hovle[video]'"


def _backend() -> str:
    try:
        import decord  # noqa: F401

        return "decord"
    except ImportError:
        pass
    try:
        import av  # noqa: F401

        return "av"
    except ImportError:
        raise ImportError(_VIDEO_HINT) from None


def _video_info(path: str | PathLike) -> tuple[int, float]:
    """(number of frames, average fps) of the video at ``path``."""
    if _backend() == "decord":
        import decord

        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        return len(vr), float(vr.get_avg_fps())
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 1)
        num_frames = stream.frames or sum(1 for _ in container.decode(stream))
    return num_frames, fps


def _read_frames(path: str | PathLike, indices: Sequence[int]) -> list[Image.Image]:
    """Decode the frames at ``indices`` (in that order, repeats allowed) as RGB PIL images."""
    if _backend() == "decord":
        import decord

        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        batch = vr.get_batch(list(indices)).asnumpy()  # [T, H, W, 3] uint8
        return [Image.fromarray(frame).convert("RGB") for frame in batch]
    import av

    # Decode sequentially: seeking by index is unreliable across codecs.
    wanted = set(indices)
    found: dict[int, Image.Image] = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                found[i] = frame.to_image().convert("RGB")
                if len(found) == len(wanted):
                    break
    missing = wanted - found.keys()
    if missing:
        raise ImageLoadError(f"{path}: could not decode frames {sorted(missing)}")
    return [found[i] for i in indices]


def frame_indices(
    num_frames: int,
    fps: float,
    num_segments: int,
    bound: tuple[float, float] | None = None,
) -> list[int]:
    """Midpoints of ``num_segments`` equal segments of [start, end] (InternVL's get_index)."""
    start_s, end_s = bound if bound is not None else (-100_000, 100_000)
    start_idx = max(0, round(start_s * fps))
    end_idx = min(round(end_s * fps), num_frames - 1)
    seg_size = (end_idx - start_idx) / num_segments
    return [int(start_idx + seg_size / 2 + round(seg_size * k)) for k in range(num_segments)]


def load_video(
    path: str | PathLike,
    num_segments: int = 8,
    max_num: int = 1,
    input_size: int = 448,
    bound: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Sample ``num_segments`` frames and tile each; returns (pixel_values, tiles per frame).

    pixel_values is [sum(num_patches_list), 3, input_size, input_size].
    """
    _validate(input_size, 1, max_num)
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    num_frames, fps = _video_info(path)
    frames = _read_frames(path, frame_indices(num_frames, fps, num_segments, bound))
    per_frame = [
        _tiles_to_tensor(dynamic_preprocess(f, 1, max_num, input_size, True), input_size)
        for f in frames
    ]  # each [n_i, 3, S, S]
    return torch.cat(per_frame), [t.shape[0] for t in per_frame]


def video_prompt_prefix(num_frames: int) -> str:
    """Per-frame image placeholders, numbered from Frame1 as InternVL does."""
    return "".join(f"Frame{i + 1}: <image>\n" for i in range(num_frames))
