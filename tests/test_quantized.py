"""BitFit on a quantized base (bitsandbytes 4-bit NF4/FP4 and 8-bit), the QLoRA way of loading a large model.

The packed weights never change; the biases (added ones in the layer's compute dtype) and the head train; the
delta records the quantization, re-applies exactly onto a fresh quantized load, loads onto the full-precision
base, and refuses another base. Tiny Llama classifiers, hidden size 64 (bitsandbytes' CPU kernels work on
blocks of 32 rows)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers as T
from conftest import run_concurrently

from bitfit_tasks import BitFitConfig, BitFitTrainer, MultiTaskBitFit, apply_delta, load_task_model, prepare_model
from bitfit_tasks.core.quantized import (
    canonical_packed,
    is_packed,
    keep_trainable_layout,
    logical_numel,
    quantization_record,
)
from bitfit_tasks.core.signature import base_signature, signature_mismatch
from bitfit_tasks.utils.errors import UsageError

pytest.importorskip("bitsandbytes", reason="quantized bases need bitsandbytes (the `quant` extra)")

STEPS = 8


def llama_config(**extra) -> T.LlamaConfig:
    return T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0,
                         attention_dropout=0.0, **extra)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama-64")
    T.LlamaForSequenceClassification(llama_config()).save_pretrained(out)
    return str(out)


QUANT = {
    "nf4": lambda: T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=torch.float32),
    "fp4-nested": lambda: T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
    "int8": lambda: T.BitsAndBytesConfig(load_in_8bit=True),
}


def load(base_dir: str, quant: str | None):
    kwargs = {"quantization_config": QUANT[quant]()} if quant else {}
    return T.LlamaForSequenceClassification.from_pretrained(base_dir, **kwargs)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, 128, (n, 10), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def args(tmp_path, **extra) -> T.TrainingArguments:
    base = dict(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-2,
                use_cpu=True, save_strategy="no", report_to=[], seed=0, disable_tqdm=True, dataloader_pin_memory=False)
    return T.TrainingArguments(**{**base, **extra})


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=Rows().ids[:6]).logits.float()


@pytest.mark.parametrize("quant", sorted(QUANT))
def test_quantized_base_trains_bias_only_and_the_delta_travels(quant, base_dir, tmp_path):
    model = load(base_dir, quant)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if is_packed(p)}
    assert len(packed) == 14  # 7 Linear layers x 2 layers, packed; embeddings, norms and the head are not
    # Evaluations between steps: on a CPU with AVX512-BF16 bitsandbytes would repack 4-bit weights at the first
    # one and fail (or pass no gradient) at the next training step; BitFit keeps the layout of the load.
    trainer = BitFitTrainer(model=model, args=args(tmp_path, eval_strategy="steps", eval_steps=3),
                            train_dataset=Rows(), eval_dataset=Rows(8), bitfit_config=BitFitConfig())
    state = trainer.bitfit_state
    # Added biases in the compute dtype, not the packed storage dtype; counts are of the logical matrices.
    assert len(state.added) == 14
    assert {model.get_parameter(n).dtype for n in state.added} == {torch.float32}
    assert state.n_total == sum(logical_numel(p) for p in model.parameters())
    assert state.n_total == sum(p.numel() for p in load(base_dir, None).parameters()) + sum(state.added.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    for n, p in model.named_parameters():
        if n in packed:
            assert torch.equal(p, packed[n]), f"{n}: a packed weight changed"
            assert not p.requires_grad
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert set(moved) == set(state.trainable), "every trained bias and the head moved, nothing else"
    trainer.save_model(str(tmp_path / "delta"))
    meta = json.loads((tmp_path / "delta" / "bitfit_delta.json").read_text())
    assert meta["quantization"]["bits"] == (8 if quant == "int8" else 4)
    assert meta["quantization"] == quantization_record(model)
    assert f"trained on a quantized base: bitsandbytes {meta['quantization']['bits']}-bit" in (
        tmp_path / "delta" / "README.md").read_text()
    assert not any(n.endswith(".weight") and "score" not in n for n in meta["shapes"]), "only biases and the head"

    # The model card's own loading lines (the recorded quantization spelled out) give the trained model.
    import re

    snippet = re.search(r"```python\n(.*?)```", (tmp_path / "delta" / "README.md").read_text(), re.S).group(1)
    assert "quantization_config=BitsAndBytesConfig(" in snippet
    scope: dict = {}
    exec(snippet, scope)
    assert torch.equal(logits(scope["model"]), logits(model))
    # A fresh quantized load plus the delta is the trained model, bit for bit, run by the same kernels. (On a CPU
    # with AVX512-BF16, bitsandbytes runs an untrained 4-bit model's evaluation with its repacked kernel, whose
    # scales are rounded to bf16: close, not equal. BitFit keeps a trained model on the load's layout.)
    trained = logits(model)
    again = load_task_model(base_dir, str(tmp_path / "delta"), quantization_config=QUANT[quant]())
    assert (logits(again) - trained).abs().max() < 1e-3
    again = load_task_model(base_dir, str(tmp_path / "delta"), quantization_config=QUANT[quant]())
    keep_trainable_layout(again)
    assert torch.equal(logits(again), trained)
    # The full-precision base takes the delta too (values differ by the quantization error only).
    full = load_task_model(base_dir, str(tmp_path / "delta"))
    assert not any(is_packed(p) for p in full.parameters())
    assert (logits(full) - trained).abs().max() < 0.05
    # Another base is refused, in one line that says how the delta's base was loaded.
    torch.manual_seed(7)
    other = T.LlamaForSequenceClassification(llama_config())
    with pytest.raises(UsageError, match=r"trained on a different base model .* It was trained on a bitsandbytes"):
        apply_delta(other, str(tmp_path / "delta"))


def test_other_quantization_of_the_same_base_is_told_apart(base_dir, tmp_path):
    """Same checkpoint, other 4-bit type: the codes differ, and the refusal names both quantizations. A
    full-precision load of it compares by the tensors both hold in floating point (and names and shapes)."""
    model = load(base_dir, "nf4")
    trainer = BitFitTrainer(model=model, args=args(tmp_path), train_dataset=Rows(), bitfit_config=BitFitConfig())
    trainer.save_model(str(tmp_path / "delta"))
    other = load(base_dir, "fp4-nested")
    with pytest.raises(UsageError, match=r"trained on another quantized load of its base \(.*stored bnb-fp4, recorded "
                                         r"bnb-nf4.*4-bit nf4 .*this one is bitsandbytes 4-bit fp4.*quantization_config="
                                         r"BitsAndBytesConfig\(load_in_4bit=True, bnb_4bit_quant_type='nf4'"):
        apply_delta(other, str(tmp_path / "delta"))
    recorded = base_signature(load(base_dir, "nf4"))
    assert signature_mismatch(recorded, base_signature(load(base_dir, "nf4"))) is None
    assert signature_mismatch(recorded, base_signature(load(base_dir, None))) is None


def test_signature_survives_bitsandbytes_cpu_repacking(base_dir):
    """On a CPU with AVX512-BF16, bitsandbytes re-lays a 4-bit weight out at its first inference in eval mode
    (codes permuted, scales rounded to bf16): the signature reads one layout, so it stays the same."""
    model = load(base_dir, "fp4-nested")
    weight = model.model.layers[0].self_attn.q_proj.weight
    first, sig = [t.clone() for t in canonical_packed(weight)], base_signature(model)
    logits(model)  # may repack, depending on the CPU
    assert all(torch.equal(a, b) for a, b in zip(first, canonical_packed(weight), strict=True))
    assert signature_mismatch(sig, base_signature(model)) is None


@pytest.mark.parametrize("mode, match", [
    ("full", "purely quantized"),  # Trainer's own refusal stands: full fine-tuning cannot train packed weights
    ("rand_uniform", "cannot be trained entry by entry"),
])
def test_modes_that_train_weights_are_refused_on_a_quantized_base(mode, match, base_dir, tmp_path):
    with pytest.raises((UsageError, ValueError), match=match):
        BitFitTrainer(model=load(base_dir, "nf4"), args=args(tmp_path), train_dataset=Rows(),
                      bitfit_config=BitFitConfig(mode=mode))


def test_lean_mode_is_refused_on_a_quantized_base(base_dir):
    with pytest.raises(UsageError, match="lean mode stores the frozen weights in bf16, and this base is quantized"):
        prepare_model(load(base_dir, "int8"), BitFitConfig(lean=True))


def test_frozen_mode_and_serving_on_a_quantized_base(base_dir, tmp_path):
    """Head-only training passes Trainer's check too; two deltas on one 4-bit base serve a mixed batch."""
    trainer = BitFitTrainer(model=load(base_dir, "nf4"), args=args(tmp_path), train_dataset=Rows(),
                            bitfit_config=BitFitConfig(mode="frozen"))
    trainer.train()
    trainer.save_model(str(tmp_path / "frozen"))
    trainer = BitFitTrainer(model=load(base_dir, "nf4"), args=args(tmp_path), train_dataset=Rows(),
                            bitfit_config=BitFitConfig())
    trainer.train()
    trainer.save_model(str(tmp_path / "bitfit"))
    server = MultiTaskBitFit(load(base_dir, "nf4"))
    server.add_task("a", str(tmp_path / "frozen"))
    server.add_task("b", str(tmp_path / "bitfit"))
    ids = Rows().ids[:4]
    mixed = torch.stack([r["logits"] for r in server.forward_mixed(["a", "b", "a", "b"], input_ids=ids)])
    for task, rows in (("a", [0, 2]), ("b", [1, 3])):
        alone = load_task_model(base_dir, str(tmp_path / ("frozen" if task == "a" else "bitfit")),
                                quantization_config=QUANT["nf4"]()).eval()
        with torch.no_grad():
            torch.testing.assert_close(mixed[rows], alone(input_ids=ids[rows]).logits, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(server(task, input_ids=ids[rows]).logits, mixed[rows], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def runner_model_dir(tmp_path_factory) -> str:
    """A saved Llama backbone (hidden 64) with a WordPiece tokenizer over the GLUE fixtures' words."""
    import re
    from pathlib import Path

    words = set()
    for path in Path(__file__).parent.glob("fixtures/glue/**/*.jsonl"):
        for line in path.read_text().splitlines():
            for v in json.loads(line).values():
                if isinstance(v, str):
                    words.update(re.findall(r"\w+|[^\w\s]", v.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *sorted(words)]
    out = tmp_path_factory.mktemp("tiny-llama-runner")
    T.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(out)
    torch.manual_seed(0)
    T.LlamaModel(T.LlamaConfig(**{**llama_config().to_dict(), "vocab_size": len(vocab)})).save_pretrained(out)
    return str(out)


def test_run_glue_load_in_4bit_end_to_end(runner_model_dir, tmp_path):
    """The README's command with --load_in_4bit true: trains, saves a delta that records the quantization, and
    results.json says how the base was loaded."""
    out = tmp_path / "run"
    cmd = [sys.executable, "run_glue.py", "--model_name_or_path", runner_model_dir, "--task_name", "rte",
           "--train_file", "tests/fixtures/glue/rte/train.jsonl",
           "--validation_file", "tests/fixtures/glue/rte/validation.jsonl",
           "--load_in_4bit", "true", "--bnb_4bit_quant_type", "fp4", "--output_dir", str(out),
           "--num_train_epochs", "1", "--use_cpu", "true", "--learning_rate", "1e-3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["quantization"] == {"method": "bitsandbytes", "bits": 4, "quant_type": "fp4",
                                       "compute_dtype": "float32", "double_quant": False, "packed_tensors": 14}
    meta = json.loads((out / "bitfit_delta.json").read_text())
    assert meta["quantization"] == results["quantization"]
    assert results["bitfit_config"]["mode"] == "bitfit"


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    """(The other refusals of the quantization flags are cases of tests/test_bad_input.py.)"""
    import importlib.util

    from bitfit_tasks.core.config import BitFitConfig as Config
    from bitfit_tasks.tasks.arguments import ModelArguments, model_load_kwargs

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UsageError, match=r"--load_in_8bit needs bitsandbytes, which is not installed; pip install "
                                         r"'bitfit-tasks\[quant\]'"):
        model_load_kwargs(ModelArguments(model_name_or_path="x", load_in_8bit=True), Config(),
                          T.TrainingArguments(output_dir="unused", use_cpu=True))


def test_a_quantized_task_head_is_refused_and_skipping_it_trains(tmp_path):
    """transformers leaves only the last parameter's module and the output embeddings unquantized: BERT's last
    parameter is classifier.bias, so its new classifier becomes a 4-bit layer with a random fp32 weight. BitFit
    says so in one line, with the fix; the fix trains."""
    torch.manual_seed(0)
    T.BertForSequenceClassification(T.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=128)).bert.save_pretrained(
        tmp_path / "bert")
    quant = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = T.BertForSequenceClassification.from_pretrained(tmp_path / "bert", quantization_config=quant)
    with pytest.raises(UsageError, match=r"the task head \['classifier'\] was quantized .*llm_int8_skip_modules="
                                         r"\['classifier'\]"):
        BitFitTrainer(model=model, args=args(tmp_path), train_dataset=Rows(), bitfit_config=BitFitConfig())
    quant = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                 llm_int8_skip_modules=["classifier"])
    model = T.BertForSequenceClassification.from_pretrained(tmp_path / "bert", quantization_config=quant)
    trainer = BitFitTrainer(model=model, args=args(tmp_path), train_dataset=Rows(), bitfit_config=BitFitConfig())
    trainer.train()
    assert model.bert.pooler.dense.weight.dtype == torch.uint8  # the pretrained pooler stays quantized


