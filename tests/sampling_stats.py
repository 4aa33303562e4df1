"""Goodness of fit for categorical draws: the chi-square statistic, in standard deviations."""

import math

import torch


def chi_square_z(counts: torch.Tensor, weights: torch.Tensor) -> float:
    """counts (rows, cols): draws per row and column; weights (rows, cols): each row's expected
    probabilities. Returns Pearson's chi-square over the cells with weight > 0, as standard
    deviations above its mean (df = cells - rows, variance 2 df). A cell drawn at weight 0 is an
    error in itself."""
    counts, weights = counts.double(), weights.double()
    expected = weights * counts.sum(1, keepdim=True)
    cells = expected > 0
    assert counts[~cells].sum() == 0, "drew a column whose weight is zero"
    chi2 = ((counts - expected)[cells] ** 2 / expected[cells]).sum().item()
    df = int(cells.sum()) - counts.shape[0]
    return (chi2 - df) / math.sqrt(2 * df)
