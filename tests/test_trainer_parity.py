"""``BitFitTrainer(mode="full")`` is ``Trainer``: the same Trainer behaviours run once with each class on
the same tiny model and data, and every result must be identical (bit for bit: same ops, same seeds)."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_trainer import RandomPairs
from transformers import Trainer, TrainerCallback, TrainingArguments

from bitfit_tasks import BitFitConfig, BitFitTrainer

# The shared random pairs, smaller: every behaviour below runs twice.
Pairs = functools.partial(RandomPairs, n=24, seq=10)

FULL = functools.partial(BitFitTrainer, bitfit_config=BitFitConfig(mode="full"))
CLASSES = {"trainer": Trainer, "bitfit-full": FULL}
# Wall-clock fields differ between any two runs.
TIMING = ("runtime", "per_second", "total_flos")


def untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.endswith(TIMING)}


def accuracy(p) -> dict:
    return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}


def targs(out: Path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                learning_rate=5e-3, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, save_strategy="no",
                logging_steps=1)
    return TrainingArguments(**{**base, **kw})


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a, b, path: str = "") -> None:
    """Deep equality over dicts, lists, tensors and arrays, naming the first difference."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path}: tensors differ (max {float((a - b).abs().max()):.3g})"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{path}: arrays differ"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


class Recorder(TrainerCallback):
    """Every callback event Trainer fires, with the step it fired at."""

    def __init__(self):
        self.events: list[tuple[str, int]] = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            return lambda args, state, control, **kw: self.events.append((name, state.global_step))
        return super().__getattribute__(name)


def both(run) -> dict:
    """``run(cls, tmp_subdir)`` once per class; the two results must be identical, and are returned."""
    results = {name: run(cls, name) for name, cls in CLASSES.items()}
    assert_same(results["trainer"], results["bitfit-full"])
    return results["trainer"]


def test_full_mode_uses_the_callers_arguments_as_trainer_does(tmp_path):
    """Trainer keeps the caller's TrainingArguments object; full mode changes nothing in it (before,
    it forced ddp_find_unused_parameters=False, which breaks DDP for a model with an unused parameter)."""
    args = targs(tmp_path)
    plain = Trainer(model=tiny_model("bert"), args=args)
    full = FULL(model=tiny_model("bert"), args=args)
    assert full.args is args and plain.args is args
    assert full.args.to_dict() == plain.args.to_dict() and args.ddp_find_unused_parameters is None
    # Bias-only modes may turn the search off (only selected biases and the head train), on a copy,
    # and only where the caller left it unset.
    bitfit = BitFitTrainer(model=tiny_model("bert"), args=args)
    assert bitfit.args is not args and bitfit.args.ddp_find_unused_parameters is False
    asked = targs(tmp_path, ddp_find_unused_parameters=True)
    assert BitFitTrainer(model=tiny_model("bert"), args=asked).args.ddp_find_unused_parameters is True


def test_train_evaluate_predict_callbacks_and_logs(tmp_path):
    def run(cls, name):
        rec = Recorder()
        trainer = cls(model=tiny_model("bert"), args=targs(tmp_path / name, eval_strategy="steps", eval_steps=2),
                      train_dataset=Pairs(), eval_dataset=Pairs(n=12, seed=1), compute_metrics=accuracy,
                      callbacks=[rec])
        out = trainer.train()
        pred = trainer.predict(Pairs(n=10, seed=2))
        return {"train": untimed(out.metrics), "loss": out.training_loss, "params": params(trainer.model),
                "log": [untimed(e) for e in trainer.state.log_history], "events": rec.events,
                "evaluate": untimed(trainer.evaluate()), "predictions": pred.predictions,
                "label_ids": pred.label_ids, "predict_metrics": untimed(pred.metrics)}

    result = both(run)
    assert len(result["log"]) > 4 and ("on_evaluate", 2) in result["events"]


