"""``BitFitTrainer``: a drop-in ``transformers.Trainer`` that trains only what BitFit selects."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..core.bias_maps import BiasMap
from ..core.config import PEFT_MODES, BitFitConfig
from ..core.lean import lean_runs, make_lean
from ..core.prepare import BitFitState, is_peft_model, prepare_model
from ..core.quantized import check_quantized_mode, is_quantized_model
from ..core.selection import head_parameter_names
from ..core.signature import base_signature
from ..delta.apply import apply_delta
from ..delta.card import model_card
from ..delta.files import DELTA_CONFIG, DELTA_WEIGHTS, is_delta_dir, upload_delta_folder
from ..delta.format import Delta, save_delta
from ..utils.errors import UsageError
from ..utils.fileio import atomic_write_text
from ..utils.launch import DEEPSPEED_REFUSAL, FSDP_REFUSAL, refuse_sharded_launch

logger = logging.getLogger("bitfit_tasks")

# Task heads BitFit trains. Their losses are per-process means (a ``CrossEntropyLoss()`` or a
# loss_utils function that ignores ``num_items_in_batch``), unlike the LM heads' token sums.
TASK_HEAD_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                      "ForMultipleChoice")


def loss_takes_num_items(model) -> bool:
    """What ``model.accepts_loss_kwargs`` should say, the attribute Trainer reads to decide whether
    the model divides its loss by the batch's item count itself. A class that declares it is
    trusted; an undeclared task head is a per-process mean (Trainer would otherwise guess True from
    its ``**kwargs`` and rescale the loss: x2 gradients on 2 processes, no division by accumulation
    steps); anything else keeps Trainer's own reading of the forward signature."""
    if is_peft_model(model) and hasattr(model, "get_base_model"):
        model = model.get_base_model()  # as Trainer reads it: the wrapped model's own forward and loss
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    if type(model).__name__.endswith(TASK_HEAD_SUFFIXES):
        return False
    import inspect

    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


def refuse_unsupported_parallelism(args) -> None:
    """Layouts BitFitTrainer does not run correctly, refused before anything is built:

    * FSDP and DeepSpeed (``--fsdp``, ``--deepspeed``, or ``accelerate launch --use_fsdp`` /
      ``--use_deepspeed``, which TrainingArguments reads from the environment): they shard parameters,
      and bias-only checkpoints are read from the live (sharded) parameters, so a delta would be saved
      as shards, silently. Checked first: reading ``n_gpu`` already sets DeepSpeed up;
    * several GPUs in one process: Trainer wraps the model in ``nn.DataParallel``, whose replicas
      would share lean mode's forward wrapper (bound to the first device's module) and whose
      per-replica losses a custom loss function does not average.
    """
    if getattr(args, "fsdp", None):
        raise UsageError(FSDP_REFUSAL)
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
        raise UsageError(DEEPSPEED_REFUSAL)
    refuse_sharded_launch()
    n_gpu = getattr(args, "n_gpu", 1)
    if n_gpu > 1:
        raise UsageError(f"{n_gpu} GPUs are visible to one process, where Trainer would use nn.DataParallel, which "
                         "BitFitTrainer does not support. Launch one process per GPU: accelerate launch --multi_gpu "
                         f"--num_processes {n_gpu} YOUR_SCRIPT.py ... (or torchrun --nproc_per_node {n_gpu}); for "
                         "one GPU, set CUDA_VISIBLE_DEVICES=0.")


# transformers' flag for "this model carries PEFT adapters": its Trainer refuses a quantized model without it.
_ADAPTERS_FLAG = "_hf_peft_config_loaded"


