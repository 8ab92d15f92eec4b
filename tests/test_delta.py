from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import tiny_model
from test_trainer import RandomPairs
from transformers import TrainingArguments

from bitfit_tasks import (
    BitFitConfig,
    BitFitTrainer,
    Delta,
    MultiTaskBitFit,
    apply_delta,
    load_task_model,
    prepare_model,
    save_delta,
)
from bitfit_tasks.core.signature import base_signature, signature_id
from bitfit_tasks.delta.files import DELTA_CONFIG, DELTA_WEIGHTS


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2,
                weight_decay=0.1, report_to=[], use_cpu=True, seed=0, logging_strategy="no",
                save_strategy="no", lr_scheduler_type="linear")
    return TrainingArguments(**{**base, **kw})


def trained(tmp_path, cfg=None, arch="bert", task="seq", num_labels=2, steps=3, seed=0):
    model = tiny_model(arch, task, num_labels=num_labels, seed=seed)
    trainer = BitFitTrainer(model=model, args=make_args(tmp_path / "train", max_steps=steps),
                            train_dataset=RandomPairs(), bitfit_config=cfg or BitFitConfig())
    trainer.train()
    return trainer


def batch(n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_save_model_writes_only_trained_tensors_and_reload_predicts_identically(tmp_path):
    trainer = trained(tmp_path, BitFitConfig(bias_terms=["qm2"]))
    trainer.save_model(str(tmp_path / "delta"))
    files = {p.name for p in (tmp_path / "delta").iterdir()}
    assert {DELTA_WEIGHTS, DELTA_CONFIG, "training_args.bin"} <= files
    assert "model.safetensors" not in files
    delta = Delta.load(tmp_path / "delta")
    assert set(delta.tensors) == set(trainer.bitfit_state.trainable)
    meta = json.loads((tmp_path / "delta" / DELTA_CONFIG).read_text())
    assert meta["mode"] == "bitfit" and set(meta["terms"]) == {"q", "m2"}
    assert meta["task_class"] == "BertForSequenceClassification"

    model = trainer.model.eval()
    want = model(**batch()).logits
    base = tiny_model("bert").eval()  # same seed -> the same pristine base; a fresh random head
    apply_delta(base, tmp_path / "delta")
    assert torch.equal(base(**batch()).logits, want)


def test_mismatched_base_is_refused(tmp_path):
    trainer = trained(tmp_path)
    trainer.save_model(str(tmp_path / "delta"))
    other = tiny_model("bert", seed=1)
    with pytest.raises(ValueError, match=r"trained on a different base model"):
        apply_delta(other, tmp_path / "delta")
    with pytest.raises(ValueError, match=r"shape of classifier\.(weight|bias) is \(2.*\) but the model's is "
                                         r"\(3.*\) \(load the base with the delta's num_labels\)"):
        apply_delta(tiny_model("bert", num_labels=3), tmp_path / "delta")
    with pytest.raises(ValueError, match=r"has tensors the model lacks"):
        apply_delta(tiny_model("bert", "qa"), tmp_path / "delta")
    with pytest.raises(FileNotFoundError, match=r"is not a BitFit delta"):
        Delta.load(tmp_path)
    # The fingerprint ignores the head (a user's base has a fresh one) and nothing else.
    assert signature_id(base_signature(tiny_model("bert", num_labels=5))) == signature_id(base_signature(tiny_model("bert")))


def test_remove_restores_base_bit_exactly(tmp_path):
    trained(tmp_path).save_model(str(tmp_path / "delta"))
    model = tiny_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = apply_delta(model, tmp_path / "delta")
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    handle.remove()
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p), n


def test_frozen_head_is_saved_too(tmp_path):
    trainer = trained(tmp_path, BitFitConfig(train_head=False))
    trainer.save_model(str(tmp_path / "d"))
    assert {"classifier.weight", "classifier.bias"} <= set(Delta.load(tmp_path / "d").tensors)


