from __future__ import annotations

import logging
import re

import pytest
import torch
from conftest import ARCHS, tiny_model
from torch.utils.data import Dataset
from transformers import TrainingArguments

from bitfit_tasks import BitFitConfig, BitFitTrainer, prepare_model
from bitfit_tasks.core.prepare import random_masks
from bitfit_tasks.core.selection import head_parameter_names, select_bias_parameters


class RandomPairs(Dataset):
    def __init__(self, n: int = 32, seq: int = 12, vocab: int = 100, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, vocab, (n, seq), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def train(model, cfg: BitFitConfig, tmp_path, steps: int = 4, **args):
    targs = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
        learning_rate=args.pop("learning_rate", 1e-2), weight_decay=args.pop("weight_decay", 0.1),
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, **args,
    )
    trainer = BitFitTrainer(model=model, args=targs, train_dataset=RandomPairs(), bitfit_config=cfg)
    trainer.train()
    return trainer


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("terms", [["bitfit"], ["qm2"], ["LN2", "m1"]])
def test_only_selected_biases_and_head_change(arch, terms, tmp_path):
    model = tiny_model(arch)
    before = snapshot(model)
    selected = {n for ns in select_bias_parameters(model, terms).values() for n in ns}
    head = set(head_parameter_names(model))
    train(model, BitFitConfig(bias_terms=terms), tmp_path)
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= selected | head
    # Real steps with lr 1e-2 move every selected bias and the head.
    assert changed == selected | head
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in selected | head)


def test_frozen_trains_head_only_and_full_trains_all(tmp_path):
    model = tiny_model("bert")
    before = snapshot(model)
    train(model, BitFitConfig(mode="frozen"), tmp_path)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {"classifier.weight", "classifier.bias"}

    model = tiny_model("bert")
    before = snapshot(model)
    train(model, BitFitConfig(mode="full"), tmp_path)
    unchanged = {n for n, p in model.named_parameters() if torch.equal(before[n], p)}
    # Position/token-type rows never seen in the batch keep zero grads, but every tensor moves.
    assert unchanged == set()


def test_train_head_false_keeps_head_frozen(tmp_path):
    model = tiny_model("bert")
    before = snapshot(model)
    train(model, BitFitConfig(train_head=False), tmp_path)
    assert torch.equal(before["classifier.weight"], model.classifier.weight)
    assert not torch.equal(before["bert.encoder.layer.0.attention.self.query.bias"],
                           model.bert.encoder.layer[0].attention.self.query.bias)


@pytest.mark.parametrize("mode", ["rand_uniform", "rand_row_col"])
def test_random_baselines_exact_count_and_bit_exact_frozen_entries(mode, tmp_path):
    model = tiny_model("bert")
    n_bias = sum(p.numel() for n, p in model.named_parameters()
                 if n in {x for ns in select_bias_parameters(model, "bitfit").values() for x in ns})
    before = snapshot(model)
    trainer = train(model, BitFitConfig(mode=mode), tmp_path, weight_decay=0.5, steps=5)
    masks = trainer.bitfit_state.masks
    assert sum(int(m.sum()) for m in masks.values()) == n_bias
    assert trainer.bitfit_state.term_counts[mode] == n_bias
    head = set(head_parameter_names(model))
    moved = 0
    for n, p in model.named_parameters():
        if n in masks:
            assert torch.equal(p[~masks[n]], before[n][~masks[n]]), n  # bit-exact, despite decay
            moved += int((p[masks[n]] != before[n][masks[n]]).sum())
        elif n not in head:
            assert torch.equal(p, before[n]), n
    assert moved > 0.9 * n_bias  # the drawn entries do train (a few get zero gradient)
    # No bias is among the candidates.
    bias_names = {n for n in before if n.endswith(".bias")}
    assert not set(masks) & bias_names


