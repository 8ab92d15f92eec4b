"""benchmarks/compare_table.py: every score re-computed from a run's prediction file, refused when it differs."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("compare_table", ROOT / "benchmarks" / "compare_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(root: Path, group: str, task: str, method: str, seed: int, metric: str, best: float,
         rows: list[dict] | dict, **extra) -> Path:
    run = root / group / task / method / "lr0.001" / f"seed{seed}"
    run.mkdir(parents=True)
    if isinstance(rows, dict):  # run_squad.py's predictions.json
        (run / "predictions.json").write_text(json.dumps(rows))
    else:
        with gzip.open(run / "predictions_validation.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    key = {"span F1 (seqeval)": "f1", "word accuracy": "accuracy"}.get(metric, metric)
    record = {"seed": seed, "learning_rate": 1e-3, "recipe": "official", "best": best, "metric": metric,
              "saved_metrics": {f"eval_{key}": best}, "best_epoch": 1, "trainable_params": 10,
              "all_params": 1000, "train_step_seconds": 0.5 + seed, "train_seconds": 9.0, "global_batch_size": 8,
              "optimizer_steps": 3, "saved_weights_bytes": 2048, "train_loss": 0.25,
              "method_options": {"peft_targets": ["v"]}, **extra}
    (run / "results.json").write_text(json.dumps(record))
    return run


def _mrpc(pred: list[str]) -> list[dict]:
    gold = ["equivalent", "equivalent", "not_equivalent", "not_equivalent"]
    return [{"idx": i, "label": g, "prediction": p} for i, (g, p) in enumerate(zip(gold, pred, strict=True))]


def _squad_dev(path: Path) -> Path:
    qas = [{"id": "q1", "answers": [{"text": "the cat"}]}, {"id": "q2", "answers": [{"text": "blue sky"}]},
           {"id": "q3", "answers": [{"text": "not asked"}]}]
    path.write_text(json.dumps({"data": [{"paragraphs": [{"qas": qas}]}]}))
    return path


def test_every_metric_is_rescored_and_tabled(tmp_path, table, capsys):
    root = tmp_path / "compare"
    # MRPC F1 of the positive class: (1 TP, 1 FN, 1 FP) -> 0.5; (2 TP, 1 FP) -> 0.8.
    _run(root, "glue", "mrpc", "bitfit", 1, "f1", 0.5, _mrpc(["equivalent", "not_equivalent"] * 2))
    _run(root, "glue", "mrpc", "bitfit", 2, "f1", 0.8, _mrpc(["equivalent"] * 3 + ["not_equivalent"]))
    _run(root, "glue", "stsb", "beft", 1, "spearmanr", 1.0,
         [{"idx": i, "label": g, "prediction": p} for i, (g, p) in enumerate([(0.1, 1), (2.0, 3), (4.5, 9)])])
    _run(root, "pos", "wsj", "beft", 1, "word accuracy", 0.75,
         [{"tokens": ["a", "b"], "gold": ["DT", "NN"], "predicted": ["DT", "NN"]},
          {"tokens": ["c", "d"], "gold": ["VB", "NN"], "predicted": ["NN", "NN"]}])
    _run(root, "chunk", "conll", "beft", 1, "span F1 (seqeval)", 1.0,
         [{"tokens": ["a", "b"], "gold": ["B-NP", "I-NP"], "predicted": ["B-NP", "I-NP"]}])
    # SQuAD records F1 in percent: q1 exact after normalization (1.0), q2 "sky" against "blue sky" (2/3).
    _run(root, "squad", "frac0.01", "beft", 1, "f1", 100 * (1 + 2 / 3) / 2,
         {"q1": "The cat.", "q2": "sky"}, eval_examples=2)
    table.main([str(root), "--squad_dev", str(_squad_dev(tmp_path / "dev.json"))])
    out = capsys.readouterr().out
    assert "| method | conll (span F1 (seqeval)) | mrpc (f1) | stsb (spearmanr) | wsj (word accuracy) | frac0.01 (f1) |" in out
    assert "| BitFit (all biases) | – | 65.0±21.2 (n=2) | – | – | – | 10–10 (1.00%) | 2.000 (8) | 2 KiB |" in out
    assert "| BEFT (v) | 100.0 (n=1) | – | 100.0 (n=1) | 75.0 (n=1) | 83.3 (n=1) |" in out
    record = json.loads((root / "comparison.json").read_text())
    assert len(record["runs"]) == 6
    squad = next(r for r in record["runs"] if r["task"] == "frac0.01")
    assert squad["best"] == pytest.approx(5 / 6) and squad["rescored"] == pytest.approx(5 / 6)
    assert record["table"]["bitfit"]["mrpc"]["train_step_seconds"] == 2.0  # the median over seeds


def test_a_score_its_predictions_do_not_give_is_refused(tmp_path, table):
    root = tmp_path / "compare"
    _run(root, "glue", "mrpc", "bitfit", 1, "f1", 0.7, _mrpc(["equivalent", "not_equivalent"] * 2))
    with pytest.raises(SystemExit, match=r"re-scored 0\.5 but results\.json saved 0\.7"):
        table.main([str(root)])


def test_squad_needs_its_dev_file_and_every_answer(tmp_path, table):
    root = tmp_path / "compare"
    run = _run(root, "squad", "frac0.01", "lora", 1, "f1", 100.0, {"q1": "cat"}, eval_examples=1)
    with pytest.raises(SystemExit, match=r"a SQuAD run; re-scoring it needs the dev file \(--squad_dev .*nowhere"):
        table.main([str(root), "--squad_dev", str(tmp_path / "nowhere.json")])
    (run / "results.json").write_text(json.dumps({**json.loads((run / "results.json").read_text()),
                                                  "eval_examples": 2}))
    with pytest.raises(SystemExit, match="predictions.json holds 1 answers, the run scored 2 questions"):
        table.main([str(root), "--squad_dev", str(_squad_dev(tmp_path / "dev.json"))])
    (run / "predictions.json").write_text(json.dumps({"q1": "cat", "q9": "dog"}))
    with pytest.raises(SystemExit, match=r"1 predicted question ids are not in it \(e\.g\. q9\)"):
        table.main([str(root), "--squad_dev", str(tmp_path / "dev.json")])


def test_squad_answer_normalization_is_the_official_one(table):
    assert table._squad_f1("The Cat!", "cat") == 1.0
    assert table._squad_f1("a blue  sky", "blue sky") == 1.0
    assert table._squad_f1("dog", "cat") == 0.0
    assert table._squad_f1("big red dog", "red dog") == pytest.approx(0.8)
    assert table._squad_normalize("the-cat") == "thecat"  # punctuation goes before the articles
