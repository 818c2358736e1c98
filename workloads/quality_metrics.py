"""Rank and linear correlation of predicted against true quality, safe on constant inputs:
the scores the quality workloads (PMT-IQA, SSTAM) report."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr


def srcc(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho; 0 when either side is constant (a constant prediction ranks nothing)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def plcc(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r; 0 when either side is constant."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(pearsonr(a, b).statistic)
