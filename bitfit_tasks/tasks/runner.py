"""What every runner does around its own data and model: the prologue (logging, resume, output folder,
recipe, seeds) and the epilogue (train, keep the best evaluation, save, write results.json)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, set_seed

from ..core.config import BIAS_TERM_MODES, PEFT_MODES, BitFitConfig
from ..core.quantized import module_paths, quantization_record
from ..core.selection import bias_parameter_ids, head_parameter_names, lm_head_parameter_names, plan_bias_selection
from ..core.skeleton import meta_skeleton
from ..delta.files import DELTA_WEIGHTS
from ..training.best import BestEpochKeeper, keeper_rule
from ..training.trainer import BitFitTrainer
from ..utils.errors import UsageError
from ..utils.fileio import as_created, atomic_write_text
from ..utils.output_dir import claim_output_dir, release_output_dir
from .arguments import parse_args, runner_dataclasses
from .callbacks import StepTimer
from .checkpoints import checkpoint_step, resolve_resume
from .recipes import apply_recipe
from .results import eval_history, headline, loss_sum_of_call, run_record, train_loss_record

logger = logging.getLogger("bitfit_tasks")


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("bitfit_tasks").setLevel(logging.INFO)


def start_run(training_args: TrainingArguments, bitfit: BitFitConfig, run_args: Any = None,
              runner: str = "glue") -> int:
    """Common prologue of every runner: logging, the checkpoint to resume from and the output folder
    (checked and locked before any data or model is loaded), the recipe's defaults for this mode
    (recipes.py; ``runner`` picks what ``--recipe auto`` means), seeds. Returns the data seed
    (``--data_seed``, else ``--seed``) for subset sampling."""
    setup_logging()
    if getattr(run_args, "keep", "best") == "last" and training_args.load_best_model_at_end:
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


def check_terms_before_loading(auto_cls, config, bitfit: BitFitConfig, load_kwargs: dict[str, Any] | None = None):
    """The task model's class and the bias-term selection (or a PEFT mode's targets) checked on a skeleton of the
    task model (meta device: no weights, no memory), so a family without the task's head class or a term the
    architecture lacks is refused before minutes of loading a large model. With a quantization config in
    ``load_kwargs``, the skeleton's task head and LM head are kept out of the quantization (transformers would
    quantize a new classifier of some families)."""
    try:
        skeleton = meta_skeleton(auto_cls, config)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        import transformers

        head = auto_cls.__name__.removeprefix("AutoModelFor")
        script = {"SequenceClassification": "run_glue.py", "TokenClassification": "run_pos.py",
                  "QuestionAnswering": "run_squad.py"}.get(head, "this runner")
        raise UsageError(f"transformers {transformers.__version__} has no {head} model for model_type "
                         f"{config.model_type!r} ({type(config).__name__}); {script} needs one: choose a model of "
                         f"another family (e.g. bert, roberta, llama, qwen3), or a transformers release that adds "
                         f"{auto_cls.__name__} for {config.model_type!r}.") from None
    quant = (load_kwargs or {}).get("quantization_config")
    if quant is not None:
        keep = module_paths(head_parameter_names(skeleton) + lm_head_parameter_names(skeleton))
        quant.llm_int8_skip_modules = list(dict.fromkeys([*(quant.llm_int8_skip_modules or []), *keep]))
    if bitfit.mode not in BIAS_TERM_MODES + PEFT_MODES:
        return
    quiet = logging.getLogger("bitfit_tasks")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # what the selection logs is logged once, when the real model is prepared
    try:
        if bitfit.mode in PEFT_MODES:
            from ..peft_interop.modes import peft_config_for

            peft_config_for(skeleton, bitfit)  # peft installed, the targets there, a task type PEFT knows
        else:
            plan_bias_selection(skeleton, bitfit.bias_terms, add_missing=bitfit.add_missing_biases)
    finally:
        quiet.setLevel(level)


def ensure_pad_token(tokenizer, config) -> None:
    """Decoder tokenizers (GPT-2, GPT-NeoX, ...) often have no pad token: batching needs one, and a
    decoder's sequence-classification head finds each row's last token by ``config.pad_token_id``.
    Pad with the end-of-sequence token, as the HF examples do."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"the tokenizer of {config.name_or_path!r} has neither a pad nor an eos token to pad "
                             "batches with; add one (tokenizer.add_special_tokens) and save the model folder.")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("the tokenizer has no pad token; padding with its eos token %r", tokenizer.eos_token)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


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
    as_created(path)  # safetensors makes its files 0600


