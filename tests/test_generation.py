"""Sampling functions against hand-computed cases."""

import math

import pytest
import torch

from hovle.generation import (GenerationConfig, apply_repetition_penalty, apply_top_k, apply_top_p, next_token)

NEG = float("-inf")


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert apply_repetition_penalty(logits, torch.tensor([[0]]), 1.0) is logits


def test_top_k_keeps_k_best():
    out = apply_top_k(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), 2)
    assert out.tolist() == [[NEG, 4.0, 3.0, NEG]]
    assert apply_top_k(torch.tensor([[1.0, 2.0]]), 0).tolist() == [[1.0, 2.0]]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = apply_top_p(logits, 0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert apply_top_p(logits, 0.8).isfinite().tolist() == [[True, True, False, False]]
    assert apply_top_p(logits, 0.81).isfinite().tolist() == [[True, True, True, False]]
    assert apply_top_p(logits, 0.1).isfinite().tolist() == [[True, False, False, False]]  # at least one


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    seen = torch.zeros(2, 1, dtype=torch.long)
    assert next_token(logits, seen, GenerationConfig()).tolist() == [1, 0]
    cfg = GenerationConfig(do_sample=True, temperature=2.0)
    draws = [next_token(logits, seen, cfg, torch.Generator().manual_seed(0)).tolist() for _ in range(2)]
    assert draws[0] == draws[1]
    # top_k=1 sampling is greedy
    assert next_token(logits, seen, GenerationConfig(do_sample=True, top_k=1)).tolist() == [1, 0]


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[math.log(0.7), math.log(0.3)]]).repeat(4000, 1)
    seen = torch.zeros(4000, 1, dtype=torch.long)
    draws = next_token(logits, seen, GenerationConfig(do_sample=True), torch.Generator().manual_seed(0))
    assert abs(draws.float().mean().item() - 0.3) < 0.03


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(top_p=0.0), dict(do_sample=True, temperature=0.0),
                                 dict(repetition_penalty=0.0), dict(top_k=-1), dict(num_beams=2)])
def test_bad_options_are_rejected(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


def test_eos_list_is_accepted():
    assert GenerationConfig.from_kwargs(eos_token_id=[2, 7]).eos_ids == (2, 7)
