from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest
from conftest import FIXTURES

from bitfit_tasks.tasks.glue.run import (
    GLUE_TASKS,
    GlueArguments,
    check_and_encode_labels,
    load_glue,
    main,
    sample,
)

GLUE_DIR = os.path.join(FIXTURES, "glue")
TASKS = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]


def args_for(task: str, **kw) -> GlueArguments:
    if task == "wnli":
        with pytest.warns(UserWarning, match="WNLI is excluded by the BitFit paper"):
            return GlueArguments(task_name=task, data_dir=GLUE_DIR, **kw)
    return GlueArguments(task_name=task, data_dir=GLUE_DIR, **kw)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_loads_and_tokenizes(task, tiny_model_dir):
    from transformers import AutoTokenizer

    spec = GLUE_TASKS[task]
    args = args_for(task)
    if task == "mnli":
        args.validation_mismatched_file = os.path.join(GLUE_DIR, "mnli", "validation_mismatched.jsonl")
    raw = load_glue(args)
    assert set(raw) == {"train", *spec.eval_splits}
    train = check_and_encode_labels(raw["train"], spec, "train")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    k1, k2 = spec.keys
    row = train[0]
    enc = tok(row[k1], row[k2]) if k2 else tok(row[k1])
    # Pair tasks put the second sentence in segment 1; single-sentence tasks have none.
    assert (1 in enc["token_type_ids"]) == (k2 is not None)
    # Every word of the fixtures is in the tiny vocab, and pairs are joined with one extra [SEP].
    assert tok.unk_token_id not in enc["input_ids"]
    assert enc["input_ids"].count(tok.sep_token_id) == (2 if k2 else 1)
    if spec.is_regression:
        assert isinstance(train[0]["label"], float)
    else:
        assert set(train["label"]) <= set(range(spec.num_labels))


@pytest.mark.parametrize("ext", ["csv", "tsv", "parquet", "json"])
def test_local_formats_read_the_same_rows(ext, tmp_path):
    src = Path(GLUE_DIR) / "rte"
    for split in ("train", "validation"):
        df = pd.read_json(src / f"{split}.jsonl", lines=True)
        path = tmp_path / "rte" / f"{split}.{ext}"
        path.parent.mkdir(exist_ok=True)
        {"csv": lambda: df.to_csv(path, index=False), "tsv": lambda: df.to_csv(path, sep="\t", index=False),
         "parquet": lambda: df.to_parquet(path), "json": lambda: df.to_json(path, orient="records")}[ext]()
    raw = load_glue(GlueArguments(task_name="rte", data_dir=str(tmp_path)))
    want = pd.read_json(src / "train.jsonl", lines=True)
    assert raw["train"]["sentence1"] == list(want["sentence1"])
    assert list(raw["train"]["label"]) == list(want["label"])


