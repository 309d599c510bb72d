"""Official checkpoint <-> our modules: one strict, shape-checked name map, applied tensor by tensor.

Our layers fuse what the official ones keep apart (q/k/v in one `wqkv` with rows [Q | K | V]; gate and up
in one `w13`), so each of our parameters maps to one or more official tensors through a `Rule` with a
`join` (official -> ours, at load) and a `split` (ours -> official, at save). Expected official shapes are
derived by running `split` on a meta tensor, so the check and the conversion can never disagree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from hovle.config import DecoderConfig


class CheckpointError(ValueError):
    """The checkpoint does not fit the config: missing, unexpected or mis-shaped tensors, unreadable files."""


@dataclass(frozen=True)
class Rule:
    names: tuple[str, ...]  # official tensor names, in join order
    join: Callable[[list[Tensor]], Tensor]
    split: Callable[[Tensor], list[Tensor]]


def _same(official: str) -> Rule:
    return Rule((official,), lambda ts: ts[0], lambda t: [t])


def _concat(names: list[str], sizes: list[int]) -> Rule:
    """Ours = official tensors stacked along dim 0 (Llama q/k/v, gate/up; InternLM2 w1/w3)."""
    return Rule(tuple(names), lambda ts: torch.cat(ts, dim=0), lambda t: list(t.split(sizes, dim=0)))


def _internlm2_wqkv(name: str, cfg: DecoderConfig) -> Rule:
    """InternLM2's wqkv groups rows per KV head: [K, g query heads + 1 key + 1 value, D, ...]."""
    K, D, g = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads

    def join(ts: list[Tensor]) -> Tensor:
        w = ts[0].view(K, g + 2, D, *ts[0].shape[1:])
        rest = w.shape[3:]
        return torch.cat((w[:, :g].reshape(-1, *rest), w[:, g].reshape(-1, *rest), w[:, g + 1].reshape(-1, *rest)))

    def split(t: Tensor) -> list[Tensor]:
        rest = t.shape[1:]
        q, k, v = t.split((K * g * D, K * D, K * D))
        grouped = torch.cat((q.view(K, g, D, *rest), k.view(K, 1, D, *rest), v.view(K, 1, D, *rest)), dim=1)
        return [grouped.reshape(-1, *rest)]

    return Rule((name,), join, split)


def _layer_rule(suffix: str, official_prefix: str, arch: str, cfg: DecoderConfig) -> Rule:
    """Rule for one of our decoder-layer parameters, e.g. suffix 'attention.wqkv.weight'."""
    module, kind = suffix.rsplit(".", 1)
    I, QD, KD = cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    p = official_prefix
    if arch == "internlm2":
        if module == "attention.wqkv":
            return _internlm2_wqkv(p + suffix, cfg)
        if module == "feed_forward.w13":
            return _concat([f"{p}feed_forward.w1.{kind}", f"{p}feed_forward.w3.{kind}"], [I, I])
        return _same(p + suffix)
    if module == "attention.wqkv":
        return _concat([f"{p}self_attn.{x}_proj.{kind}" for x in "qkv"], [QD, KD, KD])
    if module == "feed_forward.w13":
        return _concat([f"{p}mlp.gate_proj.{kind}", f"{p}mlp.up_proj.{kind}"], [I, I])
    renames = {"attention.wo": "self_attn.o_proj", "feed_forward.w2": "mlp.down_proj",
               "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    return _same(f"{p}{renames[module]}.{kind}")


def checkpoint_rules(model: torch.nn.Module) -> dict[str, Rule]:
    """Our parameter name -> Rule, for every parameter of `model` (tied weights counted once)."""
    cfg = model.config
    arch = cfg.llm.architecture
    rules = {}
    for name, _ in model.named_parameters():
        if name.startswith("embedding_model.encoder.layers."):
            i, suffix = name.removeprefix("embedding_model.encoder.layers.").split(".", 1)
            rules[name] = _layer_rule(suffix, f"embedding_model.encoder.{i}.", "internlm2", cfg.embedding)
        elif name.startswith("language_model.decoder.layers."):
            i, suffix = name.removeprefix("language_model.decoder.layers.").split(".", 1)
            rules[name] = _layer_rule(suffix, f"language_model.model.layers.{i}.", arch, cfg.llm)
        elif name == "language_model.tok_embeddings.weight":
            table = "tok_embeddings" if arch == "internlm2" else "embed_tokens"
            rules[name] = _same(f"language_model.model.{table}.weight")
        elif name == "language_model.norm.weight":
            rules[name] = _same("language_model.model.norm.weight")
        elif name == "language_model.output.weight":
            rules[name] = _same("language_model.output.weight" if arch == "internlm2" else "language_model.lm_head.weight")
        else:
            rules[name] = _same(name)
    return rules


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Official tensor name -> the safetensors file holding it (sharded with an index, or one file)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        files = {name: folder / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise FileNotFoundError(f"{index} names {f.name}, which is not in {folder}")
        return files
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


@torch.no_grad()
def load_checkpoint(model: torch.nn.Module, folder: Path) -> None:
    """Fill `model` from an official-layout folder, one tensor at a time, strictly.

    Peak memory is the model in its own dtype plus the largest single checkpoint tensor.
    """
    rules = checkpoint_rules(model)
    files = _tensor_files(folder)
    params = dict(model.named_parameters())
    wanted = {n for r in rules.values() for n in r.names}
    missing, unexpected = sorted(wanted - files.keys()), sorted(files.keys() - wanted)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder} does not match its config.json:"
            + (f"\n  missing tensors: {', '.join(missing)}" if missing else "")
            + (f"\n  unexpected tensors: {', '.join(unexpected)}" if unexpected else "")
        )
    handles = {}
    for ours, rule in tqdm(rules.items(), desc="loading weights", unit="tensor", leave=False, disable=None):
        param = params[ours]
        expected = rule.split(torch.empty(param.shape, device="meta"))
        parts = []
        for name, exp in zip(rule.names, expected):
            path = files[name]
            if path not in handles:
                handles[path] = _open(path)
            t = handles[path].get_tensor(name)
            if t.shape != exp.shape:
                raise CheckpointError(f"{path.name}: tensor {name} has shape {list(t.shape)}, config expects {list(exp.shape)}")
            if not t.is_floating_point():
                raise CheckpointError(f"{path.name}: tensor {name} has dtype {t.dtype}, expected a float tensor")
            parts.append(t)
        param.copy_(rule.join(parts))


def save_checkpoint(model: torch.nn.Module, folder: Path, max_shard_bytes: int) -> None:
    """Write official names in safetensors shards (+ index when more than one); each file atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    rules, params = checkpoint_rules(model), dict(model.named_parameters())
    shards: list[list[str]] = [[]]
    size = 0
    for ours in rules:
        nbytes = params[ours].numel() * params[ours].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(ours)
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for ours in shard:
            rule = rules[ours]
            for name, t in zip(rule.names, rule.split(params[ours].detach())):
                tensors[name] = t.contiguous().clone().cpu()  # own storage: safetensors refuses shared views
                weight_map[name] = fname
        atomic_write(folder / fname, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    if n > 1:
        total = sum(p.numel() * p.element_size() for p in params.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write(folder / "model.safetensors.index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"))
    keep = set(weight_map.values()) | ({"model.safetensors.index.json"} if n > 1 else set())
    for stale in folder.glob("model*.safetensors*"):  # shards of an earlier save into the same folder
        if stale.name not in keep:
            stale.unlink()


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a temporary file next to `path`, then rename it into place: never a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
