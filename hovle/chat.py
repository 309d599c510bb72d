"""Prompts and the chat API users know from the official model card: chat, chat_stream, batch_chat.

Semantics follow the official InternVL-family `chat()` exactly: the `<image>` placeholder, its expansion
into `<img><IMG_CONTEXT>...</img>`, the history that keeps the image in its first turn, the reply cut at
the template's separator and stripped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from hovle.generation import stream_generate

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
INTERNVL_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # from SmolLM2's own template


@dataclass(frozen=True)
class Template:
    """A turn-based chat format: system block, then (user, assistant) turns, each closed by `sep`."""

    system_prefix: str
    user: str
    assistant: str
    sep: str
    system_message: str

    @property
    def stop_token(self) -> str:
        return self.sep.strip()

    def system_block(self, system_message: str | None = None) -> str:
        """The conversation's opening system turn (this template's own message unless one is given)."""
        return self.system_prefix + (self.system_message if system_message is None else system_message) + self.sep

    def prompt(self, question: str, history: Iterable[tuple[str, str]] = (), system_message: str | None = None) -> str:
        turns = [self.system_block(system_message)]
        for q, a in history:
            turns.append(self.user + q + self.sep + self.assistant + a + self.sep)
        turns.append(self.user + question + self.sep + self.assistant)
        return "".join(turns)


TEMPLATES: dict[str, Template] = {
    "internlm2-chat": Template("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>",
                               INTERNVL_SYSTEM),
    # SmolLM2-Instruct's ChatML (HoVLE-Tiny's LLM): a newline follows each <|im_end|>.
    "smollm2-chatml": Template("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n",
                               "<|im_end|>\n", SMOLLM2_SYSTEM),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r} in config.json; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def expand_images(prompt: str, num_patches_list: list[int], tokens_per_tile: int) -> str:
    """Replace the first len(num_patches_list) `<image>` placeholders by their image-token spans."""
    if prompt.count("<image>") < len(num_patches_list):
        raise ValueError(f"{len(num_patches_list)} images were given but the prompt has only "
                         f"{prompt.count('<image>')} <image> placeholders")
    for n in num_patches_list:
        prompt = prompt.replace("<image>", IMG_START + IMG_CONTEXT * (tokens_per_tile * n) + IMG_END, 1)
    return prompt


def _check_images(model, tokenizer, pixel_values: Tensor | None, num_patches_list: list[int]) -> None:
    if pixel_values is None:
        return
    S = model.config.tile_size
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
        raise ValueError(f"pixel_values must be [tiles, 3, {S}, {S}] for this model, got {list(pixel_values.shape)} "
                         f"(use load_image(..., input_size={S}))")
    if sum(num_patches_list) != pixel_values.shape[0]:
        raise ValueError(f"num_patches_list {num_patches_list} sums to {sum(num_patches_list)}, "
                         f"but pixel_values has {pixel_values.shape[0]} tiles")
    ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    if ctx != model.config.embedding.img_context_token_id:
        raise ValueError(f"the tokenizer's {IMG_CONTEXT} id is {ctx}, the model's config says "
                         f"{model.config.embedding.img_context_token_id}: tokenizer and model do not belong together")


def _encode(model, tokenizer, prompts: list[str], num_patches_lists: list[list[int]]) -> dict[str, Tensor]:
    """Tokenize prompts (left-padded) for the LLM and, in "post" mode, for the embedding module."""
    cfg = model.config

    def batch(per_tile: int) -> tuple[Tensor, Tensor]:
        texts = [expand_images(p, n, per_tile) for p, n in zip(prompts, num_patches_lists)]
        enc = tokenizer(texts, padding=True, padding_side="left")
        return torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"])

    ids, mask = batch(cfg.num_image_token)
    out = {"input_ids": ids, "attention_mask": None if bool(mask.all()) else mask}
    if model.is_post:
        hd_ids, hd_mask = batch(cfg.num_embedding_image_token)
        out |= {"hd_input_ids": hd_ids, "hd_attention_mask": None if bool(hd_mask.all()) else hd_mask}
    return out


def _strip_stream(pieces: Iterator[str]) -> Iterator[str]:
    """Yield text so that the concatenation equals the stripped whole: drop leading, hold back trailing space."""
    pending, started = "", False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        text = pending + piece
        body = text.rstrip()
        pending = text[len(body):]
        if body:
            yield body


def _generation_options(tokenizer, template: Template, generation_config: dict) -> dict:
    options = dict(generation_config)
    options["eos_token_id"] = tokenizer.convert_tokens_to_ids(template.stop_token)
    options.setdefault("pad_token_id", tokenizer.pad_token_id)
    return options


def turn_question(question: str, history: list | None, pixel_values: Tensor | None) -> str:
    """The question as the official chat() asks and records it: a first turn with an image gets "<image>\n"."""
    if history is None and pixel_values is not None and "<image>" not in question:
        return "<image>\n" + question
    return question


def _prepare(model, tokenizer, pixel_values, question, history, num_patches_list, system_message):
    """The (possibly <image>-prefixed) question and the encoded prompt of one chat turn."""
    question = turn_question(question, history, pixel_values)
    if num_patches_list is None:
        num_patches_list = [] if pixel_values is None else [pixel_values.shape[0]]
    _check_images(model, tokenizer, pixel_values, num_patches_list)
    template = get_template(model.config.template)
    prompt = template.prompt(question, history or [], system_message)
    return question, template, _encode(model, tokenizer, [prompt], [num_patches_list])


def _reply_stream(model, tokenizer, pixel_values, template: Template, inputs: dict, generation_config: dict,
                  generator: torch.Generator | None) -> Iterator[str]:
    options = _generation_options(tokenizer, template, generation_config)
    decoder = tokenizer.stream_decoder()

    def pieces() -> Iterator[str]:
        for tok in stream_generate(model, pixel_values=pixel_values, generator=generator, **inputs, **options):
            if int(tok[0]) == options["eos_token_id"]:
                break
            yield decoder.push(int(tok[0]))
        yield decoder.flush()

    return _strip_stream(pieces())


def chat_stream(model, tokenizer, pixel_values: Tensor | None, question: str, generation_config: dict,
                history: list[tuple[str, str]] | None = None, num_patches_list: list[int] | None = None,
                system_message: str | None = None, generator: torch.Generator | None = None) -> Iterator[str]:
    """Yield the reply's text as it is generated; "".join(...) equals what `chat` returns."""
    _, template, inputs = _prepare(model, tokenizer, pixel_values, question, history, num_patches_list, system_message)
    yield from _reply_stream(model, tokenizer, pixel_values, template, inputs, generation_config, generator)


