"""Is the model a GLUE run saved the one its headline scores? For each run folder: re-score its
``predictions_<split>.jsonl`` with scikit-learn against the original dev labels (matched by ``idx``),
and load the saved delta onto the base with ``load_task_model`` and recompute the dev loss; both
are compared with the evaluation ``results.json`` says was saved (``saved_metrics``) and with the
headline ``best``.

    python benchmarks/check_saved_model.py --data_dir ../shared/data/glue \
        benchmarks/results/best-epoch/mrpc/bitfit/lr0.001/seed* --output benchmarks/results/best-epoch/check.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from bitfit_tasks.delta.apply import load_task_model
from bitfit_tasks.tasks.glue.data import GLUE_TASKS, check_and_encode_labels, load_glue
from bitfit_tasks.tasks.glue.run import GlueArguments
from bitfit_tasks.utils.fileio import atomic_write_text


def rescore(pred_file: Path, gold: dict[int, str], metric: str) -> dict[str, float]:
    rows = [json.loads(line) for line in pred_file.read_text().splitlines() if line.strip()]
    y = [gold[r["idx"]] for r in rows]
    p = [r["prediction"] for r in rows]
    out = {"accuracy": accuracy_score(y, p), "n_examples": len(rows)}
    if metric == "f1":
        pos = sorted(set(y))[0] if "equivalent" not in y else "equivalent"  # MRPC's positive class
        out["f1"] = f1_score(y, p, pos_label=pos)
    if metric == "matthews_correlation":
        out["matthews_correlation"] = matthews_corrcoef(y, p)
    return out


def dev_loss(run: Path, res: dict[str, Any], data_dir: str, max_seq_length: int) -> float:
    task = GLUE_TASKS[res["task"]]
    args = GlueArguments(task_name=res["task"], data_dir=data_dir)
    split = task.eval_splits[0]
    dev = check_and_encode_labels(load_glue(args)[split], task, split)
    tok = AutoTokenizer.from_pretrained(res["model"])
    k1, k2 = task.keys
    enc = dev.map(lambda b: tok(*((b[k1],) if k2 is None else (b[k1], b[k2])), truncation=True,
                                max_length=max_seq_length),
                  batched=True, remove_columns=[c for c in dev.column_names if c != "label"])
    model = load_task_model(res["model"], run)
    with tempfile.TemporaryDirectory() as tmp:  # nothing written into the run folder
        targs = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=128, report_to="none", use_cpu=True,
                                  save_strategy="no")
        trainer = Trainer(model=model, args=targs, eval_dataset=enc, data_collator=DataCollatorWithPadding(tok))
        return float(trainer.evaluate()["eval_loss"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--max_seq_length", type=int, default=128)
    ap.add_argument("--output")
    a = ap.parse_args()
    hf_logging.set_verbosity_error()
    records = []
    for run in map(Path, a.runs):
        res = json.loads((run / "results.json").read_text())
        task = GLUE_TASKS[res["task"]]
        gold_rows = [json.loads(line) for line in
                     (Path(a.data_dir) / res["task"] / "validation.jsonl").read_text().splitlines() if line.strip()]
        gold = {r["idx"]: task.labels[int(r["label"])] for r in gold_rows}
        key = f"eval_{task.metric}"
        again = rescore(run / "predictions_validation.jsonl", gold, task.metric)
        loss = dev_loss(run, res, a.data_dir, a.max_seq_length)
        rec = {
            "run": str(run), "seed": res["seed"], "best": res["best"], "best_epoch": res["best_epoch"],
            "final": res["final"], "saved": res["saved"], "saved_epoch": res["saved_epoch"],
            "rescored_predictions": again, "rescored_equals_best": again[task.metric] == res["best"],
            "saved_eval_loss": res["saved_metrics"]["eval_loss"], "final_eval_loss": res["final_metrics"]["eval_loss"],
            "reloaded_delta_eval_loss": loss,
            "reloaded_loss_diff": abs(loss - res["saved_metrics"]["eval_loss"]),
            "saved_score": res["saved_metrics"][key],
        }
        records.append(rec)
        print(f"{run}: best {res['best']:.4f} (epoch {res['best_epoch']}), final {res['final']:.4f}; "
              f"predictions re-scored {task.metric} {again[task.metric]:.4f} (equal to best: "
              f"{rec['rescored_equals_best']}); reloaded delta dev loss {loss:.6f} vs saved epoch's "
              f"{rec['saved_eval_loss']:.6f} (last epoch's {rec['final_eval_loss']:.6f})", flush=True)
    if a.output:
        atomic_write_text(Path(a.output), json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
