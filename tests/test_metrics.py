from __future__ import annotations

import math

import numpy as np
import pytest

from bitfit_tasks.tasks import metrics as M
from bitfit_tasks.tasks.glue.run import compute_glue_metrics


def test_accuracy_and_f1_by_hand():
    preds = [1, 1, 0, 0, 1, 0]
    labels = [1, 0, 0, 1, 1, 0]
    # tp=2 fp=1 fn=1 tn=2
    assert M.accuracy(preds, labels) == pytest.approx(4 / 6)
    assert M.f1_binary(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert M.f1_binary([0, 0], [1, 1]) == 0.0


def test_matthews_by_hand():
    preds = [1, 1, 0, 0, 1, 0]
    labels = [1, 0, 0, 1, 1, 0]
    tp, tn, fp, fn = 2, 2, 1, 1
    want = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.matthews_corrcoef(preds, labels) == pytest.approx(want) == pytest.approx(1 / 3)
    assert M.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction
    assert M.matthews_corrcoef([1, 0], [1, 0]) == pytest.approx(1.0)


def test_pearson_spearman_by_hand():
    x = [1.0, 2.0, 3.0, 4.0]
    y = [2.0, 4.0, 6.0, 8.5]
    # ranks identical -> spearman 1; pearson from the definition
    xm, ym = np.mean(x), np.mean(y)
    r = sum((a - xm) * (b - ym) for a, b in zip(x, y, strict=True)) / math.sqrt(
        sum((a - xm) ** 2 for a in x) * sum((b - ym) ** 2 for b in y))
    assert M.spearman(x, y) == pytest.approx(1.0)
    assert M.pearson(x, y) == pytest.approx(r)
    assert M.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("task,keys", [
    ("cola", {"accuracy", "matthews_correlation"}), ("sst2", {"accuracy"}), ("rte", {"accuracy"}),
    ("mrpc", {"accuracy", "f1"}), ("qqp", {"accuracy", "f1"}), ("qnli", {"accuracy"}),
    ("mnli", {"accuracy"}), ("wnli", {"accuracy"}),
])
def test_task_metrics_from_logits(task, keys):
    logits = np.array([[2.0, 1.0], [0.1, 0.9], [0.3, 0.2], [0.0, 5.0]])
    labels = np.array([0, 1, 1, 1])
    out = compute_glue_metrics(task, logits, labels)
    assert set(out) == keys
    assert out["accuracy"] == pytest.approx(0.75)
    if "f1" in out:
        assert out["f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))


def test_stsb_metrics_from_regression_output():
    out = compute_glue_metrics("stsb", np.array([[0.5], [2.0], [1.0], [4.0]]), np.array([1.0, 3.0, 2.0, 5.0]))
    assert out["spearmanr"] == pytest.approx(1.0)
    assert set(out) == {"spearmanr", "pearson"}