def test_random_masks_seeded_and_row_col_shape():
    model = tiny_model("bert")
    a = random_masks(model, 500, row_col=False, seed=1)
    b = random_masks(model, 500, row_col=False, seed=1)
    c = random_masks(model, 500, row_col=False, seed=2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    rc = random_masks(model, 500, row_col=True, seed=1)
    assert sum(int(m.sum()) for m in rc.values()) == 500
    # All but at most one drawn line are complete rows or columns.
    partial = 0
    for m in rc.values():
        if m.dim() != 2 or not m.any():
            continue
        full_rows = m.all(dim=1)
        full_cols = m.all(dim=0)
        covered = full_rows[:, None] | full_cols[None, :]
        rest = m & ~covered
        partial += int(rest.any(dim=1).sum() > 0 and rest.any(dim=0).sum() > 0)
        assert int(rest.sum()) < max(m.shape)
    assert partial <= 1
    with pytest.raises(ValueError, match=r"cannot draw"):
        random_masks(model, 10**9, row_col=False, seed=0)


def test_optim_flag_is_kept_and_optimizer_holds_trainable_only(tmp_path):
    model = tiny_model("bert")
    trainer = train(model, BitFitConfig(bias_terms=["qm2"]), tmp_path, optim="sgd", steps=1)
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, torch.optim.SGD)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == trainer.bitfit_state.n_trainable
    assert n_opt == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_head_learning_rate_groups(tmp_path):
    model = tiny_model("bert")
    trainer = train(model, BitFitConfig(head_learning_rate=5e-3), tmp_path, steps=1,
                    learning_rate=1e-3, lr_scheduler_type="constant")
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    head_ids = {id(model.classifier.weight), id(model.classifier.bias)}
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= head_ids or not ids & head_ids
        assert g["lr"] == (5e-3 if ids & head_ids else 1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainer.bitfit_state.trainable)


def test_trainable_log_line(tmp_path, caplog):
    model = tiny_model("bert")
    with caplog.at_level(logging.INFO, logger="bitfit_tasks"):
        state = prepare_model(model, BitFitConfig(bias_terms=["qm2"]))
        logging.getLogger("bitfit_tasks").info(state.summary())
    total = sum(p.numel() for p in model.parameters())
    n = 2 * (16 + 32) + 16 * 2 + 2
    assert state.n_trainable == n
    assert f"trainable params: {n:,d} || all params: {total:,d} || trainable%: " \
           f"{100 * n / total:.4f}" in caplog.text
    assert re.search(r"^\s+q: 32 \(", caplog.text, re.M)
    assert re.search(r"^\s+m2: 64 \(", caplog.text, re.M)
    assert re.search(r"^\s+head: 34 \(", caplog.text, re.M)


def test_model_init_models_are_bitfit_too(tmp_path):
    """Trainer(model_init=...) builds a fresh model at train(): it must be frozen and selected too,
    and the delta saved afterwards must be the trained model."""
    from transformers import TrainerCallback

    from bitfit_tasks import apply_delta

    seen = []

    class Count(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen.append(sum(p.numel() for p in model.parameters() if p.requires_grad))

    targs = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                              learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                              use_cpu=True, seed=0)
    trainer = BitFitTrainer(model_init=lambda: tiny_model("bert", seed=0), args=targs, train_dataset=RandomPairs(),
                            eval_dataset=RandomPairs(n=16, seed=1), bitfit_config=BitFitConfig(), callbacks=[Count()])
    want = trainer.bitfit_state.n_trainable
    trainer.train()
    assert seen == [want]
    base = snapshot(tiny_model("bert", seed=0))
    after = snapshot(trainer.model)
    selected = {n for ns in select_bias_parameters(trainer.model, ["bitfit"]).values() for n in ns}
    changed = {n for n in base if not torch.equal(base[n], after[n])}
    assert changed == selected | set(head_parameter_names(trainer.model))
    metrics = trainer.evaluate()
    trainer.save_model(str(tmp_path / "delta"))
    fresh = tiny_model("bert", seed=0)
    apply_delta(fresh, str(tmp_path / "delta"))
    trainer.model = fresh
    assert trainer.evaluate()["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-7)


def test_hyperparameter_search_every_trial_is_bias_only(tmp_path):
    """hyperparameter_search (optuna) builds a model per trial through model_init: each trial must be
    BitFit, with the trainable count printed per trial, and only biases + head may move."""
    pytest.importorskip("optuna", reason="the search extra: pip install 'bitfit-tasks[search]'")
    from transformers import TrainerCallback

    base = snapshot(tiny_model("bert", seed=0))
    selected = {n for ns in select_bias_parameters(tiny_model("bert"), ["bitfit"]).values() for n in ns}
    allowed = selected | set(head_parameter_names(tiny_model("bert")))
    trials = []

    class Check(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            trials.append({"lr": args.learning_rate,
                           "trainable": {n for n, p in model.named_parameters() if p.requires_grad}})

        def on_train_end(self, args, state, control, model=None, **kw):
            after = snapshot(model)
            trials[-1]["changed"] = {n for n in base if not torch.equal(base[n], after[n])}

    targs = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                              report_to=[], save_strategy="no", logging_strategy="no", eval_strategy="no",
                              use_cpu=True, seed=0, disable_tqdm=True)
    trainer = BitFitTrainer(model_init=lambda: tiny_model("bert", seed=0), args=targs, train_dataset=RandomPairs(),
                            eval_dataset=RandomPairs(n=16, seed=1), bitfit_config=BitFitConfig(), callbacks=[Check()])
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True)},
        backend="optuna", n_trials=2, direction="minimize")
    assert len(trials) == 2 and trials[0]["lr"] != trials[1]["lr"]
    for t in trials:
        assert t["trainable"] == allowed
        assert t["changed"] == allowed
    assert best.run_id is not None


