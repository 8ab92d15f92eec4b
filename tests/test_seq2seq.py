"""T5 (bias-free encoder-decoder) and ``Seq2SeqTrainer``: the bias map (self and cross attention, gated MLPs, RMS
norms skipped), bias-only training through ``class X(BitFitTrainer, Seq2SeqTrainer)``, the delta as the trained
model, resume, the merge refused in one line, and examples/seq2seq_qa.py run as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from bitfit_tasks import BitFitConfig, BitFitTrainer, Delta, load_task_model, prepare_model
from bitfit_tasks.core.selection import head_parameter_names, plan_bias_selection
from bitfit_tasks.delta.merge import export_merged
from bitfit_tasks.utils.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


class BitFitSeq2SeqTrainer(BitFitTrainer, T.Seq2SeqTrainer):
    pass


def t5_config(gated: bool = False, vocab: int = 100) -> T.T5Config:
    return T.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


@pytest.mark.parametrize("gated", [False, True])
def test_t5_bias_map_covers_self_and_cross_attention_and_the_mlp(gated):
    model = T.T5ForConditionalGeneration(t5_config(gated))
    plan = plan_bias_selection(model, "bitfit", add_missing=True)
    q = plan.terms["q"]
    assert "encoder.block.1.layer.0.SelfAttention.q.bias" in q
    assert "decoder.block.0.layer.1.EncDecAttention.q.bias" in q  # cross-attention
    assert len(q) == 2 + 2 * 2  # encoder self; decoder self + cross
    m2 = plan.terms["m2"]
    assert len(m2) == (8 if gated else 4)  # wi_0 and wi_1 where the MLP is gated
    assert sorted(plan.terms) == ["k", "m1", "m2", "m3", "q", "v"]  # T5LayerNorm (RMS) takes no bias
    assert not any("relative_attention_bias" in n for names in plan.terms.values() for n in names)
    with pytest.raises(UsageError, match=r"bias term 'LN1' is a norm without a bias \(T5LayerNorm\)"):
        plan_bias_selection(model, ["LN1"], add_missing=True)


def test_t5_question_answering_keeps_its_new_head():
    """T5ForQuestionAnswering is its own backbone (shared, encoder, decoder beside qa_outputs): qa_outputs is the
    task head, trained and stored."""
    model = T.T5ForQuestionAnswering(t5_config())
    assert head_parameter_names(model) == ["qa_outputs.weight", "qa_outputs.bias"]
    state = prepare_model(model, BitFitConfig())
    assert {"qa_outputs.weight", "qa_outputs.bias"} <= set(state.trainable)


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.src = torch.randint(2, 100, (n, 12), generator=g)
        self.tgt = torch.randint(2, 100, (n, 5), generator=g)

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.src[i], "labels": self.tgt[i]}


def seq2seq(tmp_path: Path, out: Path, steps: int) -> BitFitSeq2SeqTrainer:
    model = T.T5ForConditionalGeneration.from_pretrained(tmp_path / "base")
    args = T.Seq2SeqTrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8,
                                      learning_rate=1e-2, use_cpu=True, report_to=[], seed=0, save_steps=2,
                                      disable_tqdm=True, dataloader_pin_memory=False)
    return BitFitSeq2SeqTrainer(model=model, args=args, train_dataset=Pairs(), bitfit_config=BitFitConfig())


@pytest.fixture
def base(tmp_path) -> Path:
    torch.manual_seed(0)
    T.T5ForConditionalGeneration(t5_config(gated=True)).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_seq2seq_trainer_trains_biases_only_resumes_and_its_delta_is_the_model(base, tmp_path):
    whole = seq2seq(tmp_path, tmp_path / "whole", 4)
    frozen = {n: p.detach().clone() for n, p in whole.model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in whole.model.named_parameters() if p.requires_grad}
    whole.train()
    model = whole.model.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)
    assert set(trained) == set(whole.bitfit_state.added)  # bias-free: every trained tensor is an added bias
    whole.save_model(str(tmp_path / "delta"))
    delta = Delta.load(tmp_path / "delta")
    assert delta.meta["task_class"] == "T5ForConditionalGeneration" and delta.meta["head"] == []
    src, tgt = Pairs().src[:3], Pairs().tgt[:3]
    again = load_task_model(str(base), str(tmp_path / "delta")).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=src, labels=tgt).logits, model(input_ids=src, labels=tgt).logits)
        assert torch.equal(again.generate(input_ids=src, max_new_tokens=4), model.generate(input_ids=src,
                                                                                           max_new_tokens=4))
    # Resume from the step-2 checkpoint (a delta) gives the uninterrupted biases.
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    resumed = seq2seq(tmp_path, tmp_path / "cut", 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    b = dict(resumed.model.named_parameters())
    assert all(torch.allclose(p, b[n], atol=1e-6) for n, p in model.named_parameters() if n in trained)
    # No T5 config flag builds these biases: a merged T5 would lose them, so the merge says so.
    with pytest.raises(UsageError, match=r"cannot merge: T5Config cannot express the biases .* it has no flag that "
                                         r"adds biases"):
        export_merged(str(base), str(tmp_path / "delta"), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_seq2seq_qa_example_runs_as_written(tmp_path):
    """examples/seq2seq_qa.py, launched as a user launches it, on the SQuAD fixture and a tiny T5 with a
    word-level tokenizer: it trains, scores generated answers with SQuAD's EM/F1, and saves a delta."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    rows = [json.loads(line) for line in (ROOT / "tests/fixtures/squad/flat.jsonl").read_text().splitlines()]
    words = sorted({w for r in rows for text in (r["question"], r["context"]) for w in text.lower().split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.normalizer = __import__("tokenizers").normalizers.Lowercase()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(tmp_path / "t5")
    torch.manual_seed(0)
    T.T5ForConditionalGeneration(t5_config(vocab=len(vocab))).save_pretrained(tmp_path / "t5")
    squad = str(ROOT / "tests/fixtures/squad/flat.jsonl")
    cmd = [sys.executable, str(ROOT / "examples/seq2seq_qa.py"), "--model_name_or_path", str(tmp_path / "t5"),
           "--train_file", squad, "--validation_file", squad, "--output_dir", str(tmp_path / "out"),
           "--num_train_epochs", "1", "--learning_rate", "1e-2", "--per_device_train_batch_size", "2",
           "--report_to", "none", "--use_cpu", "true", "--save_strategy", "no", "--disable_tqdm", "true"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trainable params: 1,152 ||" in done.stdout
    assert "'eval_exact_match'" in done.stdout and "'eval_n_examples': 5" in done.stdout
    delta = Delta.load(tmp_path / "out")
    assert delta.meta["task_class"] == "T5ForConditionalGeneration"
    assert all(n.endswith(".bias") for n in delta.tensors)
