"""Tokenizers for HoVLE, without transformers.

Two kinds of tokenizer folders are supported, both behind the same small interface:

- InternLM2 (`tokenizer.model` + json side files): a SentencePiece model driven directly, reproducing the
  ids and strings of the reference `InternLM2Tokenizer` (a transformers 4.37 slow tokenizer).
- `tokenizer.json` (HF `tokenizers` format), used by Llama-family LLMs such as SmolLM2.

`load_tokenizer(folder)` picks the right one.
"""

from __future__ import annotations

import json
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable

import sentencepiece as spm
import tokenizers

# The clean-up that transformers' `clean_up_tokenization` applies, in its order (the order matters:
# " ' " -> "'" runs after " ." -> "." and so loses a space that both could claim).
CLEANUP_RULES = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """Remove the spaces before punctuation and English contractions, like transformers does."""
    for old, new in CLEANUP_RULES:
        text = text.replace(old, new)
    return text


def _read_json(path: Path) -> dict[str, Any]:
    """A json side file, or {} when the folder does not have it (all of them are optional)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token: str | dict | None) -> str | None:
    """Special tokens are stored either as strings or as serialized AddedToken dicts."""
    return token["content"] if isinstance(token, dict) else token


def _special_tokens_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json with special_tokens_map.json on top, as transformers merges them."""
    return {**_read_json(folder / "tokenizer_config.json"), **_read_json(folder / "special_tokens_map.json")}


def _id_list(ids: Iterable[int] | int) -> list[int]:
    """Accept a list, a single id, or a (0-d or 1-d) torch tensor."""
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    return [ids] if isinstance(ids, int) else [int(i) for i in ids]


