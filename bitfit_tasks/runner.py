"""What every runner does after building its data and model: train, track the dev scores, save."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from .config import BIAS_TERM_MODES, BitFitConfig
from .fileio import atomic_write_text
from .selection import bias_parameter_ids, head_parameter_names
from .trainer import BitFitTrainer

logger = logging.getLogger("bitfit_tasks")
_TIMING_KEYS = ("runtime", "samples_per_second", "steps_per_second")


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("bitfit_tasks").setLevel(logging.INFO)


LOCK_NAME = ".bitfit-run.lock"
# Output folders this process holds a lock on (released at the end of train_and_record): a second
# process (another runner, a second sweep) into the same folder is refused instead of interleaving.
_claims: dict[str, Any] = {}


def claim_output_dir(training_args: TrainingArguments, overwrite: bool = False) -> None:
    """Lock ``--output_dir`` for this run and refuse a folder holding another run (a finished one,
    or checkpoints of an unfinished one) unless resuming or ``--overwrite_output_dir true``."""
    import fcntl
    import shutil

    from .errors import UsageError

    out = Path(training_args.output_dir)
    main = training_args.process_index == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        key = str(out.resolve())
        if key not in _claims:
            f = open(out / LOCK_NAME, "a+")  # noqa: SIM115 -- held open for the whole run
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise UsageError(f"another run ({holder}) is writing to --output_dir {out}; wait for it to "
                                 "finish or pick another --output_dir.") from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}")
            f.flush()
            _claims[key] = f
    if training_args.resume_from_checkpoint:
        return
    finished = (out / "results.json").exists()
    ckpts = sorted(out.glob("checkpoint-*")) if out.is_dir() else []
    if not (finished or ckpts):
        return
    if not overwrite:
        what = "a finished run (results.json)" if finished else f"checkpoints of an unfinished run ({ckpts[-1].name})"
        raise UsageError(f"--output_dir {out} holds {what}; resume it with --resume_from_checkpoint true, "
                         "replace it with --overwrite_output_dir true, or pick another --output_dir.")
    if main:
        for c in ckpts:
            shutil.rmtree(c)
        (out / "results.json").unlink(missing_ok=True)
        logger.warning("--overwrite_output_dir: removed the previous run's results.json and %d checkpoint(s) in %s",
                       len(ckpts), out)


def release_output_dir(output_dir: str) -> None:
    f = _claims.pop(str(Path(output_dir).resolve()), None)
    if f is not None:
        f.close()  # closing drops the flock


def start_run(training_args: TrainingArguments, bitfit: BitFitConfig, run_args: Any = None,
              runner: str = "glue") -> int:
    """Common prologue of every runner: logging, the checkpoint to resume from and the output folder
    (checked and locked before any data or model is loaded), the recipe's defaults for this mode
    (recipes.py; ``runner`` picks what ``--recipe auto`` means), seeds. Returns the data seed
    (``--data_seed``, else ``--seed``) for subset sampling."""
    from transformers import set_seed

    from .arguments import resolve_resume
    from .recipes import apply_recipe

    setup_logging()
    if getattr(run_args, "keep", "best") == "last" and training_args.load_best_model_at_end:
        from .errors import UsageError

        raise UsageError("--keep last contradicts --load_best_model_at_end true (which loads the best checkpoint); "
                         "drop one of them (--keep best keeps the best evaluation without checkpoints).")
    resolve_resume(training_args)
    claim_output_dir(training_args, overwrite=bool(getattr(run_args, "overwrite_output_dir", False)))
    decided = apply_recipe(training_args, bitfit.mode, getattr(run_args, "recipe", "auto"),
                           getattr(run_args, "explicit_args", None), runner)
    training_args._bitfit_recipe = decided  # recorded in results.json by train_and_record
    if decided["recipe_applied"]:
        logger.info("recipe %r: %s", decided["recipe"], decided["recipe_applied"])
    set_seed(training_args.seed)
    return training_args.data_seed if training_args.data_seed is not None else training_args.seed


def ensure_pad_token(tokenizer, config) -> None:
    """Decoder tokenizers (GPT-2, GPT-NeoX, ...) often have no pad token: batching needs one, and a
    decoder's sequence-classification head finds each row's last token by ``config.pad_token_id``.
    Pad with the end-of-sequence token, as the HF examples do."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            from .arguments import UsageError

            raise UsageError(f"the tokenizer of {config.name_or_path!r} has neither a pad nor an eos token to pad "
                             "batches with; add one (tokenizer.add_special_tokens) and save the model folder.")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("the tokenizer has no pad token; padding with its eos token %r", tokenizer.eos_token)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


