"""BitFit on a CUDA GPU: each test trains or applies on the device (marker ``cuda``; skipped without one).

    python -m pytest -m cuda -q                                   # on a machine with a GPU
    BITFIT_CUDA_TESTS_DEVICE=cpu python -m pytest -m cuda -q      # the same logic on the CPU

The second line runs every test on the CPU instead (fp16 autocast left out), so the tests' own logic is
checked where no GPU is at hand; CI runs it that way.
"""

from __future__ import annotations

import json
import os
from unittest import mock

import pytest
import torch
from conftest import FIXTURES, tiny_model
from test_delta import batch
from test_trainer import RandomPairs, snapshot
from transformers import TrainingArguments

from bitfit_tasks import BitFitConfig, BitFitTrainer, MultiTaskBitFit, load_task_model
from bitfit_tasks.core.selection import head_parameter_names, select_bias_parameters
from bitfit_tasks.tasks.metrics import squad_metrics

DEVICE = os.environ.get("BITFIT_CUDA_TESTS_DEVICE", "cuda")
ON_CPU = DEVICE == "cpu"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def native_bf16_on_cpu():
    """On the CPU stand-in, lean mode's capability check is told the CPU has native bf16 (as on a GPU)."""
    if not ON_CPU:
        yield
        return
    with mock.patch("bitfit_tasks.core.lean.cpu_bf16_capability", return_value={"avx512_bf16": False, "amx": True}):
        yield


def device_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2, weight_decay=0.1,
                report_to=[], seed=0, logging_strategy="no", save_strategy="no", use_cpu=ON_CPU,
                disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def on_device(module: torch.nn.Module) -> bool:
    return all(p.device.type == DEVICE for p in module.parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_bitfit_steps_change_only_biases_and_head(precision, tmp_path):
    if precision == "fp16" and ON_CPU:
        pytest.skip("fp16 autocast is a GPU feature")
    model = tiny_model("bert")
    before = snapshot(model)
    selected = {n for ns in select_bias_parameters(model, "bitfit").values() for n in ns}
    head = set(head_parameter_names(model))
    args = device_args(tmp_path, max_steps=6, bf16=precision == "bf16", fp16=precision == "fp16")
    trainer = BitFitTrainer(model=model, args=args, train_dataset=RandomPairs(), bitfit_config=BitFitConfig())
    result = trainer.train()
    assert on_device(model) and torch.isfinite(torch.tensor(result.training_loss))
    after = {n: p.detach().cpu() for n, p in model.named_parameters()}
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after.values())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= selected | head
    if precision == "fp16":  # the loss scaler may skip a first step that overflowed; the head always moves
        assert head <= changed
    else:
        assert changed == selected | head


@pytest.mark.parametrize("mode", ["rand_uniform", "rand_row_col"])
def test_random_baselines_keep_frozen_entries_bit_exact_on_the_device(mode, tmp_path):
    model = tiny_model("bert")
    before = snapshot(model)
    trainer = BitFitTrainer(model=model, args=device_args(tmp_path, max_steps=5, weight_decay=0.5),
                            train_dataset=RandomPairs(), bitfit_config=BitFitConfig(mode=mode))
    trainer.train()
    masks = trainer.bitfit_state.masks
    assert masks and all(m.device.type == DEVICE for m in masks.values())
    head = set(head_parameter_names(model))
    moved = 0
    for n, p in model.named_parameters():
        p = p.detach().cpu()
        if n in masks:
            m = masks[n].cpu()
            assert torch.equal(p[~m], before[n][~m]), n
            moved += int((p[m] != before[n][m]).sum())
        elif n not in head:
            assert torch.equal(p, before[n]), n
    assert moved > 0


def _lean_trainer(tmp_path, out: str, **kw) -> BitFitTrainer:
    args = device_args(tmp_path / out, max_steps=4, save_strategy="steps", save_steps=2, **kw)
    return BitFitTrainer(model=tiny_model("bert"), args=args, train_dataset=RandomPairs(),
                         eval_dataset=RandomPairs(n=16, seed=1), bitfit_config=BitFitConfig(lean=True))


