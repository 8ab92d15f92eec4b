"""Keep the best epoch's trainable tensors in memory, so the model a run saves is the one its headline
scores.

The runners report the best dev score over evaluations (the paper's protocol). BitFit's trainable
state is tiny (biases + head: 27k values for all-MiniLM-L6-v2, ~100k for bert-base), so instead of
Trainer's ``load_best_model_at_end`` (a checkpoint per evaluation, reloaded at the end) the
:class:`BestEpochKeeper` copies the trainable tensors to host memory whenever the selection metric
improves and writes them back at the end. Full fine-tuning uses the same copy (every parameter:
~90 MB for all-MiniLM-L6-v2, ~440 MB for bert-base, on the host); ``--keep last`` turns it off.

The copy survives a kill + resume: every checkpoint holds it as ``bitfit_best.safetensors`` (with its
metric, direction, score, step and epoch in the metadata), written *before* Trainer's own files, so a
checkpoint that Trainer completed (``trainer_state.json``) always holds it, and a resumed run starts
from it.

One rule decides which evaluation is best: the task's metric, higher is better -- or, when the user
sets ``--load_best_model_at_end``, Trainer's ``--metric_for_best_model`` and ``--greater_is_better``
(:func:`keeper_rule`), so the keeper puts back the very evaluation Trainer loaded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..utils.errors import UsageError
from ..utils.fileio import as_created

BEST_FILE = "bitfit_best.safetensors"
KEEP_CHOICES = ("best", "last")


def keeper_rule(args, task_metric: str) -> tuple[str, bool]:
    """``(metric key, greater is better)`` that picks the best evaluation: Trainer's own rule when the
    user set ``load_best_model_at_end`` (its ``metric_for_best_model``, ``eval_``-prefixed as Trainer
    does, and ``greater_is_better``), else ``task_metric``, higher is better."""
    if not getattr(args, "load_best_model_at_end", False):
        return task_metric, True
    metric = args.metric_for_best_model or "loss"
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    greater = args.greater_is_better
    return key, (not key.endswith("loss")) if greater is None else bool(greater)


def _direction(greater_is_better: bool) -> str:
    return "higher is better" if greater_is_better else "lower is better"


class BestEpochKeeper(TrainerCallback):
    """After each evaluation that improves ``metric_key`` (higher is better, or lower with
    ``greater_is_better=False``; the first of equal scores is kept, like Trainer and the runners'
    ``best``), copy every trainable tensor of ``trainer.model`` to the host. :meth:`restore` writes the
    copy back into the model."""

    def __init__(self, trainer, metric_key: str, greater_is_better: bool = True) -> None:
        self.trainer, self.metric_key, self.greater_is_better = trainer, metric_key, greater_is_better
        self.score: float | None = None
        self.step: int | None = None
        self.epoch: float | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self._copy_at_train_begin = False

    def _names(self) -> list[str]:
        return [n for n, p in self.trainer.model.named_parameters() if p.requires_grad]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric_key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return  # another eval set of the same step (MNLI mismatched), or no score
        if not self._better(value, self.score):
            return
        self._copy()
        self.score, self.step, self.epoch = float(value), state.global_step, state.epoch

    def _copy(self) -> None:
        params = dict(self.trainer.model.named_parameters())
        # To the host: a full-FT copy on the accelerator would double the model's memory there.
        self.tensors = {n: params[n].detach().to("cpu", copy=True) for n in self._names()}

    def on_train_begin(self, args, state, control, **kwargs):
        if self._copy_at_train_begin:  # the resumed checkpoint's own model is the best
            self._copy()
            self._copy_at_train_begin = False

    def before_checkpoint(self, args, folder: Path) -> None:
        """Write the copy into checkpoint ``folder`` before Trainer writes anything there (BitFitTrainer
        calls this): Trainer writes ``trainer_state.json`` -- what makes a checkpoint complete -- and
        deletes older checkpoints (``--save_total_limit``) before the ``on_save`` callbacks, so a copy
        written there could be missing from the only checkpoint left after a kill."""
        if self.score is None or not args.should_save:
            return
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (BEST_FILE + ".tmp")
        meta = {"metric": self.metric_key, "greater_is_better": str(self.greater_is_better),
                "score": repr(self.score), "step": str(self.step), "epoch": repr(self.epoch)}
        save_file({n: t.contiguous() for n, t in self.tensors.items()}, str(tmp), metadata=meta)
        as_created(tmp)  # safetensors makes its files 0600
        os.replace(tmp, folder / BEST_FILE)

    def _better(self, value: float, than: float | None) -> bool:
        return than is None or (value > than if self.greater_is_better else value < than)

    def load(self, checkpoint: str) -> None:
        """Start a resumed run from the best copy its checkpoint holds. A checkpoint without one (written
        by an older version, which wrote the copy after Trainer's files) whose own evaluation is its best
        starts from its own model, copied when Trainer has loaded it (:meth:`on_train_begin`); one whose
        best evaluation is earlier is refused: that epoch's tensors are not in it."""
        from safetensors import safe_open

        path = Path(checkpoint) / BEST_FILE
        if not path.is_file():
            state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
            scored = [e for e in state.get("log_history", [])
                      if isinstance(e.get(self.metric_key), int | float) and not math.isnan(e[self.metric_key])]
            best: dict | None = None
            for e in scored:
                if self._better(e[self.metric_key], best[self.metric_key] if best else None):
                    best = e
            if best is not None and best.get("step") == state.get("global_step"):
                self.score, self.step, self.epoch = float(best[self.metric_key]), int(best["step"]), best.get("epoch")
                self._copy_at_train_begin = True
                return
            if scored:
                raise UsageError(f"checkpoint {checkpoint} has scored evaluations but no {BEST_FILE} (the run was "
                                 "killed while saving it, or it was written by an older version); resume from an "
                                 "earlier checkpoint-N, or pass --keep last to keep the last epoch instead.")
            return
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            self.tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 -- safe_open has no __iter__
        kept_by = (meta.get("metric", self.metric_key), meta.get("greater_is_better", "True") == "True")
        if kept_by != (self.metric_key, self.greater_is_better):
            raise UsageError(f"{path} holds the best evaluation by {kept_by[0]} ({_direction(kept_by[1])}), but this "
                             f"run keeps the best by {self.metric_key} ({_direction(self.greater_is_better)}); resume "
                             "with the run's --metric_for_best_model / --greater_is_better / --load_best_model_at_end.")
        self.score, self.step = float(meta["score"]), int(meta["step"])
        self.epoch = float(meta["epoch"]) if meta.get("epoch") not in (None, "None") else None
        missing = sorted(set(self._names()) - set(self.tensors))
        if missing:
            raise UsageError(f"{path} lacks trainable tensor(s) {missing[:3]} of this model; it was written by a "
                             "run with other --mode/--bias_terms. Resume with that run's arguments.")

    def restore(self) -> bool:
        """Write the best copy back into the model; False when there is none (nothing was scored)."""
        if not self.tensors:
            return False
        params = dict(self.trainer.model.named_parameters())
        with torch.no_grad():
            for n, t in self.tensors.items():
                params[n].copy_(t.to(device=params[n].device, dtype=params[n].dtype))
        return True
