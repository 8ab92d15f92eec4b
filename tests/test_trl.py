"""Any Trainer subclass takes BitFit by the mixin pattern, TRL's SFTTrainer first: ``class BitFitSFTTrainer(
BitFitTrainer, SFTTrainer)`` trains the biases only (the pretrained lm_head and embeddings stay), saves a delta that
rebuilds the trained model exactly, and resumes a checkpoint to the same biases as an uninterrupted run."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers as T
from conftest import bias_free_config

from bitfit_tasks import BitFitConfig, BitFitTrainer, Delta, load_task_model

pytest.importorskip("trl", reason="install the trl extra: pip install -e '.[trl]'")
import datasets  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402


class BitFitSFTTrainer(BitFitTrainer, SFTTrainer):
    """The pattern docs/architectures.md shows: BitFitTrainer first, so its hooks wrap TRL's."""


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({**{f"t{i}": i for i in range(100)}, "<unk>": 100}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t2", unk_token="<unk>")


def sft(tmp_path, out, max_steps, **extra):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"input_ids": [torch.randint(3, 100, (10,), generator=g).tolist()
                                                     for _ in range(32)]})
    # bf16=False: SFTConfig's default bf16 autocast would run the trained model's forward in bf16 (the saved
    # biases are the same either way), and not every CPU has native bf16.
    args = SFTConfig(output_dir=str(out), learning_rate=1e-2, max_steps=max_steps, per_device_train_batch_size=8,
                         report_to="none", disable_tqdm=True, use_cpu=True, bf16=False, save_steps=2, seed=0,
                         **extra)
    return BitFitSFTTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer(),
                            bitfit_config=BitFitConfig())


@pytest.fixture
def base(tmp_path):
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(bias_free_config("llama", tie_word_embeddings=False)).save_pretrained(
        tmp_path / "base")
    return tmp_path / "base"


def test_sft_trainer_trains_biases_only_and_its_delta_is_the_trained_model(base, tmp_path):
    trainer = sft(tmp_path, tmp_path / "run", 4)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not n.endswith(".bias")}
    trainer.train()
    trainer.save_model(str(tmp_path / "delta"))
    model = trainer.model.eval()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    delta = Delta.load(tmp_path / "delta")
    assert delta.tensors and all(n.endswith(".bias") for n in delta.tensors) and delta.meta["head"] == []
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = load_task_model(str(base), str(tmp_path / "delta")).eval()(input_ids=ids).logits
    assert torch.equal(got, want)


def test_sft_trainer_resumes_to_the_uninterrupted_biases(base, tmp_path):
    whole = sft(tmp_path, tmp_path / "whole", 4)
    whole.train()
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", cut / "checkpoint-2")
    resumed = sft(tmp_path, cut, 4)
    resumed.train(resume_from_checkpoint=str(cut / "checkpoint-2"))
    a = {n: p for n, p in whole.model.named_parameters() if p.requires_grad}
    b = dict(resumed.model.named_parameters())
    assert a and all(torch.allclose(p, b[n], atol=1e-6) for n, p in a.items())
