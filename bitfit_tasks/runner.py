"""What every runner does after building its data and model: train, track the dev scores, save."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from .config import BitFitConfig
from .selection import bias_parameter_ids, head_parameter_names
from .trainer import BitFitTrainer

logger = logging.getLogger("bitfit_tasks")


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("bitfit_tasks").setLevel(logging.INFO)


def start_run(training_args: TrainingArguments, bitfit: BitFitConfig, bias_lr: float) -> int:
    """Common prologue of every runner: logging, the mode's default learning rate, seeds.
    Returns the data seed (``--data_seed``, else ``--seed``) for subset sampling."""
    from transformers import set_seed

    from .arguments import resolve_lr

    setup_logging()
    resolve_lr(training_args, bitfit, bias_lr)
    set_seed(training_args.seed)
    return training_args.data_seed if training_args.data_seed is not None else training_args.seed


class EvalHistory(TrainerCallback):
    """Keeps every evaluation so the best dev score over epochs can be reported (paper, A.2)."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics:
            return
        # Several eval sets (MNLI matched/mismatched) report one by one at the same step.
        if self.history and self.history[-1]["step"] == state.global_step:
            self.history[-1].update(metrics)
        else:
            self.history.append({"epoch": state.epoch, "step": state.global_step, **metrics})


def device_name(training_args: TrainingArguments) -> str:
    dev = training_args.device
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return f"{dev.type}:{torch.get_num_threads()} threads"


def save_biases_and_head(model, path: Path) -> None:
    """Every bias parameter and the head (small, any mode): what the bias-change analysis reads."""
    from safetensors.torch import save_file

    head = set(head_parameter_names(model))
    bias_ids = bias_parameter_ids(model)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
               if id(p) in bias_ids or n in head}
    save_file(tensors, str(path))


def train_and_record(
    trainer: BitFitTrainer,
    history: EvalHistory,
    *,
    metric_key: str,
    info: dict[str, Any],
    bitfit: BitFitConfig,
    save_full_model: bool = False,
    after_training: Callable[[BitFitTrainer], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train, take the best and last dev score of ``metric_key``, save, write results.json.

    ``after_training(trainer)`` may add entries (e.g. a test-set score) before anything is written."""
    args = trainer.args
    start = time.time()
    train_result = trainer.train()
    if args.eval_strategy == "no" or not history.history:
        trainer.evaluate()
    final = history.history[-1]
    scores = [h[metric_key] for h in history.history if metric_key in h and not math.isnan(h[metric_key])]
    results = {
        **info,
        "mode": bitfit.mode,
        "bias_terms": bitfit.bias_terms,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "epochs": args.num_train_epochs,
        "trainable_params": trainer.bitfit_state.n_trainable,
        "all_params": trainer.bitfit_state.n_total,
        "best": max(scores) if scores else float("nan"),
        "final": scores[-1] if scores else float("nan"),
        "final_metrics": {k: v for k, v in final.items() if isinstance(v, float)},
        "history": history.history,
        "train_loss": train_result.training_loss,
        "train_seconds": round(time.time() - start, 1),
        "device": device_name(args),
        "bitfit_config": asdict(bitfit),
    }
    if after_training is not None:
        results.update(after_training(trainer))
    if bitfit.mode != "full" or save_full_model:
        trainer.save_model(args.output_dir)  # every rank calls it; only the main one writes
    if trainer.is_world_process_zero():
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_biases_and_head(trainer.model, out / "biases_and_head.safetensors")
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        logger.info("%s (%s): best %s %.4f, final %.4f -> %s", info.get("task"), bitfit.mode, metric_key,
                    results["best"], results["final"], out / "results.json")
    return results