def test_full_mode_saves_a_regular_model(tmp_path):
    trainer = trained(tmp_path, BitFitConfig(mode="full"))
    trainer.save_model(str(tmp_path / "full"))
    assert (tmp_path / "full" / "model.safetensors").exists()
    assert not (tmp_path / "full" / DELTA_WEIGHTS).exists()


@pytest.mark.parametrize("mode", ["bitfit", "rand_uniform"])
def test_resume_from_bias_only_checkpoint_matches_uninterrupted(mode, tmp_path):
    cfg = BitFitConfig(mode=mode)

    def run(out, resume=None, max_steps=6):
        model = tiny_model("bert")
        args = make_args(out, max_steps=max_steps, save_strategy="steps", save_steps=3)
        trainer = BitFitTrainer(model=model, args=args, train_dataset=RandomPairs(n=64), bitfit_config=cfg)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert (ckpt / DELTA_WEIGHTS).exists() and (ckpt / "optimizer.pt").exists()
    assert not (ckpt / "model.safetensors").exists()
    # Optimizer state covers the trainable set only.
    opt_state = torch.load(ckpt / "optimizer.pt", weights_only=False)
    n_state = sum(s["exp_avg"].numel() for s in opt_state["state"].values())
    assert n_state == sum(p.numel() for p in full.model.parameters() if p.requires_grad)
    resumed = run(tmp_path / "b", resume=str(ckpt))
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


def test_load_best_model_at_end_with_deltas(tmp_path):
    from conftest import FIXTURES  # noqa: F401

    model = tiny_model("bert")
    args = make_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, eval_strategy="steps",
                     eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss")
    trainer = BitFitTrainer(model=model, args=args, train_dataset=RandomPairs(n=64),
                            eval_dataset=RandomPairs(n=16, seed=5), bitfit_config=BitFitConfig())
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and (tmp_path / best.split("/")[-1] / DELTA_WEIGHTS).exists()
    saved = Delta.load(best).tensors
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in saved.items())


def test_multitask_switch_and_mixed_batch(tmp_path):
    seq = trained(tmp_path / "s", BitFitConfig(bias_terms=["qm2"]), num_labels=2)
    seq.save_model(str(tmp_path / "d_seq"))
    seq3 = trained(tmp_path / "s3", BitFitConfig(), num_labels=3, seed=0)
    seq3.save_model(str(tmp_path / "d_seq3"))
    base = tiny_model("bert")
    pristine = {n: p.detach().clone() for n, p in base.bert.named_parameters()}
    mt = MultiTaskBitFit(base)
    mt.add_task("a", tmp_path / "d_seq")
    mt.add_task("b", tmp_path / "d_seq3")
    with pytest.raises(ValueError, match=r"task 'a' is loaded already"):
        mt.add_task("a", tmp_path / "d_seq")
    x = batch(8)
    want_a = seq.model.eval()(**x).logits
    want_b = seq3.model.eval()(**x).logits
    assert torch.allclose(mt("a", **x).logits, want_a, atol=1e-6)
    assert torch.allclose(mt("b", **x).logits, want_b, atol=1e-6)
    assert torch.allclose(mt("a", **x).logits, want_a, atol=1e-6)
    rows = ["a", "b", "b", "a", "a", "b", "a", "b"]
    out = mt.forward_mixed(rows, **x)
    for i, t in enumerate(rows):
        want = (want_a if t == "a" else want_b)[i]
        assert out[i]["logits"].shape == want.shape
        assert torch.allclose(out[i]["logits"], want, atol=1e-5), (i, t)
    mt.remove_task("a")
    mt.remove_task("b")
    mt.deactivate()
    for n, p in mt.backbone.named_parameters():
        assert torch.equal(p, pristine[n]), n
    with pytest.raises(KeyError, match=r"unknown task 'a'; loaded tasks: \[\]"):
        mt.activate("a")


