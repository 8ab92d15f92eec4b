"""A language model's pretrained output head is part of the base: a causal LM (untied Llama, tied Qwen3) trains
and stores its biases only, the delta rebuilds the trained model with load_task_model, and train_lm_head opts in."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import bias_free_config
from transformers import TrainingArguments

from bitfit_tasks import BitFitConfig, BitFitTrainer, Delta, load_task_model, prepare_model
from bitfit_tasks.utils.errors import UsageError


class Text(torch.utils.data.Dataset):
    """Random token sequences for next-token prediction (labels = inputs, as the causal-LM collators give)."""

    def __init__(self, n: int = 16, vocab: int = 100) -> None:
        self.x = torch.randint(3, vocab, (n, 10), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def train_causal_lm(tmp_path, cfg, **bitfit):
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), learning_rate=1e-2, num_train_epochs=1,
                             per_device_train_batch_size=8, report_to="none", disable_tqdm=True, save_strategy="no",
                             use_cpu=True)
    trainer = BitFitTrainer(model=model, args=args, train_dataset=Text(), bitfit_config=BitFitConfig(**bitfit))
    trainer.train()
    trainer.save_model(str(tmp_path / "delta"))
    return model.eval(), before


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen3", True)])
def test_a_causal_lm_delta_holds_biases_only_and_rebuilds_the_trained_model(arch, tied, tmp_path):
    cfg = bias_free_config(arch, tie_word_embeddings=tied)
    model, before = train_causal_lm(tmp_path, cfg)
    delta = Delta.load(tmp_path / "delta")
    assert delta.tensors and all(n.endswith(".bias") for n in delta.tensors), sorted(delta.tensors)[:5]
    assert not any("lm_head" in n or "embed" in n for n in delta.tensors) and delta.meta["head"] == []
    # Only biases changed in training: the pretrained head and embeddings are as loaded.
    now = dict(model.named_parameters())
    for name, value in before.items():
        assert torch.equal(now[name], value), name
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    rebuilt = load_task_model(str(tmp_path / "base"), str(tmp_path / "delta")).eval()
    assert type(rebuilt).__name__ == type(model).__name__
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)


def test_train_lm_head_trains_and_stores_the_untied_head(tmp_path):
    cfg = bias_free_config("llama", tie_word_embeddings=False)
    model, before = train_causal_lm(tmp_path, cfg, train_lm_head=True)
    delta = Delta.load(tmp_path / "delta")
    assert delta.meta["head"] == ["lm_head.weight"] and "lm_head.weight" in delta.tensors
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    rebuilt = load_task_model(str(tmp_path / "base"), str(tmp_path / "delta")).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)


def test_train_lm_head_without_one_is_one_line():
    model = T.AutoModelForCausalLM.from_config(bias_free_config("qwen3", tie_word_embeddings=True))
    with pytest.raises(UsageError, match=r"train_lm_head: Qwen3ForCausalLM has no pretrained output head outside its "
                                         r"backbone .*; drop --train_lm_head"):
        prepare_model(model, BitFitConfig(train_lm_head=True))


def test_a_llama_3_8b_causal_lm_trains_at_most_0_05_percent():
    """At the Llama-3-8B shape (meta device: no memory), BitFit's added biases are the whole delta."""
    cfg = T.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    state = prepare_model(model, BitFitConfig())
    share = state.n_trainable / state.n_total
    print(f"Llama-3-8B shape: {state.n_trainable:,d} of {state.n_total:,d} trainable ({100 * share:.4f}%)")
    assert state.head_all == [] and all(n.endswith(".bias") for n in state.trainable)
    assert state.n_total > 8_000_000_000 and share <= 0.0005
