"""Benchmark evaluation on VLMEvalKit TSV files: prompts, answer extraction, metrics, the `hovle eval` runner."""

from hovle.evaluate.data import TSVError, read_tsv
from hovle.evaluate.metrics import (anls, circular_scores, extract_choice, extract_yes_no, mcq_scores, mme_scores,
                                    normalize_vqa_answer, pope_scores, vqa_accuracy, vqa_scores)
from hovle.evaluate.prompts import SPECS, build_prompt
from hovle.evaluate.runner import add_eval_parser, evaluate_file

__all__ = [
    "TSVError", "read_tsv", "anls", "circular_scores", "extract_choice", "extract_yes_no", "mcq_scores",
    "mme_scores", "normalize_vqa_answer", "pope_scores", "vqa_accuracy", "vqa_scores", "SPECS", "build_prompt",
    "add_eval_parser", "evaluate_file",
]