def test_multitask_is_a_module_that_moves_and_round_trips(tmp_path):
    """.to(dtype) / .to(device) move the backbone, every head and every task's biases; state_dict holds
    them all and loads back into a MultiTaskBitFit built the same way."""
    seq = trained(tmp_path / "s", BitFitConfig(bias_terms=["qm2"]), num_labels=2)
    seq.save_model(str(tmp_path / "d_seq"))
    seq3 = trained(tmp_path / "s3", BitFitConfig(), num_labels=3, seed=0)
    seq3.save_model(str(tmp_path / "d_seq3"))

    def build():
        mt = MultiTaskBitFit(tiny_model("bert"))
        mt.add_task("a", tmp_path / "d_seq")
        mt.add_task("b", tmp_path / "d_seq3")
        return mt

    mt = build().to(torch.float64)
    assert {t.dtype for t in [*mt.parameters(), *mt.buffers()] if t.is_floating_point()} == {torch.float64}
    assert all(t.dtype == torch.float64 for t in [*mt.heads.parameters(), *mt.task_biases.buffers()])
    sd = mt.state_dict()
    assert any(k.startswith("heads.a.classifier.") for k in sd) and any(k.startswith("heads.b.") for k in sd)
    assert any(k.startswith("task_biases.a.") for k in sd) and any(k.startswith("base_values.") for k in sd)
    assert not any(k.startswith(("heads.a.bert", "heads.b.bert")) for k in sd)  # the backbone is stored once
    x = batch(8)
    want_a = seq.model.eval()(**x).logits.double()
    want_b = seq3.model.eval()(**x).logits.double()
    got_a, got_b = mt("a", **x).logits, mt("b", **x).logits
    assert got_a.dtype == got_b.dtype == torch.float64
    assert torch.allclose(got_a, want_a, atol=1e-5) and torch.allclose(got_b, want_b, atol=1e-5)
    rows = ["a", "b", "b", "a", "a", "b", "a", "b"]
    mixed = mt.forward_mixed(rows, **x)
    for i, t in enumerate(rows):
        assert mixed[i]["logits"].dtype == torch.float64
        assert torch.allclose(mixed[i]["logits"], (want_a if t == "a" else want_b)[i], atol=1e-5), (i, t)
    mt.deactivate()
    again = build().to(torch.float64)
    again.load_state_dict(mt.state_dict())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in mt.state_dict().items())
    assert torch.equal(again("b", **x).logits, mt("b", **x).logits)
    # A move to another device (meta stands in for a GPU) takes heads and biases along, and switching
    # then copies the moved banks' own tensors into the backbone: every source is on that device.
    moved = build().to("meta")
    assert {t.device.type for t in [*moved.parameters(), *moved.buffers()]} == {"meta"}
    assert moved.tasks["a"].classifier.weight.device.type == "meta"
    sources = []
    real_copy = torch.Tensor.copy_

    def recording_copy(dst, src, *args, **kwargs):
        sources.append(src)
        return real_copy(dst, src, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "copy_", recording_copy):
        moved.activate("a")
    bank = {id(t) for _, t in moved.task_biases["a"].items()} | {id(t) for _, t in moved.base_values.items()}
    # The pristine values first (deactivate), then the task's biases.
    assert len(sources) == len(moved.base_values.names()) + len(moved.task_biases["a"].names())
    assert all(id(s) in bank for s in sources)
    assert {s.device.type for s in sources} == {"meta"}


def test_multitask_refuses_other_base(tmp_path):
    trained(tmp_path).save_model(str(tmp_path / "d"))
    mt = MultiTaskBitFit(tiny_model("bert", seed=7))
    with pytest.raises(ValueError, match=r"trained on a different base model"):
        mt.add_task("x", tmp_path / "d")


