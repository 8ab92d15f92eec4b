"""Recipes: one place for default learning rate, schedule, batch size and epochs; flags win."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from transformers import TrainingArguments

from bitfit_tasks.core.config import BitFitConfig
from bitfit_tasks.tasks.arguments import ModelArguments, RunArguments, parse_args
from bitfit_tasks.tasks.glue.run import GlueArguments, main
from bitfit_tasks.tasks.recipes import DEFAULT_FULL_LR, RECIPES, apply_recipe, recipe_for

GLUE_DIR = f"{FIXTURES}/glue"
TYPES = (ModelArguments, GlueArguments, BitFitConfig, RunArguments, TrainingArguments)


def _parse(argv):
    _, _, bitfit, run_args, targs = parse_args(TYPES, ["--model_name_or_path", "x", "--output_dir", "o", *argv])
    return bitfit, run_args, targs


def _decide(argv):
    bitfit, run_args, targs = _parse(argv)
    decided = apply_recipe(targs, bitfit.mode, run_args.recipe, run_args.explicit_args)
    return targs, decided


def test_official_recipe_fills_what_the_user_did_not_set():
    targs, decided = _decide(["--recipe", "official"])
    assert (targs.lr_scheduler_type.value, targs.per_device_train_batch_size, targs.num_train_epochs) == \
        ("constant", 8, 20.0)
    assert targs.learning_rate == RECIPES["official"].bias_lr and decided["recipe"] == "official"
    # flags win, on the command line and abbreviated
    targs, decided = _decide(["--recipe", "official", "--per_device_train_batch_size", "4", "--num_train_epochs=2",
                              "--learning_rate", "3e-3"])
    assert (targs.per_device_train_batch_size, targs.num_train_epochs, targs.learning_rate) == (4, 2.0, 3e-3)
    assert targs.lr_scheduler_type.value == "constant"
    assert set(decided["recipe_applied"]) == {"lr_scheduler_type"}


def test_json_argument_file_counts_as_explicit(tmp_path):
    f = tmp_path / "args.json"
    f.write_text('{"model_name_or_path": "x", "output_dir": "o", "recipe": "official", "num_train_epochs": 5}')
    _, _, bitfit, run_args, targs = parse_args(TYPES, [str(f)])
    apply_recipe(targs, bitfit.mode, run_args.recipe, run_args.explicit_args)
    assert targs.num_train_epochs == 5.0 and targs.per_device_train_batch_size == 8


def test_auto_gives_full_fine_tuning_its_own_recipe():
    targs, decided = _decide(["--mode", "full"])
    assert decided["recipe"] == "linear" and targs.learning_rate == DEFAULT_FULL_LR
    assert targs.lr_scheduler_type.value == "linear" and targs.per_device_train_batch_size == 16
    # bias-only modes: the recipe RESULTS.md found best per runner (official for GLUE and tagging)
    assert [recipe_for("auto", "bitfit", r).name for r in ("glue", "pos", "squad")] == ["official", "official", "linear"]
    assert recipe_for("auto", "full", "pos").name == "linear"
    targs, decided = _decide([])
    assert decided["recipe"] == "official" and targs.lr_scheduler_type.value == "constant"
    assert (targs.per_device_train_batch_size, targs.num_train_epochs, targs.learning_rate) == (8, 20.0, 1e-3)
    with pytest.raises(ValueError, match=r"unknown --recipe 'fast'; choose one of \['auto', 'linear', 'official', 'lora'\]"):
        recipe_for("fast", "bitfit")


def test_arguments_built_in_python_only_get_a_learning_rate():
    targs = TrainingArguments(output_dir="o", learning_rate=float("nan"), per_device_train_batch_size=3)
    apply_recipe(targs, "bitfit", "official", explicit=None)
    assert not math.isnan(targs.learning_rate) and targs.per_device_train_batch_size == 3
    assert targs.lr_scheduler_type.value == "linear"


def test_official_recipe_runs_a_constant_rate_for_the_configured_epochs(tiny_model_dir, tmp_path):
    res = main(["--task_name", "rte", "--data_dir", GLUE_DIR, "--model_name_or_path", tiny_model_dir,
                "--output_dir", str(tmp_path), "--recipe", "official", "--num_train_epochs", "3",
                "--learning_rate", "1e-2", "--use_cpu", "true", "--ignore_mismatched_sizes", "true",
                "--train_eval_samples", "10", "--disable_tqdm", "true"])
    assert res["recipe"] == "official" and res["lr_scheduler_type"] == "constant"
    assert res["global_batch_size"] == 8 and res["epochs"] == 3.0 and res["optimizer_steps"] == 3 * 3  # 24 / 8
    losses = res["train_loss_history"]
    assert [e["epoch"] for e in losses] == [1.0, 2.0, 3.0]  # one training loss per epoch
    assert all(e["learning_rate"] == pytest.approx(1e-2) for e in losses)  # constant to the last step
    assert all(math.isfinite(e["loss"]) for e in losses)
    for h in res["history"]:  # the fixed training sample is scored at every evaluation
        assert {"train_sample_loss", "train_sample_accuracy"} <= set(h)
    assert res["best_epoch"] in (1.0, 2.0, 3.0)


def _load_probe():
    spec = importlib.util.spec_from_file_location("cls_probe", Path(__file__).parents[1] / "benchmarks" / "cls_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe


def test_cls_probe_reads_a_trained_delta_and_sees_a_collapsed_layer(tiny_model_dir, tmp_path, bert):
    probe = _load_probe()
    run = tmp_path / "run"
    main(["--task_name", "rte", "--data_dir", GLUE_DIR, "--model_name_or_path", tiny_model_dir,
          "--output_dir", str(run), "--num_train_epochs", "1", "--learning_rate", "1e-2", "--use_cpu", "true",
          "--ignore_mismatched_sizes", "true", "--disable_tqdm", "true"])
    out = tmp_path / "probe.json"
    rec = probe.main([str(run), "--task", "rte", "--data_dir", GLUE_DIR, "--base_model", tiny_model_dir,
                      "--n_examples", "8", "--output", str(out)])
    assert torch.is_grad_enabled()  # the probe leaves no global state behind (later tests train)
    assert json.loads(out.read_text()) == rec and [r["run"] for r in rec["runs"]] == ["base model", str(run)]
    n_hidden = bert.config.num_hidden_layers + 1  # embeddings + each layer
    assert all(len(r["cls_input_dependence"]) == n_hidden for r in rec["runs"])
    moves = rec["runs"][1]["largest_bias_moves"]
    assert moves and all(m["name"].endswith("bias") and m["delta_norm"] > 0 for m in moves)
    # a last layer whose output ignores the input reads 0; the untouched model does not
    enc = {"input_ids": torch.randint(5, 50, (6, 7))}
    assert probe.cls_input_dependence(bert.eval(), enc)[-1] > 0.01
    with torch.no_grad():
        norm = bert.bert.encoder.layer[-1].output.LayerNorm
        norm.weight.zero_()
        norm.bias.copy_(torch.randn_like(norm.bias))  # the output is this bias, whatever the input
    assert probe.cls_input_dependence(bert, enc)[-1] == 0.0
