"""The runners' callbacks: ``--train_eval_samples`` (score a fixed sample of the training set at every dev
evaluation) and the step timer of results.json."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from transformers import Trainer, TrainerCallback

from .sampling import EVAL_SAMPLE_SEED, sample_indices

# Timing entries Trainer adds to every evaluation's metrics: not scores.
TIMING_KEYS = ("runtime", "samples_per_second", "steps_per_second")

TRAIN_SAMPLE_PREFIX = "train_sample"


class TrainSampleEval(TrainerCallback):
    """After each dev evaluation, score a fixed sample of the *training* set the same way and add
    ``train_sample_*`` (loss and metrics) to that evaluation's log entry: with the dev scores beside
    them, under-fitting (both poor) and over-fitting (train far above dev) are told apart."""

    def __init__(self, trainer: Trainer, dataset, compute_metrics: Callable | None = None) -> None:
        self.trainer, self.dataset, self.compute_metrics = trainer, dataset, compute_metrics
        self._last_step: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._last_step == state.global_step:  # several dev sets (MNLI) evaluate at one step
            return
        self._last_step = state.global_step
        trainer, saved = self.trainer, self.trainer.compute_metrics
        if self.compute_metrics is not None:
            trainer.compute_metrics = self.compute_metrics
        try:  # predict(): no logging and no on_evaluate, so no recursion and no best-model effect
            out = trainer.predict(self.dataset, metric_key_prefix=TRAIN_SAMPLE_PREFIX)
        finally:
            trainer.compute_metrics = saved
        scores = {k: v for k, v in out.metrics.items()
                  if isinstance(v, int | float) and not k.endswith(TIMING_KEYS)}
        if state.log_history and any(k.startswith("eval_") for k in state.log_history[-1]):
            state.log_history[-1].update(scores)


def add_train_sample_eval(trainer: Trainer, train_dataset, run_args: Any,
                          compute_metrics: Callable | None = None) -> None:
    """``--train_eval_samples N``: the fixed sample (seed 1234) of the training set that every
    evaluation also scores (see :class:`TrainSampleEval`)."""
    n = getattr(run_args, "train_eval_samples", 0) if run_args is not None else 0
    if not n:
        return
    idx = sample_indices(len(train_dataset), EVAL_SAMPLE_SEED, k=n)
    sample = train_dataset if idx is None else train_dataset.select(idx)
    trainer.add_callback(TrainSampleEval(trainer, sample, compute_metrics))


class StepTimer(TrainerCallback):
    """Wall seconds of each optimizer step, from ``on_step_begin`` to ``on_step_end`` (forward, backward and
    the update; no evaluation, which Trainer runs after ``on_step_end``): results.json's step time."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None

    def record(self) -> dict[str, Any]:
        """``train_step_seconds``: the median step (the first steps warm caches up); None without steps."""
        return {"train_step_seconds": round(statistics.median(self.seconds), 4) if self.seconds else None,
                "timed_steps": len(self.seconds)}
