"""The method comparison (full / LoRA / BitFit / BEFT) from the records of benchmarks/compare_methods.sh.

Per task and method: the mean ± std over seeds of the best dev score, every run's score re-computed from the
prediction file it saved (with scikit-learn, scipy and seqeval, not the package's metric code; SQuAD answers with
the official v1.1 normalization against the dev file's answers, ``--squad_dev``) and checked against its
results.json; trainable values and their share of the model; the median training-step time; the
bytes of the weights the run saved. Writes <root>/comparison.json (every run's numbers) and prints the table.

    python benchmarks/compare_table.py benchmarks/results/compare-methods [--squad_dev DEV_JSON]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import statistics
import string
from pathlib import Path

METHODS = ("full", "lora", "bitfit", "beft")


def method_name(method: str, record: dict) -> str:
    """The row's name, from what the run recorded (LoRA's rank and targets, BEFT's targets)."""
    options = record.get("method_options") or {}
    targets = ", ".join(options.get("peft_targets", []))
    if method == "lora":
        return f"LoRA r={options.get('lora_r')}, alpha={options.get('lora_alpha'):g} ({targets})"
    if method == "beft":
        return f"BEFT ({targets})"
    return {"full": "full FT", "bitfit": "BitFit (all biases)"}.get(method, method)


def _lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(x) for x in f if x.strip()]


PUNCTUATION = frozenset(string.punctuation)


def _squad_normalize(text: str) -> str:
    """The official SQuAD v1.1 evaluation script's answer normalization (written out here, not taken from the
    package's metrics, so that the re-scoring checks that code rather than repeating it)."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _squad_f1(prediction: str, truth: str) -> float:
    pred, gold = _squad_normalize(prediction).split(), _squad_normalize(truth).split()
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_f1(predictions: dict[str, str], dev_file: Path) -> float:
    """Official SQuAD v1.1 F1 (as a fraction) of {question id: answer text} against the dev file's answers."""
    answers = {qa["id"]: [a["text"] for a in qa["answers"]]
               for article in json.loads(dev_file.read_text())["data"]
               for paragraph in article["paragraphs"] for qa in paragraph["qas"]}
    missing = set(predictions) - set(answers)
    if missing:
        raise SystemExit(f"{dev_file}: {len(missing)} predicted question ids are not in it (e.g. {min(missing)})")
    return statistics.fmean(max(_squad_f1(text, truth) for truth in answers[qid])
                            for qid, text in predictions.items())


def is_squad_run(run: Path) -> bool:
    """run_squad.py writes predictions.json ({question id: answer text}) and records EM/F1 in percent."""
    return (run / "predictions.json").exists()


def rescore(run: Path, record: dict, squad_dev: Path | None = None) -> float:
    """The run's saved score on its record's own scale, from its prediction file alone (SQuAD: and the dev
    file's answers)."""
    if is_squad_run(run):
        if squad_dev is None or not squad_dev.exists():
            raise SystemExit(f"{run}: a SQuAD run; re-scoring it needs the dev file (--squad_dev {squad_dev})")
        predictions = json.loads((run / "predictions.json").read_text())
        if len(predictions) != record["eval_examples"]:
            raise SystemExit(f"{run}: predictions.json holds {len(predictions)} answers, the run scored "
                             f"{record['eval_examples']} questions")
        return 100 * squad_f1(predictions, squad_dev)
    files = sorted(run.glob("predictions_validation.jsonl*"))
    if not files:
        raise SystemExit(f"{run}: no predictions_validation.jsonl[.gz] to re-score")
    rows = _lines(files[0])
    metric = record["metric"]
    if metric in ("f1", "accuracy", "spearmanr"):  # GLUE rows: {"idx", "label", "prediction"}
        gold = [r["label"] for r in rows]
        pred = [r["prediction"] for r in rows]
        if metric == "spearmanr":
            from scipy.stats import spearmanr

            return float(spearmanr(pred, gold).correlation)
        if metric == "f1":
            from sklearn.metrics import f1_score

            return float(f1_score(gold, pred, pos_label="equivalent"))
        return sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold)
    if metric == "word accuracy":  # tagging rows: {"tokens", "gold", "predicted"}; a truncated word is wrong
        pairs = [(g, p) for r in rows for g, p in zip(r["gold"], r["predicted"], strict=True)]
        return sum(g == p for g, p in pairs) / len(pairs)
    if metric == "span F1 (seqeval)":
        from seqeval.metrics import f1_score

        return float(f1_score([r["gold"] for r in rows],
                              [[p if p is not None else "O" for p in r["predicted"]] for r in rows]))
    raise SystemExit(f"{run}: no re-scoring for metric {metric!r}")