def _two_task_deltas(tmp_path):
    """A delta of every bias (3 labels) and one of q and m2 only (2 labels), each with its trained model."""
    every = trained(tmp_path / "e", BitFitConfig(), num_labels=3)
    every.save_model(str(tmp_path / "d_every"))
    qm2 = trained(tmp_path / "q", BitFitConfig(bias_terms=["qm2"]), num_labels=2)
    qm2.save_model(str(tmp_path / "d_qm2"))
    return every.model.eval(), qm2.model.eval()


def test_multitask_adds_a_task_while_another_is_active(tmp_path):
    """The new delta's base is checked against the pristine backbone, not the live one that holds the
    active task's biases (here biases the new delta does not train)."""
    every, qm2 = _two_task_deltas(tmp_path)
    mt = MultiTaskBitFit(tiny_model("bert"))
    mt.add_task("every", tmp_path / "d_every")
    mt.activate("every")
    mt.add_task("qm2", tmp_path / "d_qm2")
    x = batch(8)
    assert torch.allclose(mt("qm2", **x).logits, qm2(**x).logits, atol=1e-6)
    assert torch.allclose(mt("every", **x).logits, every(**x).logits, atol=1e-6)
    with pytest.raises(ValueError, match=r"task 'other': delta .* was trained on a different base model"):
        MultiTaskBitFit(tiny_model("bert", seed=1)).add_task("other", tmp_path / "d_qm2")


@pytest.mark.parametrize("name", ["rte.v2", "", "keys"])
def test_multitask_refused_task_leaves_nothing_behind(tmp_path, name):
    _, qm2 = _two_task_deltas(tmp_path)
    mt = MultiTaskBitFit(tiny_model("bert"))
    before = {k: v.clone() for k, v in mt.state_dict().items()}
    with pytest.raises(ValueError, match=rf"task name {name!r} cannot be used: it keys the module's state_dict, so "
                                         r"it must be a non-empty string without '\.'"):
        mt.add_task(name, tmp_path / "d_qm2")
    other = MultiTaskBitFit(tiny_model("bert", seed=1))
    other_before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"trained on a different base model"):
        other.add_task("qm2", tmp_path / "d_qm2")
    for module, was in ((mt, before), (other, other_before)):
        assert module.tasks == {} and module.base_values.names() == [] and module.active is None
        assert module.state_dict().keys() == was.keys()
        assert all(torch.equal(v, was[k]) for k, v in module.state_dict().items())
    mt.add_task("rte_v2", tmp_path / "d_qm2")  # a retry under a good name works
    x = batch(4)
    assert torch.allclose(mt("rte_v2", **x).logits, qm2(**x).logits, atol=1e-6)
    mt.remove_task("rte_v2")
    assert mt.tasks == {}


def test_multitask_load_state_dict_leaves_no_stale_active_task(tmp_path):
    """A state_dict saved while one task was active, loaded into a module where another was active:
    the next call switches to the asked task's biases."""
    every, qm2 = _two_task_deltas(tmp_path)

    def build():
        mt = MultiTaskBitFit(tiny_model("bert"))
        mt.add_task("every", tmp_path / "d_every")
        mt.add_task("qm2", tmp_path / "d_qm2")
        return mt

    saving, loading = build(), build()
    saving.activate("every")
    loading.activate("qm2")
    loading.load_state_dict(saving.state_dict())
    x = batch(8)
    assert loading.active is None
    assert torch.allclose(loading("qm2", **x).logits, qm2(**x).logits, atol=1e-6)
    assert torch.allclose(loading("every", **x).logits, every(**x).logits, atol=1e-6)


def test_save_delta_function_and_describe(tmp_path):
    model = tiny_model("roberta")
    prepare_model(model, BitFitConfig(bias_terms=["q"]))
    save_delta(model, tmp_path / "r", mode="bitfit")
    d = Delta.load(tmp_path / "r")
    text = d.describe()
    assert "RobertaForSequenceClassification" in text and "tensors" in text
    with pytest.raises(ValueError, match=r"nothing to save"):
        save_delta(tiny_model("bert").requires_grad_(False), tmp_path / "x")


