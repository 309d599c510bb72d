"""Training configuration: typed dataclasses read from YAML, with dotted `key=value` overrides.

Every dataclass validates itself in `__post_init__` and names the offending field, so a typo in a
config file fails before any model is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

from hovle.config import ConfigError

STAGES = ("distill", "align", "sft")
FORMATS = ("conversation", "caption", "text", "images", "webdataset")
LORA_TARGETS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    init: str = "tiny"  # a checkpoint folder (fine-tune) or a preset name (random init, e.g. "tiny")
    tokenizer: str | None = None  # tokenizer folder; default: `init` when it is a folder
    seed: int = 0  # random init seed (presets only)
    # parameter names that stay frozen in this stage: prefixes, or glob patterns ("language_model.*norm*")
    freeze: list[str] = field(default_factory=list)

    def __post_init__(self):
        _check(bool(self.init), "model.init must name a checkpoint folder or a preset")
        bad = [f for f in self.freeze if not f.startswith(("embedding_model.", "language_model."))]
        _check(not bad, f"model.freeze: {bad} must start with 'embedding_model.' or 'language_model.'")


@dataclass
class SourceConfig:
    path: str  # a file, a folder (format images), or a brace pattern of tar shards ("d/{000..009}.tar")
    format: str = "conversation"
    image_root: str | None = None  # where relative image paths point; default: the file's folder
    repeat: int = 1  # how many times this source appears per epoch (cheap up-weighting)

    def __post_init__(self):
        _check(self.format in FORMATS, f"data.sources[].format must be one of {FORMATS}, got {self.format!r}")
        _check(self.repeat >= 1, f"data.sources[].repeat must be >= 1, got {self.repeat}")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    eval_sources: list[SourceConfig] = field(default_factory=list)  # held-out data; else eval_fraction
    eval_fraction: float = 0.0  # of the training sources, held out (seeded, fixed across epochs)
    max_length: int = 4096  # longer samples are skipped and counted
    # Stages II/III pad each batch to a multiple of this. On CPU every new sequence length costs memory that
    # is kept (HoVLE-Tiny Stage III: 6.5 -> 8.4 GB in 30 steps and slowing, against flat 5.6-5.8 GB and
    # 6.8 s/step when padded to multiples of 128).
    pad_to_multiple: int = 1
    max_tiles: int | None = None  # dynamic tiling limit; default: the model's max_dynamic_patch
    caption_prompt: str = "<image>\nDescribe the image briefly."
    system_message: str | None = None  # default: the template's
    shuffle: bool = True
    num_workers: int = 0  # threads that decode and tokenize a batch's samples in parallel
    group_by_length: int = 1  # micro-batches drawn together and sorted by length (less padding); 1 = off

    def __post_init__(self):
        self.sources = [s if isinstance(s, SourceConfig) else _build(SourceConfig, s, "data.sources[]")
                        for s in self.sources]
        self.eval_sources = [s if isinstance(s, SourceConfig) else _build(SourceConfig, s, "data.eval_sources[]")
                             for s in self.eval_sources]
        _check(bool(self.sources), "data.sources is empty: name at least one training source")
        _check(0.0 <= self.eval_fraction < 1.0, f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        _check(self.pad_to_multiple >= 1, f"data.pad_to_multiple must be >= 1, got {self.pad_to_multiple}")
        _check(self.max_length > 0, f"data.max_length must be positive, got {self.max_length}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.group_by_length >= 1, f"data.group_by_length must be >= 1, got {self.group_by_length}")
        _check(self.max_tiles is None or self.max_tiles >= 1, f"data.max_tiles must be >= 1, got {self.max_tiles}")
        shards = [s.format == "webdataset" for s in self.sources]
        _check(all(shards) or not any(shards),
               "data.sources mixes webdataset shards with other formats: put all of it in shards, or none")
        _check(not (any(shards) and self.eval_fraction > 0),
               "data.eval_fraction cannot split webdataset shards: give data.eval_sources instead")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.05  # not applied to biases, norms and other 1-D tensors
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global grad norm; null disables
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> lr factor

    def __post_init__(self):
        self.betas = tuple(self.betas)
        _check(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas must be two values in [0, 1), got {self.betas}")
        _check(self.grad_clip is None or self.grad_clip > 0,
               f"optim.grad_clip must be positive or null, got {self.grad_clip}")
        for k, v in self.lr_multipliers.items():
            _check(v >= 0, f"optim.lr_multipliers[{k!r}] must be >= 0, got {v}")


@dataclass
class TrainLoopConfig:
    out_dir: str = "runs/hovle"
    max_steps: int = 1000
    micro_batch_size: int = 4  # samples per forward on each process
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = micro * accum * world size
    # "fp32" | "bf16-mixed" (bf16 autocast, fp32 master weights) | "auto" (bf16-mixed where the device has
    # native bf16 matmuls, else fp32: emulated bf16 is an order of magnitude slower than fp32)
    precision: str = "fp32"
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic eval
    eval_batches: int = 8
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    resume: bool = True  # continue from out_dir/checkpoints/latest when present
    progress: bool = True
    # Stages align/sft: the cross-entropy term's weight. 0 trains on the anchors alone, e.g. a distillation of
    # the text path into the reference LLM's next-token distributions (anchor.language_kl_weight) without
    # fitting the training text itself.
    lm_weight: float = 1.0

    def __post_init__(self):
        for name in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "eval_batches", "keep_checkpoints"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            _check(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _check(self.lm_weight >= 0, f"train.lm_weight must be >= 0, got {self.lm_weight}")
        _check(self.precision in ("fp32", "bf16-mixed", "auto"),
               f"train.precision must be 'fp32', 'bf16-mixed' or 'auto', got {self.precision!r}")


@dataclass
class DistillConfig:
    teacher: str = "mobilenet_v2"  # "mobilenet_v2", or "package.module:factory" (see docs/training.md)
    teacher_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the factory
    loss: str = "cosine"  # "cosine" (1 - cos) or "mse"
    image_weight: float = 1.0  # 0: no teacher is loaded (a text-path repair, anchor.module_image_weight)
    # Standardise the teacher's features per channel over the batch's image tokens before the loss. Patch
    # features share a large common component (on HoVLE-Tiny's data, DINOv2's mean patch feature alone scores
    # cosine 0.88), so raw targets teach little beyond it.
    standardize_targets: bool = False
    # "salient": weight each teacher patch's loss by its distance from its image's mean (standardised) feature,
    # normalised to mean 1 per image. Background patches, most of a scene of small objects, otherwise dominate
    # the loss: on HoVLE-Tiny's data a linear probe found shape in 28% (uniform: 23%) of the images after
    # 1000 steps x 32.
    patch_weights: str = "uniform"
    # A folder for the teacher's features (FeatureCache): every epoch after the first skips the teacher.
    feature_cache: str | None = None
    # Dense object targets from the data's own boxes (a record's "objects": [{"box": [x0, y0, x1, y1] in 0-1
    # image coordinates, attribute: value, ...}]): a training-only linear head on each image token predicts
    # whether an object's centre lies in its cell and, where a box covers the cell, each attribute listed in
    # object_labels ({attribute: [values]}). A teacher's patch features carry what is where, but not which
    # patches make one object: on HoVLE-Tiny's data, count stayed at 48% for a linear probe of pooled Stage I
    # tokens, and the LLM never learned to count from them.
    object_weight: float = 0.0
    object_labels: dict[str, list[str]] = field(default_factory=dict)
    # The same head also regresses, at each token, how many objects of each class (all objects, each value of
    # each attribute, each combination of values: 1 + 8 + 4 + 32 classes for colour x shape) have their centre
    # at or before it in reading order. The embedding module is causal, so the last tokens then carry the whole
    # count table: counting is done once, densely supervised, where the LLM only has to read it. Per-token
    # centre flags alone left the LLM counting at chance (the attention that reads them averages).
    count_weight: float = 0.0
    # A head a Stage I run saved (its out_dir/final/object_head.safetensors), loaded frozen; object_labels
    # default to the ones saved with it. In stages align and sft, object_weight and count_weight then hold the
    # module's image tokens to what Stage I taught them: the head reads each one-image sample's whole-image tile
    # (the only tile, or the thumbnail). Without it, HoVLE-Tiny's Stage II washed the last token's count table
    # out within 100 steps (exact total counts 82% -> 27% of held-out images).
    object_head: str | None = None
    # The image tokens write each object as its attribute words in a row, in the LLM's own input embeddings:
    # " red" at the token where its centre lies, " circle" at the next, zero at every other token of the tile
    # (squared error in units of the words' mean squared norm; the quiet tokens weigh in all as much as the
    # words). The LLM then reads an object as it reads its words. From tokens that carry colour and shape in a
    # code of their own, HoVLE-Tiny's LLM named the asked object's colour in 46% of scenes of several objects;
    # given the same scenes written in words it learned that binding (92%) within 4,800 samples; from perfect
    # maps of this form, 86% (docs/hovle-tiny.md, sessions 32-33).
    word_weight: float = 0.0

    def __post_init__(self):
        _check(self.loss in ("cosine", "mse"), f"distill.loss must be 'cosine' or 'mse', got {self.loss!r}")
        _check(self.patch_weights in ("uniform", "salient"),
               f"distill.patch_weights must be 'uniform' or 'salient', got {self.patch_weights!r}")
        _check(self.image_weight >= 0, f"distill.image_weight must be >= 0, got {self.image_weight}")
        for name in ("object_weight", "count_weight", "word_weight"):
            w = getattr(self, name)
            _check(w >= 0, f"distill.{name} must be >= 0, got {w}")
            _check(not w or bool(self.object_labels) or bool(self.object_head),
                   f"distill.{name} needs distill.object_labels ({{attribute: [values]}}) or distill.object_head")
        for k, v in self.object_labels.items():
            _check(isinstance(v, list) and len(v) >= 2 and len(set(v)) == len(v),
                   f"distill.object_labels[{k!r}] must be a list of at least 2 distinct values, got {v!r}")


@dataclass
class AnchorConfig:
    """Terms, in any stage, that keep the embedding module's outputs where the frozen LLM reads its inputs.

    text_weight: relative squared error ||x - e||^2 / ||e||^2 of each text token's output x against the LLM's
    own input embedding e (Stage I: the text distillation itself). Direction and scale both count: HoVLE-Tiny
    run 2 (cosine text loss, no anchor after Stage I) sent its text outputs to 1.6x, then 3.9x, the table's
    norm and SmolLM2's perplexity on held-out prose from 31 to 1,100.
    text_start_weight: c weights the text term 1 + c / (p + 1) at a row's position p. The LLM attends most
    to a text's first tokens, and there the module is furthest off (its attention sees only the token itself):
    on HoVLE-Tiny's held-out prose, the module's error was 0.26 at position 0 and 0.02 after position 16, and
    giving the LLM SmolLM2's own embeddings at the first 4 positions alone took perplexity from 35.8 to 30.7.
    image_rms_weight: squared log ratio of each image token's RMS to the LLM's mean text-embedding RMS. The
    cosine distill loss leaves that scale free and Adam lets it drift: run 1's image tokens grew to 100x its
    text embeddings, so the LLM saw near-constant image tokens and learned nothing from them.
    language_kl_weight: KL(reference || model) of the next-token distributions at every position of the
    image-free rows (stages align and sft), where the reference is the LLM alone, reading its own input
    embeddings, as loaded from `language_reference` (default: model.init). The whole distribution is matched,
    not just the sampled token, so text chat keeps the LLM's language: HoVLE-Tiny's Stage III, trained on
    cross-entropy alone, took SmolLM2's perplexity on held-out prose from 31 to 83.
    vision_kl_weight: KL(reference || model) of the next-token distributions at the target tokens of the rows
    with image tokens, where the reference is a whole HoVLE model loaded from `vision_reference` (default:
    model.init). It keeps what a trained model answers about images while a continuation changes something
    else (learning without forgetting): a CPU continuation of HoVLE-Tiny on cross-entropy alone lost 6 points
    of colour and 14 of shape.
    module_image_weight: squared error of the module's outputs at the image tokens against those of the
    `vision_reference` model's module on the same input (any stage), in units of the reference's mean squared
    norm over the batch's image tokens. It holds what the LLM reads from an
    image while a module-only run (stage distill, no teacher) repairs the module's text path, at the cost of
    the module alone: the LLM never runs.
    """

    text_weight: float = 0.0
    text_start_weight: float = 0.0
    image_rms_weight: float = 0.0
    language_kl_weight: float = 0.0
    language_reference: str | None = None
    vision_kl_weight: float = 0.0
    vision_reference: str | None = None
    module_image_weight: float = 0.0

    def __post_init__(self):
        _check(self.text_weight >= 0, f"anchor.text_weight must be >= 0, got {self.text_weight}")
        _check(self.text_start_weight >= 0, f"anchor.text_start_weight must be >= 0, got {self.text_start_weight}")
        _check(self.image_rms_weight >= 0, f"anchor.image_rms_weight must be >= 0, got {self.image_rms_weight}")
        _check(self.language_kl_weight >= 0, f"anchor.language_kl_weight must be >= 0, got {self.language_kl_weight}")
        _check(self.vision_kl_weight >= 0, f"anchor.vision_kl_weight must be >= 0, got {self.vision_kl_weight}")
        _check(self.module_image_weight >= 0, f"anchor.module_image_weight must be >= 0, got {self.module_image_weight}")


@dataclass
class LoRAConfig:
    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    parts: list[str] = field(default_factory=lambda: ["language_model"])  # model prefixes that get adapters

    def __post_init__(self):
        _check(self.r >= 1, f"lora.r must be >= 1, got {self.r}")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.target_modules if t not in LORA_TARGETS]
        _check(not bad, f"lora.target_modules: unknown {bad}; known: {list(LORA_TARGETS)}")
        bad = [p for p in self.parts if p not in ("language_model", "embedding_model")]
        _check(not bad and bool(self.parts),
               f"lora.parts must be a subset of [language_model, embedding_model], got {self.parts}")


@dataclass
class DistributedConfig:
    strategy: str = "ddp"  # "ddp" | "fsdp" (FSDP2 fully_shard per decoder layer)
    backend: str | None = None  # default: nccl on CUDA, gloo on CPU

    def __post_init__(self):
        _check(self.strategy in ("ddp", "fsdp"), f"distributed.strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")


@dataclass
class TrainConfig:
    stage: str
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    device: str = "cpu"

    def __post_init__(self):
        _check(self.stage in STAGES, f"stage must be one of {STAGES}, got {self.stage!r}")
        learning = {k: w for k, w in self.loss_weights().items() if k != "image_rms"}  # image_rms only holds a scale
        _check(any(learning.values()), f"stage {self.stage} learns nothing: the weights of {', '.join(learning)} are all 0")
        for name in ("object_weight", "count_weight", "word_weight"):
            if not getattr(self.distill, name):
                continue
            if self.stage == "distill":
                _check(self.data.max_tiles == 1, f"distill.{name} in stage distill needs data.max_tiles 1 (object "
                       f"boxes are given on the whole image), not {self.data.max_tiles}")
            elif name != "word_weight":  # the word term has fixed targets: the labels alone are enough
                _check(bool(self.distill.object_head), f"distill.{name} in stage {self.stage} anchors the image "
                       "tokens to a trained head: give distill.object_head (a Stage I run's object_head.safetensors)")
        _check(not (self.lora.enabled and self.stage != "sft"), f"lora.enabled is for stage sft, not {self.stage}")
        _check(not (self.lora.enabled and self.distributed.strategy == "fsdp"),
               "lora.enabled works with distributed.strategy ddp, not fsdp")
        if self.stage != "distill":
            bad = [s.path for s in self.data.sources + self.data.eval_sources if s.format == "images"]
            _check(not bad, f"data.sources {bad}: format 'images' has no text to learn; it is for stage distill")
        for kl in ("language_kl_weight", "vision_kl_weight"):
            _check(not (self.stage == "distill" and getattr(self.anchor, kl)),
                   f"anchor.{kl} is for stages align and sft: stage distill never runs the LLM")

    def loss_weights(self) -> dict[str, float]:
        """Each loss term's weight, in logging order: the stage's own term, then the anchors."""
        a, d = self.anchor, self.distill
        first = {"image": d.image_weight} if self.stage == "distill" else {"lm": self.train.lm_weight}
        return first | {"object": d.object_weight, "count": d.count_weight, "word": d.word_weight,
                        "text": a.text_weight, "image_rms": a.image_rms_weight, "language_kl": a.language_kl_weight,
                        "vision_kl": a.vision_kl_weight, "module_image": a.module_image_weight}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _build(cls, d, "")

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
        """Read a YAML file (or nothing) and apply `a.b.c=value` overrides (values parsed as YAML)."""
        import yaml

        d: dict[str, Any] = {}
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"training config not found: {path}")
            try:
                d = yaml.safe_load(Path(path).read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML ({e})") from None
            if not isinstance(d, dict):
                raise ConfigError(f"{path}: expected a mapping at the top level")
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} is not key=value")
            *parents, leaf = key.split(".")
            node = d
            for p in parents:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {item!r}: {p} is not a section")
            try:
                node[leaf] = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"override {key}: its value is not valid YAML ({' '.join(str(e).split())})") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, d: Any, where: str):
    """Instantiate dataclass `cls` from a dict, recursing into dataclass fields; unknown keys are errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown field(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in d.items():
        sub = f"{where}.{name}" if where else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and value is not None:
            value = _build(tp, value, sub)
        elif isinstance(value, str | int) and not isinstance(value, bool) and float in (get_args(tp) or (tp,)):
            try:  # PyYAML reads "1e-4" as a string
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{sub}: expected a number, got {value!r}") from None
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None
