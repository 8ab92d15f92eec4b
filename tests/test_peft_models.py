"""A PEFT-wrapped model: full mode trains it exactly as Trainer does (its adapters, as PEFT marked
them); the bias-only modes refuse it in one line, before anything is built."""

from __future__ import annotations

import pytest
from conftest import tiny_model
from test_trainer_parity import Pairs, assert_same, params, targs
from transformers import Trainer

from bitfit_tasks import BitFitConfig, BitFitTrainer, prepare_model

peft = pytest.importorskip("peft", reason="the bench extra: pip install 'bitfit-tasks[bench]'")


def lora_bert():
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
    return peft.get_peft_model(tiny_model("bert"), config)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_full_mode_trains_a_peft_model_as_trainer_does(tmp_path):
    """Before: full mode set requires_grad on every parameter (the LoRA-wrapped tiny BERT went from its
    adapters + classifier to every weight)."""
    runs = {}
    for name, cls, kw in [("trainer", Trainer, {}), ("full", BitFitTrainer, {"bitfit_config": BitFitConfig(mode="full")})]:
        model = lora_bert()
        want = model.get_nb_trainable_parameters()[0]
        trainer = cls(model=model, args=targs(tmp_path / name), train_dataset=Pairs(), **kw)
        assert trainable(trainer.model) == want < sum(p.numel() for p in model.parameters())
        trainer.train()
        runs[name] = params(trainer.model)
        if name == "full":
            assert trainer.bitfit_state.n_trainable == want
    assert_same(runs["trainer"], runs["full"])


@pytest.mark.parametrize("mode", ["bitfit", "frozen", "rand_uniform"])
def test_bias_only_modes_refuse_a_peft_model(mode, tmp_path):
    model = lora_bert()
    with pytest.raises(ValueError, match=rf"mode '{mode}' does not take a PEFT model "
                                         r"\(PeftModelForSequenceClassification\): BitFit selects and saves biases of "
                                         r"the plain base model.*Pass the base model unwrapped.*mode 'full'"):
        BitFitTrainer(model=model, args=targs(tmp_path), bitfit_config=BitFitConfig(mode=mode))
    # Adapters injected into a plain model (no PeftModel wrapper) are PEFT too.
    injected = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["query"]), tiny_model("bert"))
    with pytest.raises(ValueError, match=r"does not take a PEFT model \(BertForSequenceClassification\)"):
        prepare_model(injected, BitFitConfig(mode=mode))
    assert any(p.requires_grad for p in lora_bert().parameters())  # nothing frozen before the refusal
    plain = tiny_model("bert")
    assert prepare_model(plain, BitFitConfig(mode=mode)).n_trainable > 0


def test_peft_model_loss_reading_looks_through_the_wrapper(tmp_path):
    """Trainer reads the wrapped model's forward; so does the loss-normalisation reading. A generic
    PeftModel (no task_type) around a classification head is still a per-batch-mean loss (before:
    read as True from PeftModel.forward's **kwargs)."""
    from bitfit_tasks.training.trainer import loss_takes_num_items

    generic = peft.get_peft_model(tiny_model("bert"), peft.LoraConfig(r=2, target_modules=["query"]))
    assert type(generic).__name__ == "PeftModel"
    assert loss_takes_num_items(generic) is loss_takes_num_items(lora_bert()) is False
