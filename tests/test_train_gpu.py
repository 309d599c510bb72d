"""Training on a CUDA device (run with `pytest -m gpu` where a GPU exists): bf16 autocast, teachers on device."""

import json

import numpy as np
import pytest
import torch

from hovle import HoVLE
from test_train import base, config, data, losses, tok  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_sft_on_cuda(tmp_path, base, data, precision):  # noqa: F811
    from hovle.train import train

    final = train(config(tmp_path, base, data, "sft", device="cuda", train__precision=precision))
    curve = losses(tmp_path / "run")
    assert np.mean(curve[-3:]) < 0.5 * np.mean(curve[:3]), curve
    HoVLE.from_pretrained(final, device="cuda")


def test_distill_on_cuda(tmp_path, base, data, monkeypatch):  # noqa: F811
    from pathlib import Path

    from hovle.train import train

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    sources = [{"path": str(data), "format": "images"}, {"path": str(data / "text.txt"), "format": "text"}]
    train(config(tmp_path, base, data, "distill", sources=sources, device="cuda", train__precision="bf16-mixed",
                 distill__teacher="test_train:TinyTeacher", distill__teacher_args={}, data__max_tiles=1))
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"], rows
