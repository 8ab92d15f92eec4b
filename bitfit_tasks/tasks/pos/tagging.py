"""Token classification on words: first-sub-token labels, cached sub-token features, word-level
predictions, word accuracy with per-tag precision/recall (scikit-learn), the token loss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...utils.errors import UsageError
from ..cache import cache_file, content_digest, tokenizer_digest
from ..metrics import is_bio_tag_set
from .data import Sentence

IGNORE = -100  # the label of sub-tokens that are not a word's first (and of special tokens)


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """First sub-token of each word gets the word's label; other sub-tokens and specials -100."""
    out, prev = [], None
    for wid in word_ids:
        out.append(word_labels[wid] if wid is not None and wid != prev else IGNORE)
        prev = wid if wid is not None else prev
    return out


def word_accuracy_metrics(pred_ids: np.ndarray, label_ids: np.ndarray, id2tag: dict[int, str],
                          extra_wrong: int = 0, top_confusions: int = 5) -> dict[str, Any]:
    """Word-level accuracy (the POS headline) from first-sub-token positions, plus per-tag
    precision/recall and the most frequent confusions. ``extra_wrong`` words (truncated or with an
    unseen tag) count in the denominator as errors."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    mask = label_ids != IGNORE
    gold, pred = label_ids[mask], pred_ids[mask]
    correct = int((gold == pred).sum())
    total = int(mask.sum()) + extra_wrong
    out: dict[str, Any] = {"accuracy": correct / total if total else 0.0, "n_words": total}
    present = sorted(set(gold.tolist()) | set(pred.tolist()))  # tags seen in gold or predictions
    if not present:
        return {**out, "per_tag": {}, "confusions": []}
    precision, recall, _, support = precision_recall_fscore_support(gold, pred, labels=present, zero_division=0)
    out["per_tag"] = {id2tag[i]: {"precision": float(p), "recall": float(r), "support": int(n)}
                      for i, p, r, n in zip(present, precision, recall, support, strict=True)}
    conf = confusion_matrix(gold, pred, labels=present)
    np.fill_diagonal(conf, 0)
    g_idx, p_idx = np.nonzero(conf)
    order = sorted(zip(g_idx, p_idx, strict=True), key=lambda gp: -conf[gp])[:top_confusions]
    out["confusions"] = [f"{id2tag[present[g]]}->{id2tag[present[p]]}: {conf[g, p]}" for g, p in order]
    return out


def token_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy summed over labelled sub-tokens / the labelled count of the *global* batch.

    Trainer counts labels across processes and accumulation steps (``num_items_in_batch``), so N
    processes with batch B give exactly the gradient of one process with batch N*B; the models'
    own per-process mean would weight sentences by their process's token count instead.
    """
    import torch.nn.functional as F

    logits = outputs["logits"]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE).sum()
    return loss / n


POS_CACHE_VERSION = 1


def encode_sentences(sentences: list[Sentence], tokenizer, tag2id: dict[str, int], max_len: int):
    """Sub-token features of ``sentences`` (first sub-token of each word labelled, the rest -100) as a
    memory-mapped ``datasets.Dataset`` built by ``map(batched=True)`` into a content-keyed Arrow
    file, plus per sentence the words lost to truncation (``n_lost``) and the ``word_ids`` (-1 for
    special tokens) that the prediction files read."""
    import datasets

    key = [POS_CACHE_VERSION, content_digest(sentences, ("tokens", "tags")), tokenizer_digest(tokenizer),
           sorted(tag2id.items()), max_len]
    path = cache_file("pos", "features", key)
    if Path(path).exists():
        return datasets.Dataset.from_file(path)

    def encode(batch):
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_len)
        labels, lost, wids = [], [], []
        for i, (words, tags) in enumerate(zip(batch["tokens"], batch["tags"], strict=True)):
            ids = enc.word_ids(i)
            labels.append(align_labels(ids, [tag2id.get(t, IGNORE) for t in tags]))
            lost.append(len(words) - len({w for w in ids if w is not None}))
            wids.append([-1 if w is None else w for w in ids])
        return {**enc, "labels": labels, "n_lost": lost, "word_ids": wids}

    source = datasets.Dataset.from_dict({"tokens": [s["tokens"] for s in sentences],
                                         "tags": [s["tags"] for s in sentences]})
    return source.map(encode, batched=True, batch_size=1000, remove_columns=source.column_names,
                      cache_file_name=path, desc="POS features")


def word_level_predictions(sentences: list[Sentence], word_ids: list[list[int | None]], pred_ids: np.ndarray,
                           id2tag: dict[int, str]) -> list[list[str | None]]:
    """Per sentence, each word's predicted tag: its first sub-token's, ``None`` for words cut off by
    --max_seq_length."""
    out = []
    for i, s in enumerate(sentences):
        pred: list[str | None] = [None] * len(s["tokens"])
        prev = None
        for pos, wid in enumerate(word_ids[i]):
            if wid is not None and wid != prev and pos < pred_ids.shape[1]:
                pred[wid] = id2tag[int(pred_ids[i, pos])]
            prev = wid if wid is not None else prev
        out.append(pred)
    return out


def resolve_tag_scheme(requested: str, tags: list[str]) -> str:
    """--tag_scheme auto -> 'bio' for span tag sets (O, B-X, I-X...), else 'pos'; 'bio' on tags that
    are not BIO is refused (seqeval would silently score nonsense)."""
    if requested == "bio" and not is_bio_tag_set(tags):
        odd = [t for t in tags if not is_bio_tag_set([t, "B-X"])][:5]
        raise UsageError(f"--tag_scheme bio: the training tags are not BIO (e.g. {odd}); BIO tags are O or "
                         "B-/I-/E-/S-TYPE. Pick the chunk/NER column with --tag_column/--tag_field, or use "
                         "--tag_scheme pos (word accuracy).")
    if requested == "auto":
        return "bio" if is_bio_tag_set(tags) else "pos"
    return requested


def word_predictions(sentences: list[Sentence], word_ids: list[list[int | None]], pred_ids: np.ndarray,
                     id2tag: dict[int, str]):
    """One JSON line per sentence: ``{"tokens", "gold", "predicted"}`` (``null`` for a truncated word)."""
    for s, pred in zip(sentences, word_level_predictions(sentences, word_ids, pred_ids, id2tag), strict=True):
        yield json.dumps({"tokens": s["tokens"], "gold": s["tags"], "predicted": pred})
