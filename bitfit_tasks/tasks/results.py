"""What a run's results.json records, read from Trainer's log history: every evaluation, the training
loss over the whole run (resumed steps included), the headline line."""

from __future__ import annotations

import math
from typing import Any

from transformers import Trainer

from ..core.config import BIAS_TERM_MODES, PEFT_MODES, BitFitConfig
from .callbacks import TIMING_KEYS, TRAIN_SAMPLE_PREFIX


def eval_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every evaluation of the run, from Trainer's ``state.log_history`` (restored on resume, so a
    resumed run reports the epochs before the checkpoint too). Several eval sets evaluated at the
    same step (MNLI matched/mismatched) are merged into one entry; the training-sample scores of
    ``--train_eval_samples`` ride along (``train_sample_*``)."""
    out: list[dict[str, Any]] = []
    for entry in log_history:
        evals = {k: v for k, v in entry.items() if k.startswith(("eval_", TRAIN_SAMPLE_PREFIX + "_"))}
        if not evals:
            continue
        if out and out[-1]["step"] == entry.get("step"):
            out[-1].update(evals)
        else:
            out.append({"epoch": entry.get("epoch"), "step": entry.get("step"), **evals})
    return out


def train_loss_record(log_history: list[dict[str, Any]], run_loss_sum: float, global_step: int,
                      resumed_step: int) -> dict[str, Any]:
    """Mean training loss over the *whole* run, and the loss of every logged interval.

    ``run_loss_sum``: the summed loss of the last ``train()`` call's steps (see :func:`loss_sum_of_call`).
    After a resume the steps before the checkpoint come from the logged intervals (each log holds
    the mean since the previous one). Steps between the checkpoint's last log and the checkpoint
    itself were never logged and are left out; ``train_loss_steps`` says how many steps the mean
    covers."""
    logged = [{"epoch": e.get("epoch"), "step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate")}
              for e in log_history if "loss" in e and "step" in e]
    total, covered = run_loss_sum, global_step - resumed_step
    prev = 0
    for e in logged:
        if e["step"] > resumed_step:
            break
        total += e["loss"] * (e["step"] - prev)
        covered += e["step"] - prev
        prev = e["step"]
    return {"train_loss": total / covered if covered else float("nan"), "train_loss_steps": covered,
            "train_loss_history": logged}


def loss_sum_of_call(trainer: Trainer, training_loss: float, global_step: int, resumed_step: int) -> float:
    """The summed loss of the steps the last ``train()`` call ran. Trainer keeps it as
    ``_total_loss_scalar``; its public ``training_loss`` divides it by those steps from transformers
    5.24 on, but by *all* steps (the resumed ones included) before, so it is read directly where it
    exists."""
    total = getattr(trainer, "_total_loss_scalar", None)
    if isinstance(total, float | int):
        return float(total)
    return training_loss * (global_step - resumed_step)


def numbers(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if isinstance(v, float | int)}


def headline_metrics(metrics: dict[str, Any]) -> str:
    """``exact_match 61.2000, f1 72.5000, n_examples 2000``: the scores and counts, no timings."""
    return ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" if isinstance(v, float) else f"{k.removeprefix('eval_')} {v}"
                     for k, v in metrics.items()
                     if k not in ("epoch", "step", "eval_loss") and not k.endswith(TIMING_KEYS))


def peft_record(bitfit: BitFitConfig) -> dict[str, Any]:
    """A LoRA / BEFT run's method options (targets in the paper's notation; LoRA's rank, scale, dropout)."""
    if bitfit.mode not in PEFT_MODES:
        return {}
    options: dict[str, Any] = {"peft_targets": bitfit.targets}
    if bitfit.mode == "lora":
        options.update(lora_r=bitfit.lora_r, lora_alpha=bitfit.lora_alpha, lora_dropout=bitfit.lora_dropout)
    return {"method_options": options}


def run_record(trainer: Trainer, bitfit: BitFitConfig, history: list[dict[str, Any]], metric_key: str,
               saved: dict[str, Any], kept: str) -> dict[str, Any]:
    """What was really trained (steps, epochs, batch, recipe), the best and last dev score of
    ``metric_key``, and which evaluation's model was saved (``kept``: best or last)."""
    args, state = trainer.args, trainer.state
    scored = [h for h in history if metric_key in h and not math.isnan(h[metric_key])]
    best = max(scored, key=lambda h: h[metric_key]) if scored else None
    return {
        "mode": bitfit.mode,
        "bias_terms": bitfit.bias_terms if bitfit.mode in BIAS_TERM_MODES else None,
        **peft_record(bitfit),
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "seed": args.seed,
        "epochs": round(state.epoch, 4) if state.epoch is not None else None,  # trained, not configured
        "optimizer_steps": state.global_step,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps if args.max_steps > 0 else None,
        # train_batch_size = per-device batch x GPUs of this process (Trainer's own product).
        "global_batch_size": args.train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1),
        "resumed_from": args.resume_from_checkpoint,
        **getattr(args, "_bitfit_recipe", {}),
        "trainable_params": trainer.bitfit_state.n_trainable,
        "all_params": trainer.bitfit_state.n_total,
        "best": best[metric_key] if best else float("nan"),
        "best_epoch": best["epoch"] if best else None,
        "final": scored[-1][metric_key] if scored else float("nan"),
        "best_metrics": numbers(best) if best else None,
        "final_metrics": numbers(history[-1]),
        # Which evaluation's model was saved (and wrote the prediction files and any test score).
        "saved": kept,
        "saved_epoch": saved.get("epoch"),
        "saved_step": saved.get("step"),
        "saved_metrics": numbers(saved),
        "history": history,
    }


def headline(results: dict[str, Any], metric_key: str, path: Any) -> str:
    """The one line a run prints at its end."""
    return (f"{results.get('task')} ({results['mode']}): best {metric_key.removeprefix('eval_')} "
            f"{results['best']:.4f} (epoch {results['best_epoch']}), final {results['final']:.4f} | saved: "
            f"{results['saved']} (epoch {results['saved_epoch']}): {headline_metrics(results['saved_metrics'])} | "
            f"{results['optimizer_steps']} steps, {results['epochs']} epochs -> {path}")