@pytest.mark.parametrize("optim, scheduler", [("adamw_torch", "linear"), ("sgd", "cosine"),
                                               ("adafactor", "constant_with_warmup")])
def test_optimizer_and_scheduler_choice(optim, scheduler, tmp_path):
    def run(cls, name):
        trainer = cls(model=tiny_model("bert"), args=targs(tmp_path / name, optim=optim, lr_scheduler_type=scheduler,
                                                           warmup_steps=1, weight_decay=0.01),
                      train_dataset=Pairs())
        trainer.train()
        return {"optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                  else trainer.optimizer).__name__,
                "scheduler": type(trainer.lr_scheduler).__name__,
                "groups": [len(g["params"]) for g in trainer.optimizer.param_groups],
                "lrs": [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e],
                "params": params(trainer.model)}

    both(run)


def test_resume_equals_uninterrupted(tmp_path):
    def run(cls, name):
        kw = dict(save_strategy="steps", save_steps=2)
        whole = cls(model=tiny_model("bert"), args=targs(tmp_path / name / "whole", **kw), train_dataset=Pairs())
        whole.train()
        resumed = cls(model=tiny_model("bert", seed=5), args=targs(tmp_path / name / "resumed", **kw),
                      train_dataset=Pairs())
        resumed.train(resume_from_checkpoint=str(tmp_path / name / "whole" / "checkpoint-2"))
        assert_same(params(whole.model), params(resumed.model), f"{name} resumed")
        return {"params": params(resumed.model),
                "log": [untimed(e) for e in resumed.state.log_history]}

    both(run)


def test_checkpoint_rotation_and_load_best_model_at_end(tmp_path):
    def run(cls, name):
        out = tmp_path / name
        trainer = cls(model=tiny_model("bert"),
                      args=targs(out, max_steps=8, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                                 save_steps=2, save_total_limit=2, load_best_model_at_end=True,
                                 metric_for_best_model="accuracy", learning_rate=2e-2),
                      train_dataset=Pairs(), eval_dataset=Pairs(n=12, seed=1), compute_metrics=accuracy)
        trainer.train()
        kept = sorted(p.name for p in out.glob("checkpoint-*"))
        return {"kept": kept, "files": {k: sorted(f.name for f in (out / k).iterdir()) for k in kept},
                "best": Path(trainer.state.best_model_checkpoint).name, "best_metric": trainer.state.best_metric,
                "params": params(trainer.model), "evaluate": untimed(trainer.evaluate())}

    result = both(run)
    assert len(result["kept"]) == 2 and result["best"] in result["kept"]


@pytest.mark.slow
def test_model_init_and_hyperparameter_search(tmp_path):
    optuna = pytest.importorskip("optuna", reason="the search extra: pip install 'bitfit-tasks[search]'")

    def run(cls, name):
        trials = []

        class Seen(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kw):
                trials.append({"lr": args.learning_rate, "params": params(model),
                               "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)})

        trainer = cls(model_init=lambda: frozen_embeddings(tiny_model("bert")),
                      args=targs(tmp_path / name, max_steps=3, eval_strategy="no", logging_strategy="no"),
                      train_dataset=Pairs(), eval_dataset=Pairs(n=12, seed=1), callbacks=[Seen()])
        best = trainer.hyperparameter_search(
            hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True)},
            backend="optuna", n_trials=2, direction="minimize", sampler=optuna.samplers.TPESampler(seed=0))
        return {"trials": trials, "best": [best.run_id, best.objective, best.hyperparameters]}

    result = both(run)
    assert len(result["trials"]) == 2
    assert all("bert.embeddings.word_embeddings.weight" not in t["trainable"] for t in result["trials"])


# ---- a model the user partly froze ------------------------------------------------------------

def frozen_embeddings(model):
    model.bert.embeddings.requires_grad_(False)
    return model