def fmt(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}±{100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def size(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="the output folder of benchmarks/compare_methods.sh")
    p.add_argument("--squad_dev", type=Path,
                   default=Path(os.environ.get("SHARED_DATA", "../shared/data"), "squad", "dev-v1.1.rebuilt.json"),
                   help="the SQuAD dev file the squad runs were scored on (default: %(default)s)")
    a = p.parse_args(argv)
    runs = []
    for path in sorted(a.root.glob("*/*/*/lr*/seed*/results.json")):
        r = json.loads(path.read_text())
        task, method = path.parts[-5], path.parts[-4]
        score = rescore(path.parent, r, a.squad_dev)
        saved = r["saved_metrics"][next(k for k in r["saved_metrics"] if k == f"eval_{metric_key(r)}")]
        if abs(score - saved) > 1e-6 or abs(saved - r["best"]) > 1e-12:
            raise SystemExit(f"{path.parent}: re-scored {score} but results.json saved {saved} / best {r['best']}")
        unit = 100 if is_squad_run(path.parent) else 1  # the table holds fractions
        runs.append({"task": task, "method": method, "seed": r["seed"], "learning_rate": r["learning_rate"],
                     "recipe": r.get("recipe"), "best": r["best"] / unit, "rescored": score / unit,
                     "best_epoch": r["best_epoch"],
                     "trainable_params": r["trainable_params"], "all_params": r["all_params"],
                     "train_step_seconds": r["train_step_seconds"], "train_seconds": r["train_seconds"],
                     "global_batch_size": r["global_batch_size"], "optimizer_steps": r["optimizer_steps"],
                     "saved_weights_bytes": r["saved_weights_bytes"], "metric": r["metric"],
                     "name": method_name(method, r), "train_loss": r.get("train_loss"),
                     "run": str(path.parent.relative_to(a.root))})
    tasks = list(dict.fromkeys(x["task"] for x in runs))
    table: dict[str, dict[str, dict]] = {}
    for m in METHODS:
        for t in tasks:
            cell = [x for x in runs if x["task"] == t and x["method"] == m]
            if not cell:
                continue
            if len({(x["learning_rate"], x["name"]) for x in cell}) > 1:
                raise SystemExit(f"{t}/{m}: runs with several learning rates or options; this table takes one "
                                 "setting per method (the comparison's own grid)")
            table.setdefault(m, {})[t] = {
                "scores": [x["best"] for x in cell], "seeds": [x["seed"] for x in cell],
                "cell": fmt([x["best"] for x in cell]),
                "mean": statistics.fmean(x["best"] for x in cell),
                "std": statistics.stdev(x["best"] for x in cell) if len(cell) > 1 else 0.0,
                "learning_rate": cell[0]["learning_rate"], "recipe": cell[0]["recipe"],
                "trainable_params": cell[0]["trainable_params"], "all_params": cell[0]["all_params"],
                "train_step_seconds": statistics.median(x["train_step_seconds"] for x in cell
                                                        if x["train_step_seconds"] is not None),
                "global_batch_size": cell[0]["global_batch_size"],
                "saved_weights_bytes": statistics.median(x["saved_weights_bytes"] or 0 for x in cell) or None,
                "name": cell[0]["name"],
                "train_loss": statistics.fmean(x["train_loss"] for x in cell) if all(
                    x["train_loss"] is not None for x in cell) else None,
            }
    metric = {t: next(x["metric"] for x in runs if x["task"] == t) for t in tasks}
    head = " | ".join(f"{t} ({metric[t]})" for t in tasks)
    out = [f"| method | {head} | trainable values (share of the model) | step s, per task (batch) | saved weights |",
           "|---" * (len(tasks) + 4) + "|"]
    for cells in table.values():
        c0 = cells[tasks[0]] if tasks[0] in cells else next(iter(cells.values()))
        scores = [f"{cells[t]['cell']} (n={len(cells[t]['scores'])})" if t in cells else "–" for t in tasks]
        steps = ", ".join(f"{cells[t]['train_step_seconds']:.3f}" for t in tasks if t in cells)
        trainable = sorted({cells[t]["trainable_params"] for t in cells})
        shares = sorted(100 * cells[t]["trainable_params"] / cells[t]["all_params"] for t in cells)
        low, high = f"{shares[0]:.2f}", f"{shares[-1]:.2f}"
        share = f"{low}–{high}%" if low != high else f"{low}%"
        sizes = sorted(cells[t]["saved_weights_bytes"] for t in cells if cells[t]["saved_weights_bytes"])
        saved = "not saved" if not sizes else size(sizes[0]) if size(sizes[0]) == size(sizes[-1]) else (
            f"{size(sizes[0])}–{size(sizes[-1])}")
        out.append(f"| {c0['name']} | {' | '.join(scores)} | {trainable[0]:,d}–{trainable[-1]:,d} ({share}) | "
                   f"{steps} ({c0['global_batch_size']}) | {saved} |")
    md = "\n".join(out)
    (a.root / "comparison.json").write_text(json.dumps({"runs": runs, "table": table}, indent=1))
    print(md)
    print(f"\n{len(runs)} runs, each re-scored from its prediction file: equal to its results.json (|diff| <= 1e-6).")


def metric_key(record: dict) -> str:
    return {"span F1 (seqeval)": "f1", "word accuracy": "accuracy"}.get(record["metric"], record["metric"])


if __name__ == "__main__":
    main()
