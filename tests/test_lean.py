from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch
from conftest import tiny_model
from test_delta import batch, make_args
from test_trainer import RandomPairs
from torch import nn
from transformers import TrainingArguments

from bitfit_tasks import BitFitConfig, BitFitTrainer, apply_delta, prepare_model
from bitfit_tasks.core.lean import BoolDropout, make_lean


def test_bool_dropout_keeps_a_bool_mask_and_matches_dropout_semantics():
    torch.manual_seed(0)
    x = torch.randn(64, 128, requires_grad=True)
    d = BoolDropout(0.25).train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = d(x)
    assert [t.dtype for t in saved] == [torch.bool]  # 1 byte per element, not a float mask
    keep = y != 0
    assert torch.allclose(y[keep], x[keep] / 0.75)
    assert abs(keep.float().mean().item() - 0.75) < 0.02
    y.sum().backward()
    assert torch.allclose(x.grad, keep.float() / 0.75)
    assert torch.equal(d.eval()(x), x)


def test_make_lean_casts_only_frozen_matrices_and_swaps_dropout():
    model = tiny_model("bert")
    model.config.hidden_dropout_prob = 0.1
    prepare_model(model, BitFitConfig())
    info = make_lean(model)
    for n, p in model.named_parameters():
        if p.requires_grad or p.dim() < 2:
            assert p.dtype == torch.float32, n
        else:
            assert p.dtype == torch.bfloat16, n
    assert info["bool_dropouts"] == sum(isinstance(m, BoolDropout) for m in model.modules()) > 0
    assert not any(type(m) is nn.Dropout for m in model.modules())


def test_lean_loss_and_gradients_match_fp32_within_bf16_tolerance():
    x = batch(8)
    y = torch.tensor([0, 1] * 4)
    grads, losses = {}, {}
    for lean in (False, True):
        model = tiny_model("bert").train()
        prepare_model(model, BitFitConfig(bias_terms=["qm2"]))
        if lean:
            make_lean(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=lean):
            out = model(**x, labels=y)
        out.loss.backward()
        losses[lean] = out.loss.item()
        grads[lean] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
    for n, g in grads[False].items():
        assert grads[True][n].dtype == torch.float32  # trainable tensors stay fp32
        cos = torch.nn.functional.cosine_similarity(g.flatten(), grads[True][n].flatten(), dim=0)
        assert cos > 0.98, (n, cos)


@pytest.fixture
def fast_bf16_cpu():
    """Pretend the CPU has native bf16 matmuls (AMX), so lean mode runs here (emulated, tiny model)."""
    with mock.patch("bitfit_tasks.core.lean.cpu_bf16_capability", return_value={"avx512_bf16": False, "amx": True}):
        yield


def test_lean_trainer_trains_and_its_delta_fits_the_fp32_base(tmp_path, fast_bf16_cpu):
    model = tiny_model("bert")
    args = make_args(tmp_path, max_steps=3)
    trainer = BitFitTrainer(model=model, args=args, train_dataset=RandomPairs(), bitfit_config=BitFitConfig(lean=True))
    assert trainer.args.bf16 and trainer.args.mixed_precision == "bf16" and trainer.bitfit_config.lean
    assert not args.bf16 and args.mixed_precision != "bf16"  # the caller's arguments are left as given
    before = model.bert.encoder.layer[0].intermediate.dense.bias.detach().clone()
    trainer.train()
    assert not torch.equal(before, model.bert.encoder.layer[0].intermediate.dense.bias)
    trainer.save_model(str(tmp_path / "d"))
    base = tiny_model("bert")
    apply_delta(base, tmp_path / "d")  # fingerprint taken before the bf16 rounding: accepted
    assert torch.equal(base.bert.encoder.layer[0].intermediate.dense.bias,
                       model.bert.encoder.layer[0].intermediate.dense.bias)


def test_lean_refuses_weight_updating_modes():
    with pytest.raises(ValueError, match=r"lean=True stores frozen weights in bf16.*mode 'full'"):
        BitFitConfig(mode="full", lean=True)
    with pytest.raises(ValueError, match=r"mode 'rand_uniform' updates weights"):
        BitFitConfig(mode="rand_uniform", lean=True)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_qm2_gives_the_same_gradients(reentrant, tmp_path):
    grads = {}
    for gc in (False, True):
        model = tiny_model("bert").train()
        # transformers 5.24 renamed gradient_checkpointing -> activation_checkpointing (fields and methods).
        name = ("activation" if hasattr(TrainingArguments, "activation_checkpointing") or any(
            f.name == "activation_checkpointing" for f in dataclasses.fields(TrainingArguments)) else "gradient")
        args = make_args(tmp_path, max_steps=1, **{f"{name}_checkpointing": gc,
                                                   f"{name}_checkpointing_kwargs": {"use_reentrant": reentrant}})
        trainer = BitFitTrainer(model=model, args=args, train_dataset=RandomPairs(),
                                bitfit_config=BitFitConfig(bias_terms=["qm2"], train_head=False))
        if gc:
            getattr(model, f"{name}_checkpointing_enable")(**{f"{name}_checkpointing_kwargs": {"use_reentrant": reentrant}})
        out = model(**batch(4), labels=torch.tensor([0, 1, 0, 1]))
        out.loss.backward()
        grads[gc] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        del trainer
    for n, g in grads[False].items():
        assert grads[True][n] is not None and grads[True][n].abs().sum() > 0, n
        assert torch.allclose(grads[True][n], g, atol=1e-7), n