def test_accepts_loss_kwargs_for_task_heads_and_declared_models(tmp_path):
    """Trainer reads ``model.accepts_loss_kwargs`` to decide whether the model's loss is already a
    sum over the global item count; encoder task heads compute per-process means."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bitfit_tasks.training.trainer import loss_takes_num_items

    cls_model = tiny_model("bert")
    assert loss_takes_num_items(cls_model) is False  # takes **kwargs, but its loss is a mean
    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert loss_takes_num_items(lm) is True  # loss_function sums and divides by num_items_in_batch
    lm.accepts_loss_kwargs = False  # a model's own declaration wins
    assert loss_takes_num_items(lm) is False
    trainer = train(tiny_model("bert"), BitFitConfig(), tmp_path, steps=1)
    assert trainer.model_accepts_loss_kwargs is False


def test_trainer_leaves_the_callers_arguments_alone(tmp_path):
    from bitfit_tasks.training.trainer import BitFitTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    assert args.ddp_find_unused_parameters is None
    trainer = BitFitTrainer(tiny_model("bert"), args, train_dataset=RandomPairs(), bitfit_config=BitFitConfig())
    assert trainer.args is not args and trainer.args.ddp_find_unused_parameters is False
    assert args.ddp_find_unused_parameters is None  # unchanged: reusable for another Trainer


@pytest.mark.parametrize("setting, message", [
    ({"n_gpu": 2}, r"2 GPUs are visible to one process, where Trainer would use nn\.DataParallel.*accelerate launch "
                   r"--multi_gpu --num_processes 2"),
    ({"fsdp": "full_shard"}, r"FSDP shards parameters; BitFitTrainer's bias-only checkpoints .* Train with DDP"),
    ({"deepspeed": "ds.json"}, r"DeepSpeed is not supported by BitFitTrainer"),
])
def test_unsupported_parallel_layouts_are_refused_before_training(setting, message, tmp_path):
    from types import SimpleNamespace

    from bitfit_tasks.training.trainer import refuse_unsupported_parallelism

    with pytest.raises(ValueError, match=message):
        refuse_unsupported_parallelism(SimpleNamespace(**{"n_gpu": 1, "fsdp": None, "deepspeed": None, **setting}))


def test_several_gpus_in_one_process_are_refused_by_the_trainer(tmp_path):
    from unittest import mock

    from bitfit_tasks.training.trainer import BitFitTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    with mock.patch.object(TrainingArguments, "n_gpu", new_callable=mock.PropertyMock, return_value=4):
        with pytest.raises(ValueError, match=r"4 GPUs are visible to one process"):
            BitFitTrainer(tiny_model("bert"), args, train_dataset=RandomPairs(), bitfit_config=BitFitConfig())
    with mock.patch.dict("os.environ", {"ACCELERATE_USE_FSDP": "true"}):
        with pytest.raises(ValueError, match=r"FSDP shards parameters"):
            BitFitTrainer(tiny_model("bert"), args, train_dataset=RandomPairs(), bitfit_config=BitFitConfig())



def test_step_timer_times_each_optimizer_step_over_all_its_micro_batches(tmp_path):
    """Under gradient accumulation one timed step is one optimizer step: every micro-batch's forward (here each
    sleeps 50 ms) falls inside it, and there are as many timings as optimizer steps."""
    import time

    from bitfit_tasks.tasks.callbacks import StepTimer

    model = tiny_model("bert")
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.05))
    timer = StepTimer()
    targs = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                              gradient_accumulation_steps=3, report_to=[], save_strategy="no",
                              logging_strategy="no", use_cpu=True, seed=0)
    # 48 rows = 12 micro-batches of 4 = 4 steps of 3 (Trainer closes a short step at an epoch's end).
    trainer = BitFitTrainer(model=model, args=targs, train_dataset=RandomPairs(n=48), bitfit_config=BitFitConfig(),
                            callbacks=[timer])
    trainer.train()
    assert trainer.state.global_step == 4
    assert timer.record()["timed_steps"] == 4
    assert min(timer.seconds) >= 3 * 0.05  # the three micro-batches of each step, not one
