"""BitFit's old recipe vs the authors' constant-rate recipe vs full fine-tuning, per task, from the
committed run records: mean ± std over seeds of the best epoch's dev score (and of the best epoch
within the first ``epochs`` when a row caps it), the last epoch's training loss and its fixed
training-sample score.

    python benchmarks/recipe_table.py --json benchmarks/results/recipe-table.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

R = Path(__file__).parent / "results"
# (task, row label, record glob, epoch cap or None)
ROWS: list[tuple[str, str, str, int | None]] = [
    ("mrpc", "BitFit, linear (batch 16, 5 ep.)", "glue-main/mrpc/bitfit/lr0.001/seed*", None),
    ("mrpc", "BitFit, official (constant, batch 8, 5 ep.)", "recipe-long/mrpc/bitfit/lr0.001/seed*", 5),
    ("mrpc", "full FT, linear (batch 16, 5 ep.)", "glue-main/mrpc/full/lr5e-05/seed*", None),
    ("stsb", "BitFit, linear (batch 16, 5 ep.)", "glue-main/stsb/bitfit/lr0.001/seed*", None),
    ("stsb", "BitFit, official (constant, batch 8, 3 ep.)", "recipe-pilot-stsb/stsb/bitfit/lr0.001/seed*", None),
    ("stsb", "full FT, linear (batch 16, 5 ep.)", "glue-main/stsb/full/lr5e-05/seed*", None),
    ("cola", "BitFit, linear (batch 16, 5 ep.)", "glue-main/cola/bitfit/lr0.001/seed*", None),
    ("cola", "BitFit, official (constant, batch 8, 3 ep.)", "recipe-official/cola/bitfit/lr0.001/seed*", None),
    ("cola", "BitFit, official (constant, batch 8, 10 ep.)", "recipe-long/cola/bitfit/lr0.001/seed*", None),
    ("cola", "full FT, linear (batch 16, 5 ep.)", "glue-main/cola/full/lr5e-05/seed*", None),
    ("rte", "BitFit, linear (batch 16, 5 ep.)", "glue-main/rte/bitfit/lr0.001/seed*", None),
    ("rte", "BitFit, official (constant, batch 8, 3 ep.)", "recipe-official/rte/bitfit/lr0.001/seed*", None),
    ("rte", "full FT, linear (batch 16, 5 ep.)", "glue-main/rte/full/lr2e-05/seed*", None),
    ("wsj", "BitFit, linear (batch 16, 3 ep.)", "pos/wsj/bitfit/lr0.001/seed*", None),
    ("wsj", "BitFit, official (constant, batch 8, 3 ep.), lr 3e-3", "recipe-official/wsj/bitfit/lr0.003/seed*", None),
    ("wsj", "full FT, linear (batch 16, 3 ep.)", "pos/wsj/full/lr5e-05/seed*", None),
]


# The rate scan: seed 1, constant rate, batch 8, 3 epochs. (task, grid folder, probe record or None)
SCAN: list[tuple[str, str, str | None]] = [
    ("mrpc", "recipe-pilot/mrpc/bitfit", "recipe-probe/mrpc.json"),
    ("stsb", "recipe-pilot-stsb/stsb/bitfit", "recipe-probe/stsb.json"),
    ("cola", "recipe-official/cola/bitfit", "recipe-probe/cola.json"),
    ("wsj", "recipe-official/wsj/bitfit", None),
]


def scan_rows() -> list[dict]:
    """Per task and rate: best dev score, last-epoch training loss, last-layer [CLS] input dependence."""
    out = []
    for task, grid, probe in SCAN:
        probed = {}
        if probe and (R / probe).exists():
            for run in json.loads((R / probe).read_text())["runs"]:
                probed[Path(run["run"]).parent.name] = run["cls_input_dependence"][-1]
                if run["run"] == "base model":
                    probed["base"] = run["cls_input_dependence"][-1]
        for f in sorted((R / grid).glob("lr*/seed1/results.json"), key=lambda f: float(f.parts[-3][2:])):
            r = json.loads(f.read_text())
            losses = r.get("train_loss_history") or [{}]
            out.append({"task": task, "lr": r["learning_rate"], "record": str(f.relative_to(R)),
                        "epochs": [round(h["epoch"]) for h in r["history"]][-1],
                        "dev_best": round(100 * max(h[score_key(r)] for h in r["history"]), 2),
                        "last_train_loss": losses[-1].get("loss"),
                        "cls_input_dependence_last_layer": probed.get(f.parts[-3]),
                        "base_cls_input_dependence_last_layer": probed.get("base")})
    return out


def score_key(r: dict) -> str:
    return next(k for k in (f"eval_{r['metric']}", "eval_accuracy") if k in r["history"][0])


def summarise(records: list[dict], cap: int | None) -> dict:
    bests, losses, run_losses, samples = [], [], [], []
    for r in records:
        hist = [h for h in r["history"] if cap is None or h["epoch"] <= cap + 1e-9]
        bests.append(100 * max(h[score_key(r)] for h in hist))
        last = hist[-1]
        epoch_losses = {round(e["epoch"]): e["loss"] for e in r.get("train_loss_history", [])}
        losses.append(epoch_losses.get(round(last["epoch"])))
        # whole-run mean loss (older records hold only this); epochs are equally long
        kept = [v for e, v in epoch_losses.items() if cap is None or e <= cap]
        run_losses.append(statistics.mean(kept) if kept else r.get("train_loss"))
        samples.append(last.get(f"train_sample_{r['metric']}", last.get("train_sample_accuracy")))

    def ms(xs: list) -> str | None:
        xs = [x for x in xs if x is not None]
        if not xs:
            return None
        return f"{statistics.mean(xs):.1f}" + (f"±{statistics.stdev(xs):.1f}" if len(xs) > 1 else "")

    return {"n": len(records), "dev": ms(bests), "dev_per_seed": [round(b, 2) for b in bests],
            "run_mean_train_loss": ms([None if x is None else x * 100 for x in run_losses]),
            "last_train_loss": ms([None if x is None else x * 100 for x in losses]),
            "last_train_sample": ms([None if x is None else 100 * x for x in samples])}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the table's rows here")
    a = p.parse_args(argv)
    scan = scan_rows()
    print("| task | lr | dev (best of 3 epochs) | last-epoch train loss | last-layer [CLS] input dependence "
          "(base model) |")
    print("|---|---|---|---|---|")
    for row in scan:
        dep, base, loss = (row["cls_input_dependence_last_layer"], row["base_cls_input_dependence_last_layer"],
                           row["last_train_loss"])
        print(f"| {row['task']} | {row['lr']:g} | {row['dev_best']:.1f} | {'n/r' if loss is None else f'{loss:.3f}'} | "
              f"{'–' if dep is None else f'{dep:.3f} ({base:.3f})'} |")
    print()
    out = []
    print("| task | recipe (lr 1e-3 for BitFit) | n | dev (best epoch) | per seed | last-epoch train loss ×100 |"
          " last-epoch train-sample score | run-mean train loss ×100 |")
    print("|---|---|---|---|---|---|---|---|")
    for task, label, pattern, cap in ROWS:
        files = sorted(R.glob(pattern + "/results.json"))
        if not files:
            continue
        s = summarise([json.loads(f.read_text()) for f in files], cap)
        out.append({"task": task, "recipe": label, "records": [str(f.relative_to(R)) for f in files], **s})
        print(f"| {task} | {label} | {s['n']} | {s['dev']} | {' / '.join(map(str, s['dev_per_seed']))} | "
              f"{s['last_train_loss'] or 'n/r'} | {s['last_train_sample'] or 'n/r'} | {s['run_mean_train_loss']} |")
    if a.json:
        tmp = a.json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"scan": scan, "comparison": out}, indent=1) + "\n")
        os.replace(tmp, a.json)
    return out


if __name__ == "__main__":
    main()
