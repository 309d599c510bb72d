"""Dataset kinds and the prompts InternVL-family models are evaluated with (VLMEvalKit's InternVLChat).

* yes/no: MME ``question + " Answer the question using a single word or phrase."`` (MME questions already
  end in "Please answer yes or no."; InternVL joins with a space here); POPE and other yes/no sets are
  asked the bare question, as InternVL's VLMEvalKit wrapper does.
* multiple choice (``internvl`` style, the default): ``[hint + "\\n"] + question + "\\nA. ..." ...`` then
  ``"\\nAnswer with the option's letter from the given choices directly."`` ("\\n请直接回答选项字母。" when
  the prompt contains Chinese). The ``vlmevalkit`` style is VLMEvalKit's generic MCQ prompt:
  ``"Hint: ...\\nQuestion: ...\\nOptions:\\nA. ...\\n" + "Please select the correct answer from the options above. \\n"``.
* VQA: ``question + "\\nAnswer the question using a single word or phrase."``.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from hovle.evaluate.data import Row

SHORT_ANSWER = "Answer the question using a single word or phrase."
MCQ_SUFFIX_EN = "Answer with the option's letter from the given choices directly."
MCQ_SUFFIX_CN = "请直接回答选项字母。"
OPTION_LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class DatasetSpec:
    """How one dataset type is asked and scored."""

    name: str  # --dataset-type value
    kind: str  # "yesno" | "mcq" | "vqa"
    metric: str  # "mme" | "pope" | "yesno" | "mcq" | "circular" | "vqa" | "anls"
    max_tiles: int  # InternVL's dynamic-tiling limit for this dataset (VLMEvalKit max_num)
    max_new_tokens: int
    description: str


SPECS: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("mme", "yesno", "mme", 6, 32, "MME: acc and acc+ per category, perception/cognition scores"),
    DatasetSpec("pope", "yesno", "pope", 6, 32, "POPE: accuracy, precision, recall, F1, yes-ratio per split"),
    DatasetSpec("yesno", "yesno", "yesno", 6, 32, "any yes/no set (bare question): accuracy per category"),
    DatasetSpec("mmbench", "mcq", "circular", 6, 64, "MMBench/CCBench: CircularEval accuracy (index % 1e6)"),
    DatasetSpec("mcq", "mcq", "mcq", 6, 64, "SEED-Bench, ScienceQA, AI2D, other multiple choice: accuracy"),
    DatasetSpec("textvqa", "vqa", "vqa", 6, 64, "TextVQA-style VQA accuracy (official 10-choose-9 form)"),
    DatasetSpec("vqa", "vqa", "vqa", 6, 64, "other short-answer VQA: VQA accuracy"),
    DatasetSpec("docvqa", "vqa", "anls", 18, 64, "DocVQA: ANLS (threshold 0.5)"),
    DatasetSpec("infovqa", "vqa", "anls", 24, 64, "InfographicVQA: ANLS (threshold 0.5)"),
]}

# VLMEvalKit file stems -> type; first match (case-insensitive substring) wins.
_NAME_RULES = [
    ("mmbench", "mmbench"), ("ccbench", "mmbench"), ("mme", "mme"), ("pope", "pope"),
    ("seedbench", "mcq"), ("seed", "mcq"), ("scienceqa", "mcq"), ("ai2d", "mcq"),
    ("textvqa", "textvqa"), ("docvqa", "docvqa"), ("infovqa", "infovqa"), ("vqa", "vqa"),
]


def detect_type(dataset_name: str) -> str | None:
    """The dataset type a VLMEvalKit file name implies (MMBench_DEV_EN -> mmbench), or None."""
    low = dataset_name.lower()
    for key, kind in _NAME_RULES:
        if key in low:
            return kind
    return None


def has_chinese(text: str) -> bool:
    return re.search(r"[\u4e00-\u9fff]", text) is not None


def options(row: Row) -> dict[str, str]:
    """The row's answer options in letter order: A, B, ... as long as the columns are present and non-empty."""
    out = {}
    for letter in OPTION_LETTERS:
        value = row.get(letter)
        if value is None:
            continue
        out[letter] = value
    return out


def build_prompt(row: Row, spec: DatasetSpec, style: str = "internvl") -> str:
    question = row.get("question", "")
    if spec.kind == "yesno":
        return question + " " + SHORT_ANSWER if spec.name == "mme" else question
    if spec.kind == "vqa":
        return question + "\n" + SHORT_ANSWER
    opts = options(row)
    hint = row.get("hint")
    if style == "vlmevalkit":
        prompt = f"Hint: {hint}\n" if hint is not None else ""
        prompt += f"Question: {question}\n"
        if opts:
            prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in opts.items())
            prompt += "Please select the correct answer from the options above. \n"
        return prompt
    if style != "internvl":
        raise ValueError(f"unknown prompt style {style!r}; known: internvl, vlmevalkit")
    prompt = (hint + "\n" if hint is not None else "") + question
    prompt += "".join(f"\n{k}. {v}" for k, v in opts.items())
    cn = has_chinese(prompt)
    if opts:
        return prompt + "\n" + (MCQ_SUFFIX_CN if cn else MCQ_SUFFIX_EN)
    return prompt + ("\n请直接回答问题。" if cn else "\nAnswer the question directly.")