TRAIN_SAMPLE_PREFIX = "train_sample"


class TrainSampleEval(TrainerCallback):
    """After each dev evaluation, score a fixed sample of the *training* set the same way and add
    ``train_sample_*`` (loss and metrics) to that evaluation's log entry: with the dev scores beside
    them, under-fitting (both poor) and over-fitting (train far above dev) are told apart."""

    def __init__(self, trainer: BitFitTrainer, dataset, compute_metrics: Callable | None = None) -> None:
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
                  if isinstance(v, int | float) and not k.endswith(_TIMING_KEYS)}
        if state.log_history and any(k.startswith("eval_") for k in state.log_history[-1]):
            state.log_history[-1].update(scores)


def add_train_sample_eval(trainer: BitFitTrainer, train_dataset, run_args: Any,
                          compute_metrics: Callable | None = None) -> None:
    """``--train_eval_samples N``: the fixed sample (seed 1234) of the training set that every
    evaluation also scores (see :class:`TrainSampleEval`)."""
    from .sampling import EVAL_SAMPLE_SEED, sample_indices

    n = getattr(run_args, "train_eval_samples", 0) if run_args is not None else 0
    if not n:
        return
    idx = sample_indices(len(train_dataset), EVAL_SAMPLE_SEED, k=n)
    sample = train_dataset if idx is None else train_dataset.select(idx)
    trainer.add_callback(TrainSampleEval(trainer, sample, compute_metrics))


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


def loss_sum_of_call(trainer: BitFitTrainer, training_loss: float, global_step: int, resumed_step: int) -> float:
    """The summed loss of the steps the last ``train()`` call ran. Trainer keeps it as
    ``_total_loss_scalar``; its public ``training_loss`` divides it by those steps from transformers
    5.24 on, but by *all* steps (the resumed ones included) before, so it is read directly where it
    exists."""
    total = getattr(trainer, "_total_loss_scalar", None)
    if isinstance(total, float | int):
        return float(total)
    return training_loss * (global_step - resumed_step)


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