def test_added_biases_equal_beft_on_the_same_4bit_base():
    """benchmarks/beft_4bit.py at a tiny size: BitFit's added q/k/v/o biases and PEFT's BEFT on the same targets of
    one 4-bit base give the same losses for 20 AdamW steps, and the same final biases."""
    pytest.importorskip("peft")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("beft_4bit", Path(__file__).parents[1] / "benchmarks/beft_4bit.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    record = bench.compare(steps=20)
    assert record["biases"]["bitfit"] == record["biases"]["beft"] and len(record["biases"]["beft"]) == 8
    assert record["trainable"]["bitfit"] == record["trainable"]["beft"]
    losses = record["losses"]
    assert losses["bitfit"][-1] < 0.8 * losses["bitfit"][0], "the runs did not train: equal losses prove nothing"
    torch.testing.assert_close(torch.tensor(losses["bitfit"]), torch.tensor(losses["beft"]), rtol=1e-5, atol=1e-6)
    assert record["smallest_max_abs_bias"] > 1e-3 and record["max_abs_final_bias_diff"] < 1e-5


@pytest.mark.slow
def test_pos_and_squad_runners_on_quantized_bases(tiny_bias_free_dirs, tmp_path):
    """The other two runners take the same flags: POS tagging on an 8-bit base, SQuAD on a 4-bit one."""
    from pathlib import Path

    fixtures = Path(__file__).parent / "fixtures"
    common = ["--model_name_or_path", tiny_bias_free_dirs["llama"], "--num_train_epochs", "1", "--use_cpu", "true",
              "--disable_tqdm", "true"]
    runs = {
        "pos": (["run_pos.py", "--treebank", str(fixtures / "pos" / "treebank"), "--unknown_tags", "count_wrong",
                 "--load_in_8bit", "true"], 8),
        "squad": (["run_squad.py", "--train_file", str(fixtures / "squad" / "official.json"), "--validation_file",
                   str(fixtures / "squad" / "official.json"), "--max_seq_length", "128", "--doc_stride", "32",
                   "--load_in_4bit", "true", "--use_bnb_nested_quant", "true"], 4),
    }
    run_concurrently([[*cmd, *common, "--output_dir", str(tmp_path / name)] for name, (cmd, _) in runs.items()],
                     Path(__file__).parents[1])
    for name, (_, bits) in runs.items():
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["quantization"]["bits"] == bits and results["quantization"]["packed_tensors"] == 14
        assert results["quantization"].get("double_quant", False) is (name == "squad")
        meta = json.loads((tmp_path / name / "bitfit_delta.json").read_text())
        assert meta["quantization"] == results["quantization"]


def test_bf16_compute_keeps_fp32_biases_that_learn_and_reload_exactly(base_dir, tmp_path):
    """bitsandbytes casts a layer's bias to its compute dtype in place at every forward; a bf16 bias under AdamW
    loses updates below half a bf16 step. BitFit keeps the biases of quantized layers in fp32 and adds them after
    the layer's product: with bf16 compute and a small learning rate every bias still moves, and base + delta is
    the trained model."""
    quant = lambda: T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)  # noqa: E731
    model = T.LlamaForSequenceClassification.from_pretrained(base_dir, quantization_config=quant())
    trainer = BitFitTrainer(model=model, args=args(tmp_path, learning_rate=1e-4), train_dataset=Rows(),
                            bitfit_config=BitFitConfig(bias_terms=["q", "v"], train_head=False))
    before = {n: model.get_parameter(n).detach().clone() for n in trainer.bitfit_state.trainable}
    trainer.train()
    for n, b in before.items():
        p = model.get_parameter(n)
        assert p.dtype == torch.float32, f"{n} is {p.dtype}"
        assert (p != b).float().mean() > 0.9, f"{n}: most entries should move at lr 1e-4"
    trainer.save_model(str(tmp_path / "delta"))
    again = load_task_model(base_dir, str(tmp_path / "delta"), quantization_config=quant())
    assert torch.equal(logits(again), logits(model))


