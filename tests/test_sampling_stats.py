"""The goodness-of-fit helper the sampler tests use, against chi-square table values."""

import math

import pytest
import torch

from sampling_stats import FALSE_ALARM, chi_square_p, chi_square_sf


@pytest.mark.parametrize("df,chi2,p", [(1, 3.841, 0.05), (2, 5.991, 0.05), (5, 11.070, 0.05), (5, 20.515, 0.001),
                                       (10, 18.307, 0.05), (10, 29.588, 0.001), (25, 37.652, 0.05), (100, 124.342, 0.05)])
def test_the_survival_function_matches_the_table(df, chi2, p):
    assert chi_square_sf(chi2, df) == pytest.approx(p, rel=2e-3)


def test_the_two_degree_form_is_the_exponential():
    for x in (0.1, 1.0, 7.5, 40.0):
        assert chi_square_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-12)
    assert chi_square_sf(0.0, 5) == 1.0


def test_draws_from_the_weights_pass_and_draws_from_others_fail():
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.26, 0.0, 0.34, 0.40], [0.28, 0.31, 0.0, 0.41]])
    draws = torch.multinomial(weights, 4000, replacement=True, generator=g)
    counts = torch.stack([torch.bincount(d, minlength=4) for d in draws]).float()
    assert chi_square_p(counts, weights) > FALSE_ALARM
    flatter = weights ** 0.5  # what a sampler at temperature 2 would draw
    assert chi_square_p(counts, flatter / flatter.sum(1, keepdim=True)) < FALSE_ALARM