def parse_and_run(run: Callable[..., dict[str, Any]], task_args: type, argv: list[str],
                  defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """A runner's ``main``: parse the shared dataclasses plus the task's, call ``run``, and release the
    output-folder lock on any exit (an error before training must not keep it for the process's life)."""
    from .arguments import parse_args, runner_dataclasses

    model_args, data_args, bitfit, run_args, training_args = parse_args(runner_dataclasses(task_args), argv, defaults)
    try:
        return run(model_args, data_args, bitfit, training_args, run_args)
    finally:
        release_output_dir(training_args.output_dir)


def train_and_record(
    trainer: BitFitTrainer,
    *,
    metric_key: str,
    info: dict[str, Any],
    bitfit: BitFitConfig,
    save_full_model: bool = False,
    after_training: Callable[[BitFitTrainer], dict[str, Any]] | None = None,
    keep: str = "best",
) -> dict[str, Any]:
    """Train (resuming from ``--resume_from_checkpoint`` if set), put the kept epoch's tensors in the
    model (``keep``: ``best`` dev score of ``metric_key``, or ``last``), save the model first, then run
    ``after_training(trainer)`` (test scores, prediction files -- of the saved model; it may add
    entries) and write results.json: the best and last dev score and what was really trained."""
    from .best import BestEpochKeeper

    args = trainer.args
    start = time.time()
    resume = args.resume_from_checkpoint
    resumed_step = 0
    keeper = BestEpochKeeper(trainer, metric_key) if keep == "best" else None
    if keeper is not None:
        trainer.add_callback(keeper)
    if resume:
        resumed_step = int(json.loads((Path(resume) / "trainer_state.json").read_text()).get("global_step", 0))
        logger.info("resuming from %s (step %d)", resume, resumed_step)
        if keeper is not None:
            keeper.load(resume)
    train_result = trainer.train(resume_from_checkpoint=resume)
    history = eval_history(trainer.state.log_history)
    if args.eval_strategy == "no" or not history:
        trainer.evaluate()
        history = eval_history(trainer.state.log_history)
    final = history[-1]
    scored = [h for h in history if metric_key in h and not math.isnan(h[metric_key])]
    best = max(scored, key=lambda h: h[metric_key]) if scored else None
    saved = final
    restored = keeper is not None and keeper.restore()
    if restored:
        saved = next((h for h in history if h["step"] == keeper.step),
                     {"epoch": keeper.epoch, "step": keeper.step, metric_key: keeper.score})
        if saved is not final:
            logger.info("keeping the best evaluation (step %s, epoch %s, %s %.4f), not the last (step %s)",
                        keeper.step, saved.get("epoch"), metric_key, keeper.score, final["step"])
    trainer.saved_metrics = saved  # the model card and after_training describe the saved model
    # Save before anything else can fail (scoring a test set, writing predictions): the trained
    # model is never lost to an error after training.
    if bitfit.mode != "full" or save_full_model:
        trainer.save_model(args.output_dir)  # every rank calls it; only the main one writes
    state = trainer.state
    results = {
        **info,
        "mode": bitfit.mode,
        "bias_terms": bitfit.bias_terms if bitfit.mode in BIAS_TERM_MODES else None,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "seed": args.seed,
        "epochs": round(state.epoch, 4) if state.epoch is not None else None,  # trained, not configured
        "optimizer_steps": state.global_step,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps if args.max_steps > 0 else None,
        # train_batch_size = per-device batch x GPUs of this process (Trainer's own product).
        "global_batch_size": args.train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1),
        "resumed_from": resume,
        **getattr(args, "_bitfit_recipe", {}),
        "trainable_params": trainer.bitfit_state.n_trainable,
        "all_params": trainer.bitfit_state.n_total,
        "best": best[metric_key] if best else float("nan"),
        "best_epoch": best["epoch"] if best else None,
        "final": scored[-1][metric_key] if scored else float("nan"),
        "best_metrics": _numbers(best) if best else None,
        "final_metrics": _numbers(final),
        # Which evaluation's model was saved (and wrote the prediction files and any test score).
        "saved": "best" if restored else "last",
        "saved_epoch": saved.get("epoch"),
        "saved_step": saved.get("step"),
        "saved_metrics": _numbers(saved),
        "history": history,
        **train_loss_record(state.log_history, loss_sum_of_call(trainer, train_result.training_loss, state.global_step,
                                                                resumed_step), state.global_step, resumed_step),
        "train_seconds": round(time.time() - start, 1),
        "device": device_name(args),
        "bitfit_config": asdict(bitfit),
    }
    if after_training is not None:
        results.update(after_training(trainer))
    if trainer.is_world_process_zero():
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_biases_and_head(trainer.model, out / "biases_and_head.safetensors")
        atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
        # print, not logging: the headline must show whatever the user's logging setup is.
        print(f"{info.get('task')} ({bitfit.mode}): best {metric_key.removeprefix('eval_')} {results['best']:.4f} "
              f"(epoch {results['best_epoch']}), final {results['final']:.4f} | saved: {results['saved']} "
              f"(epoch {results['saved_epoch']}): {headline_metrics(results['saved_metrics'])} | "
              f"{results['optimizer_steps']} steps, "
              f"{results['epochs']} epochs -> {out / 'results.json'}", flush=True)
    return results


def _numbers(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if isinstance(v, float | int)}


def headline_metrics(metrics: dict[str, Any]) -> str:
    """``exact_match 61.2000, f1 72.5000, n_examples 2000``: the scores and counts, no timings."""
    return ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" if isinstance(v, float) else f"{k.removeprefix('eval_')} {v}"
                     for k, v in metrics.items()
                     if k not in ("epoch", "step", "eval_loss") and not k.endswith(_TIMING_KEYS))
