"""One trainer for HoVLE's three stages (distill, align, sft): model setup, the step, the loop, checkpoints.

Losses are sums over target tokens divided by the number of target tokens in the *global* batch (all
micro-batches on all processes), so 1 process with grad_accum 2 and 2 processes with grad_accum 1 compute
the same gradient. Checkpoints hold everything a run needs to continue bit-for-bit: trainable weights,
optimizer, scheduler, RNG and each process's data position; frozen weights are rebuilt from model.init.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from hovle.config import ConfigError
from hovle.kernels import native_bf16
from hovle.model import DecoderLayer, HoVLE
from hovle.train.config import AnchorConfig, DistillConfig, TrainConfig
from hovle.train.data import IGNORE_INDEX, Encoder, Loader, build_streams, collate_distill, collate_lm, count_classes
from hovle.weights import atomic_write

# ---- what trains in each stage -------------------------------------------------------------------------------


def freeze_for_stage(model: HoVLE, stage: str, lora_parts: Sequence[str] = (), frozen: Sequence[str] = ()) -> None:
    """Set requires_grad for `stage`: distill/align train the embedding module, sft the whole model. In the
    `lora_parts` (model prefixes carrying LoRA adapters) only the adapters train; other parts train as the stage
    says. Names matching a `frozen` entry (a prefix, or a glob pattern such as `language_model.*norm*`) never
    train; an entry that matches nothing is a ConfigError, not a silent no-op. Weights HoVLE never uses stay frozen
    (bit-identical) in every stage: the CLS position embedding and the LLM's input table (unless it is tied to the
    output head)."""
    unused = {"embedding_model.vision_embeddings.class_embedding"}
    if not model.config.llm.tie_word_embeddings:
        unused.add("language_model.tok_embeddings.weight")
    names = [name for name, _ in model.named_parameters()]
    idle = [f for f in frozen if not any(_names(f, name) for name in names)]
    if idle:
        raise ConfigError(f"model.freeze: {idle} match no parameter of the model")
    for name, p in model.named_parameters():
        if any(name.startswith(part + ".") for part in lora_parts):
            train = "lora_" in name
        elif stage == "sft":
            train = name not in unused
        else:
            train = name.startswith("embedding_model.") and name not in unused
        p.requires_grad_(train and not any(_names(f, name) for f in frozen))


def _names(entry: str, name: str) -> bool:
    """Whether a model.freeze `entry` names parameter `name`: as its prefix, or as a glob pattern."""
    return name.startswith(entry) or fnmatch.fnmatchcase(name, entry)


def apply_lora(model: HoVLE, cfg) -> nn.Module:
    """Inject peft LoRA adapters into the chosen linears of the chosen parts (names kept, `.base_layer` added)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = [name for name, _ in model.named_modules()
               if any(name.startswith(part + ".") for part in cfg.parts)
               and any(name.endswith("." + t) for t in cfg.target_modules)]
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
    return inject_adapter_in_model(config, model)


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA adapter into its base linear and put the plain nn.Linear back, in place."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (parameter names are unchanged)."""
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)


OBJECT_HEAD_FILE = "object_head.safetensors"  # next to a Stage I run's final checkpoint; the model loader ignores it


def object_head_outputs(labels: dict[str, list[str]]) -> int:
    """The object head's outputs: the centre flag, each attribute's classes, then the count classes."""
    return 1 + sum(len(v) for v in labels.values()) + len(count_classes(labels))


def save_object_head(head: nn.Linear, labels: dict[str, list[str]], path: Path) -> None:
    tensors = {k: getattr(head, k).detach().float().cpu().contiguous() for k in ("weight", "bias")}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"object_labels": json.dumps(labels)}))


def load_object_head(path: str, labels: dict[str, list[str]], width: int) -> tuple[nn.Linear, dict[str, list[str]]]:
    """distill.object_head, frozen, and its labels; `labels` (distill.object_labels), when given, must be its own."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"distill.object_head: {path} not found (a Stage I run writes "
                                f"out_dir/final/{OBJECT_HEAD_FILE} when it has object or count terms)")
    try:
        with safe_open(path, "pt") as f:
            saved = json.loads((f.metadata() or {})["object_labels"])
            tensors = {k: f.get_tensor(k) for k in ("weight", "bias")}
    except (SafetensorError, KeyError, ValueError, OSError) as e:
        raise ConfigError(f"distill.object_head {path}: not an object head file ({type(e).__name__}: {e})") from None
    if labels and labels != saved:
        raise ConfigError(f"distill.object_labels {labels} are not those of distill.object_head {path}: {saved}")
    head = nn.Linear(width, object_head_outputs(saved))
    for name, t in tensors.items():
        want = tuple(getattr(head, name).shape)
        if tuple(t.shape) != want:
            raise ConfigError(f"distill.object_head {path}: tensor {name!r} has shape {tuple(t.shape)}, the model "
                              f"(width {width}) and its labels need {want}")
        getattr(head, name).data.copy_(t)
    return head.requires_grad_(False), saved


# ---- losses ---------------------------------------------------------------------------------------------------


def seeded_init(head: nn.Module, seed: int) -> nn.Module:
    """A training-only head's weights N(0, 0.02) and zero biases from its own seed: the same in every run of a
    config, whatever else (a teacher, another head) was built before it."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02 if p.dim() > 1 else torch.zeros_like(p))
    return head


