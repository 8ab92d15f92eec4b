"""Chunking and BIO NER through run_pos.py: seqeval span scores, tag columns and fields, scheme checks."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES

from bitfit_tasks.tasks import metrics as M
from bitfit_tasks.tasks.pos.data import read_file
from bitfit_tasks.tasks.pos.run import main
from bitfit_tasks.tasks.pos.tagging import resolve_tag_scheme

POS = f"{FIXTURES}/pos"


def test_seqeval_scores_a_known_bio_prediction():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-NP", "I-NP", "B-VP"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-NP", "B-NP", "B-VP"]]
    # gold spans: PER, LOC, NP(0-1), VP = 4; predicted: PER, ORG, NP(0), NP(1), VP = 5; correct: PER, VP
    m = M.seqeval_metrics(gold, pred)
    assert m["precision"] == pytest.approx(2 / 5)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    assert m["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert m["per_type"]["LOC"]["recall"] == 0.0 and m["per_type"]["LOC"]["support"] == 1
    assert m["per_type"]["NP"]["precision"] == 0.0 and m["per_type"]["VP"]["f1"] == 1.0
    # A word with no prediction (cut by the length limit) counts as O: the LOC span is missed.
    assert M.seqeval_metrics([["B-LOC", "O"]], [[None, "O"]])["recall"] == 0.0


def test_bio_tag_set_detection_and_scheme():
    assert M.is_bio_tag_set(["B-NP", "I-NP", "O", "B-PP"])
    assert M.is_bio_tag_set(["S-PER", "E-LOC", "O"])
    assert not M.is_bio_tag_set(["NN", "VBD", "DT"])
    assert not M.is_bio_tag_set(["O"])  # nothing to score as spans
    assert resolve_tag_scheme("auto", ["B-NP", "O"]) == "bio"
    assert resolve_tag_scheme("auto", ["NN", "O"]) == "pos"
    assert resolve_tag_scheme("pos", ["B-NP", "O"]) == "pos"
    with pytest.raises(ValueError, match=r"--tag_scheme bio: the training tags are not BIO \(e.g. \['DT'"):
        resolve_tag_scheme("bio", ["DT", "NN", "O"])


def test_conll2000_chunk_column_and_ner_jsonl_field():
    chunks = read_file(f"{POS}/chunk_train.txt", tag_column=2)
    assert len(chunks) == 12 and chunks[0]["tags"][:3] == ["B-NP", "B-PP", "B-NP"]
    ner = read_file(f"{POS}/ner.jsonl", tag_field="ner_tags")
    assert ner[0]["tags"][:2] == ["B-PER", "I-PER"]
    with pytest.raises(ValueError, match=r"needs columns tokens and pos_tags; .* --tag_field, e.g. ner_tags"):
        read_file(f"{POS}/ner.jsonl")


def test_classlabel_ids_map_back_to_names(tmp_path):
    import datasets

    feats = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                               "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"]))})
    path = tmp_path / "ner.parquet"
    datasets.Dataset.from_dict({"tokens": [["Ann", "Lee", "ran"]], "ner_tags": [[1, 2, 0]]},
                               features=feats).to_parquet(str(path))
    assert read_file(str(path), tag_field="ner_tags") == [{"tokens": ["Ann", "Lee", "ran"],
                                                          "tags": ["B-PER", "I-PER", "O"]}]


def _rescore(pred_file):
    rows = [json.loads(line) for line in open(pred_file, encoding="utf-8")]
    return M.seqeval_metrics([r["gold"] for r in rows], [r["predicted"] for r in rows])


@pytest.mark.parametrize("mode", ["bitfit", "full"])
def test_run_pos_chunking_reports_seqeval(mode, tiny_model_dir, tmp_path):
    res = main(["--task_name", "chunk", "--train_file", f"{POS}/chunk_train.txt", "--validation_file",
                f"{POS}/chunk_test.txt", "--test_file", f"{POS}/chunk_test.txt", "--tag_column", "2",
                "--unknown_tags", "count_wrong", "--model_name_or_path", tiny_model_dir, "--output_dir",
                str(tmp_path), "--num_train_epochs", "2", "--use_cpu", "true", "--mode", mode,
                "--learning_rate", "1e-2" if mode == "bitfit" else "1e-4", "--disable_tqdm", "true",
                "--ignore_mismatched_sizes", "true"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metric"] == "span F1 (seqeval)" and saved["tag_scheme"] == "bio"
    last = saved["history"][-1]
    assert {"eval_precision", "eval_recall", "eval_f1", "eval_per_type", "eval_accuracy"} <= set(last)
    assert "NP" in last["eval_per_type"] and saved["best"] == max(h["eval_f1"] for h in saved["history"])
    # The predictions written for the test split re-score (seqeval) to the recorded test F1.
    again = _rescore(tmp_path / "predictions_test.jsonl")
    assert again["f1"] == pytest.approx(res["test_f1"]) and again["recall"] == pytest.approx(res["test_recall"])
    assert set(res["test_per_type"]) == set(again["per_type"])


def test_run_pos_ner_jsonl(tiny_model_dir, tmp_path):
    main(["--task_name", "ner", "--train_file", f"{POS}/ner.jsonl", "--validation_file", f"{POS}/ner.jsonl",
          "--tag_field", "ner_tags", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path),
          "--num_train_epochs", "1", "--use_cpu", "true", "--disable_tqdm", "true",
          "--ignore_mismatched_sizes", "true"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["tag_scheme"] == "bio" and set(saved["history"][-1]["eval_per_type"]) == {"PER", "LOC", "ORG"}
    assert _rescore(tmp_path / "predictions_validation.jsonl")["f1"] == pytest.approx(saved["final"])


def test_bio_scheme_on_pos_tags_is_refused_before_model_load(tmp_path):
    with pytest.raises(ValueError, match=r"--tag_scheme bio: the training tags are not BIO"):
        main(["--train_file", f"{POS}/chunk_train.txt", "--validation_file", f"{POS}/chunk_test.txt",
              "--tag_scheme", "bio", "--unknown_tags", "count_wrong", "--model_name_or_path", "/nonexistent",
              "--output_dir", str(tmp_path), "--use_cpu", "true"])