def test_a_bf16_checkpoint_with_its_own_biases_reloads_exactly(tmp_path):
    """A Qwen2 checkpoint (q/k/v biases of its own) saved in bf16, loaded in 4-bit with fp32 compute: its biases
    train in fp32, and a fresh 4-bit load plus the delta is the trained model, bit for bit."""
    torch.manual_seed(0)
    cfg = T.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0)
    T.Qwen2ForSequenceClassification(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "qwen")
    quant = lambda: T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)  # noqa: E731
    load = lambda: T.Qwen2ForSequenceClassification.from_pretrained(  # noqa: E731
        tmp_path / "qwen", quantization_config=quant(), dtype=torch.bfloat16)
    model = load()
    assert model.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    trainer = BitFitTrainer(model=model, args=args(tmp_path), train_dataset=Rows(), bitfit_config=BitFitConfig())
    assert trainer.bitfit_state.added == {}  # Qwen2's q/k/v biases are its own
    trainer.train()
    trainer.save_model(str(tmp_path / "delta"))
    assert model.model.layers[0].self_attn.q_proj.bias.dtype == torch.float32
    again = load_task_model(str(tmp_path / "qwen"), str(tmp_path / "delta"), quantization_config=quant(),
                            dtype=torch.bfloat16)
    assert torch.equal(logits(again), logits(model))


def test_trainers_quantized_check_is_passed_for_that_model_only(base_dir, tmp_path):
    """Nothing global changes: after BitFitTrainer is built, the model no longer carries transformers' adapters
    flag, and a plain Trainer still refuses the same quantized model."""
    model = load(base_dir, "nf4")
    BitFitTrainer(model=model, args=args(tmp_path), train_dataset=Rows(), bitfit_config=BitFitConfig())
    assert not getattr(model, "_hf_peft_config_loaded", False)
    with pytest.raises(ValueError, match="purely quantized"):
        T.Trainer(model=model, args=args(tmp_path), train_dataset=Rows())
    # model_init: the model Trainer builds inside its constructor passes too.
    trainer = BitFitTrainer(model_init=lambda: load(base_dir, "int8"), args=args(tmp_path), train_dataset=Rows(),
                            bitfit_config=BitFitConfig())
    assert not getattr(trainer.model, "_hf_peft_config_loaded", False)
    trainer.train()