def pass_quantized_check(model, config: BitFitConfig) -> bool:
    """Let a quantized base (bitsandbytes 4-/8-bit) through Trainer's construction in the modes that train no
    quantized weight; returns whether the model was flagged (:func:`unflag_quantized` undoes it).

    Trainer refuses any "purely quantized" model, one without PEFT adapters, since full fine-tuning cannot update
    packed weights. Bias-only modes leave them untouched and train floating-point biases beside them, so their own
    check (core.quantized) runs instead, and this model alone carries transformers' adapters flag while Trainer is
    built (nothing global changes). Full mode keeps Trainer's refusal; PEFT models pass it as they are.
    """
    if (model is None or config.mode in ("full", *PEFT_MODES) or is_peft_model(model)
            or not is_quantized_model(model) or getattr(model, _ADAPTERS_FLAG, False)):
        return False
    check_quantized_mode(model, config.mode, lean=config.lean, head=head_parameter_names(model))
    setattr(model, _ADAPTERS_FLAG, True)
    return True


def unflag_quantized(model) -> None:
    model.__dict__.pop(_ADAPTERS_FLAG, None)


class BitFitTrainer(Trainer):
    """``Trainer`` plus BitFit: swap the class, pass ``bitfit_config=BitFitConfig(...)``.

    The model is frozen in place at construction (``requires_grad=False`` outside the selection),
    so the optimizer built by ``Trainer`` -- any ``--optim`` -- sees only the selected biases and
    the head. Everything else is the parent's: arguments, callbacks, evaluation, distribution.
    ``mode="full"`` is Trainer's own training: the model's ``requires_grad`` and the arguments
    object are kept as given (only the loss normalisation under gradient accumulation differs).
    """

    # The evaluation whose tensors the model holds when it is saved (a runner that puts the best
    # evaluation back sets it); None: the last evaluation. The model card reports it.
    saved_metrics: dict | None = None

    def __init__(
        self,
        *args,
        bitfit_config: BitFitConfig | None = None,
        bias_map: BiasMap | None = None,
        **kwargs,
    ) -> None:
        bitfit_config = bitfit_config or BitFitConfig()
        full = bitfit_config.mode == "full"
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if targs is None:
            # Trainer's own default, built here so that the checks below see what will run.
            refuse_sharded_launch()  # TrainingArguments already sets DeepSpeed up from the environment
            targs = TrainingArguments(output_dir="tmp_trainer")
        if not full:
            # Work on our own copy: the settings changed below must not leak into the caller's object
            # (reused for another Trainer, or read back to report what was asked for). Full mode
            # changes nothing, so it keeps the caller's object, as Trainer does.
            targs = copy.copy(targs)
            if "args" in kwargs or len(args) <= 1:
                kwargs["args"] = targs
            else:
                args = (args[0], targs, *args[2:])
        refuse_unsupported_parallelism(targs)
        if bitfit_config.lean:
            if not lean_runs(targs):
                bitfit_config = dataclasses.replace(bitfit_config, lean=False)  # what runs is recorded
            elif not targs.bf16:
                # Lean mode is bf16 autocast by definition; the accelerator reads mixed_precision.
                targs.bf16, targs.mixed_precision = True, "bf16"
        if not full and targs.ddp_find_unused_parameters is None:
            # Bias-only modes: every selected bias and the head take part in each forward, so DDP
            # needs no per-step search for unused parameters (Trainer's default turns it on). Not in
            # full mode: any parameter of the user's model may go unused in a step (Trainer's default
            # is there for that), so full mode leaves the flag, and the arguments, as given.
            targs.ddp_find_unused_parameters = False
        wrapped = None
        if bitfit_config.mode in PEFT_MODES:
            # LoRA / BEFT: the model is wrapped in PEFT's adapters here, before Trainer sees it (as TRL's trainers
            # take a peft_config), and after the refusals above: PEFT changes the caller's model in place. A
            # model_init's models are wrapped in call_model_init.
            from ..peft_interop.modes import unwrap_peft, wrap_with_peft

            if kwargs.get("model") is not None:
                wrapped = kwargs["model"] = wrap_with_peft(kwargs["model"], bitfit_config, bias_map=bias_map)
            elif args and args[0] is not None:
                wrapped = wrap_with_peft(args[0], bitfit_config, bias_map=bias_map)
                args = (wrapped, *args[1:])
        self.bitfit_config = bitfit_config
        self._bias_map = bias_map
        self._bitfit_model: torch.nn.Module | None = None
        # With model_init, Trainer builds the model inside __init__ (and again in every train() /
        # hyperparameter-search trial) through call_model_init, which applies BitFit below.
        given = kwargs.get("model", args[0] if args else None)
        self._flagged = [given] if pass_quantized_check(given, bitfit_config) else []
        self._initialising = True  # call_model_init flags a quantized model_init model while Trainer is built
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            if wrapped is not None:  # a refusal leaves the caller's model as it was given
                unwrap_peft(wrapped)
            raise
        finally:
            self._initialising = False
            for model in self._flagged:
                unflag_quantized(model)
        trainers_reading = self.model_accepts_loss_kwargs
        self.model_accepts_loss_kwargs = loss_takes_num_items(self.model)
        if trainers_reading and not self.model_accepts_loss_kwargs:
            self._note_loss_scaling()
        if self._bitfit_model is not self.model:
            self._apply_bitfit(self.model)

    def _note_loss_scaling(self) -> None:
        """Once per trainer, on the main process: where Trainer would take this model's per-batch mean
        loss for a sum (and so skip the division by the accumulation steps), say that the loss here
        differs from Trainer's, and by how much. A warning in full mode, whose user compares with Trainer."""
        steps = self.args.gradient_accumulation_steps
        if steps <= 1 or self.compute_loss_func is not None or self.args.process_index != 0:
            return
        logger.log(logging.WARNING if self.bitfit_config.mode == "full" else logging.INFO,
                   "gradient accumulation over %d batches: BitFitTrainer divides %s's loss (a per-batch mean) by %d, "
                   "so the logged loss and the gradients are those of one batch of %d x the per-device batch; "
                   "transformers' Trainer reads its forward's **kwargs as a summed loss and does not divide, so it "
                   "logs and steps with %dx this loss.", steps, type(self.model).__name__, steps, steps, steps)

    def call_model_init(self, trial=None):
        """Every model Trainer creates from ``model_init`` (at ``train()``, in each hyperparameter
        trial) is frozen and selected like one passed as ``model=``; otherwise it would train fully."""
        model = super().call_model_init(trial)
        if self.bitfit_config.mode in PEFT_MODES:
            from ..peft_interop.modes import wrap_with_peft

            model = wrap_with_peft(model, self.bitfit_config, bias_map=self._bias_map)
        self._apply_bitfit(model)
        if getattr(self, "_initialising", False) and pass_quantized_check(model, self.bitfit_config):
            self._flagged.append(model)
        return model

    def _apply_bitfit(self, model: torch.nn.Module) -> None:
        """Freeze and select in place, fingerprint the base, lean mode, log the table."""
        args = self.args
        self.bitfit_state: BitFitState = prepare_model(
            model, self.bitfit_config, bias_map=self._bias_map, seed=args.seed
        )
        # Fingerprint the base before lean mode rounds it, so deltas stay valid for the fp32 base.
        # Once per model: every save records it and every load of this trainer's checkpoints checks
        # against it (the rounded lean model is never re-signed).
        self._base_signature = (
            base_signature(model, exclude=set(self._delta_names())) if self._saves_delta() else None
        )
        # transformers 5.24 renamed --gradient_checkpointing to --activation_checkpointing.
        checkpointing = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", 0)
        if checkpointing and hasattr(model, "enable_input_require_grads"):
            # With reentrant checkpointing, blocks whose input needs no grad (frozen embeddings) would
            # give their biases no gradient at all; make the embedding output require grad.
            model.enable_input_require_grads()
        if self.bitfit_config.lean:
            logger.info("lean mode: %s", make_lean(model))
        self._bitfit_model = model
        # Logged, not printed (a library leaves stdout to its user), and only by the main process, so
        # N processes don't log N copies; print_trainable_parameters() prints it on request.
        if args.process_index == 0:
            logger.info("%s", self.trainable_table())

    def trainable_table(self) -> str:
        """PEFT's line ``trainable params: N || all params: M || trainable%: P``, then the count of
        every bias term and the head."""
        return f"BitFit mode {self.bitfit_config.mode!r}\n{self.bitfit_state.summary()}"

    def print_trainable_parameters(self) -> None:
        """Print :meth:`trainable_table` to stdout, as PEFT's ``print_trainable_parameters()`` does."""
        print(self.trainable_table(), flush=True)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        head_lr = self.bitfit_config.head_learning_rate
        if head_lr is not None and self.bitfit_state.head:
            self._split_head_groups(optimizer, head_lr)
        if self.bitfit_state.masks:
            # Runs after every real step of whichever optimizer --optim chose.
            optimizer.register_step_post_hook(
                lambda *_: self.bitfit_state.restore_frozen_entries(self.model)
            )
        return optimizer

    def _split_head_groups(self, optimizer, head_lr: float) -> None:
        """Give the head its own learning rate, keeping each group's other settings."""
        head = set(self.bitfit_state.head)
        head_ids = {id(p) for n, p in self.model.named_parameters() if n in head}
        groups = list(optimizer.param_groups)
        optimizer.param_groups.clear()
        for group in groups:
            body = [p for p in group["params"] if id(p) not in head_ids]
            head = [p for p in group["params"] if id(p) in head_ids]
            for params, lr in ((body, group["lr"]), (head, head_lr)):
                if params:
                    optimizer.add_param_group({**group, "params": params, "lr": lr})

    # ---- bias-only checkpoints ------------------------------------------------------------------
    # Trainer funnels save_model(), periodic checkpoints and the final save through _save(), and
    # resume / load_best_model_at_end through the two loaders below: overriding these three keeps
    # every Trainer feature working with checkpoints that hold only the trained tensors.

    def _delta_names(self) -> list[str]:
        # The head is stored even when frozen: its (random) init is not in the base checkpoint.
        return list(dict.fromkeys(self.bitfit_state.trainable + self.bitfit_state.head_all))

    def _saves_delta(self) -> bool:
        # Full fine-tuning saves the model, LoRA / BEFT their PEFT adapter folder: Trainer's own saving.
        return self.bitfit_config.mode not in ("full", *PEFT_MODES)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.bitfit_config.mode in PEFT_MODES:
            super()._save(output_dir, state_dict=state_dict)  # PEFT's adapter folder
            if self.args.should_save:
                from ..peft_interop.modes import write_adapter_extras

                write_adapter_extras(self.accelerator.unwrap_model(self.model, keep_torch_compile=False),
                                     output_dir if output_dir is not None else self.args.output_dir,
                                     n_trainable=self.bitfit_state.n_trainable, n_total=self.bitfit_state.n_total,
                                     metrics=self._saved_metrics())
            return None
        if not self._saves_delta():
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_delta(model, output_dir, names=self._delta_names(), mode=self.bitfit_config.mode,
                   terms=self.bitfit_state.terms, signature=self._base_signature, added=self.bitfit_state.added)
        # The model card says what the folder is (a delta, not a model) and how to load it.
        metrics = self._saved_metrics()
        meta = json.loads(Path(output_dir, DELTA_CONFIG).read_text())
        card = model_card(output_dir, meta, weights_file=DELTA_WEIGHTS, n_trainable=self.bitfit_state.n_trainable,
                          n_total=self.bitfit_state.n_total, metrics=metrics)
        atomic_write_text(os.path.join(output_dir, "README.md"), str(card))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        logger.info("Saved BitFit delta (%s) to %s", self.bitfit_config.mode, output_dir)

    def _saved_metrics(self) -> dict | None:
        """The evaluation of the tensors being saved: the kept one (a runner sets it), else the last."""
        evals = [e for e in self.state.log_history if any(k.startswith("eval_") for k in e)]
        return self.saved_metrics or (evals[-1] if evals else None)

    def _save_checkpoint(self, model, trial) -> None:
        """Callbacks with ``before_checkpoint(args, folder)`` (the best-epoch keeper) write their files into
        the checkpoint first: Trainer writes ``trainer_state.json`` (what makes a checkpoint complete) and
        deletes older checkpoints (``--save_total_limit``) before it calls ``on_save``."""
        folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "before_checkpoint"):
                callback.before_checkpoint(self.args, folder)
        super()._save_checkpoint(model, trial)

    def _apply_own_delta(self, model: torch.nn.Module, folder: str) -> None:
        """Apply a checkpoint's delta, checked against the base signature this trainer took once,
        before lean mode rounded the frozen weights."""
        delta = Delta.load(folder)
        own = self._base_signature if set(delta.tensors) == set(self._delta_names()) else None
        apply_delta(model, delta, signature=own)

    def push_to_hub(self, *args, **kwargs):
        """Bias-only modes upload the delta alone (tensors, JSON, model card, tokenizer) to
        ``--hub_model_id`` (or ``repo_id=``), not the whole output folder; ``--mode full`` is
        Trainer's own upload. Same arguments as ``Trainer.push_to_hub``."""
        if not self._saves_delta():
            return super().push_to_hub(*args, **kwargs)
        commit_message = args[0] if args else kwargs.get("commit_message") or "Upload BitFit delta"
        token = kwargs.get("token") or self.args.hub_token
        repo_id = kwargs.get("repo_id") or self.args.hub_model_id or Path(self.args.output_dir).name
        if not self.is_world_process_zero():
            return None
        # _internal_call: with --push_to_hub true, a user's save_model() pushes, which would call us again.
        return upload_delta_folder(lambda folder: self.save_model(folder, _internal_call=True), repo_id,
                                   token=token, private=kwargs.get("private"), revision=kwargs.get("revision"),
                                   commit_message=commit_message)

    def _check_checkpoint_kind(self, checkpoint: str, model) -> None:
        """A checkpoint resumes only in the kind of run that wrote it: a PEFT adapter with the same options in a
        LoRA / BEFT run, anything else elsewhere (one line, before training, not a library's traceback)."""
        from ..peft_interop.modes import adapter_mismatch

        is_adapter = Path(checkpoint, "adapter_config.json").is_file()
        mode = self.bitfit_config.mode
        wrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if mode in PEFT_MODES and not is_adapter:
            held = "a BitFit delta" if is_delta_dir(checkpoint) else "no PEFT adapter"
            raise UsageError(f"--resume_from_checkpoint {checkpoint} holds {held}, not the adapter of a --mode {mode} "
                             "run; resume it with the --mode it was trained with, or start this run in another "
                             "--output_dir.")
        if mode not in PEFT_MODES and is_adapter and not (mode == "full" and is_peft_model(wrapped)):
            # (A user's own PEFT model in full mode is Trainer's own training: it resumes its adapter, as Trainer does.)
            raise UsageError(f"--resume_from_checkpoint {checkpoint} holds a PEFT adapter (a --mode lora / beft run), "
                             f"not a --mode {mode} checkpoint; resume it with the --mode it was trained with, or start "
                             "this run in another --output_dir.")
        if is_adapter:
            differ = adapter_mismatch(wrapped.peft_config["default"], checkpoint)
            if differ:
                said = "; ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in differ.items())
                raise UsageError(f"--resume_from_checkpoint {checkpoint} holds an adapter trained with other options "
                                 f"({said}); resume with the options it was trained with, or start this run in "
                                 "another --output_dir.")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._check_checkpoint_kind(resume_from_checkpoint, model)
        if not is_delta_dir(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        self._apply_own_delta(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not is_delta_dir(best):
            return super()._load_best_model()
        logger.info("Loading best BitFit delta from %s (score: %s).", best, self.state.best_metric)
        self._apply_own_delta(self.accelerator.unwrap_model(self.model), best)
