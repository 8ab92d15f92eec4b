"""The paper-style results table of a finished grid: per task and method, the learning rate with the
best mean dev score over seeds, that score's mean +- std, and the paper's BERT-base number beside it."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..utils.errors import UsageError
from ..utils.fileio import atomic_write_text

# BERT-base dev results (Tables 2 and 3), x100.
PAPER_GLUE: dict[str, dict[str, str]] = {
    "full": {"qnli": "90.7±0.2", "sst2": "92.0±0.4", "mnli": "83.5±0.1", "cola": "56.4±0.9",
             "mrpc": "89.0±1.0", "stsb": "88.9±0.7", "rte": "70.5±0.6", "qqp": "87.1±0.1"},
    "bitfit": {"qnli": "90.2±0.2", "sst2": "92.1±0.3", "mnli": "81.4±0.2", "cola": "58.8±0.5",
               "mrpc": "90.4±0.5", "stsb": "89.2±0.2", "rte": "72.3±0.9", "qqp": "84.0±0.2"},
    "qm2": {"qnli": "89.4±0.1", "sst2": "91.2±0.2", "mnli": "80.4±0.2", "cola": "57.4±0.8",
            "mrpc": "89.0±0.2", "stsb": "88.4±0.1", "rte": "68.6±0.6", "qqp": "83.7±0.2"},
    "m2": {"qnli": "88.9±0.1", "sst2": "91.1±0.3", "mnli": "79.9±0.3", "cola": "54.9±0.9",
           "mrpc": "87.9±0.6", "stsb": "88.2±0.1", "rte": "66.8±0.6", "qqp": "82.1±0.4"},
    "q": {"qnli": "86.8±0.1", "sst2": "89.6±0.2", "mnli": "74.4±0.3", "cola": "49.1±1.5",
          "mrpc": "84.4±0.2", "stsb": "85.6±0.1", "rte": "61.4±1.1", "qqp": "80.6±0.4"},
    "frozen": {"qnli": "68.7±0.3", "sst2": "81.7±0.1", "mnli": "42.4±0.1", "cola": "31.9±1.1",
               "mrpc": "81.1±0.1", "stsb": "71.4±0.1", "rte": "56.9±0.4", "qqp": "62.4±0.2"},
    "rand_uniform": {"qnli": "87.8±0.3", "sst2": "90.5±0.3", "mnli": "78.3±0.3", "cola": "54.1±1.0",
                     "mrpc": "84.3±0.3", "stsb": "87.2±0.4", "rte": "62.9±0.9", "qqp": "82.4±0.3"},
    "rand_row_col": {"qnli": "88.4±0.2", "sst2": "91.0±0.3", "mnli": "79.4±0.3", "cola": "53.4±0.6",
                     "mrpc": "88.0±0.7", "stsb": "87.9±0.2", "rte": "65.1±0.7", "qqp": "82.3±0.2"},
}


def read_results(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}); rerun the sweep to train that cell again.") from None


def fmt_cell(values: list[float], *, percent: bool = False) -> str:
    """Mean ± std ×100 of fractions (GLUE, tagging), or as recorded when already ``percent`` (SQuAD's EM/F1)."""
    scale = 1 if percent else 100
    mean = scale * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"  # one seed: no spread to report (a "±0.0" would claim one)
    return f"{mean:.1f}±{scale * statistics.stdev(values):.1f}"


# BERT-base PTB POS accuracy (Sec. 4, "Token-level tasks").
PAPER_POS = {"full": "97.2", "bitfit": "97.2"}


def paper_reference(runner: str, method: str, task: str, metric: str = "word accuracy") -> str | None:
    if runner == "pos":  # the paper tags POS only: no reference for chunking/NER span F1
        return PAPER_POS.get(method) if metric == "word accuracy" else None
    if runner == "squad":
        return None  # the paper gives Figure 2 only, no numbers
    return PAPER_GLUE.get(method, {}).get(task)


def _size(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def cost(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What the runs of one cell cost: trainable values (and share of the model), the median of their median step
    times, the bytes of the weights they saved (records without these fields, from older versions: '–')."""
    trainable = runs[0].get("trainable_params")
    total = runs[0].get("all_params")
    steps = [r["train_step_seconds"] for r in runs if r.get("train_step_seconds") is not None]
    saved = [r["saved_weights_bytes"] for r in runs if r.get("saved_weights_bytes") is not None]
    return {
        "trainable_params": trainable, "all_params": total,
        "trainable": f"{trainable:,d} ({100 * trainable / total:.3f}%)" if trainable and total else "–",
        "train_step_seconds": statistics.median(steps) if steps else None,
        "step_cell": f"{statistics.median(steps):.3f}" if steps else "–",
        "saved_weights_bytes": statistics.median(saved) if saved else None,
        "saved_cell": _size(statistics.median(saved)) if saved else "–",
    }


def summarize(output_dir: str, score: str = "best", runner: str = "glue") -> dict[str, Any]:
    """Collect every results.json below ``output_dir`` into a paper-style table (Markdown + JSON)."""
    root = Path(output_dir)
    runs: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    records: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    meta: dict[str, str] = {}
    for path in sorted(root.glob("*/*/lr*/seed*/results.json")):
        r = read_results(path)
        task, method = path.parts[-5], path.parts[-4]
        runs[(task, method)][float(r["learning_rate"])].append(float(r[score]))
        records[(task, method, float(r["learning_rate"]))].append(r)
        meta[task] = r["metric"]
    table: dict[str, dict[str, Any]] = defaultdict(dict)
    percent = runner == "squad"  # run_squad.py records EM/F1 in percent, the official script's scale
    for (task, method), by_lr in runs.items():
        best_lr = max(by_lr, key=lambda lr: statistics.fmean(by_lr[lr]))
        vals = by_lr[best_lr]
        table[method][task] = {
            "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n_seeds": len(vals), "best_lr": best_lr, "scores": vals, "cell": fmt_cell(vals, percent=percent),
            "all_lrs": {str(lr): fmt_cell(v, percent=percent) for lr, v in sorted(by_lr.items())},
            "paper": paper_reference(runner, method, task, meta[task]),
            **cost(records[(task, method, best_lr)]),
        }
    tasks = sorted(meta)
    # Rows: full fine-tuning, then the PEFT methods from most to fewest trained values, then the rest by name.
    order = ("full", "lora", "bitfit", "beft")
    table = dict(sorted(table.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))
    lines = [
        f"| method | {' | '.join(f'{t} ({meta[t]})' for t in tasks)} |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for method in table:
        cells = []
        for t in tasks:
            c = table[method].get(t)
            if c is None:
                cells.append("–")
            else:
                paper = f" [paper {c['paper']}]" if c["paper"] else ""
                cells.append(f"{c['cell']} (lr {c['best_lr']:g}, n={c['n_seeds']}){paper}")
        lines.append(f"| {method} | {' | '.join(cells)} |")
    lines += ["", "| method | task | trainable values (% of the model) | train step, s (median) | saved weights |",
              "|---|---|---|---|---|"]
    for method in table:
        for t in tasks:
            c = table[method].get(t)
            if c is not None:
                lines.append(f"| {method} | {t} | {c['trainable']} | {c['step_cell']} | {c['saved_cell']} |")
    md = "\n".join(lines) + "\n"
    atomic_write_text(root / "results.md", md)
    atomic_write_text(root / "results.json", json.dumps(table, indent=2))
    return {"markdown": md, "table": table}
