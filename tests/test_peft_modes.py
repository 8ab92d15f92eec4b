"""``--mode lora`` / ``--mode beft``: PEFT's LoRA and BEFT as modes of BitFitTrainer, the runners and the sweep.
The mode trains exactly what ``peft.get_peft_model`` + ``Trainer`` train, on targets named in the paper's notation
and mapped per architecture; the run saves PEFT's own adapter folder, resumes, keeps its best epoch and reports
like every other mode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, bias_free_config, tiny_config, tiny_model
from test_trainer_parity import Pairs, assert_same, params, targs
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from bitfit_tasks import BitFitConfig, BitFitTrainer, prepare_model
from bitfit_tasks.peft_interop.modes import import_peft, peft_target_modules, wrap_with_peft
from bitfit_tasks.tasks.recipes import apply_recipe
from bitfit_tasks.utils.errors import UsageError

peft = pytest.importorskip("peft", reason="the peft extra: pip install 'bitfit-tasks[peft]'")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the mode is PEFT's method under Trainer ---------------------------------------------------------------------

PEFT_TWINS = {
    "lora": (BitFitConfig(mode="lora", lora_r=2, lora_alpha=4),
             lambda: peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"],
                                     modules_to_save=["classifier"])),
    "beft": (BitFitConfig(mode="beft"),
             lambda: peft.BeftConfig(task_type="SEQ_CLS", target_modules=["value"], modules_to_save=["classifier"])),
}


@pytest.mark.parametrize("mode", list(PEFT_TWINS))
def test_mode_trains_what_peft_and_trainer_train(mode, tmp_path):
    """Same trainable tensors, same training, bit for bit: the mode is PEFT's method, not a look-alike."""
    ours_cfg, theirs_cfg = PEFT_TWINS[mode]
    ours = BitFitTrainer(model=tiny_model("bert"), args=targs(tmp_path / "ours"), train_dataset=Pairs(),
                         bitfit_config=ours_cfg)
    theirs = Trainer(model=peft.get_peft_model(tiny_model("bert"), theirs_cfg()), args=targs(tmp_path / "theirs"),
                     train_dataset=Pairs())
    trainable = {n for n, p in ours.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.model.named_parameters() if p.requires_grad}
    assert ours.bitfit_state.n_trainable == theirs.model.get_nb_trainable_parameters()[0]
    before = params(ours.model)
    ours.train()
    theirs.train()
    assert_same(params(ours.model), params(theirs.model))
    # Only the adapters and the head's trained copy moved; every base weight (and the original head) is as loaded.
    after = params(ours.model)
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert moved and moved <= trainable
    assert all(("lora_" in n or "beft_" in n or ".modules_to_save." in n) for n in trainable)


@pytest.mark.parametrize("mode", list(PEFT_TWINS))
def test_saved_adapter_folder_loads_with_peft(mode, tmp_path):
    cfg, _ = PEFT_TWINS[mode]
    torch.manual_seed(0)
    base = tiny_model("bert")
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    trainer = BitFitTrainer(model=AutoModelForSequenceClassification.from_pretrained(base_dir),
                            args=targs(tmp_path / "run"), train_dataset=Pairs(), bitfit_config=cfg)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["peft_type"] == mode.upper() and "classifier" in saved["modules_to_save"]
    assert not (tmp_path / "out" / "bitfit_delta.safetensors").exists()
    loaded = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir),
                                            str(tmp_path / "out")).eval()
    ids = torch.randint(0, 100, (3, 7))
    trainer.model.eval()
    with torch.no_grad():
        want, got = trainer.model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.equal(want, got)


def _checkpoint(tmp_path, cfg: BitFitConfig) -> str:
    trainer = BitFitTrainer(model=tiny_model("bert"), args=targs(tmp_path / "first", save_strategy="steps",
                                                                 save_steps=2, max_steps=2),
                            train_dataset=Pairs(), bitfit_config=cfg)
    trainer.train()
    return str(tmp_path / "first" / "checkpoint-2")