# The weight files a run's save writes: a BitFit delta, a PEFT adapter, a whole model (maybe sharded).
SAVED_WEIGHTS = (DELTA_WEIGHTS, "adapter_model.safetensors", "model.safetensors", "model-*.safetensors")


def saved_weights_bytes(output_dir: str) -> int | None:
    """Bytes of the trained weights the run saved in ``output_dir`` (None: nothing saved, e.g. --mode full
    without --save_full_model): what a checkpoint of this method costs on disk."""
    files = {f for pattern in SAVED_WEIGHTS for f in Path(output_dir).glob(pattern)}
    return sum(f.stat().st_size for f in files) if files else None


def parse_and_run(run: Callable[..., dict[str, Any]], task_args: type, argv: list[str],
                  defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """A runner's ``main``: parse the shared dataclasses plus the task's, call ``run``, and release the
    output-folder lock on any exit (an error before training must not keep it for the process's life)."""
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
    model (``keep``: ``best`` dev score of ``metric_key`` -- or, with ``--load_best_model_at_end``, of
    Trainer's ``--metric_for_best_model`` in its direction, so one rule decides the saved model -- or
    ``last``), save the model first, then run ``after_training(trainer)`` (test scores, prediction files
    -- of the saved model; it may add entries) and write results.json: the best and last dev score of
    ``metric_key`` and what was really trained."""
    args = trainer.args
    start = time.time()
    keeper = BestEpochKeeper(trainer, *keeper_rule(args, metric_key)) if keep == "best" else None
    if keeper is not None:
        trainer.add_callback(keeper)
    timer = StepTimer()
    trainer.add_callback(timer)
    resumed_step = 0
    if args.resume_from_checkpoint:
        resumed_step = checkpoint_step(args.resume_from_checkpoint)
        logger.info("resuming from %s (step %d)", args.resume_from_checkpoint, resumed_step)
        if keeper is not None:
            keeper.load(args.resume_from_checkpoint)
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    history = eval_history(trainer.state.log_history)
    if args.eval_strategy == "no" or not history:
        trainer.evaluate()
        history = eval_history(trainer.state.log_history)
    saved = history[-1]
    restored = keeper is not None and keeper.restore()
    if restored:
        saved = next((h for h in history if h["step"] == keeper.step),
                     {"epoch": keeper.epoch, "step": keeper.step, keeper.metric_key: keeper.score})
        if saved is not history[-1]:
            logger.info("keeping the best evaluation (step %s, epoch %s, %s %.4f), not the last (step %s)",
                        keeper.step, saved.get("epoch"), keeper.metric_key, keeper.score, history[-1]["step"])
    trainer.saved_metrics = saved  # the model card and after_training describe the saved model
    # Save before anything else can fail (scoring a test set, writing predictions): the trained
    # model is never lost to an error after training.
    if bitfit.mode != "full" or save_full_model:
        trainer.save_model(args.output_dir)  # every rank calls it; only the main one writes
    results = {
        **info,
        **run_record(trainer, bitfit, history, metric_key, saved, "best" if restored else "last"),
        "saved_by": keeper.metric_key if restored else None,  # the metric that chose the saved evaluation
        **train_loss_record(trainer.state.log_history,
                            loss_sum_of_call(trainer, train_result.training_loss, trainer.state.global_step,
                                             resumed_step), trainer.state.global_step, resumed_step),
        "train_seconds": round(time.time() - start, 1),
        **timer.record(),
        "saved_weights_bytes": saved_weights_bytes(args.output_dir),
        "device": device_name(args),
        "bitfit_config": asdict(trainer.bitfit_config),  # what ran (lean falls back to fp32 on some CPUs)
        # The base as it was loaded: bitsandbytes 4-/8-bit (--load_in_4bit / --load_in_8bit), else null.
        "quantization": quantization_record(trainer.accelerator.unwrap_model(trainer.model)),
    }
    if trainer.bitfit_config != bitfit:
        results["bitfit_config_requested"] = asdict(bitfit)
    if after_training is not None:
        results.update(after_training(trainer))
    if trainer.is_world_process_zero():
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if bitfit.mode not in PEFT_MODES:  # a PEFT adapter folder holds its own trained tensors
            save_biases_and_head(trainer.model, out / "biases_and_head.safetensors")
        atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
        # print, not logging: the headline must show whatever the user's logging setup is.
        print(headline(results, metric_key, out / "results.json"), flush=True)
    return results