def chat(model, tokenizer, pixel_values: Tensor | None, question: str, generation_config: dict,
         history: list[tuple[str, str]] | None = None, return_history: bool = False,
         num_patches_list: list[int] | None = None, system_message: str | None = None,
         generator: torch.Generator | None = None):
    """One chat turn. Returns the reply, or (reply, history + [(question, reply)]) with return_history.

    As in the official code, the pair is also appended to the caller's `history` list in place.
    """
    asked, template, inputs = _prepare(model, tokenizer, pixel_values, question, history, num_patches_list,
                                       system_message)
    reply = "".join(_reply_stream(model, tokenizer, pixel_values, template, inputs, generation_config, generator))
    if not return_history:
        return reply
    history = [] if history is None else history
    history.append((asked, reply))
    return reply, history


def batch_chat(model, tokenizer, pixel_values: Tensor | None, questions: list[str], generation_config: dict,
               num_patches_list: list[int] | None = None, system_message: str | None = None,
               generator: torch.Generator | None = None) -> list[str]:
    """One reply per question, generated together in one left-padded batch (one image per question)."""
    if pixel_values is not None and num_patches_list is None:
        raise ValueError("batch_chat with pixel_values needs num_patches_list (tiles per question's image)")
    per_question = [[] for _ in questions] if pixel_values is None else [[n] for n in num_patches_list]
    if len(per_question) != len(questions):
        raise ValueError(f"{len(questions)} questions but num_patches_list has {len(per_question)} entries")
    _check_images(model, tokenizer, pixel_values, [n for p in per_question for n in p])
    template = get_template(model.config.template)
    prompts = [template.prompt(q if pixel_values is None or "<image>" in q else "<image>\n" + q, [], system_message)
               for q in questions]
    inputs = _encode(model, tokenizer, prompts, per_question)
    options = _generation_options(tokenizer, template, generation_config)
    ids = torch.stack(list(stream_generate(model, pixel_values=pixel_values, generator=generator, **inputs, **options)), 1)
    return [tokenizer.decode(row, skip_special_tokens=True).split(template.sep)[0].strip() for row in ids.tolist()]