def test_string_labels_are_mapped(tmp_path):
    rows = [{"sentence1": "a", "sentence2": "b", "label": "not_entailment"},
            {"sentence1": "c", "sentence2": "d", "label": "entailment"}]
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    raw = load_glue(GlueArguments(task_name="rte", train_file=str(f), validation_file=str(f)))
    encoded = check_and_encode_labels(raw["train"], GLUE_TASKS["rte"], "train")
    assert encoded["label"] == [1, 0]
    assert encoded.features["label"].names == ["entailment", "not_entailment"]  # a datasets ClassLabel


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown GLUE task 'mnli2'; choose one of"):
        GlueArguments(task_name="mnli2")
    with pytest.raises(ValueError, match=r"unsupported data file .*\.txt"):
        GlueArguments(task_name="rte", train_file="a.txt", validation_file="b.txt")
    with pytest.raises(ValueError, match=r"give both --train_file and --validation_file"):
        GlueArguments(task_name="rte", train_file="a.jsonl")
    with pytest.raises(FileNotFoundError, match=r"no train file for task 'qqp'"):
        GlueArguments(task_name="qqp", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"--validation_mismatched_file is for --task_name mnli only"):
        GlueArguments(task_name="rte", data_dir=GLUE_DIR, validation_mismatched_file="x.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": 0}) + "\n")
    raw = load_glue(GlueArguments(task_name="rte", train_file=str(bad), validation_file=str(bad)))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['sentence1', 'sentence2'\].*has \['text', 'label'\]"):
        check_and_encode_labels(raw["train"], GLUE_TASKS["rte"], "train")
    for label, msg in [(-1, r"label -1 out of range 0..1 \(-1 marks the unlabelled GLUE test split\)"),
                       ("maybe", r"unknown label 'maybe'; allowed: one of \['entailment', 'not_entailment'\]")]:
        bad.write_text(json.dumps({"sentence1": "x", "sentence2": "y", "label": label}) + "\n")
        raw = load_glue(GlueArguments(task_name="rte", train_file=str(bad), validation_file=str(bad)))
        with pytest.raises(ValueError, match=msg):
            check_and_encode_labels(raw["train"], GLUE_TASKS["rte"], "validation")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"sentence1": "x", \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:1: not a JSON line \(Expecting property name"):
        load_glue(GlueArguments(task_name="rte", train_file=str(broken), validation_file=str(broken)))


def test_sample_is_seeded_random_not_prefix():
    raw = load_glue(GlueArguments(task_name="rte", data_dir=GLUE_DIR))["train"]
    a, b, c = sample(raw, 10, 1), sample(raw, 10, 1), sample(raw, 10, 2)
    assert a["idx"] == b["idx"] != c["idx"]
    assert a["idx"] != raw["idx"][:10]
    assert len(sample(raw, 10**6, 0)) == len(raw)


MODES = [["--mode", "bitfit"], ["--mode", "bitfit", "--bias_terms", "qm2"], ["--mode", "full"],
         ["--mode", "frozen"], ["--mode", "rand_uniform"], ["--mode", "rand_row_col"]]


@pytest.mark.parametrize("mode_args", MODES, ids=lambda a: "-".join(a[1::2]))
def test_main_smoke_each_mode(mode_args, tiny_model_dir, tmp_path):
    argv = ["run_glue.py", "--task_name", "mrpc", "--data_dir", GLUE_DIR, "--model_name_or_path", tiny_model_dir,
            "--output_dir", str(tmp_path), "--num_train_epochs", "2", "--max_seq_length", "32",
            "--use_cpu", "true", "--disable_tqdm", "true", *mode_args]
    with mock.patch.object(sys, "argv", argv):
        res = main()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["mode"] == mode_args[1] == res["mode"]
    assert len(saved["history"]) == 2 and {"eval_f1", "eval_accuracy"} <= set(saved["history"][0])
    assert saved["best"] == max(h["eval_f1"] for h in saved["history"])
    assert saved["learning_rate"] == (2e-5 if mode_args[1] == "full" else 1e-3)  # the recipe defaults
    assert (tmp_path / "biases_and_head.safetensors").exists()
    # Bias-only modes leave a delta; full fine-tuning saves no 100%-size model unless asked.
    assert (tmp_path / "bitfit_delta.safetensors").exists() == (mode_args[1] != "full")
    assert not (tmp_path / "model.safetensors").exists()


def test_main_mnli_two_eval_sets_and_json_args(tiny_model_dir, tmp_path):
    cfg = {"task_name": "mnli", "train_file": f"{GLUE_DIR}/mnli/train.jsonl",
           "validation_file": f"{GLUE_DIR}/mnli/validation_matched.jsonl",
           "validation_mismatched_file": f"{GLUE_DIR}/mnli/validation_mismatched.jsonl",
           "model_name_or_path": tiny_model_dir, "output_dir": str(tmp_path), "num_train_epochs": 1,
           "bias_terms": ["q", "m2"], "use_cpu": True, "max_train_samples": 16, "learning_rate": 1e-3,
           "ignore_mismatched_sizes": True}
    f = tmp_path / "args.json"
    f.write_text(json.dumps(cfg))
    res = main([str(f)])
    assert res["bias_terms"] == ["q", "m2"] and res["train_examples"] == 16
    assert res["learning_rate"] == 1e-3
    last = res["history"][-1]
    assert "eval_validation_matched_accuracy" in last and "eval_validation_mismatched_accuracy" in last
    assert res["best"] == last["eval_validation_matched_accuracy"]


def test_stsb_regression_smoke(tiny_model_dir, tmp_path):
    res = main(["--task_name", "stsb", "--data_dir", GLUE_DIR, "--model_name_or_path", tiny_model_dir,
                "--output_dir", str(tmp_path), "--num_train_epochs", "1", "--use_cpu", "true",
                "--ignore_mismatched_sizes", "true"])
    assert res["metric"] == "spearmanr" and "eval_pearson" in res["history"][0]


def test_eval_subset_is_the_same_for_every_seed_and_method(tiny_model_dir, tmp_path):
    """--max_eval_samples draws with one fixed seed: methods and seeds are scored on the same examples,
    while the training subset follows the data seed."""
    idx, train = {}, {}
    for mode, seed in (("bitfit", "1"), ("full", "2"), ("frozen", "3")):
        out = tmp_path / f"{mode}{seed}"
        res = main(["--task_name", "mrpc", "--data_dir", GLUE_DIR, "--model_name_or_path", tiny_model_dir,
                    "--output_dir", str(out), "--num_train_epochs", "1", "--max_seq_length", "32", "--use_cpu", "true",
                    "--mode", mode, "--seed", seed, "--max_eval_samples", "6", "--max_train_samples", "8",
                    "--disable_tqdm", "true"])
        idx[mode] = [json.loads(x)["idx"] for x in (out / "predictions_validation.jsonl").read_text().splitlines()]
        train[mode] = res["train_examples"]
    assert len(idx["bitfit"]) == 6 and idx["bitfit"] == idx["full"] == idx["frozen"]
    from bitfit_tasks.tasks.sampling import sample_indices

    assert sample_indices(100, 1, k=8) != sample_indices(100, 2, k=8)  # training subsets differ by seed
    assert sample_indices(100, 1, fraction=0.1) == sample_indices(100, 1, k=10)
