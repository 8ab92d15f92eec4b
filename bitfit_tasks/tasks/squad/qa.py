"""Question answering on the Trainer (as HF's ``utils_qa.py`` / ``trainer_qa.py``): n-best span search
over all of an example's windows, and a trainer whose evaluate() scores the official EM/F1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...training.trainer import BitFitTrainer
from ...utils.fileio import atomic_write_text
from ..metrics import squad_metrics


def offsets_array(offsets: list[list]) -> np.ndarray:
    """Per-window offset lists (``None`` outside the context) as one ``(windows, length, 2)`` int
    array with -1 outside the context: what the vectorised post-processing reads."""
    length = max((len(o) for o in offsets), default=0)
    out = np.full((len(offsets), length, 2), -1, dtype=np.int64)
    for w, off in enumerate(offsets):
        for k, o in enumerate(off):
            if o is not None:
                out[w, k] = o
    return out


def postprocess(rows: list[dict], sample_map, offsets, start_logits: np.ndarray, end_logits: np.ndarray,
                n_best: int = 20, max_answer_length: int = 30) -> dict[str, str]:
    """Best context span per example over *all* its windows (n-best start x end search).

    Per window, the ``n_best`` start and end candidates are taken once and their grid scored at
    once (as HF's ``postprocess_qa_predictions``); ties go to the higher-ranked start, then end,
    then the earlier window. ``offsets`` is a list of per-window offset lists (``None`` outside the
    context) or the array from :func:`offsets_array`."""
    offs = offsets if isinstance(offsets, np.ndarray) else offsets_array(offsets)
    n = offs.shape[1]
    best_score = np.full(len(rows), -np.inf)
    best_span: list[tuple[int, int] | None] = [None] * len(rows)
    in_ctx = offs[:, :, 0] >= 0
    for f, ex in enumerate(np.asarray(sample_map)):
        sl, el = start_logits[f, :n], end_logits[f, :n]
        s_idx = np.argsort(sl)[::-1][:n_best]
        e_idx = np.argsort(el)[::-1][:n_best]
        length = e_idx[None, :] - s_idx[:, None] + 1
        ok = in_ctx[f, s_idx][:, None] & in_ctx[f, e_idx][None, :] & (length >= 1) & (length <= max_answer_length)
        if not ok.any():
            continue
        score = np.where(ok, sl[s_idx][:, None] + el[e_idx][None, :], -np.inf)
        i, j = np.unravel_index(np.argmax(score), score.shape)  # first maximum, row-major
        if score[i, j] > best_score[ex]:
            best_score[ex] = score[i, j]
            best_span[ex] = (int(offs[f, s_idx[i], 0]), int(offs[f, e_idx[j], 1]))
    return {row["id"]: (row["context"][span[0]:span[1]] if span else "") for row, span in zip(rows, best_span,
                                                                                               strict=True)}


class SquadEval:
    """Evaluate = predict start/end logits for every window (gathered over processes, no duplicates),
    then n-best post-processing over each example's windows and the official EM/F1."""

    def __init__(self, rows, windows, args: Any, output_dir: str):
        self.rows, self.args, self.output_dir = rows, args, output_dir
        self.sample_map = np.asarray(windows["example_index"])
        self.offsets = windows.with_format("numpy", columns=["offset_mapping"])[:]["offset_mapping"]
        self.features = windows.remove_columns(["example_index", "offset_mapping"])

    def score(self, trainer: BitFitTrainer) -> dict[str, float]:
        """EM/F1 of the model as it is now, and its ``predictions.json``; nothing logged."""
        out = trainer.predict(self.features, metric_key_prefix="eval")
        start, end = out.predictions[:2] if isinstance(out.predictions, tuple) else out.predictions
        preds = postprocess(self.rows, self.sample_map, self.offsets, start, end, self.args.n_best_size,
                            self.args.max_answer_length)
        metrics = {f"eval_{k}": v for k, v in squad_metrics(preds, {r["id"]: r["answers"]["text"]
                                                                    for r in self.rows}).items()}
        if trainer.is_world_process_zero():
            atomic_write_text(Path(self.output_dir) / "predictions.json", json.dumps(preds, indent=1))
        return metrics

    def __call__(self, trainer: BitFitTrainer) -> dict[str, float]:
        metrics = self.score(trainer)
        trainer.log(metrics)
        trainer.control = trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)
        return metrics


class SquadBitFitTrainer(BitFitTrainer):
    """BitFitTrainer whose evaluate() is SQuAD's (windows -> spans -> EM/F1), during and after training."""

    squad_eval: SquadEval | None = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self.squad_eval is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        return self.squad_eval(self)