@pytest.mark.parametrize(("saved", "now", "message"), [
    (BitFitConfig(mode="lora", lora_r=2), BitFitConfig(mode="lora", lora_r=4),
     r"holds an adapter trained with other options \(r: saved 2, now 4\); resume with the options it was trained"),
    (BitFitConfig(mode="lora", lora_r=2), BitFitConfig(mode="lora", lora_r=2, peft_targets=["q", "k", "v"]),
     r"other options \(target_modules: saved \[.*\]\); resume"),
    (BitFitConfig(mode="lora", lora_r=2), BitFitConfig(mode="beft"), r"other options \(peft_type: saved LORA, now BEFT"),
    (BitFitConfig(mode="lora", lora_r=2), BitFitConfig(mode="bitfit"),
     r"holds a PEFT adapter \(a --mode lora / beft run\), not a --mode bitfit checkpoint"),
    (BitFitConfig(mode="bitfit"), BitFitConfig(mode="beft"),
     r"holds a BitFit delta, not the adapter of a --mode beft run; resume it with the --mode it was trained with"),
])
def test_resuming_a_checkpoint_of_another_kind_is_one_line(saved, now, message, tmp_path):
    checkpoint = _checkpoint(tmp_path, saved)
    trainer = BitFitTrainer(model=tiny_model("bert"), args=targs(tmp_path / "again", max_steps=4),
                            train_dataset=Pairs(), bitfit_config=now)
    with pytest.raises(UsageError, match=message):
        trainer.train(resume_from_checkpoint=checkpoint)


def test_model_init_models_are_wrapped_too(tmp_path):
    trainer = BitFitTrainer(model_init=lambda *_: tiny_model("bert"), args=targs(tmp_path),
                            train_dataset=Pairs(), bitfit_config=BitFitConfig(mode="lora", lora_r=2))
    trainer.train()  # Trainer builds a fresh model here, through call_model_init
    assert type(trainer.model).__name__ == "PeftModelForSequenceClassification"
    assert trainer.bitfit_state.term_counts["lora adapters"] == 2 * 2 * (2 * 16 * 2)  # 2 layers x q, v x r(16+16)


@pytest.mark.parametrize("train_head", [True, False])
@pytest.mark.parametrize(("arch", "head"), [("distilbert", {"pre_classifier", "classifier"}),
                                            ("deberta-v2", {"pooler", "classifier"})])
def test_the_whole_head_trains_with_the_adapters(arch, head, train_head, tmp_path):
    """A head of two modules (DeBERTa's pooler + classifier; PEFT's SEQ_CLS default saves only the classifier)
    trains whole. The count of all parameters stays the model's own (not PEFT's adapters and head copies)."""
    model = tiny_model(arch)
    own = sum(p.numel() for p in model.parameters())
    trainer = BitFitTrainer(model=model, args=targs(tmp_path), bitfit_config=BitFitConfig(
        mode="lora", lora_r=2, train_head=train_head))
    heads = {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in trainer.bitfit_state.head}
    assert heads == (head if train_head else set())
    assert trainer.bitfit_state.n_total == own
    assert trainer.bitfit_state.n_trainable == sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)


# ---- targets in the paper's notation, per architecture ------------------------------------------------------------

def _modules(model, terms, mode="lora"):
    return peft_target_modules(model, terms, mode=mode)