class Tokenizer(ABC):
    """The interface the rest of hovle uses; subclasses provide the vocabulary and the codec."""

    bos_token: str | None
    eos_token: str | None
    pad_token: str | None

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ...

    @abstractmethod
    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False) -> str:
        ...

    @abstractmethod
    def save_pretrained(self, folder: str | Path) -> None:
        ...

    @abstractmethod
    def __len__(self) -> int:
        ...

    @abstractmethod
    def _token_to_id(self, token: str) -> int | None:
        ...

    @abstractmethod
    def _id_to_token(self, index: int) -> str | None:
        ...

    def __call__(
        self,
        text: str | list[str],
        padding: bool = False,
        padding_side: str = "left",
        add_special_tokens: bool = True,
    ) -> dict[str, list]:
        """Encode one text or a batch; with padding, the batch is padded to its longest row."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = [self.encode(t, add_special_tokens) for t in text]
        width = max(map(len, rows), default=0) if padding else 0
        input_ids, attention_mask = [], []
        for ids in rows:
            n_pad = max(width - len(ids), 0)
            pad, mask = [self.pad_token_id] * n_pad, [1] * len(ids)
            if padding_side == "left":
                input_ids.append(pad + ids)
                attention_mask.append([0] * n_pad + mask)
            else:
                input_ids.append(ids + pad)
                attention_mask.append(mask + [0] * n_pad)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Iterable[int] | int) -> str | None | list[str | None]:
        if isinstance(ids, int) or getattr(ids, "ndim", 1) == 0:
            return self._id_to_token(int(ids))
        return [self._id_to_token(i) for i in _id_list(ids)]

    def _optional_id(self, token: str | None) -> int | None:
        return None if token is None else self._token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._optional_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._optional_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        """Without a pad token, pad with EOS: padded positions are masked out anyway."""
        return self._optional_id(self.pad_token) if self.pad_token is not None else self.eos_token_id

    @property
    def vocab_size(self) -> int:
        """All ids the tokenizer can produce, added tokens included (what the embedding must cover)."""
        return len(self)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class InternLM2Tokenizer(Tokenizer):
    """The InternLM2 tokenizer on plain SentencePiece, id-for-id with the transformers 4.37 reference.

    Encoding: added and special tokens are cut out of the text first (leftmost, longest match), and every
    text segment between them is encoded by SentencePiece on its own, so each one gets the dummy-prefix "▁".
    Decoding: see `decode`.
    """

    FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        model_file = self.folder / "tokenizer.model"
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_file} is not a valid SentencePiece model: {e}") from e

        config = _special_tokens_config(self.folder)
        self.add_bos_token: bool = config.get("add_bos_token", True)
        self.add_eos_token: bool = config.get("add_eos_token", False)
        # The reference class's defaults apply when the config does not name a token.
        self.bos_token = _content(config.get("bos_token", "<s>"))
        self.eos_token = _content(config.get("eos_token", "</s>"))
        self.unk_token = _content(config.get("unk_token", "<unk>"))
        self.pad_token = _content(config.get("pad_token", "</s>"))
        additional = [_content(t) for t in config.get("additional_special_tokens", [])]
        special = [t for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token) if t] + additional

        # Added tokens: those in tokenizer_config.json and added_tokens.json, plus every special token
        # (which transformers adds too, keeping its SentencePiece id when the vocab has it).
        self.added: dict[str, int] = {
            entry["content"]: int(index) for index, entry in config.get("added_tokens_decoder", {}).items()
        }
        self.added.update(_read_json(self.folder / "added_tokens.json"))
        for token in special:
            self.added.setdefault(token, self.sp.piece_to_id(token))
        self.added_by_id = {index: token for token, index in self.added.items()}
        self.special_ids = {self.added[token] for token in special}
        # Tokens the reference decodes apart from SentencePiece text and joins with spaces: non-special
        # added tokens, and additional special ones outside the SentencePiece vocab (<img>, ...).
        sp_size = self.sp.get_piece_size()
        self.joined_ids = {
            index
            for token, index in self.added.items()
            if index not in self.special_ids or (token in additional and index >= sp_size)
        }
        longest_first = sorted(self.added, key=len, reverse=True)
        self.added_pattern = re.compile("|".join(map(re.escape, longest_first)))

    def __len__(self) -> int:
        return max(self.sp.get_piece_size(), max(self.added_by_id) + 1)

    def _token_to_id(self, token: str) -> int:
        """Unknown tokens map to <unk>, as SentencePiece does."""
        return self.added[token] if token in self.added else self.sp.piece_to_id(token)

    def _id_to_token(self, index: int) -> str:
        return self.added_by_id[index] if index in self.added_by_id else self.sp.id_to_piece(index)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids, start = [], 0
        for match in self.added_pattern.finditer(text):
            ids += self.sp.encode(text[start : match.start()])
            ids.append(self.added[match.group()])
            start = match.end()
        ids += self.sp.encode(text[start:])
        if add_special_tokens:
            ids = [self.bos_token_id] * self.add_bos_token + ids + [self.eos_token_id] * self.add_eos_token
        return ids

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False) -> str:
        """Decode like the reference: the ids are cut into runs at joined added tokens; each run is decoded
        and cleaned up on its own, and the runs and joined tokens are joined with single spaces."""
        parts, run = [], []
        for index in _id_list(ids):
            if skip_special_tokens and index in self.special_ids:
                continue
            if index in self.joined_ids:
                if run and (text := self._decode_run(run)):
                    parts.append(text)
                parts.append(self.added_by_id[index])
                run = []
            else:
                run.append(index)
        if run:
            parts.append(self._decode_run(run))
        return " ".join(parts)

    def _decode_run(self, run: list[int]) -> str:
        """SentencePiece text with special tokens spelled out. Like the reference, a special token that is not
        right after another one adds a space in front of the text chunk before it ("x<|im_end|>" decodes
        to " x<|im_end|>"). The clean-up always runs here, whatever the config says."""
        text, pieces, prev_special = "", [], False
        for index in run:
            if index in self.special_ids:
                text += ("" if prev_special else " ") + self.sp.decode(pieces) + self.added_by_id[index]
                pieces, prev_special = [], True
            else:
                pieces.append(index)
                prev_special = False
        return clean_up_tokenization(text + self.sp.decode(pieces))

    def save_pretrained(self, folder: str | Path) -> None:
        """Copy the tokenizer files, which `load_tokenizer` reads back unchanged."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.FILES:
            source, target = self.folder / name, folder / name
            if source.is_file() and source.resolve() != target.resolve():
                shutil.copyfile(source, target)


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the special tokens transformers would read from the side files.

    Built from a folder by `load_tokenizer`, or directly from an in-memory tokenizer (e.g. one converted
    from a GGUF vocabulary). The special tokens are registered as special in `tokenizer` (as transformers
    does), so they are never split and `skip_special_tokens` drops them.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool = False,
        additional_special_tokens: Iterable[str] = (),
        clean_up_tokenization_spaces: bool = False,
        config: dict[str, Any] | None = None,
    ):
        self.tokenizer = tokenizer
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        self.add_bos_token = add_bos_token
        self.additional_special_tokens = list(additional_special_tokens)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.config = config or {}  # the rest of tokenizer_config.json (chat template, ...), kept for saving
        specials = [t for t in (bos_token, eos_token, pad_token) if t] + self.additional_special_tokens
        tokenizer.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in specials])
        # A post-processor (e.g. Llama's template) may already add BOS; only add it where it does not.
        adds_bos_itself = tokenizer.encode("").ids[:1] == [self.bos_token_id]
        self.prepend_bos = add_bos_token and bos_token is not None and not adds_bos_itself

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFTokenizer:
        folder = Path(folder)
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{folder / 'tokenizer.json'} is not a valid tokenizer.json: {e}") from e
        config = _special_tokens_config(folder)
        return cls(
            tokenizer,
            eos_token=_content(config.get("eos_token")),
            bos_token=_content(config.get("bos_token")),
            pad_token=_content(config.get("pad_token")),
            add_bos_token=config.get("add_bos_token", False),
            additional_special_tokens=[_content(t) for t in config.get("additional_special_tokens", [])],
            clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
            config=_read_json(folder / "tokenizer_config.json"),
        )

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _token_to_id(self, token: str) -> int | None:
        """None for a token outside the vocabulary."""
        return self.tokenizer.token_to_id(token)

    def _id_to_token(self, index: int) -> str | None:
        return self.tokenizer.id_to_token(index)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return [self.bos_token_id] + ids if add_special_tokens and self.prepend_bos else ids

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False) -> str:
        text = self.tokenizer.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def save_pretrained(self, folder: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json holding the special tokens."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        config = {
            **self.config,
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token,
            "additional_special_tokens": self.additional_special_tokens,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


class StreamDecoder:
    """Turns generated ids, pushed one at a time, into text as soon as that text is final.

    Each push re-decodes all ids so far (with skip_special_tokens; exact, and cheap next to a model step
    at generation lengths) and hands out the new text, except a
    tail that later ids may still change: replacement characters of an unfinished UTF-8 sequence (byte
    fallback), and the few last characters the clean-up may still rewrite (see `_final_length`). The
    concatenation of all pieces, flush included, equals decode(ids, skip_special_tokens=True).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out

    def push(self, token_id: int) -> str:
        self.ids += _id_list(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._send(text, _final_length(text))

    def flush(self) -> str:
        """The held-back tail, once no more ids will come."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._send(text, len(text))

    def _send(self, text: str, end: int) -> str:
        piece = text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece


# The clean-up can still rewrite the end of a text from a space or apostrophe followed only by characters
# of its patterns, as far back as CLEANUP_REACH characters: a 4-character pattern such as " n't" that
# " ' " -> "'" joined to up to 2 characters before it ("do n ' t" -> "do n't" -> "don't").
CLEANUP_REACH = 6
_CLEANUP_CHARS = re.escape("".join(sorted({c for old, _ in CLEANUP_RULES for c in old})))
_CLEANUP_TAIL = re.compile(f"[ '][{_CLEANUP_CHARS}]*\\Z")


def _final_length(text: str) -> int:
    """Length of the prefix of `text` that more ids can no longer change."""
    end = len(text.rstrip("\ufffd"))
    start = max(end - CLEANUP_REACH, 0)
    tail = _CLEANUP_TAIL.search(text, start, end)
    return tail.start() if tail else end


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer in a model folder, or HoVLE-Tiny's ("hovle-tiny", rebuilt from the SmolLM2 GGUF).

    A SentencePiece `tokenizer.model` means InternLM2, unless the folder also has a `tokenizer.json`
    and its config names another tokenizer class (Llama folders often ship both files).
    """
    from hovle.tiny.ship import load_shipped_tokenizer, shipped_folder

    if shipped_folder(path) is not None:
        return load_shipped_tokenizer(path)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no tokenizer folder at {folder} (looked for tokenizer.model or tokenizer.json)")
    has_sp, has_json = (folder / "tokenizer.model").is_file(), (folder / "tokenizer.json").is_file()
    tokenizer_class = _read_json(folder / "tokenizer_config.json").get("tokenizer_class") or ""
    if has_sp and (not has_json or "InternLM2" in tokenizer_class):
        return InternLM2Tokenizer(folder)
    if has_json:
        return HFTokenizer.from_folder(folder)
    raise FileNotFoundError(f"tokenizer folder {folder} has neither tokenizer.model nor tokenizer.json")
