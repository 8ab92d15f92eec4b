"""Metrics from the field's libraries: scikit-learn (accuracy, F1, Matthews), scipy (Pearson,
Spearman) and seqeval (entity-level precision/recall/F1 of BIO tag sequences).

The hub metrics (``evaluate.load("glue")``, ``evaluate.load("seqeval")``) are downloaded scripts
and fail offline; these call the same library functions those scripts wrap.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def accuracy(preds, labels) -> float:
    return float(skm.accuracy_score(np.asarray(labels), np.asarray(preds)))


def f1_binary(preds, labels, positive: int = 1) -> float:
    """F1 of the positive class (MRPC: equivalent, QQP: duplicate), as GLUE scores it."""
    return float(skm.f1_score(np.asarray(labels), np.asarray(preds), pos_label=positive, average="binary",
                              zero_division=0.0))


def matthews_corrcoef(preds, labels) -> float:
    """Matthews correlation (CoLA); 0 when a row or column of the confusion matrix is empty."""
    return float(skm.matthews_corrcoef(np.asarray(labels), np.asarray(preds)))


def pearson(preds, labels) -> float:
    return float(stats.pearsonr(np.asarray(preds, float), np.asarray(labels, float))[0])


def spearman(preds, labels) -> float:
    return float(stats.spearmanr(np.asarray(preds, float), np.asarray(labels, float))[0])


# A BIO-style tag: O, or a B-/I-/E-/S-/L-/U- prefix and an entity type (B-NP, I-PER, ...).
_BIO_TAG = re.compile(r"^(O|[BIESLU]-.+)$")


def is_bio_tag_set(tags: Sequence[str]) -> bool:
    """Whether every tag is ``O`` or prefix-and-type (CoNLL-2000 chunks, CoNLL-2003 NER), so the
    tags mark spans and are scored by span F1; POS tags (NN, VBD, ...) are not."""
    return bool(tags) and all(_BIO_TAG.match(t) for t in tags) and any(t != "O" for t in tags)


def seqeval_metrics(gold: list[list[str]], predicted: list[list[str | None]]) -> dict[str, Any]:
    """seqeval's span-level scores (the CoNLL ``conlleval`` definition, default lenient mode):
    overall ``precision``/``recall``/``f1`` (micro over spans) and per entity type
    ``{"precision", "recall", "f1", "support"}``. A word without a prediction (``None``: cut off by
    the length limit) counts as ``O``."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    pred = [[p if p is not None else "O" for p in sent] for sent in predicted]
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    per_type = {k: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                    "f1": float(v["f1-score"]), "support": int(v["support"])}
                for k, v in report.items() if not k.endswith(" avg")}
    return {"precision": float(precision_score(gold, pred, zero_division=0)),
            "recall": float(recall_score(gold, pred, zero_division=0)),
            "f1": float(f1_score(gold, pred, zero_division=0)),
            "per_type": per_type}
