"""GLUE metrics, computed locally (hub metrics can't be downloaded offline), as in the paper's Table 5."""

from __future__ import annotations

import numpy as np
from scipy import stats


def accuracy(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean())


def f1_binary(preds, labels, positive: int = 1) -> float:
    """F1 of the positive class (MRPC: equivalent, QQP: duplicate), as sklearn's default."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    tp = int(((preds == positive) & (labels == positive)).sum())
    fp = int(((preds == positive) & (labels != positive)).sum())
    fn = int(((preds != positive) & (labels == positive)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(preds, labels) -> float:
    """Binary Matthews correlation (CoLA); 0 when a row or column of the confusion matrix is empty."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    tp = float(((preds == 1) & (labels == 1)).sum())
    tn = float(((preds == 0) & (labels == 0)).sum())
    fp = float(((preds == 1) & (labels == 0)).sum())
    fn = float(((preds == 0) & (labels == 1)).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def pearson(preds, labels) -> float:
    return float(stats.pearsonr(np.asarray(preds, float), np.asarray(labels, float))[0])


def spearman(preds, labels) -> float:
    return float(stats.spearmanr(np.asarray(preds, float), np.asarray(labels, float))[0])