class DistillHead(nn.Module):
    """Training-only student head: the student's g x g tokens of width C -> the teacher's t x t grid of width D.
    When t = r * g, each token predicts its own r x r teacher patches (a linear map to r*r*D, then
    depth-to-space: the inverse of the pixel shuffle that made the token); a bilinear resize of the grid would
    give the r*r patches of a token one blurred prediction. Other grids are resized. Not part of the saved model."""

    def __init__(self, width: int, dim: int, student_grid: int, teacher_grid: int):
        super().__init__()
        self.r = teacher_grid // student_grid if teacher_grid % student_grid == 0 else 1
        self.dim, self.grid = dim, teacher_grid
        out = self.r * self.r * dim
        self.proj = nn.Linear(width, out) if width != out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """[N, g*g, C] -> [N, t*t, D]."""
        x = self.proj(x)
        N, L, _ = x.shape
        g, r, D = math.isqrt(L), self.r, self.dim
        if r > 1:  # [N, g, g, r, r, D] -> rows (g, r), columns (g, r)
            return x.reshape(N, g, g, r, r, D).permute(0, 1, 3, 2, 4, 5).reshape(N, g * r * g * r, D)
        if g != self.grid:
            x = x.transpose(1, 2).reshape(N, D, g, g)
            x = F.interpolate(x.float(), size=(self.grid, self.grid), mode="bilinear", align_corners=False,
                              antialias=g > self.grid).to(x.dtype)
            x = x.flatten(2).transpose(1, 2)
        return x


def attribute_word_embeddings(labels: dict[str, list[str]], tokenizer, table: Tensor) -> list[Tensor]:
    """distill.word_weight's vocabulary: per attribute, [values, C] fp32 rows of the LLM's input table `table`,
    each value's embedding as a word (" red"; the mean over its tokens where it has several)."""
    return [torch.stack([table[tokenizer.encode(" " + v, add_special_tokens=False)].float().mean(0) for v in values])
            for values in labels.values()]


def word_positions(targets: Tensor) -> Tensor:
    """[N, n] bool over object targets [N, n, K] (data.object_targets): the tokens where an object's centre lies."""
    return targets[..., 0] == 1