def frozen_lower_half(model):
    model.bert.embeddings.requires_grad_(False)
    model.bert.encoder.layer[0].requires_grad_(False)
    return model


@pytest.mark.parametrize("freeze", [frozen_embeddings, frozen_lower_half])
def test_full_mode_keeps_what_the_user_froze(freeze, tmp_path):
    """Before: full mode set requires_grad=True on every parameter and trained the frozen ones."""
    def run(cls, name):
        model = freeze(tiny_model("bert"))
        before = params(model)
        trainer = cls(model=model, args=targs(tmp_path / name), train_dataset=Pairs())
        trainable = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
        trainer.train()
        after = params(trainer.model)
        return {"trainable": trainable, "params": after,
                "moved": sorted(n for n in before if not torch.equal(before[n], after[n]))}

    result = both(run)
    frozen = {n for n, _ in freeze(tiny_model("bert")).named_parameters()} - set(result["trainable"])
    assert frozen and not frozen & set(result["moved"])


def test_full_mode_counts_only_what_trains(tmp_path, caplog):
    model = frozen_lower_half(tiny_model("bert"))
    want = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with caplog.at_level(logging.INFO, logger="bitfit_tasks"):
        trainer = FULL(model=model, args=targs(tmp_path))
    assert trainer.bitfit_state.n_trainable == want < trainer.bitfit_state.n_total
    assert f"trainable params: {want:,d} || all params: {trainer.bitfit_state.n_total:,d}" in caplog.text
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"mode 'full' trains what the model marks trainable, and every parameter "
                                         r"of BertForSequenceClassification has requires_grad=False"):
        FULL(model=model, args=targs(tmp_path))


# ---- gradient accumulation: the one deliberate difference ---------------------------------------

def losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_without_accumulation_full_mode_matches_trainer_bit_for_bit(tmp_path, caplog):
    def run(cls, name):
        trainer = cls(model=tiny_model("bert"), args=targs(tmp_path / name, max_steps=3), train_dataset=Pairs())
        trainer.train()
        return {"losses": losses(trainer), "params": params(trainer.model)}

    with caplog.at_level(logging.INFO, logger="bitfit_tasks"):
        result = both(run)
    assert len(result["losses"]) == 3 and "gradient accumulation" not in caplog.text


def test_accumulation_normalises_the_loss_and_says_so_once(tmp_path, caplog):
    """With accumulation 2 Trainer sums the two per-batch means of a classification head (it reads the
    forward's **kwargs as a summed loss); BitFitTrainer averages them, and warns once in full mode."""
    runs = {}
    for name, cls in CLASSES.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="bitfit_tasks"):
            trainer = cls(model=tiny_model("bert"), args=targs(tmp_path / name, max_steps=3,
                                                               gradient_accumulation_steps=2), train_dataset=Pairs())
            trainer.train()
        notes = [r for r in caplog.records if "gradient accumulation" in r.getMessage()]
        runs[name] = losses(trainer), notes
    (plain, none), (full, notes) = runs["trainer"], runs["bitfit-full"]
    assert not none and len(notes) == 1 and notes[0].levelno == logging.WARNING
    assert re.fullmatch(r"gradient accumulation over 2 batches: BitFitTrainer divides BertForSequenceClassification's "
                        r"loss \(a per-batch mean\) by 2, .* logs and steps with 2x this loss\.", notes[0].getMessage())
    # The first step sees the same two batches and weights: Trainer logs exactly twice the mean.
    assert plain[0] == pytest.approx(2 * full[0], rel=1e-6)
    assert 0.6 < full[0] < 0.8  # a 2-class head at init: about ln 2
    # Bias-only modes normalise the same way; the note is INFO there.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bitfit_tasks"):
        BitFitTrainer(model=tiny_model("bert"), args=targs(tmp_path / "b", gradient_accumulation_steps=2))
    assert [r.levelno for r in caplog.records if "gradient accumulation" in r.getMessage()] == [logging.INFO]