def test_lean_trains_resumes_and_loads_its_best_checkpoint(tmp_path):
    ref = _lean_trainer(tmp_path, "ref")
    ref.train()
    assert ref.args.bf16 and on_device(ref.model)
    resumed = _lean_trainer(tmp_path, "ref")
    resumed.train(resume_from_checkpoint=str(tmp_path / "ref" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    a = {n: p.detach() for n, p in ref.model.named_parameters() if p.requires_grad}
    b = {n: p.detach() for n, p in resumed.model.named_parameters() if p.requires_grad}
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-3, rtol=1e-2), n
    best = _lean_trainer(tmp_path, "best", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                         metric_for_best_model="loss")
    best.train()
    from safetensors.torch import load_file

    saved = load_file(f"{best.state.best_model_checkpoint}/bitfit_delta.safetensors")
    params = dict(best.model.named_parameters())
    assert all(torch.equal(params[n].detach().cpu(), t) for n, t in saved.items())


def _eval_loss(model, x, labels) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**{k: v.to(DEVICE) for k, v in x.items()}, labels=labels.to(DEVICE)).loss)


def test_a_delta_saved_from_the_device_reloads_to_the_same_eval_loss(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    trainer = BitFitTrainer(model=model, args=device_args(tmp_path / "run", max_steps=3), train_dataset=RandomPairs(),
                            bitfit_config=BitFitConfig(bias_terms=["qm2"]))
    trainer.train()
    trainer.save_model(str(tmp_path / "delta"))
    x, labels = batch(8), torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(0))
    want = _eval_loss(trainer.model, x, labels)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 5e-2)):
        loaded = load_task_model(tiny_model_dir, tmp_path / "delta", dtype=dtype, device=DEVICE)
        assert on_device(loaded)
        assert abs(_eval_loss(loaded, x, labels) - want) <= tol * max(1.0, abs(want)), dtype


def test_multitask_on_the_device_mixed_rows_equal_one_task_at_a_time(tmp_path):
    deltas = {}
    for name, (terms, labels) in {"a": (["qm2"], 2), "b": (["bitfit"], 3)}.items():
        trainer = BitFitTrainer(model=tiny_model("bert", num_labels=labels), args=device_args(tmp_path / name,
                                max_steps=3), train_dataset=RandomPairs(), bitfit_config=BitFitConfig(bias_terms=terms))
        trainer.train()
        trainer.save_model(str(tmp_path / f"d_{name}"))
        deltas[name] = trainer.model.eval()
    mt = MultiTaskBitFit(tiny_model("bert"))
    for name in deltas:
        mt.add_task(name, tmp_path / f"d_{name}")
    mt.to(DEVICE)
    assert on_device(mt)
    x = {k: v.to(DEVICE) for k, v in batch(8).items()}
    with torch.no_grad():
        single = {t: mt(t, **x).logits for t in deltas}
        for t, m in deltas.items():
            assert torch.allclose(single[t], m(**x).logits, atol=1e-5), t
        rows = ["a", "b", "b", "a", "a", "b", "a", "b"]
        mixed = mt.forward_mixed(rows, **x)
    for i, t in enumerate(rows):
        assert mixed[i]["logits"].device.type == DEVICE
        assert torch.allclose(mixed[i]["logits"], single[t][i], atol=1e-4), (i, t)


def _device_flags() -> list[str]:
    return ["--use_cpu", "true"] if ON_CPU else []


def _check_device(out) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["device"].startswith(DEVICE), results["device"]
    return results


def test_run_glue_end_to_end_on_the_device(tiny_model_dir, tmp_path):
    from bitfit_tasks.tasks.glue.run import main

    main(["--task_name", "mrpc", "--data_dir", f"{FIXTURES}/glue", "--model_name_or_path", tiny_model_dir,
          "--output_dir", str(tmp_path), "--num_train_epochs", "2", "--max_seq_length", "32", "--bf16", "true",
          "--disable_tqdm", "true", *_device_flags()])
    results = _check_device(tmp_path)
    assert len(results["history"]) == 2 and (tmp_path / "bitfit_delta.safetensors").exists()


