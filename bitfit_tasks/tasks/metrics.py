"""Metrics from the field's libraries: scikit-learn (accuracy, F1, Matthews), scipy (Pearson,
Spearman) and seqeval (entity-level precision/recall/F1 of BIO tag sequences); SQuAD v1.1's
official EM/F1 (the official evaluation script's normalisation, max over gold answers).

The hub metrics (``evaluate.load("glue")``, ``evaluate.load("seqeval")``) are downloaded scripts
and fail offline; these call the same library functions those scripts wrap.
"""

from __future__ import annotations

import collections
import re
import string
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


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, squeeze whitespace (official v1.1)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_metrics(predictions: dict[str, str], golds: dict[str, list[str]]) -> dict[str, float]:
    """EM and F1 (x100) as the official script: max over gold answers, mean over questions."""
    missing = [q for q in golds if q not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} question(s) have no prediction, e.g. {missing[:3]}; every "
                         "example must be scored.")
    em = [max(exact_match(predictions[q], g) for g in gs) for q, gs in golds.items()]
    f1 = [max(f1_score(predictions[q], g) for g in gs) for q, gs in golds.items()]
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1)), "n_examples": len(golds)}