def word_map(targets: Tensor, words: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """distill.word_weight's targets from object targets [N, n, K]: each object written as its attribute words in
    a row, as the LLM reads " red circle": the first attribute's embedding at its centre token, the second's at
    the next token, and so on (a word past the tile's end is dropped; where two objects' words meet, a centre
    keeps its own first word). Returns the map [N, n, C] (fp32) and bool masks [N, n] of the tokens it writes
    and of the quiet tokens: every other token of a tile with objects, where the map is zero."""
    N, n, _ = targets.shape
    tile, pos = word_positions(targets).nonzero(as_tuple=True)
    target = torch.zeros(N, n, words[0].shape[1], device=targets.device)
    written = torch.zeros(N, n, dtype=torch.bool, device=targets.device)
    for i in reversed(range(len(words))):  # first words last: they win where two objects meet
        ok = pos + i < n
        t, p = tile[ok], pos[ok]
        target[t, p + i] = words[i].to(targets.device)[targets[t, p, 1 + i]]
        written[t, p + i] = True
    return target, written, (targets[..., 0] != IGNORE_INDEX) & ~written


def word_loss(x: Tensor, targets: Tensor, words: list[Tensor]) -> Tensor:
    """Sum over objects of the squared error of the image tokens x [N, n, C] against `word_map`, in units of the
    vocabulary's mean squared word norm, averaged over each object's words. The quiet tokens count in all as
    much as the written ones: a scene's blanks outnumber its words about 20:1 and would otherwise teach the
    module to write nothing."""
    target, written, quiet = word_map(targets, words)
    scale = torch.cat(words).pow(2).sum(-1).mean().to(x.device)
    err = (x.float() - target).pow(2).sum(-1) / scale  # [N, n]
    blank = written.sum() / quiet.sum().clamp(min=1)
    return (err[written].sum() + err[quiet].sum() * blank) / len(words)


def object_loss(logits: Tensor, targets: Tensor, sizes: list[int]) -> Tensor:
    """Sum over labelled image tokens of distill.object_weight's loss: `logits` [N, n, 1 + sum(sizes)] (an object
    centre's logit, then each attribute's classes), `targets` [N, n, 1 + len(sizes)] (data.object_targets).
    Binary cross-entropy on the centre flag of every token of an image with objects, cross-entropy on each
    attribute where a box covers the token."""
    logits, keep = logits.float(), targets[..., 0] != IGNORE_INDEX
    loss = F.binary_cross_entropy_with_logits(logits[..., 0][keep], targets[..., 0][keep].float(), reduction="sum")
    for i, attr in enumerate(logits[..., 1:].split(sizes, dim=-1)):
        loss = loss + F.cross_entropy(attr.flatten(0, 1), targets[..., 1 + i].flatten(), reduction="sum")
    return loss


def token_loss(student: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-token regression loss [..., D] -> [...]: 1 - cosine, or mean squared error, in fp32."""
    s, t = student.float(), target.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1)
    return (s - t).pow(2).mean(-1)


def relative_error(x: Tensor, target: Tensor) -> Tensor:
    """Per-token ||x - t||^2 / ||t||^2 [..., C] -> [...] in fp32: zero only when direction and scale match."""
    x, t = x.float(), target.float()
    return (x - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=1e-12)


def anchor_text_weights(ids: Tensor, valid: Tensor | None, cfg, start_weight: float = 0.0) -> Tensor:
    """[B, T] float: where anchor.text_weight compares the module's output with the LLM's input embedding
    (text positions whose embedding exists: not an image slot, not a special id past the LLM vocab, not
    padding), each weighted 1 + start_weight / (p + 1) at its row's position p (anchor.text_start_weight)."""
    keep = (ids != cfg.embedding.img_context_token_id) & (ids < cfg.llm.vocab_size)
    if valid is not None:
        keep = keep & valid.bool()
    position = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32)
    return keep * (1.0 + start_weight / (position + 1.0))


def image_rows(ids: Tensor, cfg) -> Tensor:
    """[B, 1] bool: the rows that hold image tokens."""
    return (ids == cfg.embedding.img_context_token_id).any(1, keepdim=True)


def language_kl_mask(ids: Tensor, valid: Tensor | None, cfg) -> Tensor:
    """[B, T] bool: the valid positions of rows without image tokens, where the LLM alone (reading its own
    embeddings) is a fair reference for the next token: anchor.language_kl_weight."""
    text_rows = ~image_rows(ids, cfg)
    return text_rows.expand_as(ids) if valid is None else text_rows & valid.bool()


def vision_kl_mask(ids: Tensor, labels: Tensor, cfg) -> Tensor:
    """[B, T - 1] bool: the target positions (position t predicts token t + 1) of the rows with image tokens,
    where anchor.vision_kl_weight compares the model with its reference."""
    return (labels[:, 1:] != IGNORE_INDEX) & image_rows(ids, cfg)


def kl_sum(logits: Tensor, reference_logits: Tensor) -> Tensor:
    """Sum over rows of KL(reference || model) of the next-token distributions [K, V], in fp32."""
    return F.kl_div(logits.float().log_softmax(-1), reference_logits.float().log_softmax(-1), log_target=True,
                    reduction="sum")


def _embed_args(b: dict) -> list:
    """HoVLE.embed's arguments for an LM-stage batch."""
    return [b[k] for k in ("input_ids", "pixel_values", "hd_input_ids", "attention_mask", "hd_attention_mask")]


def _hidden(model: nn.Module, b: dict) -> tuple[Tensor, Tensor]:
    """A HoVLE's LLM inputs x [B, T, C] (the embedding module's outputs) and last hidden states h [B, T, C]."""
    x = model.embed(*_embed_args(b))
    return x, model.language_model.decoder(x, b["attention_mask"].bool())


class StageModule(nn.Module):
    """The model plus stage-specific training parts; forward returns per-term loss *sums* (what DDP wraps)."""

    def __init__(self, model: nn.Module, stage: str, distill: DistillConfig | None = None,
                 head: DistillHead | None = None, anchor: AnchorConfig | None = None,
                 reference: nn.Module | None = None, vision_reference: nn.Module | None = None, lm: bool = True,
                 object_head: nn.Linear | None = None, object_labels: dict[str, list[str]] | None = None,
                 words: list[Tensor] | None = None):
        super().__init__()
        self.model, self.stage, self.head, self.object_head = model, stage, head, object_head
        self.words = words  # attribute_word_embeddings, for distill.word_weight
        self.object_labels = object_labels or {}
        self.object_sizes = [len(v) for v in self.object_labels.values()]  # classes per attribute
        self.lm = lm  # whether stages align/sft compute their cross-entropy term (train.lm_weight > 0)
        self.reference = reference  # frozen LanguageModel for anchor.language_kl_weight
        self.vision_reference = vision_reference  # frozen HoVLE for anchor.vision_kl_weight / module_image_weight
        self.distill, self.anchor = distill or DistillConfig(), anchor or AnchorConfig()
        self.text_rms = None  # the scale the LLM reads its own inputs at: only the image_rms term needs it
        if self.anchor.image_rms_weight:
            with torch.no_grad():
                self.text_rms = float(model.language_model.tok_embeddings.weight.float().pow(2).mean(-1).sqrt().mean())

    def forward(self, batch: dict) -> dict[str, Tensor]:
        return self._distill(batch) if self.stage == "distill" else self._lm(batch)

    def _image_rms(self, x: Tensor) -> Tensor:
        """Sum over image tokens [..., C] of the squared log ratio of their RMS to the LLM's text RMS."""
        return torch.log(x.float().pow(2).mean(-1).sqrt() / self.text_rms).pow(2).sum()

    def _text_anchor(self, x: Tensor, ids: Tensor, valid: Tensor | None) -> Tensor:
        weights = anchor_text_weights(ids, valid, self.model.config, self.anchor.text_start_weight)
        with torch.no_grad():
            target = self.model.language_model.tok_embeddings(ids.clamp(max=self.model.config.llm.vocab_size - 1))
        return (relative_error(x, target) * weights).sum()

    def _lm(self, b: dict) -> dict[str, Tensor]:
        """Cross-entropy summed over target tokens; the LM head only runs where there is a target (image
        and prompt positions, most of a VLM sequence, never reach the vocab projection)."""
        m, lm = self.model, self.model.language_model
        ids = b["input_ids"]
        x, h = _hidden(m, b)
        out = {}
        if self.lm or self.anchor.vision_kl_weight:
            targets = b["labels"][:, 1:]  # position t predicts token t + 1
            keep = targets != IGNORE_INDEX
            logits = lm.output(lm.norm(h[:, :-1][keep]))  # [K, V]
            if self.lm:
                out["lm"] = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
            if self.anchor.vision_kl_weight:
                out["vision_kl"] = self._vision_kl(b, logits, keep)
        if self.object_labels:  # the LLM-side tokens of each tile, in pixel_values order: [N, n, C]
            image = x[ids == m.config.embedding.img_context_token_id].view(-1, m.config.num_image_token, x.shape[-1])
            out |= self._objects(image, b["object_targets"])
        if self.anchor.module_image_weight:
            out["module_image"] = self._module_image(x, _embed_args(b))
        if self.anchor.text_weight:
            out["text"] = self._text_anchor(x, ids, b["attention_mask"])
        if self.anchor.image_rms_weight:
            out["image_rms"] = self._image_rms(x[ids == m.config.embedding.img_context_token_id])
        if self.reference is not None:
            out["language_kl"] = self._language_kl(h, ids, language_kl_mask(ids, b["attention_mask"], m.config))
        return out

    def _module_image(self, x: Tensor, embed_args: list) -> Tensor:
        """Sum over the image tokens of the squared error of the module's outputs `x` [B, T, C] against the
        reference module's on the same `embed_args` (those of HoVLE.embed), in units of the reference's mean
        squared norm over the batch's image tokens. One unit per batch, not each token's own norm: a word map's
        quiet tokens are near zero, and a per-token relative error weights them far above its words, which
        then drift (docs/hovle-tiny.md, session 35)."""
        image = embed_args[0] == self.model.config.embedding.img_context_token_id  # [B, T]
        if not bool(image.any()):
            return x.sum() * 0.0  # a text-only batch; keeps every process's graph the same shape under DDP
        with torch.no_grad():
            target = self.vision_reference.embed(*embed_args)[image].float()  # [K, C]
        return (x[image].float() - target).pow(2).sum() / target.pow(2).sum(-1).mean().clamp(min=1e-12)

    def _vision_kl(self, b: dict, logits: Tensor, keep: Tensor) -> Tensor:
        """Sum over the target positions of image rows of KL(reference || model); `logits` [K, V] are
        the model's at the K target positions `keep` [B, T - 1]."""
        ref = self.vision_reference
        image = vision_kl_mask(b["input_ids"], b["labels"], self.model.config)[keep]  # [K]
        if not bool(image.any()):
            return logits.sum() * 0.0
        with torch.no_grad():
            h = _hidden(ref, b)[1][:, :-1][keep][image]
            target = ref.language_model.output(ref.language_model.norm(h))  # [K', V]
        return kl_sum(logits[image], target)

    def _language_kl(self, h: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Sum over `mask` positions of KL(reference || model) of the next-token distributions."""
        rows = mask.any(1)
        if not bool(rows.any()):
            return h.sum() * 0.0  # keeps every process's graph the same shape under DDP
        lm, ref = self.model.language_model, self.reference
        keep = mask[rows]
        student = lm.output(lm.norm(h[rows][keep]))  # [K, V]
        with torch.no_grad():
            target = ref(ref.tok_embeddings(ids[rows]), keep)[keep]  # [K, V]
        return kl_sum(student, target)

    def _teacher_loss(self, x: Tensor, target: Tensor) -> Tensor:
        """Sum over the teacher's patches of the head's loss: `x` [N, n, C] image tokens, `target` [N, t*t, D]."""
        if self.distill.standardize_targets:
            flat = target.float().flatten(0, 1)
            target = (target.float() - flat.mean(0)) / (flat.std(0) + 1e-6)
        loss = token_loss(self.head(x), target, self.distill.loss)  # [N, t*t]
        if self.distill.patch_weights == "salient":
            t = target.float()
            dist = (t - t.mean(1, keepdim=True)).norm(dim=-1)
            loss = loss * dist / dist.mean(1, keepdim=True).clamp(min=1e-6)
        return loss.sum()

    def _objects(self, x: Tensor, targets: Tensor | None) -> dict[str, Tensor]:
        """distill.object_weight's, count_weight's and word_weight's terms from the image tokens x [N, n, C]."""
        d = self.distill
        terms = [k for k in ("object", "count", "word") if getattr(d, f"{k}_weight")]
        if targets is None:
            return {k: x.sum() * 0.0 for k in terms}  # keeps every process's graph the same shape under DDP
        out = {"word": word_loss(x, targets, self.words)} if d.word_weight else {}
        if not (d.object_weight or d.count_weight):
            return out
        sizes = self.object_sizes
        y = self.object_head(x).float()  # [N, n, 1 + sum(sizes) + count classes]
        split, A = 1 + sum(sizes), 1 + len(sizes)
        if d.object_weight:
            out["object"] = object_loss(y[..., :split], targets[..., :A], sizes)
        if d.count_weight:
            keep = targets[..., 0] != IGNORE_INDEX  # tokens of images with objects
            out["count"] = (y[..., split:][keep] - targets[..., A:][keep].float()).pow(2).sum()
        return out

    def _distill(self, b: dict) -> dict[str, Tensor]:
        m = self.model
        out = {}
        if b["pixel_values"] is not None:
            cfg = m.config
            N = b["pixel_values"].shape[0]
            ctx = cfg.embedding.img_context_token_id
            ids = torch.full((N, cfg.num_image_token), ctx, device=b["pixel_values"].device)  # one tile per row
            hd = torch.full((N, cfg.num_patch_tokens), ctx, device=ids.device) if m.is_post else None
            x = m.embed(ids, b["pixel_values"], hd)  # [N, n, C], the LLM-side image tokens
            if self.head is not None:
                out["image"] = self._teacher_loss(x, b["teacher_features"])
            if self.object_labels:
                out |= self._objects(x, b["object_targets"])
            if self.anchor.image_rms_weight:
                out["image_rms"] = self._image_rms(x)
            if self.anchor.module_image_weight:
                out["module_image"] = self._module_image(x, [ids, b["pixel_values"], hd])
        if b["text_ids"] is not None:
            x = m.embed(b["text_ids"], attention_mask=b["text_mask"])  # [B, T, C]
            out["text"] = self._text_anchor(x, b["text_ids"], b["text_mask"])
        return out


def loss_terms(cfg: TrainConfig) -> list[str]:
    """The loss terms this run sums, in logging order (an anchor term only where its weight is set)."""
    return [k for k, w in cfg.loss_weights().items() if w]


def target_counts(batch: dict, stage: str) -> dict[str, int]:
    """How many tokens each loss term sums over in this micro-batch (the normaliser's share; for the text term,
    the sum of its position weights)."""
    counts = {"text": batch["anchor_text_tokens"], "image_rms": batch["llm_image_tokens"],
              "module_image": batch["llm_image_tokens"],
              "language_kl": batch.get("language_kl_tokens", 0), "vision_kl": batch.get("vision_kl_tokens", 0)}
    ot = batch["object_targets"]
    objects = 0 if ot is None else int((ot[..., 0] != IGNORE_INDEX).sum())
    centres = 0 if ot is None else int(word_positions(ot).sum())
    counts |= {"object": objects, "count": objects, "word": centres}
    if stage != "distill":
        return counts | {"lm": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}
    tf = batch["teacher_features"]
    return counts | {"image": 0 if tf is None else tf.shape[0] * tf.shape[1]}


def input_tokens(batch: dict, stage: str) -> int:
    """Tokens the model processes in this micro-batch (for throughput)."""
    if stage != "distill":
        return int(batch["attention_mask"].sum())
    n = 0 if batch["text_mask"] is None else int(batch["text_mask"].sum())
    return n + (0 if batch["pixel_values"] is None else batch["pixel_values"].shape[0] * batch["n_image_tokens"])


# ---- distributed helpers -----------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- the trainer ------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    loss: float
    parts: dict[str, float]
    grad_norm: float
    tokens: int
    samples: int


def _use_bf16(precision: str, device: torch.device) -> bool:
    """train.precision resolved on this device; an explicit bf16-mixed where bf16 is emulated gets a warning."""
    native = native_bf16(device)
    if precision == "bf16-mixed" and not native:
        warnings.warn(f"train.precision bf16-mixed on a {device.type} without native bf16 matmuls (AVX512-BF16 or "
                      "AMX on a CPU) is emulated and an order of magnitude slower than fp32; use 'auto' or 'fp32'",
                      stacklevel=2)
    return precision == "bf16-mixed" or (precision == "auto" and native)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from hovle.tokenizer import load_tokenizer

        self.cfg = cfg
        self.rank, self.world = _world()
        self.device = torch.device(cfg.device if cfg.device != "cuda" or not dist.is_initialized()
                                   else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        self.out = Path(cfg.train.out_dir)
        self.bf16 = _use_bf16(cfg.train.precision, self.device)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)

        self.model = build_model(cfg, self.device)
        tok_path = cfg.model.tokenizer or (cfg.model.init if Path(cfg.model.init).is_dir() else None)
        if tok_path is None:
            raise ConfigError("model.tokenizer is required when model.init is a preset (no tokenizer folder)")
        self.tokenizer = load_tokenizer(tok_path)
        # Ids past the LLM's vocabulary are fine when the embedding module embeds them itself (HoVLE-Tiny's
        # <img>, </img>, <IMG_CONTEXT>: special_token_maps); they are never prediction targets.
        vocab = self.model.config.llm.vocab_size
        special = set((self.model.config.embedding.special_token_maps or {}).values())
        if set(range(vocab, len(self.tokenizer))) - special:
            raise ConfigError(f"the tokenizer has {len(self.tokenizer)} ids but the model's vocab_size is {vocab}")

        self.teacher, head, self.feature_cache = None, None, None
        if cfg.stage == "distill" and cfg.distill.image_weight:
            self.teacher, head = self._teacher_and_head()
            if cfg.distill.feature_cache:
                from hovle.train.teachers import FeatureCache

                self.feature_cache = FeatureCache(cfg.distill.feature_cache, cfg.distill.teacher,
                                                  cfg.distill.teacher_args, self.teacher)
        if cfg.lora.enabled:
            apply_lora(self.model, cfg.lora)
        freeze_for_stage(self.model, cfg.stage, cfg.lora.parts if cfg.lora.enabled else (), cfg.model.freeze)
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        object_head, self.object_labels = None, None
        d, width = cfg.distill, self.model.config.llm.hidden_size
        uses_head = bool(d.object_weight or d.count_weight)
        if d.object_head and (uses_head or d.word_weight):
            object_head, self.object_labels = load_object_head(d.object_head, d.object_labels, width)
        elif uses_head or d.word_weight:
            self.object_labels = d.object_labels
            if uses_head:
                object_head = seeded_init(nn.Linear(width, object_head_outputs(d.object_labels)), cfg.train.seed + 2)
        words = None
        if d.word_weight:
            words = attribute_word_embeddings(self.object_labels, self.tokenizer,
                                              self.model.language_model.tok_embeddings.weight.detach())
        self.module = StageModule(self.model, cfg.stage, cfg.distill, head, cfg.anchor, *self._references(),
                                  lm=bool(cfg.train.lm_weight), object_head=object_head,
                                  object_labels=self.object_labels, words=words).to(self.device)
        self.module.train()
        self.wrapped = self._parallelize()  # before the optimizer: FSDP2 swaps in sharded parameters
        self.trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        self.optimizer = build_optimizer(self.trainable, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))

        encoder = Encoder(self.model.config, self.tokenizer, cfg.data, cfg.stage, self.teacher,
                          distill_text=bool(cfg.anchor.text_weight), object_labels=self.object_labels)
        train_stream, eval_stream = build_streams(cfg.data, cfg.train.seed, self.rank, self.world)
        self.loader = Loader(train_stream, encoder, cfg.data.num_workers, cfg.data.group_by_length)
        self.eval_loader = Loader(eval_stream, encoder, cfg.data.num_workers) if eval_stream is not None else None
        self.eval_start = self.eval_loader.state() if self.eval_loader else None
        self.step = 0

    # ---- setup ----

    def _teacher_and_head(self):
        from hovle.train.teachers import load_teacher

        teacher = load_teacher(self.cfg.distill.teacher, **self.cfg.distill.teacher_args)
        if isinstance(teacher, nn.Module):
            teacher.to(self.device).eval().requires_grad_(False)
        s = teacher.image_size
        tokens = teacher.features(torch.zeros(1, 3, s, s, device=self.device)).shape[1]
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise ConfigError(f"distill.teacher gives {tokens} tokens per image, not a square grid")
        head = DistillHead(self.model.config.llm.hidden_size, teacher.dim, math.isqrt(self.model.config.num_image_token), grid)
        return teacher, seeded_init(head, self.cfg.train.seed + 1)

    def _references(self) -> tuple[nn.Module | None, nn.Module | None]:
        """The frozen models the KL anchors compare with: the LLM of anchor.language_reference and the whole
        HoVLE of anchor.vision_reference (each loaded before LoRA or freezing touch the model being trained)."""
        a = self.cfg.anchor
        language = self._reference("language", a.language_reference) if a.language_kl_weight else None
        vision = self._reference("vision", a.vision_reference) if a.vision_kl_weight or a.module_image_weight else None
        return None if language is None else language.language_model, vision

    def _reference(self, kind: str, path: str | None) -> HoVLE:
        path = path or self.cfg.model.init
        if not Path(path).is_dir():
            raise ConfigError(f"anchor.{kind}_reference {path!r} is not a checkpoint folder")
        ref = HoVLE.from_pretrained(path, dtype=torch.float32, device=self.device)
        if ref.config.llm.vocab_size != self.model.config.llm.vocab_size:
            raise ConfigError(f"anchor.{kind}_reference {path}: vocab_size {ref.config.llm.vocab_size} is not the "
                              f"model's {self.model.config.llm.vocab_size}")
        return ref.eval().requires_grad_(False)

    def _parallelize(self) -> nn.Module:
        if self.world == 1:
            return self.module
        if self.cfg.distributed.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for m in self.module.modules():
                if isinstance(m, DecoderLayer):
                    fully_shard(m)
            return fully_shard(self.module)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Batches without images leave the vision parameters unused, hence find_unused_parameters.
        return DistributedDataParallel(self.module, device_ids=ids, find_unused_parameters=True)

    # ---- batches ----

    def _batch(self, loader: Loader) -> dict:
        examples = loader.batch(self.cfg.train.micro_batch_size)
        pad = self.tokenizer.pad_token_id or 0
        mc = self.model.config
        if self.cfg.stage != "distill":
            batch = collate_lm(examples, pad, self.cfg.data.pad_to_multiple)
            ids, valid = batch["input_ids"], batch["attention_mask"]
            batch["llm_image_tokens"] = int((ids == mc.embedding.img_context_token_id).sum())
            batch["language_kl_tokens"] = int(language_kl_mask(ids, valid, mc).sum())
            batch["vision_kl_tokens"] = int(vision_kl_mask(ids, batch["labels"], mc).sum())
        else:
            batch = collate_distill(examples, pad)
            batch["n_image_tokens"] = mc.num_embedding_image_token
            pv, ids, valid = batch["pixel_values"], batch["text_ids"], batch["text_mask"]
            batch["llm_image_tokens"] = 0 if pv is None else pv.shape[0] * mc.num_image_token
            tp = batch.pop("teacher_pixels")
            if tp is None:
                batch["teacher_features"] = None
            elif self.feature_cache is not None:
                batch["teacher_features"] = self.feature_cache.features(self.teacher, tp, self.device)
            else:
                batch["teacher_features"] = self.teacher.features(tp.to(self.device)).float()
        start = self.cfg.anchor.text_start_weight
        batch["anchor_text_tokens"] = 0 if ids is None else float(anchor_text_weights(ids, valid, mc, start).sum())
        batch["samples"] = len(examples)
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ---- one optimizer step ----

    def train_step(self) -> StepResult:
        """grad_accum micro-batches on each process -> one AdamW step. Returns global (all-process) figures."""
        batches = [self._batch(self.loader) for _ in range(self.cfg.train.grad_accum)]
        keys = loss_terms(self.cfg)
        local = [sum(target_counts(b, self.cfg.stage)[k] for b in batches) for k in keys]
        local += [sum(input_tokens(b, self.cfg.stage) for b in batches), sum(b["samples"] for b in batches)]
        *totals, tokens, samples = _all_sum(local, self.device)
        totals = dict(zip(keys, totals))
        weights = self.cfg.loss_weights()
        parts = dict.fromkeys(keys, 0.0)
        ddp = isinstance(self.wrapped, DistributedDataParallel)
        for i, b in enumerate(batches):
            last = i == len(batches) - 1
            with (self.wrapped.no_sync() if ddp and not last else nullcontext()), self._autocast():
                sums = self.wrapped(b)
            # Each term is a share of the global mean; DDP/FSDP average gradients, hence * world. A term with no
            # tokens in the whole step joins at 0, so a micro-batch without any still has a graph to backward.
            shares = {k: s / totals[k] if totals[k] > 0 else s * 0.0 for k, s in sums.items()}
            loss = sum(weights[k] * v for k, v in shares.items())
            (loss * self.world).backward()
            for k, v in shares.items():
                parts[k] += float(v.detach())
        params = list(self.trainable.values())
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        parts = dict(zip(keys, _all_sum([parts[k] for k in keys], self.device)))
        loss = sum(weights[k] * v for k, v in parts.items())
        return StepResult(loss, parts, float(norm.full_tensor() if isinstance(norm, DTensor) else norm),
                          int(tokens), int(samples))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the first train.eval_batches micro-batches of the held-out split (same each time)."""
        if self.eval_loader is None:
            return None
        self.eval_loader.load_state(self.eval_start)
        keys = loss_terms(self.cfg)
        sums, counts = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0)
        for _ in range(self.cfg.train.eval_batches):
            b = self._batch(self.eval_loader)
            with self._autocast():
                out = self.module(b)  # unwrapped (DDP) or the FSDP2 root itself
            n = target_counts(b, self.cfg.stage)
            for k in keys:
                counts[k] += n[k]
                sums[k] += float(out[k]) if k in out else 0.0
        total = _all_sum([sums[k] for k in keys] + [counts[k] for k in keys], self.device)
        s, n = dict(zip(keys, total[: len(keys)])), dict(zip(keys, total[len(keys):]))
        weights = self.cfg.loss_weights()
        return sum(weights[k] * s[k] / n[k] for k in keys if n[k] > 0)

    # ---- checkpoints ----

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def _trainable_state(self) -> dict[str, Tensor]:
        if self.cfg.distributed.strategy == "fsdp" and self.world > 1:
            return {n: p.full_tensor().detach().cpu() for n, p in self.trainable.items()}
        return {n: p.detach().cpu().clone() for n, p in self.trainable.items()}

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step_N (temp folder + rename) and then the `latest` pointer (temp + rename)."""
        data = _gather(self.loader.state())
        fsdp = self.cfg.distributed.strategy == "fsdp" and self.world > 1
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim = get_optimizer_state_dict(self.wrapped, self.optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            optim = self.optimizer.state_dict()
        weights = self._trainable_state()
        final = self.ckpt_dir / f"step_{self.step:08d}"
        if self.rank == 0:
            state = {
                "step": self.step, "trainable": weights, "optimizer": optim,
                "scheduler": self.scheduler.state_dict(), "data": data, "world_size": self.world,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                "config": self.cfg.to_dict(),
            }
            tmp = self.ckpt_dir / f".tmp_step_{self.step:08d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(state, tmp / "state.pt")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.ckpt_dir / ".latest.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.ckpt_dir / "latest")
            for old in sorted(self.ckpt_dir.glob("step_*"))[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            plot_metrics(self.out)
        if dist.is_initialized():
            dist.barrier()
        return final

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if not pointer.is_file():
            return None
        path = self.ckpt_dir / pointer.read_text().strip()
        return path if (path / "state.pt").is_file() else None

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        if state["world_size"] != self.world:
            raise ConfigError(f"{path} was written by {state['world_size']} processes; resume with the same number "
                              f"(this run has {self.world})")
        with torch.no_grad():
            for n, p in self.trainable.items():
                t = state["trainable"][n].to(self.device)
                if isinstance(p, DTensor):  # FSDP2 shard: keep this rank's part
                    t = distribute_tensor(t, p.device_mesh, p.placements)
                p.copy_(t)
        if self.cfg.distributed.strategy == "fsdp" and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state(state["data"][self.rank])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = state["step"]

    # ---- the loop ----

    def log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self, stop_at_step: int | None = None) -> Path | None:
        """Train to train.max_steps (resuming when a checkpoint exists); save the final model folder.

        `stop_at_step` ends the run early right after that step's checkpoint (for time-limited job slots);
        the next call resumes from it. Returns the final model folder, or None when stopped early."""
        from tqdm import tqdm

        tc = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        latest = self.latest_checkpoint() if tc.resume else None
        if latest is not None:
            self.load_checkpoint(latest)
        if self.rank == 0:
            _truncate_metrics(self.out / "metrics.jsonl", self.step)
            (self.out / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=self.rank != 0 or not tc.progress,
                   desc=f"{self.cfg.stage} ({'bf16' if self.bf16 else 'fp32'})", dynamic_ncols=True)
        window = {"tokens": 0, "samples": 0, "time": 0.0}
        while self.step < tc.max_steps:
            t0 = time.perf_counter()
            r = self.train_step()
            self.step += 1
            window["tokens"] += r.tokens
            window["samples"] += r.samples
            window["time"] += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{r.loss:.4f}")
            if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                self.log({"step": self.step, "loss": r.loss, **{f"loss_{k}": v for k, v in r.parts.items()},
                          "lr": self.scheduler.get_last_lr()[0], "grad_norm": r.grad_norm,
                          "tokens_per_s": window["tokens"] / window["time"],
                          "samples_per_s": window["samples"] / window["time"],
                          "skipped": _merge_counts(_gather(dict(self.loader.skipped)))})
                window = {"tokens": 0, "samples": 0, "time": 0.0}
            if tc.eval_every and (self.step % tc.eval_every == 0 or self.step == tc.max_steps):
                eval_loss = self.evaluate()
                if eval_loss is not None:
                    self.log({"step": self.step, "eval_loss": eval_loss})
            if (tc.save_every and self.step % tc.save_every == 0) or self.step == stop_at_step:
                self.save_checkpoint()
            if self.step == stop_at_step:
                bar.close()
                return None
        bar.close()
        return self.save_final()

    def save_final(self) -> Path:
        """out_dir/final: a plain checkpoint folder (config.json, safetensors, tokenizer) with LoRA merged."""
        final = self.out / "final"
        if self.cfg.distributed.strategy == "fsdp" and self.world > 1:
            full = {n: p.full_tensor() for n, p in self.model.named_parameters()}  # collective: every rank
            model = HoVLE.from_config(self.model.config, seed=None)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(full[n])
        else:
            model = self.model
        if self.rank == 0:
            if self.cfg.lora.enabled:
                merge_lora(model)
            model.save_pretrained(final)
            self.tokenizer.save_pretrained(final)
            head = self.module.object_head
            if head is not None and head.weight.requires_grad:  # a head this run trained: later stages' anchor
                save_object_head(head, self.object_labels, final / OBJECT_HEAD_FILE)
            plot_metrics(self.out)
        if dist.is_initialized():
            dist.barrier()
        return final


def _merge_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    """Add up per-process skip counters."""
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


# ---- builders ---------------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, device) -> HoVLE:
    """fp32 master weights: the checkpoint folder in model.init, or a seeded random preset / config.json."""
    init = Path(cfg.model.init)
    if init.is_dir():
        model = HoVLE.from_pretrained(init, dtype=torch.float32, device=device)
    else:
        model = HoVLE.from_config(cfg.model.init, dtype=torch.float32, device=device, seed=cfg.model.seed)
    return model.train()


def build_optimizer(trainable: dict[str, Tensor], cfg) -> torch.optim.AdamW:
    """AdamW, one group per (lr multiplier, decay or not); 1-D tensors (norms, biases) get no weight decay.
    Names are matched against optim.lr_multipliers by prefix (longest wins), without the "model." prefix."""
    groups: dict[tuple[float, bool], list[Tensor]] = {}
    for name, p in trainable.items():
        short = name.removeprefix("model.")
        hits = [k for k in cfg.lr_multipliers if short.startswith(k)]
        mult = cfg.lr_multipliers[max(hits, key=len)] if hits else 1.0
        groups.setdefault((mult, p.dim() >= 2), []).append(p)
    if not groups:
        raise ConfigError("no parameter is trainable in this stage")
    param_groups = [{"params": ps, "lr": cfg.lr * mult, "weight_decay": cfg.weight_decay if decay else 0.0}
                    for (mult, decay), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_lambda(cfg: TrainConfig):
    """Linear warmup from lr/warmup to lr, then cosine down to lr * min_lr_ratio at max_steps."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ---- metrics ----------------------------------------------------------------------------------------------------


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def plot_metrics(out: Path) -> None:
    """out/loss.png: training loss (and eval loss) against step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out / "loss.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def train(cfg: TrainConfig, stop_at_step: int | None = None) -> Path | None:
    """Run a whole training job (initialising torch.distributed under torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = cfg.distributed.backend or ("nccl" if cfg.device.startswith("cuda") else "gloo")
        dist.init_process_group(backend)
        if cfg.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        return Trainer(cfg).fit(stop_at_step)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