def test_bf16_mixed_precision_keeps_trainable_biases_fp32(tmp_path):
    """Plain --bf16 (not lean): Trainer autocasts the forward; the biases stay fp32 tensors and train,
    the frozen weights stay fp32 and untouched, and nothing trips over a dtype mismatch."""
    model = tiny_model("bert")
    trainer = BitFitTrainer(model=model, args=make_args(tmp_path, max_steps=3, bf16=True),
                            train_dataset=RandomPairs(), bitfit_config=BitFitConfig(bias_terms=["qm2"]))
    # Everything BitFit froze (weights and the biases outside qm2) must come out bit-identical.
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.endswith("key.bias") for n in frozen)
    assert trainer.accelerator.mixed_precision == "bf16"  # the forward runs under bf16 autocast
    before = model.bert.encoder.layer[0].attention.self.query.bias.detach().clone()
    trainer.train()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(before, model.bert.encoder.layer[0].attention.self.query.bias)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_lean_on_a_cpu_without_native_bf16_falls_back_to_fp32_with_a_warning(tmp_path):
    """AVX2-only CPU (this machine's kind): lean would emulate bf16 (>50x slower), so it trains fp32."""
    with mock.patch("bitfit_tasks.core.lean.cpu_bf16_capability", return_value={"avx512_bf16": False, "amx": False}):
        model = tiny_model("bert")
        args = make_args(tmp_path, max_steps=1)
        with pytest.warns(UserWarning, match=r"--lean needs native bf16 matmuls \(AVX512-BF16 or AMX\); this CPU has "
                                             r"none .* so this run trains in fp32 \(plain BitFit\)"):
            trainer = BitFitTrainer(model=model, args=args, train_dataset=RandomPairs(),
                                    bitfit_config=BitFitConfig(lean=True))
    assert not trainer.bitfit_config.lean and not trainer.args.bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    trainer.train()


def test_results_json_records_that_a_lean_request_ran_in_fp32(tiny_model_dir, tmp_path):
    """On a CPU without native bf16 the run trains fp32: results.json says what ran (lean false) and
    what was asked."""
    import json

    from conftest import FIXTURES

    from bitfit_tasks.tasks.glue.run import main

    with mock.patch("bitfit_tasks.core.lean.cpu_bf16_capability", return_value={"avx512_bf16": False, "amx": False}), \
            pytest.warns(UserWarning, match=r"so this run trains in fp32"):
        main(["--task_name", "mrpc", "--data_dir", f"{FIXTURES}/glue", "--model_name_or_path", tiny_model_dir,
              "--output_dir", str(tmp_path), "--num_train_epochs", "1", "--max_seq_length", "32", "--lean", "true",
              "--use_cpu", "true", "--disable_tqdm", "true"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["bitfit_config"]["lean"] is False and results["bitfit_config_requested"]["lean"] is True
    assert {k: v for k, v in results["bitfit_config"].items() if k != "lean"} == \
        {k: v for k, v in results["bitfit_config_requested"].items() if k != "lean"}


def test_a_deepcopy_of_a_lean_model_runs_its_own_weights():
    """The autocast wrapper is bound to its model: the copy's forward runs the copy, under autocast."""
    import copy

    model = tiny_model("bert").eval()
    prepare_model(model, BitFitConfig())
    make_lean(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.classifier.bias.add_(1.0)
        twin.bert.encoder.layer[0].output.dense.weight.mul_(0.5)
    x = batch(4)
    want = model(**x).logits
    got = twin(**x).logits
    assert got.dtype == want.dtype == torch.bfloat16  # the copy still runs under bf16 autocast
    assert not torch.allclose(got, want, atol=0.5)
    assert torch.equal(model(**x).logits, want)  # the original is untouched
    twin.bert.encoder.layer[0].output.dense.weight.data = model.bert.encoder.layer[0].output.dense.weight.data
    with torch.no_grad():
        twin.classifier.bias.sub_(1.0)
    assert torch.allclose(twin(**x).logits.float(), want.float(), atol=2e-2)


def test_capability_check_reads_torch_cpu_flags():
    from bitfit_tasks.core.lean import bf16_supported, cpu_bf16_capability

    caps = cpu_bf16_capability()
    assert caps == {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported()}
    assert bf16_supported("cpu") == any(caps.values())


def _lean_trainer(tmp_path, out: str, **kw) -> BitFitTrainer:
    args = make_args(tmp_path / out, max_steps=4, save_strategy="steps", save_steps=2, **kw)
    return BitFitTrainer(model=tiny_model("bert"), args=args, train_dataset=RandomPairs(),
                         eval_dataset=RandomPairs(n=16, seed=1), bitfit_config=BitFitConfig(lean=True))


def _trained(trainer: BitFitTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_lean_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, fast_bf16_cpu):
    """Lean rounds the frozen weights to bf16; its checkpoints were refused on resume as 'trained on a
    different base model' (the loader fingerprinted the rounded model). Resumed = uninterrupted, to
    bf16 tolerance (measured bit-identical on a CPU with native bf16; the tolerance leaves room for
    kernels that are not deterministic)."""
    ref = _lean_trainer(tmp_path, "ref")
    ref.train()
    resumed = _lean_trainer(tmp_path, "ref")  # a fresh process's trainer over the same folder
    resumed.train(resume_from_checkpoint=str(tmp_path / "ref" / "checkpoint-2"))
    a, b = _trained(ref), _trained(resumed)
    assert resumed.state.global_step == 4
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-3, rtol=1e-2), n


def test_lean_load_best_model_at_end(tmp_path, fast_bf16_cpu):
    trainer = _lean_trainer(tmp_path, "best", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                            metric_for_best_model="loss")
    trainer.train()  # ends by applying the best checkpoint's delta onto the lean (bf16-rounded) model
    assert trainer.state.best_model_checkpoint is not None
    best = trainer.state.best_model_checkpoint
    from safetensors.torch import load_file

    saved = load_file(f"{best}/bitfit_delta.safetensors")
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n].detach(), t) for n, t in saved.items())