def test_cli_info_and_export(tmp_path, capsys, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from bitfit_tasks.serving.cli import main as cli

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    trainer = BitFitTrainer(model=base, args=make_args(tmp_path / "t", max_steps=2),
                            train_dataset=RandomPairs(), bitfit_config=BitFitConfig(bias_terms=["qm2"]))
    trainer.train()
    trainer.save_model(str(tmp_path / "d"))
    assert cli(["info", str(tmp_path / "d"), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "BertForSequenceClassification" in out and "bert.encoder.layer.0.attention.self.query.bias" in out
    assert tiny_model_dir in out
    assert cli(["export", str(tmp_path / "d"), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    x = batch()
    assert torch.equal(merged(**x).logits, trainer.model.eval()(**x).logits)


def test_save_model_writes_a_model_card_whose_snippet_runs(tiny_model_dir, tmp_path):
    """trainer.save_model() output says it is a bias-only delta and how to load it; the snippet runs."""
    import re

    from test_trainer import RandomPairs
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from bitfit_tasks import BitFitConfig, BitFitTrainer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    trainer = BitFitTrainer(model=model, args=args, train_dataset=RandomPairs(), eval_dataset=RandomPairs(n=8),
                            bitfit_config=BitFitConfig(bias_terms=["qm2"]))
    trainer.train()
    trainer.evaluate()
    out = tmp_path / "delta"
    trainer.save_model(str(out))
    card = (out / "README.md").read_text()
    from huggingface_hub import ModelCard

    data = ModelCard.load(out / "README.md").data  # the metadata header parses as the Hub reads it
    assert data.base_model == tiny_model_dir and data.library_name == "bitfit-tasks" and "bitfit" in data.tags
    assert "**bias-only delta**" in card
    assert f"trainable params: {trainer.bitfit_state.n_trainable:,d} of" in card and "eval_loss" in card
    assert "bias terms: q, m2" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(snippet, scope)
    batch = {"input_ids": RandomPairs().ids[:2], "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    model.eval()
    scope["model"].eval()
    with torch.no_grad():
        assert torch.allclose(scope["model"](**batch).logits, model(**batch).logits, atol=1e-6)


def _trained_delta(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    trainer = BitFitTrainer(model=model, args=make_args(tmp_path / "run", max_steps=3),
                            train_dataset=RandomPairs(), eval_dataset=RandomPairs(n=16, seed=5),
                            bitfit_config=BitFitConfig())
    trainer.train()
    want = trainer.evaluate()
    trainer.save_model(str(tmp_path / "delta"))
    return tmp_path / "delta", want


def _eval_loss(model, tmp_path):
    from transformers import Trainer

    return Trainer(model=model, args=make_args(tmp_path / "eval"), eval_dataset=RandomPairs(n=16, seed=5)).evaluate()


def _hub_cache(tmp_path, delta_dir, repo="user/tiny-delta", commit="0" * 40):
    """A Hugging Face Hub cache holding ``repo`` at ``commit`` (the layout snapshot_download writes)."""
    import shutil

    root = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    shutil.copytree(delta_dir, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return tmp_path / "hub"


def test_from_pretrained_folder_hub_cache_and_mocked_download_reproduce_eval(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    from bitfit_tasks import load_task_model

    delta_dir, want = _trained_delta(tiny_model_dir, tmp_path)
    # 1. a local folder
    got = _eval_loss(load_task_model(tiny_model_dir, delta_dir), tmp_path)
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], abs=1e-6)
    # 2. a Hub id served by huggingface_hub's own code from its cache, offline
    cache = _hub_cache(tmp_path, delta_dir)
    delta = Delta.from_pretrained("user/tiny-delta", cache_dir=str(cache), local_files_only=True)
    assert set(delta.tensors) == set(Delta.load(delta_dir).tensors)
    # 3. a Hub id through a mocked download (what snapshot_download returns: a snapshot folder)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, allow_patterns))
        out = tmp_path / "download" / repo_id.replace("/", "--")
        shutil.copytree(delta_dir, out, dirs_exist_ok=True)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    got = _eval_loss(load_task_model(tiny_model_dir, "user/tiny-delta", revision="v1"), tmp_path)
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], abs=1e-6)
    assert calls[0][:2] == ("user/tiny-delta", "v1") and "bitfit_delta.safetensors" in calls[0][2]


def test_hub_delta_errors_are_one_line(tmp_path):
    from bitfit_tasks.utils.errors import UsageError

    with pytest.raises(UsageError, match=r"not a local folder, and the Hub download failed .* check the id"):
        Delta.from_pretrained("user/no-such-delta", cache_dir=str(tmp_path), local_files_only=True)
    with pytest.raises(UsageError, match=r"neither a local folder nor a Hub repository id"):
        Delta.from_pretrained("not a hub id!", cache_dir=str(tmp_path), local_files_only=True)
    with pytest.raises(FileNotFoundError, match=r"delta folder '.*/missing' does not exist"):
        Delta.from_pretrained(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"is not a BitFit delta: expected bitfit_delta.safetensors"):
        Delta.from_pretrained(empty)


def test_delta_save_pretrained_round_trip_and_card(tiny_model_dir, tmp_path):
    delta_dir, _ = _trained_delta(tiny_model_dir, tmp_path)
    delta = Delta.from_pretrained(delta_dir)
    out = delta.save_pretrained(tmp_path / "copy")
    again = Delta.from_pretrained(out)
    assert all(torch.equal(again.tensors[n], t) for n, t in delta.tensors.items())
    assert {k: v for k, v in again.meta.items() if k != "weights_sha256"} == \
        {k: v for k, v in delta.meta.items() if k != "weights_sha256"}
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card and delta.meta["base_fingerprint"] in card
    assert "labels:" in card and "load_task_model(" in card


def _delta_on_saved_base(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    trainer = BitFitTrainer(model=model, args=make_args(tmp_path / "t", max_steps=3), train_dataset=RandomPairs(),
                            bitfit_config=BitFitConfig())
    trainer.train()
    trainer.save_model(str(tmp_path / "d"))
    return model.eval(), tmp_path / "d"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_delta_applies_to_the_base_loaded_in_half_precision(dtype, tiny_model_dir, tmp_path):
    trained_model, d = _delta_on_saved_base(tiny_model_dir, tmp_path)
    model = load_task_model(tiny_model_dir, d, dtype=dtype, device="cpu")
    assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == dtype
    x = batch(4)
    want = trained_model(**x).logits
    got = model(**x).logits.float()
    assert torch.allclose(got, want, atol=5e-2), (got - want).abs().max()


def test_fp32_delta_applies_to_a_lean_model_and_a_perturbed_base_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from bitfit_tasks.core.lean import make_lean

    _, d = _delta_on_saved_base(tiny_model_dir, tmp_path)
    lean = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    prepare_model(lean, BitFitConfig())
    make_lean(lean)
    apply_delta(lean, d)  # bf16-rounded frozen matrices: accepted
    for dtype in (torch.float32, torch.bfloat16):
        other = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, dtype=dtype)
        with torch.no_grad():
            other.bert.encoder.layer[1].output.dense.weight[3, 5] += 0.5  # one weight of one matrix
        with pytest.raises(ValueError, match=r"was trained on a different base model \(bert\.encoder\.layer\.1\.output"
                                             r"\.dense\.weight: "):
            apply_delta(other, d)


def test_a_delta_saved_before_signatures_is_still_checked_bit_exactly(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from bitfit_tasks.core.signature import legacy_fingerprint
    from bitfit_tasks.delta.format import write_delta_files

    model, d = _delta_on_saved_base(tiny_model_dir, tmp_path)
    old = Delta.load(d)
    head = set(old.meta["head"])
    frozen = [(n, p) for n, p in model.named_parameters() if n not in old.tensors and n not in head]
    meta = {k: v for k, v in old.meta.items() if k not in ("base_signature", "weights_sha256")}
    meta["base_fingerprint"] = legacy_fingerprint(frozen)
    write_delta_files(tmp_path / "legacy", old.tensors, meta)
    apply_delta(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir), tmp_path / "legacy")
    with pytest.raises(ValueError, match=r"this delta predates dtype-tolerant checks, so the base must be loaded in "
                                         r"fp32"):
        apply_delta(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, dtype=torch.bfloat16),
                    tmp_path / "legacy")


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the calls and copies what upload_folder is given."""

    def __init__(self, store):
        self.store = store

    def __call__(self, token=None):
        self.store["token"] = token
        return self

    def create_repo(self, repo_id, **kw):
        self.store["created"] = (repo_id, kw)

    def upload_folder(self, *, repo_id, folder_path, **kw):
        import shutil

        shutil.copytree(folder_path, self.store["dest"])
        self.store["uploaded"] = (repo_id, kw)
        return f"commit-of-{repo_id}"


def test_delta_push_to_hub_uploads_a_loadable_delta(tmp_path):
    from unittest import mock

    trainer = trained(tmp_path)
    trainer.save_model(str(tmp_path / "d"))
    store = {"dest": tmp_path / "hub"}
    with mock.patch("huggingface_hub.HfApi", FakeHub(store)):
        out = Delta.load(tmp_path / "d").push_to_hub("user/tiny-bitfit", token="t0k", private=True)
    assert out == "commit-of-user/tiny-bitfit"
    assert store["created"] == ("user/tiny-bitfit", {"token": "t0k", "private": True, "repo_type": "model",
                                                     "exist_ok": True})
    assert store["uploaded"][1]["commit_message"] == "Upload BitFit delta"
    assert {"bitfit_delta.safetensors", "bitfit_delta.json", "README.md"} <= {p.name for p in store["dest"].iterdir()}
    fresh = tiny_model("bert")
    apply_delta(fresh, store["dest"])  # what landed on the "Hub" is a valid delta for the base
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in fresh.named_parameters() if n in Delta.load(store["dest"]).tensors)


def test_trainer_push_to_hub_uploads_the_delta_not_the_run_folder(tmp_path):
    from unittest import mock

    trainer = trained(tmp_path)
    (Path(trainer.args.output_dir) / "results.json").write_text("{}")  # a run's other output
    trainer.args.hub_model_id = "user/run-delta"
    store = {"dest": tmp_path / "hub"}
    with mock.patch("huggingface_hub.HfApi", FakeHub(store)):
        trainer.push_to_hub("first upload")
    assert store["created"][0] == store["uploaded"][0] == "user/run-delta"
    assert store["uploaded"][1]["commit_message"] == "first upload"
    names = {p.name for p in store["dest"].iterdir()}
    assert {"bitfit_delta.safetensors", "bitfit_delta.json", "README.md"} <= names and "results.json" not in names
    assert "push_to_hub" in (store["dest"] / "README.md").read_text()
    Delta.load(store["dest"])


def test_save_model_with_push_to_hub_uploads_once(tmp_path):
    """--push_to_hub true: Trainer.save_model() pushes, and our push saves the delta again; that inner
    save must not push (it recursed without end)."""
    from unittest import mock

    trainer = trained(tmp_path)
    trainer.args.push_to_hub = True
    trainer.args.hub_model_id = "user/pushed"
    store = {"dest": tmp_path / "hub"}
    with mock.patch("huggingface_hub.HfApi", FakeHub(store)):
        trainer.save_model(str(tmp_path / "out"))
    assert store["uploaded"][0] == "user/pushed"
    assert Delta.load(store["dest"]).tensors.keys() == Delta.load(tmp_path / "out").tensors.keys()