def test_run_pos_end_to_end_on_the_device(tiny_model_dir, tmp_path):
    from bitfit_tasks.core.lean import make_lean
    from bitfit_tasks.tasks.pos.run import main

    with mock.patch("bitfit_tasks.training.trainer.make_lean", wraps=make_lean) as lean:
        main(["--treebank", f"{FIXTURES}/pos/treebank", "--model_name_or_path", tiny_model_dir, "--output_dir",
              str(tmp_path), "--num_train_epochs", "2", "--ignore_mismatched_sizes", "true", "--disable_tqdm", "true",
              "--unknown_tags", "count_wrong", "--lean", "true", *_device_flags()])
    results = _check_device(tmp_path)
    # Lean really ran, on the device (frozen matrices in bf16 there), and the record says what ran.
    assert lean.call_count == 1 and results["bitfit_config"]["lean"] is True
    model = lean.call_args.args[0]
    matrices = [p for p in model.parameters() if not p.requires_grad and p.dim() >= 2]
    assert matrices and all(p.dtype == torch.bfloat16 and p.device.type == DEVICE for p in matrices)
    # The headline is the best of the recorded evaluations, and both epochs were evaluated.
    scores = [h["eval_accuracy"] for h in results["history"]]
    assert len(scores) == 2 and results["best"] == max(scores)


def test_run_squad_end_to_end_on_the_device(tiny_model_dir, tmp_path):
    from bitfit_tasks.tasks.squad.run import main

    sq = f"{FIXTURES}/squad"
    res = main(["--train_file", f"{sq}/official.json", "--validation_file", f"{sq}/flat.jsonl",
                "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), "--max_seq_length", "40",
                "--doc_stride", "16", "--num_train_epochs", "1", "--disable_tqdm", "true", *_device_flags()])
    _check_device(tmp_path)
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert set(predictions) == {"q1", "q2", "q3", "q4", "q5"}
    # The reported EM/F1 are the official scores of the written predictions.
    rows = [json.loads(line) for line in open(f"{sq}/flat.jsonl")]
    want = squad_metrics(predictions, {r["id"]: r["answers"]["text"] for r in rows})
    assert res["f1"] == pytest.approx(want["f1"]) and res["exact_match"] == pytest.approx(want["exact_match"])


def test_bitfit_on_a_4bit_base(tmp_path):
    """QLoRA's loading, BitFit's training: a 4-bit NF4 Llama (bf16 compute on the GPU) trains its biases and
    head on the device, the packed weights stay bit-identical, and the delta re-applies onto a fresh 4-bit
    load exactly. The device kit does not carry bitsandbytes (its 41 MiB wheel does not fit the 64 MiB that
    travel): on a device machine without it, this test is skipped."""
    pytest.importorskip("bitsandbytes")
    import transformers as T

    from bitfit_tasks.core.quantized import is_packed, keep_trainable_layout

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0)
    T.LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "base")
    compute = torch.float32 if ON_CPU else torch.bfloat16

    def load():
        quant = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        place = {} if ON_CPU else {"device_map": {"": 0}}
        return T.LlamaForSequenceClassification.from_pretrained(tmp_path / "base", quantization_config=quant, **place)

    model = load()
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if is_packed(p)}
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(3, 128, (10,), generator=g), "labels": torch.tensor(i % 2)} for i in range(32)]
    trainer = BitFitTrainer(model=model, args=device_args(tmp_path, max_steps=6, bf16=not ON_CPU),
                            train_dataset=rows, bitfit_config=BitFitConfig())
    trainer.train()
    assert on_device(model) and packed
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)
    trainer.save_model(str(tmp_path / "delta"))
    ids = torch.stack([r["input_ids"] for r in rows[:4]]).to(DEVICE)
    again = load_task_model(str(tmp_path / "base"), str(tmp_path / "delta"), quantization_config=T.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute),
        **({} if ON_CPU else {"device_map": {"": 0}}))
    keep_trainable_layout(again)  # the CPU stand-in: the trained model's kernels, not bitsandbytes' CPU inference one
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=0, atol=0)