def test_a_lean_trainers_checkpoint_is_still_refused_on_another_base(tmp_path, fast_bf16_cpu):
    ref = _lean_trainer(tmp_path, "ref")
    ref.train()
    other = BitFitTrainer(model=tiny_model("bert", seed=1), args=make_args(tmp_path / "o", max_steps=4),
                          train_dataset=RandomPairs(), bitfit_config=BitFitConfig(lean=True))
    with pytest.raises(ValueError, match=r"was trained on a different base model"):
        other.train(resume_from_checkpoint=str(tmp_path / "ref" / "checkpoint-2"))


def test_lean_with_fp16_is_one_clear_error(tmp_path, fast_bf16_cpu):
    args = make_args(tmp_path, max_steps=1)
    args.fp16 = True  # as --fp16 would set it (TrainingArguments refuses fp16 on a CPU at construction)
    with pytest.raises(ValueError, match=r"lean=True trains under bf16 autocast; it cannot be combined with --fp16"):
        BitFitTrainer(model=tiny_model("bert"), args=args, train_dataset=RandomPairs(),
                      bitfit_config=BitFitConfig(lean=True))


def test_lean_hyperparameter_search_with_best_model_per_trial(tmp_path, fast_bf16_cpu):
    """Every trial builds its model through model_init, is made lean, saves checkpoints and loads its
    best one at the end: the checkpoints of each trial fit that trial's (pre-rounding) base."""
    pytest.importorskip("optuna", reason="the search extra: pip install 'bitfit-tasks[search]'")
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                     load_best_model_at_end=True, metric_for_best_model="loss", disable_tqdm=True)
    from transformers import TrainerCallback

    ends = []

    class Check(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            ends.append((state.best_model_checkpoint, model.bert.encoder.layer[0].attention.self.query.weight.dtype))

    trainer = BitFitTrainer(model_init=lambda: tiny_model("bert", seed=0), args=args, train_dataset=RandomPairs(),
                            eval_dataset=RandomPairs(n=16, seed=1), bitfit_config=BitFitConfig(lean=True),
                            callbacks=[Check()])
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True)},
        backend="optuna", n_trials=2, direction="minimize")
    assert best.run_id is not None and len(ends) == 2
    # Each trial was lean and ended by loading its own best checkpoint (refused before the fix).
    assert all(ckpt is not None and dtype == torch.bfloat16 for ckpt, dtype in ends)


@pytest.mark.parametrize("device", ["xpu", "mps", "cuda"])
def test_lean_on_an_accelerator_without_bf16_names_it(device, tmp_path):
    """The bf16 check follows the accelerator torch reports (accelerate's is_bf16_available for every
    device type), not only CUDA."""
    args = make_args(tmp_path, max_steps=1)
    with mock.patch("bitfit_tasks.core.lean.accelerator_type", return_value=device), \
            mock.patch("accelerate.utils.is_bf16_available", return_value=False):
        with pytest.raises(ValueError, match=rf"lean=True needs bf16 autocast, which this {device} device does not"):
            BitFitTrainer(model=tiny_model("bert"), args=args, train_dataset=RandomPairs(),
                          bitfit_config=BitFitConfig(lean=True))


def test_accelerator_type_follows_torch():
    from types import SimpleNamespace

    from bitfit_tasks.core.lean import accelerator_type

    assert accelerator_type(SimpleNamespace(use_cpu=True)) == "cpu"
    with mock.patch("torch.accelerator.is_available", return_value=True), \
            mock.patch("torch.accelerator.current_accelerator", return_value=torch.device("xpu")):
        assert accelerator_type(SimpleNamespace(use_cpu=False)) == "xpu"