def test_targets_map_per_architecture():
    bert = tiny_model("bert")
    assert _modules(bert, ["q", "v"]) == [f"bert.encoder.layer.{i}.attention.self.{m}"
                                          for i in range(2) for m in ("query", "value")]
    llama = AutoModelForSequenceClassification.from_config(bias_free_config("llama"))
    assert _modules(llama, ["v", "m2"]) == [f"model.layers.{i}.{m}" for i in range(2)
                                            for m in ("self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]
    # A fused query/key/value projection is adapted whole, once per layer.
    modern = AutoModelForSequenceClassification.from_config(bias_free_config("modernbert"))
    assert _modules(modern, ["q", "v"]) == [f"model.layers.{i}.attn.Wqkv" for i in range(2)]
    gpt2 = AutoModelForSequenceClassification.from_config(tiny_config("gpt2"))
    assert _modules(gpt2, ["qkv", "m3"]) == [f"transformer.h.{i}.{m}" for i in range(2)
                                             for m in ("attn.c_attn", "mlp.c_proj")]


def test_target_the_architecture_lacks_is_refused_naming_what_it_has():
    qwen2 = AutoModelForSequenceClassification.from_config(tiny_config("qwen2"))
    with pytest.raises(UsageError, match=r"--peft_targets m2: Qwen2ForSequenceClassification has no such layer; its "
                                         r"beft targets are \['q', 'k', 'v'\]\."):
        _modules(qwen2, ["q", "m2"], mode="beft")


def test_q_k_v_of_a_one_projection_family_adapt_that_projection():
    """GPT-2 computes q, k and v in one layer (c_attn, a Conv1D): the defaults adapt it whole for LoRA; PEFT's
    BEFT takes Linear layers only, so BEFT there is refused before the weights load, naming the way out."""
    gpt2 = AutoModelForSequenceClassification.from_config(tiny_config("gpt2"))
    assert _modules(gpt2, ["q", "v"]) == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    with pytest.raises(UsageError, match=r"--peft_targets qkv: transformer.h.0.attn.c_attn is a Conv1D, which PEFT's "
                                         r"beft does not adapt \(it takes Linear layers\); .* or --mode bitfit"):
        _modules(gpt2, ["v"], mode="beft")


# ---- bad input: one line each -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "bitfit", "peft_targets": ["q"]}, r"--peft_targets q is for --mode lora / beft, not 'bitfit'"),
    ({"mode": "lora", "peft_targets": ["LN1"]},
     r"--peft_targets LN1: a lora target is a Linear layer .* choose from \['q', 'k', 'v', 'qkv', 'm1', 'm2', 'm3'\]"),
    ({"mode": "lora", "lora_r": 0}, r"--lora_r must be >= 1, got 0"),
    ({"mode": "lora", "lora_alpha": 0.0}, r"--lora_alpha must be > 0, got 0.0"),
    ({"mode": "lora", "lora_dropout": 1.0}, r"--lora_dropout must be in \[0, 1\), got 1.0"),
    ({"mode": "beft", "bias_terms": ["q"]}, r"--bias_terms q has no effect with --mode beft, which trains adapters "
                                            r"on --peft_targets"),
    ({"mode": "lora", "lean": True}, r"lean=True .* mode 'lora' updates weights"),
    ({"mode": "beft", "lora_r": 4, "lora_dropout": 0.1}, r"--lora_r --lora_dropout set LoRA's adapters, and --mode "
                                                         r"beft trains none; drop them, or use --mode lora"),
    ({"mode": "bitfit", "lora_alpha": 16.0}, r"--lora_alpha set LoRA's adapters, and --mode bitfit trains none; drop "
                                             r"it"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=message):
        BitFitConfig(**kwargs)


def test_a_model_peft_wrapped_already_is_refused(tmp_path):
    wrapped = peft.get_peft_model(tiny_model("bert"), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    with pytest.raises(UsageError, match=r"mode 'lora' wraps a plain model in its own adapters, and "
                                         r"PeftModelForSequenceClassification is a PEFT model already; .*mode 'full'"):
        BitFitTrainer(model=wrapped, args=targs(tmp_path), bitfit_config=BitFitConfig(mode="lora"))
    with pytest.raises(UsageError, match=r"mode 'beft' trains a PEFT model: wrap it first"):
        prepare_model(tiny_model("bert"), BitFitConfig(mode="beft"))
    with pytest.raises(ValueError, match=r"mode 'bitfit' is not a PEFT mode"):
        wrap_with_peft(tiny_model("bert"), BitFitConfig())


def test_without_peft_installed_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(UsageError, match=r"--mode lora / beft needs the peft package: pip install "
                                         r"'bitfit-tasks\[peft\]'"):
        import_peft()


def test_lora_recipe_fills_what_the_user_did_not_set(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=float("nan"), report_to=[])
    decided = apply_recipe(args, "lora", "auto", explicit={"num_train_epochs"})
    assert decided == {"recipe": "lora", "recipe_applied": {
        "learning_rate": 4e-4, "lr_scheduler_type": "linear", "per_device_train_batch_size": 16,
        "warmup_steps": 0.06}}
    assert args.get_warmup_steps(100) == 6
    beft = apply_recipe(TrainingArguments(output_dir=str(tmp_path), learning_rate=float("nan"), report_to=[]),
                        "beft", "auto", explicit=set())
    assert beft["recipe"] == "official" and beft["recipe_applied"]["learning_rate"] == 1e-3


# ---- runners and the sweep, as a user runs them ------------------------------------------------------------------

def run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def glue_args(model_dir, out, *extra):
    return [os.path.join(REPO, "run_glue.py"), "--task_name", "mrpc", "--data_dir", os.path.join(FIXTURES, "glue"),
            "--model_name_or_path", model_dir, "--output_dir", str(out), "--max_seq_length", "32",
            "--use_cpu", "true", "--disable_tqdm", "true", "--train_eval_samples", "0", *extra]


@pytest.mark.parametrize("mode", ["lora", "beft"])
def test_run_glue_trains_saves_resumes_and_reports(mode, tiny_model_dir, tmp_path):
    whole = tmp_path / "whole"
    proc = run(glue_args(tiny_model_dir, whole, "--mode", mode, "--num_train_epochs", "3", "--save_strategy", "epoch",
                         "--per_device_train_batch_size", "8"), tmp_path)
    res = json.loads((whole / "results.json").read_text())
    assert f"mrpc ({mode}): best f1 {res['best']:.4f}" in proc.stdout
    assert res["mode"] == mode and res["method_options"]["peft_targets"] == (["q", "v"] if mode == "lora" else ["v"])
    assert res["saved_weights_bytes"] == (whole / "adapter_model.safetensors").stat().st_size
    assert res["train_step_seconds"] > 0 and res["timed_steps"] == res["optimizer_steps"]
    # The saved adapter is the headline's evaluation: its predictions re-score to the saved f1.
    rows = [json.loads(x) for x in (whole / "predictions_validation.jsonl").read_text().splitlines()]
    tp = sum(r["label"] == r["prediction"] == "equivalent" for r in rows)
    fp = sum(r["prediction"] == "equivalent" != r["label"] for r in rows)
    fn = sum(r["label"] == "equivalent" != r["prediction"] for r in rows)
    assert res["saved_metrics"]["eval_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    ids = torch.randint(1, 20, (3, 9))
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir),
                                              str(whole)).eval()(input_ids=ids).logits
    if mode == "beft":  # the run's BEFT adapter serves as a delta on the shared backbone
        from transformers import AutoModel

        from bitfit_tasks import MultiTaskBitFit

        served = MultiTaskBitFit(AutoModel.from_pretrained(tiny_model_dir))
        served.add_task("mrpc", str(whole))
        rows = served.forward_mixed(["mrpc"] * 3, input_ids=ids)
        assert torch.allclose(torch.stack([r["logits"] for r in rows]), want, atol=1e-5)
    # Killed after the first epoch: resuming its checkpoint ends where the whole run ended.
    steps = sorted(whole.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(steps[0], cut / steps[0].name)
    run(glue_args(tiny_model_dir, cut, "--mode", mode, "--num_train_epochs", "3", "--save_strategy", "epoch",
                  "--per_device_train_batch_size", "8", "--resume_from_checkpoint", "true"), tmp_path)
    resumed = json.loads((cut / "results.json").read_text())
    assert resumed["resumed_from"].endswith(steps[0].name)
    assert [h["eval_f1"] for h in resumed["history"]] == [h["eval_f1"] for h in res["history"]]
    from safetensors.torch import load_file

    assert_same(load_file(str(whole / "adapter_model.safetensors")), load_file(str(cut / "adapter_model.safetensors")))


def test_sweep_compares_the_four_methods(tiny_model_dir, tmp_path):
    proc = run(["-m", "bitfit_tasks.sweep", "--tasks", "mrpc", "--methods", "full", "bitfit", "beft", "lora",
                "--seeds", "1", "--full_lrs", "2e-5", "--bias_lrs", "1e-3", "--lora_lrs", "4e-4", "--output_dir",
                str(tmp_path / "grid"), "--", "--data_dir", os.path.join(FIXTURES, "glue"), "--model_name_or_path",
                tiny_model_dir, "--num_train_epochs", "1", "--max_seq_length", "32", "--use_cpu", "true",
                "--disable_tqdm", "true", "--train_eval_samples", "0"], REPO)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    table = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert [r.split(" | ")[0] for r in rows[1:5]] == ["| full", "| lora", "| bitfit", "| beft"]
    for method in ("full", "bitfit", "beft", "lora"):
        cell = table[method]["mrpc"]
        run_res = json.loads(Path(tmp_path, "grid", "mrpc", method, f"lr{cell['best_lr']:g}", "seed1",
                                  "results.json").read_text())
        assert cell["trainable_params"] == run_res["trainable_params"]
        assert any(r.startswith(f"| {method} | mrpc | {run_res['trainable_params']:,d} (") for r in rows)
    assert table["lora"]["mrpc"]["best_lr"] == 4e-4 and table["beft"]["mrpc"]["best_lr"] == 1e-3
    assert table["beft"]["mrpc"]["trainable_params"] < table["bitfit"]["mrpc"]["trainable_params"]


def test_a_tagging_adapter_reloads_as_its_model_card_says(tiny_model_dir, tmp_path):
    """A POS head has as many outputs as tags, not the base's two: the folder keeps the task config, and the
    card's own lines load it (before: a size-mismatch error from PeftModel.from_pretrained)."""
    out = tmp_path / "pos"
    run([os.path.join(REPO, "run_pos.py"), "--treebank", os.path.join(FIXTURES, "pos", "treebank"),
         "--unknown_tags", "count_wrong", "--model_name_or_path", tiny_model_dir, "--ignore_mismatched_sizes", "true",
         "--output_dir", str(out),
         "--mode", "lora", "--num_train_epochs", "1", "--use_cpu", "true", "--disable_tqdm", "true"], tmp_path)
    card = (out / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("THIS_FOLDER", str(out))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 -- the card's own lines, as a user runs them
    config = json.loads((out / "config.json").read_text())
    assert len(config["id2label"]) > 2
    with torch.no_grad():
        logits = scope["model"].eval()(input_ids=torch.tensor([[2, 7, 9, 3]])).logits
    assert logits.shape == (1, 4, len(config["id2label"]))


def test_the_sweep_gives_peft_options_to_peft_runs_only_and_checks_every_run_first(tmp_path):
    from bitfit_tasks.experiments.sweep import run_grid

    ran: list[list[str]] = []
    common = dict(tasks=["mrpc"], seeds=[1], output_dir=str(tmp_path / "grid"), bias_lrs=[1e-3], lora_lrs=[4e-4],
                  runner="glue", main=ran.append)
    data = ["--data_dir", os.path.join(FIXTURES, "glue")]
    run_grid(methods=["bitfit", "lora", "beft"], extra_args=[*data, "--peft_targets", "q", "k", "--lora_r=4"],
             **common)
    by_mode = {a[a.index("--mode") + 1]: a for a in ran}
    assert "--peft_targets" not in by_mode["bitfit"] and "--lora_r=4" not in by_mode["bitfit"]
    at = by_mode["lora"].index("--peft_targets")
    assert by_mode["lora"][at:at + 3] == ["--peft_targets", "q", "k"] and "--lora_r=4" in by_mode["lora"]
    assert "--peft_targets" in by_mode["beft"] and "--lora_r=4" not in by_mode["beft"]
    # A bad option for the lora runs stops the grid before its first run (bitfit) trains.
    ran.clear()
    with pytest.raises(UsageError, match=r"--lora_r must be >= 1, got 0"):
        run_grid(methods=["bitfit", "lora"], extra_args=[*data, "--lora_r", "0"],
                 **{**common, "output_dir": str(tmp_path / "bad")})
    assert ran == []


def test_the_bias_change_analysis_says_a_peft_run_has_none(tmp_path):
    from bitfit_tasks.experiments.analysis import analyze_run

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"is a LoRA / BEFT run \(a PEFT adapter folder\): it changes no bias of the "
                                         r"model, so there is no bias change to analyse"):
        analyze_run(str(tmp_path))
