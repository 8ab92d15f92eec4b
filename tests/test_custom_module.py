"""BitFit on a plain ``nn.Module`` (no transformers class): its deltas resume, apply onto the model the
user builds, and say how to load them."""

from __future__ import annotations

import json

import pytest
import torch
from test_trainer_parity import Pairs, assert_same, params, targs
from torch import nn

from bitfit_tasks import BitFitConfig, BitFitTrainer, Delta, apply_delta, load_task_model


class DummyModel(nn.Module):
    """A user's own classifier with biases: every bias is its backbone's (no base_model), no head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(100, 8)
        self.hidden = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.out(torch.tanh(self.hidden(self.emb(input_ids).mean(1))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def run(out, **kw):
    trainer = BitFitTrainer(model=DummyModel(), args=targs(out, save_strategy="steps", save_steps=2, **kw),
                            train_dataset=Pairs(), eval_dataset=Pairs(n=12, seed=1), bitfit_config=BitFitConfig())
    return trainer


def test_a_plain_module_resumes_from_its_own_delta(tmp_path):
    """Before: the checkpoint's JSON named task_class 'DummyModel' and resuming was refused with "the JSON
    was edited or damaged: save the delta again"."""
    whole = run(tmp_path / "whole")
    whole.train()
    ckpt = tmp_path / "whole" / "checkpoint-2"
    meta = json.loads((ckpt / "bitfit_delta.json").read_text())
    assert meta["task_class"] == "DummyModel" and sorted(meta["shapes"]) == ["hidden.bias", "out.bias"]
    resumed = run(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert_same(params(whole.model), params(resumed.model))
    moved = {n for n, p in params(DummyModel()).items() if not torch.equal(p, params(whole.model)[n])}
    assert moved == {"hidden.bias", "out.bias"}


def test_a_plain_module_delta_applies_onto_the_users_model_and_says_how(tmp_path):
    trainer = run(tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "delta"))
    model = DummyModel()
    apply_delta(model, tmp_path / "delta")
    assert_same(params(model), params(trainer.model))
    assert Delta.load(tmp_path / "delta").meta["task_class"] == "DummyModel"
    card = (tmp_path / "delta" / "README.md").read_text()
    assert "model = DummyModel(...)" in card and "apply_delta(model, " in card and "load_task_model" not in card
    with pytest.raises(ValueError, match=r"delta: task_class 'DummyModel' is not a transformers model class \(e\.g\. "
                                         r"BertForSequenceClassification\).* A delta of your own module applies onto "
                                         r"that module: build it, then apply_delta\(model, '.*delta'\)"):
        load_task_model("unused-base", tmp_path / "delta")


def test_a_plain_module_loads_its_best_checkpoint_at_end(tmp_path):
    trainer = run(tmp_path / "run", max_steps=6, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                  learning_rate=5e-2)
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")  # not the last: loading it shows
    best = Delta.load(trainer.state.best_model_checkpoint)
    live = params(trainer.model)
    assert best.meta["task_class"] == "DummyModel"
    assert_same({n: live[n] for n in best.tensors}, best.tensors)
