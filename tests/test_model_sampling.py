"""Sampling: the original's order top-k -> temperature -> top-p, greedy default, seeded draws."""
import pytest
import torch

from omniflow.model.sampling import Sampling, sample, top_p_filter


def test_default_is_the_originals_greedy():
    s = Sampling()
    assert (s.temperature, s.top_k, s.top_p) == (0.9, 1, 1.0) and s.greedy
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample(logits, s).tolist() == [1, 0]


def test_top_k_only_draws_among_the_k_best():
    logits = torch.tensor([4.0, 3.9, -2.0, -3.0, 3.8])
    s = Sampling(temperature=5.0, top_k=2, seed=0)
    gen = s.generator()
    draws = {int(sample(logits, s, gen)) for _ in range(200)}
    assert draws == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = top_p_filter(probs.log(), 0.75).isfinite()
    assert kept.tolist() == [True, True, False, False]  # 0.5 + 0.3 >= 0.75
    assert top_p_filter(probs.log(), 0.0).isfinite().tolist() == [True, False, False, False]


def test_seeded_generators_repeat_and_differ_by_seed():
    logits = torch.randn(3, 1000)
    draw = lambda seed: [sample(logits, Sampling(1.0, None, 1.0, seed), g).tolist()  # noqa: E731
                         for g in [Sampling(1.0, None, 1.0, seed).generator()] for _ in range(5)]
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=0), dict(top_p=1.5)])
def test_bad_settings_are_rejected(kw):
    with pytest.raises(ValueError):
        Sampling(**kw)
