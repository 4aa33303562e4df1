"""Goodness of fit for categorical draws: Pearson's chi-square as a p-value (the chance that a correct
sampler lands at least this far off)."""

import math

import torch


# A correct sampler fails `chi_square_p(...) > FALSE_ALARM` once in a million draws of the test.
# A bound on z is not that: with few cells the statistic is skewed (at 5 degrees of freedom z > 5
# happens about once in 1,100).
FALSE_ALARM = 1e-6


def _chi_square(counts: torch.Tensor, weights: torch.Tensor) -> tuple[float, int]:
    counts, weights = counts.double(), weights.double()
    expected = weights * counts.sum(1, keepdim=True)
    cells = expected > 0
    assert counts[~cells].sum() == 0, "drew a column whose weight is zero"
    chi2 = ((counts - expected)[cells] ** 2 / expected[cells]).sum().item()
    return chi2, int(cells.sum()) - counts.shape[0]


def chi_square_sf(chi2: float, df: int) -> float:
    """P(X >= chi2) for X chi-square with integer df: the closed forms of the regularised upper
    incomplete gamma function Q(df / 2, chi2 / 2)."""
    h = chi2 / 2
    if h <= 0:
        return 1.0

    def term(a: float) -> float:  # exp(-h) h^a / Gamma(a + 1), in logs: no overflow for large df
        return math.exp(-h + a * math.log(h) - math.lgamma(a + 1))

    if df % 2 == 0:
        return sum(term(i) for i in range(df // 2))
    return math.erfc(math.sqrt(h)) + sum(term(i - 0.5) for i in range(1, (df - 1) // 2 + 1))


def chi_square_p(counts: torch.Tensor, weights: torch.Tensor) -> float:
    """counts (rows, cols): draws per row and column; weights (rows, cols): each row's expected
    probabilities. Returns the p-value of Pearson's chi-square over the cells with weight > 0
    (df = cells - rows): the chance that draws from `weights` land at least this far from them. A
    cell drawn at weight 0 is an error in itself."""
    return chi_square_sf(*_chi_square(counts, weights))
